"""What an installer sees when the configuration file is right, and when it is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from balancing.site import (
    AllocationPolicy,
    CircuitConfig,
    EvseConfig,
    NodeLimits,
    SiteConfig,
    StationConfig,
    StationDefaults,
)
from meters.settings import MeterSettings, RegisterMap
from mqtt.settings import MqttSettings
from router.autonomy.settings import AutonomySettings
from router.config import (
    BalancingSettings,
    ConfigError,
    ConfigProblem,
    ControllerSettings,
    CsmsSettings,
    EmsSettings,
    FirmwareCacheSettings,
    HttpSettings,
    ListenAddress,
    LogSettings,
    RoutingSettings,
    Settings,
    StateSettings,
    StationsSettings,
    load_settings,
    parse_listen_address,
    parse_settings,
    parse_ws_url,
)
from router.tls import CsmsTlsSettings, StationTlsSettings
from tests.support.certs import TestCa

EXAMPLE_FILE = Path(__file__).resolve().parents[2] / "deploy" / "ocpp-lc.example.toml"

ISSUE_EXAMPLE = """\
[controller]
identity = "LC01"
[stations]
listen = "0.0.0.0:9000"
path = "/ocpp"
[csms]
url = "ws://csms.example.net:9000/ocpp"
[http]
listen = "127.0.0.1:8080"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ocpp-lc.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[ConfigError, Path]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return caught.value, path


def test_the_issue_example_parses(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ISSUE_EXAMPLE))

    assert settings.controller.identity == "LC01"
    assert settings.stations.address == ListenAddress("0.0.0.0", 9000)
    assert settings.stations.path == "/ocpp"
    assert settings.csms.address == ListenAddress("csms.example.net", 9000)
    assert settings.csms.path == "/ocpp"
    assert settings.csms.tls is False
    assert settings.http.address == ListenAddress("127.0.0.1", 8080)
    assert settings.http.token_value() is None


def test_an_empty_file_gives_a_runnable_loopback_config(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""))

    assert settings == Settings()
    assert settings.stations.address == ListenAddress("0.0.0.0", 9000)
    assert settings.stations.max_message_bytes == 1_048_576
    assert settings.stations.ping_interval_s == 60
    assert settings.csms.address == ListenAddress("127.0.0.1", 9100)
    assert settings.routing.lc_call_timeout_s == 30
    assert settings.routing.tracked_calls_max == 64
    assert settings.http.address.is_loopback
    assert (settings.log.level, settings.log.format) == ("info", "text")
    # The controller boots toward the CSMS under its own identity, with its state where systemd puts it.
    controller = settings.controller
    assert controller.connect is True
    assert (controller.vendor_name, controller.model, controller.serial_number) == ("ocpp-lc", "ocpp-lc", None)
    assert controller.basic_auth_password_value() is None
    assert (controller.heartbeat_interval_s, controller.message_timeout_s, controller.boot_retry_s) == (300, 30, 60)
    retry = (controller.retry_wait_minimum_s, controller.retry_random_range_s, controller.retry_repeat_times)
    assert retry == (5, 10, 5)
    assert settings.state.path == Path("/var/lib/ocpp-lc")
    # A silent EMS stops charging unless the installer sets a failsafe above 0.
    ems = settings.ems
    assert (ems.failsafe_current_amperes, ems.max_current_amperes, ems.default_validity_s) == (0, 10_000, 900)


def test_the_shipped_example_loads_without_problems() -> None:
    settings = load_settings(EXAMPLE_FILE)

    assert settings.csms.url == "ws://csms.example.net:9000/ocpp"


