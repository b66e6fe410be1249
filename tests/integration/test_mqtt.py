"""EMS limits over MQTT against a real Mosquitto broker (#16; K14 external limits).

The broker is Debian's ``mosquitto`` started per test on 127.0.0.1 (tests/support/mosquitto.py); the
EMS is ``mosquitto_pub``, an MQTT client independent of ours. The controller side is the real
:class:`~mqtt.service.MqttService` over real :class:`~balancing.limits.LimitSources` in a real store;
only the limits' wall clock is ours to move, so that validity runs out without waiting for it.
Everything waits on what the service reports (``service.changed``), under ``fail_after``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.limits import LimitBounds, LimitSources
from mqtt.service import MqttService
from mqtt.settings import MqttSettings
from router.store import Store
from tests.support.certs import TestCa
from tests.support.mosquitto import Broker, needs_mosquitto, open_broker, pub, sub_one, sub_until

pytestmark = needs_mosquitto

TIMEOUT_S = 30.0
FAILSAFE_AMPERES = 6.0
PREFIX = "site1"


class WallClock:
    """The limits' wall clock, moved by the test."""

    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Controller:
    """The MQTT service with its limits, store and registry."""

    def __init__(self, service: MqttService, limits: LimitSources, registry: CollectorRegistry) -> None:
        self.service = service
        self.limits = limits
        self.registry = registry

    def count(self, outcome: str) -> float:
        return self.registry.get_sample_value("ocpp_lc_mqtt_messages_total", {"outcome": outcome}) or 0.0

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def phase_limits(self) -> tuple[tuple[float | None, str | None], ...]:
        effective = self.limits.effective()
        return tuple(zip(effective.phase_current_amperes, effective.phase_sources, strict=True))

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds, re-checking each time the service reports a change."""
        while not condition():
            await self.service.changed.wait()

    async def handled(self, outcome: str, count: float = 1) -> None:
        await self.until(lambda: self.count(outcome) >= count)


@asynccontextmanager
async def controller(broker: Broker, state_dir: Path, clock: WallClock, **mqtt: Any) -> AsyncIterator[Controller]:
    registry = CollectorRegistry()
    settings = MqttSettings.model_validate(
        {
            "host": "127.0.0.1",
            "port": broker.port,
            "topic_prefix": PREFIX,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 0.5,
            "status_min_interval_s": 0.1,
            **mqtt,
        }
    )
    with Store.open(state_dir) as store:
        limits = LimitSources(
            store.namespace("ems_limits"),
            LimitBounds(max_current_amperes=100.0, failsafe_current_amperes=FAILSAFE_AMPERES),
            config_limits=SiteLimits.uniform(63.0, None),
            clock=clock,
        )
        service = MqttService(
            settings,
            limits,
            registry,
            digests=store.namespace("mqtt_retained"),
            status_document=lambda: {"limit": limits.status()["phases"]},
            rng=random.Random(7),
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            yield Controller(service, limits, registry)
            nursery.cancel_scope.cancel()


def limit(amperes: float, **extra: Any) -> str:
    return json.dumps({"unit": "A", "limit": amperes, **extra})


def topic(source: str) -> str:
    return f"{PREFIX}/ems/{source}/limit"


async def test_a_retained_limit_is_applied_at_connect_and_an_expired_one_is_not(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TIMEOUT_S):
        async with open_broker(tmp_path) as broker:
            # Published (QoS 1, retained) before the controller connects.
            await pub(broker, topic("pv"), limit(20.0, valid_for_s=600), retain=True)
            past = (clock.now - timedelta(hours=1)).isoformat()
            await pub(broker, topic("tariff"), limit(10.0, valid_until=past), retain=True)
            async with controller(broker, tmp_path / "state", clock) as lc:
                await lc.handled("applied")
                await lc.handled("expired")
                assert lc.phase_limits() == ((20.0, "ems:pv"),) * 3
                assert [source.source for source in lc.limits.sources()] == ["pv"]
                assert lc.metric("ocpp_lc_mqtt_connected") == 1


async def test_bad_payloads_are_counted_logged_and_leave_the_limit_in_force(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = WallClock()
    caplog.set_level(logging.WARNING, "ocpp_lc.mqtt")
    with trio.fail_after(TIMEOUT_S):
        async with (
            open_broker(tmp_path) as broker,
            controller(broker, tmp_path / "state", clock, sources=["pv", "grid-ops"]) as lc,
        ):
            await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connected") == 1)
            await pub(broker, topic("pv"), limit(25.0))
            await lc.handled("applied")
            in_force = lc.phase_limits()
            version = lc.limits.version
            await pub(broker, topic("pv"), "twenty amperes please")
            await lc.handled("not_json")
            await pub(broker, topic("pv"), limit(5000.0))  # above [ems] max_current_amperes
            await pub(broker, topic("pv"), json.dumps({"unit": "V", "limit": 5}))  # wrong shape
            await pub(broker, topic("pv"), limit(-3.0))
            await lc.handled("invalid", 3)
            await pub(broker, topic("neighbour"), limit(1.0))  # not an accepted source
            await lc.handled("unknown_source")
            assert lc.phase_limits() == in_force == ((25.0, "ems:pv"),) * 3
            assert lc.limits.version == version
            messages = [record.getMessage() for record in caplog.records]
            assert any("not JSON" in message and "'pv'" in message for message in messages)
            assert any("must be at most 100" in message for message in messages)
            assert any("'neighbour'" in message or "neighbour" in message for message in messages)
            assert lc.count("applied") == 1


async def test_an_empty_payload_clears_the_source(tmp_path: Path) -> None:
    clock = WallClock()
    with trio.fail_after(TIMEOUT_S):
        async with open_broker(tmp_path) as broker, controller(broker, tmp_path / "state", clock) as lc:
            await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connected") == 1)
            await pub(broker, topic("pv"), limit(16.0), retain=True)
            await lc.handled("applied")
            assert lc.phase_limits() == ((16.0, "ems:pv"),) * 3
            await pub(broker, topic("pv"), b"", retain=True)  # also deletes the retained message
            await lc.handled("cleared")
            assert lc.phase_limits() == ((63.0, "config"),) * 3
            assert lc.limits.sources() == []


async def test_validity_runs_out_through_a_broker_outage_and_the_retained_limit_does_not_renew_it(
    tmp_path: Path,
) -> None:
    """K14: a source that stops talking falls to the failsafe; losing the broker changes nothing else."""
    clock = WallClock()
    with trio.fail_after(TIMEOUT_S):
        async with open_broker(tmp_path) as broker, controller(broker, tmp_path / "state", clock) as lc:
            await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connected") == 1)
            await pub(broker, topic("pv"), limit(20.0, valid_for_s=60), retain=True)
            await lc.handled("applied")
            assert lc.phase_limits() == ((20.0, "ems:pv"),) * 3

            await broker.terminate()  # it keeps the retained limit; the controller loses it
            await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connected") == 0)
            # Without the broker the limit holds as it was: not released, not unlimited.
            assert lc.phase_limits() == ((20.0, "ems:pv"),) * 3
            clock.now += timedelta(seconds=61)
            assert lc.phase_limits() == ((FAILSAFE_AMPERES, "failsafe:pv"),) * 3
            await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connection_attempts_total", outcome="unreachable") >= 2)

            await broker.start()
            # Back, with the retained limit: the same message again renews nothing (the EMS said
            # nothing new), so the failsafe holds ...
            await lc.handled("repeated")
            assert lc.metric("ocpp_lc_mqtt_connected") == 1
            assert lc.metric("ocpp_lc_mqtt_reconnects_total") == 1
            assert lc.phase_limits() == ((FAILSAFE_AMPERES, "failsafe:pv"),) * 3
            # ... until the EMS speaks again.
            await pub(broker, topic("pv"), limit(18.0, valid_for_s=60), retain=True)
            await lc.handled("applied", 2)
            assert lc.phase_limits() == ((18.0, "ems:pv"),) * 3


async def test_credentials_from_a_password_file_and_a_wrong_password_is_refused(tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    with trio.fail_after(TIMEOUT_S):
        await trio.run_process(["mosquitto_passwd", "-b", "-c", str(passwords), "lc", "right-horse-battery"])
        extra = ["allow_anonymous false", f"password_file {passwords}"]
        async with open_broker(tmp_path, extra=extra, client_args=("-u", "lc", "-P", "right-horse-battery")) as broker:
            async with controller(broker, tmp_path / "s1", WallClock(), username="lc", password="wrong") as lc:
                await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connection_attempts_total", outcome="refused") >= 1)
                assert lc.metric("ocpp_lc_mqtt_connected") == 0
                assert "wrong" not in str(lc.service.status())
            secret = tmp_path / "mqtt-password"
            secret.write_text("right-horse-battery\n")
            async with controller(broker, tmp_path / "s2", WallClock(), username="lc", password_file=str(secret)) as lc:
                await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connected") == 1)
                await pub(broker, topic("pv"), limit(12.0))
                await lc.handled("applied")
                assert "right-horse" not in str(lc.service.status())


async def test_tls_with_the_brokers_ca_connects_and_a_strange_ca_is_refused(tmp_path: Path) -> None:
    ca = TestCa(tmp_path, "MQTT Test CA")
    server = ca.issue("127.0.0.1", hosts=("127.0.0.1",))
    strange = TestCa(tmp_path, "Someone Else")
    extra = [f"cafile {ca.cert_file}", f"certfile {server.cert_file}", f"keyfile {server.key_file}"]
    with trio.fail_after(TIMEOUT_S):
        async with open_broker(tmp_path, extra=extra, client_args=("--cafile", str(ca.cert_file))) as broker:
            async with controller(broker, tmp_path / "s1", WallClock(), tls=True, ca_file=str(strange.cert_file)) as lc:
                await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connection_attempts_total", outcome="tls") >= 1)
                assert lc.metric("ocpp_lc_mqtt_connected") == 0
            async with controller(broker, tmp_path / "s2", WallClock(), tls=True, ca_file=str(ca.cert_file)) as lc:
                await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connected") == 1)
                await pub(broker, topic("pv"), limit(14.0))
                await lc.handled("applied")
                assert lc.phase_limits() == ((14.0, "ems:pv"),) * 3


async def test_status_and_availability_topics(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_broker(tmp_path) as broker:
            async with controller(broker, tmp_path / "state", WallClock()) as lc:
                await lc.until(lambda: lc.metric("ocpp_lc_mqtt_connected") == 1)
                assert await sub_one(broker, f"{PREFIX}/availability") == b"online"
                await pub(broker, topic("pv"), limit(21.0))
                await lc.handled("applied")
                # Published on change (at most every status_min_interval_s), retained.
                text = await sub_until(broker, f"{PREFIX}/status", lambda line: b"ems:pv" in line)
                assert json.loads(text)["limit"]["L1"] == {"limit_amperes": 21.0, "source": "ems:pv"}
                assert await sub_one(broker, f"{PREFIX}/status") == text  # retained
                assert lc.metric("ocpp_lc_mqtt_status_published_total") >= 2
            # Stopped: it says so itself before DISCONNECT (after which the broker drops the will).
            assert await sub_one(broker, f"{PREFIX}/availability") == b"offline"


def test_reconnect_waits_double_up_to_the_maximum_with_jitter() -> None:
    settings = MqttSettings(host="broker", reconnect_min_s=1.0, reconnect_max_s=30.0)
    store = MemoryKeyValue()
    limits = LimitSources(store, LimitBounds())
    service = MqttService(
        settings, limits, CollectorRegistry(), digests=MemoryKeyValue(), status_document=dict, rng=random.Random(1)
    )
    for failures, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (40, 30.0)):
        waits = [service.backoff_s(failures) for _ in range(50)]
        assert all(ceiling / 2 <= wait <= ceiling for wait in waits)
        assert len(set(waits)) > 1  # jitter: not in step with every other controller


class MemoryKeyValue:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value

    def delete(self, key: str) -> bool:
        return self.values.pop(key, None) is not None

    def items(self) -> dict[str, Any]:
        return dict(self.values)
