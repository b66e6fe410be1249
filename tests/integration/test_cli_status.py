"""``ocpp-lc status`` and ``ocpp-lc limit set/clear`` against a running appliance, as a user runs them.

The appliance runs in-process on port 0; the CLI runs in a subprocess and talks to it over real HTTP on
loopback, so what is asserted is what the user reads and the exit code a script sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from router.app import App
from router.transport import WebSocket
from tests.integration.conftest import BOOT_REQUEST, OCPP201, FakeCsms, Lab, call

TOKEN = "cli-test-token-0123456789"
#: A Python start-up with typer, httpx and pydantic takes about a second; the machine may be busy.
CLI_TIMEOUT_S = 30.0
#: Nothing listens on the discard port of loopback.
UNREACHABLE_URL = "http://127.0.0.1:9"


async def ocpp_lc(*args: str) -> tuple[int, str, str]:
    """Run ``ocpp-lc ARGS`` in a subprocess; its exit code, stdout and stderr."""
    with trio.fail_after(CLI_TIMEOUT_S):
        done = await trio.run_process(
            [sys.executable, "-c", "from router.cli import main; main()", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def url_of(app: App) -> str:
    return f"http://127.0.0.1:{app.http_port}"


async def connected_station(lab: Lab, app: App, identity: str) -> WebSocket:
    station = await lab.station(app, identity)
    # Once the CSMS's answer came back through the pair, the link is registered and relaying.
    with trio.fail_after(CLI_TIMEOUT_S):
        await call(station, "BootNotification", BOOT_REQUEST)
    return station


async def test_status_lists_stations_own_identity_limits_and_upstream(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    await connected_station(lab, app, "CP-7")

    code, out, err = await ocpp_lc("status", "--url", url_of(app), "--token", TOKEN)
    json_code, json_out, _ = await ocpp_lc("status", "--url", url_of(app), "--token", TOKEN, "--json")

    assert (code, err) == (0, "")
    assert "stations connected: 1" in out
    [station_line] = [line for line in out.splitlines() if "CP-7" in line]
    assert OCPP201 in station_line
    assert "own identity LC01: off" in out
    assert "L1: none  source -" in out
    # Balancing runs; the station told it of no EVSE yet, so there is nothing to allocate.
    assert "balancing: 0 sessions" in out
    assert "L1: limit none, committed 0 A, measured 0 A, headroom none" in out
    assert f"upstream {csms.url}" in out
    assert json_code == 0
    document = json.loads(json_out)
    [station] = document["stations"]
    assert (station["station_id"], station["subprotocol"]) == ("CP-7", OCPP201)
    assert 0 <= station["connected_for_s"] < CLI_TIMEOUT_S
    assert document["own_identity"] == {"identity": "LC01", "connect": False}
    assert document["upstream"]["csms_url"] == csms.url


async def test_limit_set_shows_in_status_and_clear_releases_it(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    auth = ("--url", url_of(app), "--token", TOKEN)

    set_code, set_out, set_err = await ocpp_lc("limit", "set", "pv", "--amperes", "80", "--valid-for", "600", *auth)
    _, during, _ = await ocpp_lc("status", *auth)
    watts_code, watts_out, _ = await ocpp_lc("limit", "set", "grid", "--watts", "40000", *auth)
    _, with_power, _ = await ocpp_lc("status", *auth)
    clear_code, clear_out, _ = await ocpp_lc("limit", "clear", "pv", *auth)
    _, after, _ = await ocpp_lc("status", "--json", *auth)
    again_code, _, again_err = await ocpp_lc("limit", "clear", "pv", *auth)

    assert (set_code, set_err) == (0, "")
    assert set_out.startswith("limit pv set: 80 A, valid until ")
    assert "L2: 80 A  source ems:pv" in during
    assert "ems source pv: 80 A, valid until" in during
    assert watts_code == 0, watts_out
    assert "power: 40000 W  source ems:grid" in with_power
    assert (clear_code, clear_out.strip()) == (0, "limit pv cleared")
    limits = json.loads(after)["limits"]
    assert limits["phases"]["L1"] == {"limit_amperes": None, "source": None}
    assert [source["source"] for source in limits["sources"]] == ["grid"]
    # Clearing a source with no limit is refused (3), with the controller's reason.
    assert again_code == 3
    assert "this source has no limit" in again_err


async def test_invalid_limit_is_refused_with_the_reason_per_field(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    auth = ("--url", url_of(app), "--token", TOKEN)

    code, out, err = await ocpp_lc("limit", "set", "pv", "--amperes", "-5", *auth)
    neither_code, _, neither_err = await ocpp_lc("limit", "set", "pv", *auth)
    _, status_out, _ = await ocpp_lc("status", "--json", *auth)

    assert (code, out) == (3, "")
    assert "refused (HTTP 422)" in err
    assert "limit:" in err  # the per-field reason, on its own line
    assert neither_code == 2
    assert "exactly one of --amperes and --watts" in neither_err
    assert json.loads(status_out)["limits"]["sources"] == []


async def test_wrong_or_missing_token_exits_4(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})

    wrong = await ocpp_lc("status", "--url", url_of(app), "--token", "not-the-token-0123456789")
    missing = await ocpp_lc("limit", "set", "pv", "--amperes", "10", "--url", url_of(app))

    for code, out, err in (wrong, missing):
        assert (code, out) == (4, "")
        assert "wrong or missing token" in err


async def test_unreachable_controller_exits_1_naming_the_url() -> None:
    code, out, err = await ocpp_lc("status", "--url", UNREACHABLE_URL, "--token", TOKEN)

    assert (code, out) == (1, "")
    assert f"controller unreachable at {UNREACHABLE_URL}" in err


async def test_url_and_token_default_from_the_config(lab: Lab, csms: FakeCsms, tmp_path: Path) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    config = tmp_path / "ocpp-lc.toml"
    # A wildcard listen address is reached on loopback; the token is the configured one.
    config.write_text(f'[csms]\nurl = "{csms.url}"\n[http]\nlisten = "0.0.0.0:{app.http_port}"\ntoken = "{TOKEN}"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text('[http]\nlisten = "0.0.0.0:8080"\n')  # beyond loopback without a token

    code, out, err = await ocpp_lc("status", "--config", str(config))
    broken_code, broken_out, broken_err = await ocpp_lc("status", "--config", str(broken))

    assert (code, err) == (0, "")
    assert "stations connected: 0" in out
    assert (broken_code, broken_out) == (2, "")
    assert "token" in broken_err


def test_exit_codes_are_documented_in_help() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from router.cli import main; main()", "status", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert "4 unauthorized" in " ".join(done.stdout.split())