def test_the_shipped_example_documents_every_key() -> None:
    """A key added to the models but not to the example (or misspelled there) fails here."""
    documented: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE_FILE.read_text(encoding="utf-8").splitlines():
        if header := re.fullmatch(r"#? ?\[\[?([\w.]+)\]\]?", line):
            section = header[1]
            documented.setdefault(section, set())
        elif key := re.match(r"#? ?(\w+) = ", line):
            documented[section].add(key[1])
    sections: dict[str, type[BaseModel]] = {
        "controller": ControllerSettings,
        "stations": StationsSettings,
        "csms": CsmsSettings,
        "routing": RoutingSettings,
        "http": HttpSettings,
        "state": StateSettings,
        "firmware": FirmwareCacheSettings,
        "ems": EmsSettings,
        "site": SiteConfig,
        "balancing": BalancingSettings,
        "autonomy": AutonomySettings,
        "log": LogSettings,
        "meters": MeterSettings,
        "mqtt": MqttSettings,
    }
    assert set(sections) == set(Settings.model_fields)
    tables = {"security", "grid", "circuits", "stations", "defaults", "policy", "registers"}
    expected = {name: set(model.model_fields) - tables for name, model in sections.items()}
    expected |= {"site.grid": set(NodeLimits.model_fields), "site.defaults": set(StationDefaults.model_fields)}
    expected |= {"site.policy": set(AllocationPolicy.model_fields), "site.circuits": set(CircuitConfig.model_fields)}
    expected |= {"site.stations": set(StationConfig.model_fields) - {"evses"}}
    expected |= {"site.stations.evses": set(EvseConfig.model_fields)}
    expected |= {"stations.security": set(StationTlsSettings.model_fields)}
    expected |= {"csms.security": set(CsmsTlsSettings.model_fields)}
    expected |= {"meters.registers": set(RegisterMap.model_fields)}
    assert documented == expected


def test_whole_numbers_are_accepted_for_durations(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, "[stations]\nhandshake_timeout_s = 2\nping_interval_s = 0\n"))

    assert settings.stations.handshake_timeout_s == 2.0
    assert settings.stations.ping_interval_s == 0


