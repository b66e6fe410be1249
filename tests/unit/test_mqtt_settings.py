"""The [mqtt] table as an installer writes it (#16): off unless configured, problems in words, no secret echoed."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.config import ConfigError, parse_settings


def problems(mqtt: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"mqtt": mqtt})
    return str(caught.value)


def test_mqtt_is_off_unless_a_broker_is_configured() -> None:
    assert parse_settings({}).mqtt.enabled is False
    settings = parse_settings({"mqtt": {"host": "broker.local", "tls": True}}).mqtt
    assert settings.enabled and settings.broker_port == 8883
    assert parse_settings({"mqtt": {"host": "broker.local"}}).mqtt.broker_port == 1883


def test_the_password_comes_from_a_file_and_is_never_echoed(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret-in-a-file\n")
    settings = parse_settings({"mqtt": {"host": "b", "username": "lc", "password_file": str(secret)}}).mqtt
    assert settings.password_value() == "s3cret-in-a-file"
    assert "s3cret" not in repr(settings)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "[mqtt] password_file: is empty" in problems({"host": "b", "username": "lc", "password_file": str(empty)})
    text = problems({"host": "b", "password": "hunter2-hunter2"})
    assert "[mqtt] username: a password needs a username" in text and "hunter2" not in text


def test_inconsistent_tables_are_explained() -> None:
    assert "[mqtt] reconnect_max_s: must not be below reconnect_min_s" in problems(
        {"host": "b", "reconnect_min_s": 10, "reconnect_max_s": 5}
    )
    assert "[mqtt] topic_prefix:" in problems({"host": "b", "topic_prefix": "site/#"})
    assert "[mqtt] tls:" in problems({"host": "b", "ca_file": "/etc/hostname"})
    assert "unknown key 'hots'" in problems({"hots": "b"})
