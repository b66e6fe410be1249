"""``ocpp-lc status`` and ``ocpp-lc limit set/clear`` against a running appliance, as a user runs them.

The appliance runs in-process on port 0; the CLI runs in a subprocess and talks to it over real HTTP on
loopback, so what is asserted is what the user reads and the exit code a script sees.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from router.app import App
from router.cli import _print_autonomy
from router.transport import WebSocket
from tests.integration.conftest import BOOT_REQUEST, OCPP201, STRICT_6_3, FakeCsms, Lab, call

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


async def test_status_shows_the_stations_served_locally_how_long_and_what_waits_for_the_csms(
    lab: Lab, csms: FakeCsms
) -> None:
    # Issue #12 (operators): the CSMS drops CP-L's connection and then refuses to take it back (503,
    # "unavailable": the controller keeps trying); CP-R stays relayed.
    app = await lab.start_app(csms.url, http={"token": TOKEN})
    local = await connected_station(lab, app, "CP-L")
    await connected_station(lab, app, "CP-R")
    autonomy = app.autonomy
    assert autonomy is not None
    auth = ("--url", url_of(app), "--token", TOKEN)
    _, before, _ = await ocpp_lc("status", *auth)

    csms.refuse_status = 503
    csms.close(await csms.connection("CP-L"), 1011, "CSMS failing")
    with trio.fail_after(CLI_TIMEOUT_S):
        while autonomy.mode_of("CP-L") != "local":
            changed = trio.Event()
            autonomy.on_change(changed.set)
            await changed.wait()
        # Answered by the controller and kept for the CSMS.
        event = {
            "eventType": "Updated",
            "timestamp": "2025-01-01T00:00:00Z",
            "triggerReason": "MeterValuePeriodic",
            "seqNo": 3,
            "transactionInfo": {"transactionId": "tx-9"},
        }
        reply = await call(local, "TransactionEvent", event)
        assert (reply[0], reply[2]) == (3, {})
    code, out, err = await ocpp_lc("status", *auth)
    _, json_out, _ = await ocpp_lc("status", "--json", *auth)

    assert "autonomy: every station relayed; kept for the CSMS: 0 messages, 0 B of 256.0 MiB" in before
    assert (code, err) == (0, "")
    assert "autonomy: 1 served locally (CSMS unreachable), 0 replaying; kept for the CSMS: 1 messages," in out
    [line] = [line for line in out.splitlines() if line.startswith("  CP-L  local")]
    assert re.fullmatch(r"  CP-L  local      without CSMS 0m\d\ds  1 queued", line), line
    assert "stations connected: 2" in out  # CP-L is still connected; CP-R is relayed, not listed as local
    assert not [line for line in out.splitlines() if line.startswith(("  CP-R  local", "  CP-R  replaying"))]
    view = json.loads(json_out)["autonomy"]
    [station] = view["stations"]
    assert (station["station_id"], station["mode"], station["queued_messages"]) == ("CP-L", "local", 1)
    assert 0 <= station["offline_for_s"] < CLI_TIMEOUT_S
    assert view["queue_messages"] == 1 and view["queue_bytes"] > 0


async def test_status_says_when_autonomy_is_off(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, http={"token": TOKEN}, autonomy=STRICT_6_3)

    code, out, _ = await ocpp_lc("status", "--url", url_of(app), "--token", TOKEN)

    assert code == 0
    assert "autonomy: off ([autonomy] enabled = false: a lost CSMS connection closes the station)" in out


def test_status_lists_replaying_stations_with_what_is_left(capsys: pytest.CaptureFixture[str]) -> None:
    # The printing alone, for a moment the integration test above cannot hold still: a replay under way.
    _print_autonomy(
        {
            "enabled": True,
            "stations": [
                {"station_id": "CP-1", "mode": "replaying", "offline_for_s": 3725.4, "queued_messages": 40},
                {"station_id": "CP-2", "mode": "local", "offline_for_s": 61.0, "queued_messages": 7},
            ],
            "queue_messages": 47,
            "queue_bytes": 3 * 1024 * 1024 + 512 * 1024,
            "queue_max_bytes": 268_435_456,
        }
    )
    assert capsys.readouterr().out.splitlines() == [
        "autonomy: 1 served locally (CSMS unreachable), 1 replaying; kept for the CSMS: 47 messages, "
        "3.5 MiB of 256.0 MiB",
        "  CP-1  replaying  without CSMS 1h02m05s  40 left to replay",
        "  CP-2  local      without CSMS 1m01s  7 queued",
    ]