@pytest.mark.parametrize(
    ("section", "key", "toml_value", "expected"),
    [
        ("controller", "identity", '"' + "L" * 49 + '"', "must be from 1 to 48 characters, got 49 characters"),
        ("controller", "identity", '""', "must be from 1 to 48 characters, got 0 characters"),
        ("controller", "identity", '"LC:01"', "must not contain ':'"),
        ("controller", "identity", '"LC 01"', "only letters, digits and *-_=+|@."),
        ("stations", "path", '"ocpp"', "must start with '/'"),
        ("stations", "path", '"/ocpp/"', "not end with '/'"),
        ("stations", "path", '"/ocpp?x=1"', "no '?', '#'"),
        ("stations", "max_message_bytes", "10", "must be from 1024 to 67108864 bytes, got 10"),
        ("stations", "handshake_timeout_s", "0", "must be from 0.1 to 300 seconds, got 0"),
        ("stations", "handshake_timeout_s", '"abc"', "must be a number, got 'abc'"),
        ("stations", "handshake_timeout_s", '"10"', "must be a number, got '10'"),
        ("stations", "ping_interval_s", "0.5", "must be 0 (no pings) or from 1 to 86400 seconds, got 0.5"),
        ("stations", "ping_interval_s", "86401", "must be 0 (no pings) or from 1 to 86400 seconds, got 86401"),
        ("stations", "ping_timeout_s", "nan", "must be a finite number, got nan"),
        ("stations", "ping_timeout_s", "601", "must be from 1 to 600 seconds, got 601"),
        ("stations", "max_stations", "0", "must be from 1 to 100000, got 0"),
        ("stations", "max_stations", "2.5", "must be a whole number, got 2.5"),
        ("stations", "max_stations", "true", "must be a whole number, got true"),
        ("stations", "listen", "9000", "must be a string in quotes, got 9000"),
        ("csms", "connect_timeout_s", "301", "must be from 0.1 to 300 seconds, got 301"),
        ("csms", "ping_interval_s", "-1", "must be 0 (no pings) or from 1 to 86400 seconds, got -1"),
        ("csms", "ping_timeout_s", "0", "must be from 1 to 600 seconds, got 0"),
        ("routing", "lc_call_timeout_s", "0.5", "must be from 1 to 600 seconds, got 0.5"),
        ("routing", "csms_call_hold_s", "3601", "must be from 1 to 3600 seconds, got 3601"),
        ("routing", "observer_queue", "0", "must be from 1 to 1000000, got 0"),
        ("routing", "shutdown_grace_s", "-1", "must be from 0 to 120 seconds, got -1"),
        ("routing", "tracked_calls_max", "10001", "must be from 1 to 10000, got 10001"),
        ("ems", "failsafe_current_amperes", "-1", "must be from 0 to 10000, got -1"),
        ("ems", "max_current_amperes", "0", "must be from 1 to 10000, got 0"),
        ("ems", "default_validity_s", "604801", "must be from 1 to 604800 seconds, got 604801"),
        ("controller", "connect", '"yes"', "must be true or false, got 'yes'"),
        ("controller", "vendor_name", '"' + "V" * 51 + '"', "must be from 1 to 50 characters, got 51 characters"),
        ("controller", "model", '""', "must be from 1 to 20 characters, got 0 characters"),
        ("controller", "model", '"' + "M" * 21 + '"', "must be from 1 to 20 characters, got 21 characters"),
        ("controller", "serial_number", '"' + "S" * 26 + '"', "must be from 1 to 25 characters, got 26 characters"),
        ("controller", "heartbeat_interval_s", "0", "must be from 1 to 86400 seconds, got 0"),
        ("controller", "heartbeat_interval_s", "2.5", "must be a whole number, got 2.5"),
        ("controller", "message_timeout_s", "601", "must be from 1 to 600 seconds, got 601"),
        ("controller", "boot_retry_s", "0.5", "must be from 1 to 3600 seconds, got 0.5"),
        ("controller", "retry_wait_minimum_s", "0", "must be from 1 to 3600 seconds, got 0"),
        ("controller", "retry_random_range_s", "-1", "must be from 0 to 3600 seconds, got -1"),
        ("controller", "retry_repeat_times", "17", "must be from 0 to 16, got 17"),
        ("state", "dir", '"var/lib/ocpp-lc"', "must be an absolute path, e.g. '/var/lib/ocpp-lc'"),
        ("state", "dir", '""', "must be from 1 to 4096 characters, got 0 characters"),
        ("state", "dir", "5", "must be a string in quotes, got 5"),
        ("log", "level", '"verbose"', "must be one of 'debug', 'info', 'warning' or 'error', got 'verbose'"),
        ("log", "format", '"xml"', "must be one of 'text' or 'json', got 'xml'"),
    ],
)
def test_a_bad_value_names_the_key_and_what_is_allowed(
    tmp_path: Path, section: str, key: str, toml_value: str, expected: str
) -> None:
    error, path = problems_of(tmp_path, f"[{section}]\n{key} = {toml_value}\n")

    assert [problem.location for problem in error.problems] == [f"{section}.{key}"]
    assert expected in error.problems[0].message
    assert str(error) == f"{path}: [{section}] {key}: {error.problems[0].message}"
    assert error.path == path


def test_an_ems_failsafe_above_the_ems_maximum_is_refused(tmp_path: Path) -> None:
    error, _ = problems_of(tmp_path, "[ems]\nmax_current_amperes = 250\nfailsafe_current_amperes = 300\n")

    assert [problem.location for problem in error.problems] == ["ems.failsafe_current_amperes"]
    assert "must not exceed [ems] max_current_amperes (250.0), got 300.0" in error.problems[0].message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    error, path = problems_of(
        tmp_path,
        '[controller]\nidentity = "LC:01"\n'
        '[stations]\nlisten = "9000"\nmax_stations = 0\n'
        '[csms]\nurl = "http://csms.example.net"\n'
        '[log]\nlevel = "loud"\n',
    )

    assert [problem.location for problem in error.problems] == [
        "controller.identity",
        "stations.listen",
        "stations.max_stations",
        "csms.url",
        "log.level",
    ]
    lines = str(error).splitlines()
    assert len(lines) == 5
    assert all(line.startswith(f"{path}: [") for line in lines)
    assert lines[3] == f"{path}: [csms] url: must be a ws:// or wss:// URL, got 'http://csms.example.net'"


def test_a_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    error, path = problems_of(tmp_path, '[controller]\nidentity = "LC01"\n[stations]\npath = /ocpp\n')

    assert error.problems == [
        ConfigProblem("", "TOML syntax error at line 4, column 8: Invalid value (text needs double quotes)")
    ]
    assert str(error).startswith(f"{path}: TOML syntax error at line 4")


def test_a_missing_file_is_one_problem_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(caught.value) == f"{path}: file not found"


def test_a_file_that_is_not_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ocpp-lc.toml"
    path.write_bytes(b'[controller]\nidentity = "\xff"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(caught.value) == f"{path}: is not UTF-8 text"


@pytest.mark.parametrize(
    ("text", "location", "expected"),
    [
        ('[stations]\nlisen = "0.0.0.0:9000"\n', "stations.lisen", "unknown key 'lisen'; did you mean 'listen'?"),
        ('[stations]\nurl = "ws://x/ocpp"\n', "stations.url", "unknown key 'url'; it belongs in [csms]"),
        ('[stationz]\nlisten = "0.0.0.0:9000"\n', "stationz", "unknown section [stationz]; did you mean 'stations'?"),
        ("[metrics]\nport = 9\n", "metrics", "unknown section [metrics] (known sections: controller, stations"),
        ('identity = "LC01"\n', "identity", "unknown key 'identity' outside any section; it belongs in [controller]"),
        ("stations = 5\n", "stations", "must be a table"),
    ],
)
def test_unknown_keys_and_sections_are_named_with_suggestions(
    tmp_path: Path, text: str, location: str, expected: str
) -> None:
    error, _ = problems_of(tmp_path, text)

    assert [problem.location for problem in error.problems] == [location]
    assert expected in error.problems[0].message


def test_an_unknown_key_lists_the_known_keys(tmp_path: Path) -> None:
    error, path = problems_of(tmp_path, "[log]\ncolour = true\n")

    assert str(error) == f"{path}: [log] colour: unknown key 'colour' (known keys: level, format)"


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("0.0.0.0:9000", ListenAddress("0.0.0.0", 9000), "0.0.0.0:9000"),
        ("[::1]:9000", ListenAddress("::1", 9000), "[::1]:9000"),
        ("[::]:9000", ListenAddress("::", 9000), "[::]:9000"),
        ("localhost:0", ListenAddress("localhost", 0), "localhost:0"),
        ("lc-01.example.net:65535", ListenAddress("lc-01.example.net", 65535), "lc-01.example.net:65535"),
    ],
)
def test_listen_address_forms_that_work(text: str, address: ListenAddress, shown: str) -> None:
    assert parse_listen_address(text) == address
    assert str(address) == shown
    assert parse_settings({"stations": {"listen": text}}).stations.address == address


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9000", "must be host:port, e.g. '0.0.0.0:9000' or '[::1]:9000', got '9000'"),
        ("host:99999", "port must be a number from 0 to 65535, got '99999'"),
        ("host:", "port must be a number from 0 to 65535, got ''"),
        ("host:-1", "port must be a number from 0 to 65535, got '-1'"),
        ("::1:9000", "an IPv6 address must be in brackets"),
        (":9000", "needs a host before the port"),
        ("[lc01]:9000", "with an IPv6 address"),
        ("[::1]9000", "'[ipv6-address]:port'"),
        ("300.1.1.1:9000", "'300.1.1.1' is not a host name or an IP address"),
        ("bad_host:9000", "'bad_host' is not a host name"),
    ],
)
def test_listen_address_forms_that_are_refused(text: str, expected: str) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)):
        parse_listen_address(text)
    with pytest.raises(ConfigError) as caught:
        parse_settings({"stations": {"listen": text}}, source="lc.toml")
    assert str(caught.value).startswith("lc.toml: [stations] listen: ")
    assert expected in caught.value.problems[0].message


@pytest.mark.parametrize(
    ("url", "address", "path", "tls"),
    [
        ("ws://csms.example.net:9000/ocpp", ListenAddress("csms.example.net", 9000), "/ocpp", False),
        ("wss://csms.example.net/ocpp/v201", ListenAddress("csms.example.net", 443), "/ocpp/v201", True),
        ("ws://10.0.0.5", ListenAddress("10.0.0.5", 80), "", False),
        ("wss://[2001:db8::1]:8443/ocpp", ListenAddress("2001:db8::1", 8443), "/ocpp", True),
        ("wss://[2001:db8::1]/ocpp", ListenAddress("2001:db8::1", 443), "/ocpp", True),
    ],
)
def test_csms_url_forms_that_work(url: str, address: ListenAddress, path: str, tls: bool) -> None:
    security = {"security": {"security_profile": 2}} if tls else {}  # wss:// means profile 2 or 3
    csms = parse_settings({"csms": {"url": url, **security}}).csms

    assert (csms.address, csms.path, csms.tls) == (address, path, tls)
    assert parse_ws_url(url) == (address, path, tls)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://csms.example.net/ocpp", "must be a ws:// or wss:// URL, got 'http://csms.example.net/ocpp'"),
        ("csms.example.net:9000/ocpp", "must be a ws:// or wss:// URL"),
        ("ws:/csms.example.net/ocpp", "must be a ws:// or wss:// URL"),
        ("ws://csms.example.net/ocpp/", "must not end with '/'"),
        ("ws://csms.example.net/ocpp?key=1", "must not have a query ('?')"),
        ("ws://csms.example.net/ocpp#x", "fragment ('#')"),
        ("ws://user:secret@csms.example.net/ocpp", "user name ('@')"),
        ("ws:///ocpp", "needs a host"),
        ("ws://csms.example.net:0/ocpp", "port must be a number from 1 to 65535, got 0"),
        ("ws://csms.example.net:70000/ocpp", "port must be a number from 0 to 65535, got '70000'"),
        ("ws://csms_example/ocpp", "'csms_example' is not a host name"),
    ],
)
def test_csms_url_forms_that_are_refused(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"csms": {"url": url}}, source="lc.toml")

    assert [problem.location for problem in caught.value.problems] == ["csms.url"]
    assert expected in caught.value.problems[0].message
    assert str(caught.value).startswith("lc.toml: [csms] url: ")


def test_http_beyond_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    error, path = problems_of(tmp_path, '[http]\nlisten = "0.0.0.0:8080"\n')

    assert str(error) == (
        f"{path}: [http] listen: serving beyond loopback needs [http] token (the EMS and admin API must not be open)"
    )


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.0.0.2:8080", "localhost:8080", "[::1]:8080"])
def test_http_on_loopback_needs_no_token(listen: str) -> None:
    http = parse_settings({"http": {"listen": listen}}).http

    assert http.address.is_loopback
    assert http.token_value() is None


def test_http_beyond_loopback_with_a_token_is_served_and_the_token_stays_out_of_logs(tmp_path: Path) -> None:
    token = "s3cret-token-0123456789"
    settings = load_settings(write(tmp_path, f'[http]\nlisten = "0.0.0.0:8080"\ntoken = "{token}"\n'))

    assert settings.http.token_value() == token
    assert token not in repr(settings)
    assert token not in str(settings)


@pytest.mark.parametrize("token", ["short", "has a space in the middle", "tab\tinside-the-token"])
def test_a_weak_or_malformed_token_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"http": {"token": token}})

    assert [problem.location for problem in caught.value.problems] == ["http.token"]
    assert "16 to 4096 printable ASCII characters without spaces" in str(caught.value)
    assert token not in str(caught.value)


def test_stations_and_http_on_the_same_port_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"stations": {"listen": "0.0.0.0:8080"}}, source="lc.toml")

    assert str(caught.value) == "lc.toml: [http] listen: uses port 8080, like [stations] listen; pick another port"


def test_port_zero_for_both_servers_is_allowed_for_tests() -> None:
    settings = parse_settings({"stations": {"listen": "127.0.0.1:0"}, "http": {"listen": "127.0.0.1:0"}})

    assert settings.stations.address.port == settings.http.address.port == 0


def test_the_controller_as_a_station_and_its_state_directory(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            '[controller]\nconnect = false\nvendor_name = "Acme Energy"\nmodel = "LC-7"\nserial_number = "SN-0042"\n'
            "heartbeat_interval_s = 60\nmessage_timeout_s = 10\nboot_retry_s = 2.5\n"
            "retry_wait_minimum_s = 1\nretry_random_range_s = 0\nretry_repeat_times = 0\n"
            '[state]\ndir = "/srv/ocpp-lc/state"\n',
        )
    )

    controller = settings.controller
    assert controller.connect is False
    assert (controller.vendor_name, controller.model, controller.serial_number) == ("Acme Energy", "LC-7", "SN-0042")
    assert (controller.heartbeat_interval_s, controller.message_timeout_s, controller.boot_retry_s) == (60, 10, 2.5)
    retry = (controller.retry_wait_minimum_s, controller.retry_random_range_s, controller.retry_repeat_times)
    assert retry == (1, 0, 0)
    assert settings.state.path == Path("/srv/ocpp-lc/state")


def test_the_basic_auth_password_is_used_but_never_shown(tmp_path: Path) -> None:
    password = "Lc01-pa55:word|16+"
    settings = load_settings(write(tmp_path, f'[controller]\nbasic_auth_password = "{password}"\n'))

    assert settings.controller.basic_auth_password_value() == password
    assert password not in repr(settings)
    assert password not in str(settings)


@pytest.mark.parametrize("password", ["only-15-chars-x", "x" * 41, "has a space-in-it-here", "no#hash-allowed-here"])
def test_a_bad_basic_auth_password_is_refused_without_echoing_it(password: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"controller": {"basic_auth_password": password}}, source="lc.toml")

    assert [problem.location for problem in caught.value.problems] == ["controller.basic_auth_password"]
    assert "16 to 40 characters: letters, digits and *-_=:+|@." in str(caught.value)  # A00.FR.205
    assert password not in str(caught.value)


def test_a_basic_auth_password_under_security_profile_3_is_refused(tmp_path: Path) -> None:
    client = TestCa(tmp_path, "test CSO CA").issue("LC01", file_stem="controller-station-role")
    csms = {
        "url": "wss://csms.example.net/ocpp",
        "security": {"security_profile": 3, "cert_file": str(client.cert_file), "key_file": str(client.key_file)},
    }
    assert parse_settings({"csms": csms}).csms.security.security_profile == 3
    with pytest.raises(ConfigError) as caught:
        parse_settings({"controller": {"basic_auth_password": "a" * 16}, "csms": csms}, source="lc.toml")

    assert str(caught.value) == (
        "lc.toml: [controller] basic_auth_password: is not used with [csms.security] security_profile 3 "
        "(the client certificate identifies the controller): remove it"
    )


def test_firmware_ca_file_must_be_a_readable_absolute_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"firmware": {"ca_file": str(tmp_path / "missing.pem")}})
    assert any(
        problem.location == "firmware.ca_file" and "no such file" in problem.message
        for problem in caught.value.problems
    )
    with pytest.raises(ConfigError):
        parse_settings({"firmware": {"ca_file": "relative/ca.pem"}})
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    assert parse_settings({"firmware": {"ca_file": str(bundle)}}).firmware.ca_file == str(bundle)
