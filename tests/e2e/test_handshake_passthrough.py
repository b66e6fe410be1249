"""The station's handshake reaches the CSMS whole, and a CSMS refusal reaches the station whole (#13.8).

Part 4 §6.1: the CSMS must not be able to tell that a station is relayed. Real peers on both sides:
the `ocpp` station on a `websockets` client sends a query string and end-to-end headers; the `ocpp`
CSMS on a `websockets` server reports the request it received, or refuses it with the headers a
station needs (WWW-Authenticate, Retry-After). The policy itself is router/passthrough.py.
"""

from __future__ import annotations

import base64

import pytest
import trio

from tests.e2e.conftest import OpenRelay
from tests.support.schemas import validate_frames

#: Real peers in subprocesses on a loaded two-core machine.
TIMEOUT_S = 20.0


async def test_query_string_and_end_to_end_headers_reach_the_csms(open_relay: OpenRelay) -> None:
    password = "Passthrough-password-16"
    station_args = [
        "--query",
        "site=7&token=a%2Fb",
        "--header",
        "User-Agent: ACME-Charger/1.2",
        "--header",
        "X-Vendor-Trace: 42",
        "--header",
        "Cookie: lb=node-2",
        "--basic-auth-password",
        password,
    ]
    async with open_relay() as relay, relay.station("CS01", *station_args) as station:
        with trio.fail_after(TIMEOUT_S):
            connected = await relay.csms.wait_for_event("connected", identity="CS01")
            boot = await station.wait_for_event("boot")
            assert boot["payload"]["status"] == "Accepted"

    assert connected["path"] == "/ocpp/CS01?site=7&token=a%2Fb"
    headers = connected["headers"]
    assert headers["user-agent"] == "ACME-Charger/1.2"
    assert headers["x-vendor-trace"] == "42"
    assert headers["cookie"] == "lb=node-2"
    assert headers["authorization"] == "Basic " + base64.b64encode(f"CS01:{password}".encode()).decode()
    # This hop's own handshake headers are the controller's, once each: not doubled by the station's.
    assert headers["host"] == f"127.0.0.1:{relay.csms_port}"
    assert headers["upgrade"] == "websocket"
    assert headers["connection"] == "Upgrade"
    assert headers["sec-websocket-version"] == "13"
    assert "," not in headers["sec-websocket-key"]
    assert headers["sec-websocket-protocol"] == "ocpp2.0.1"
    validate_frames(station.frames())


@pytest.mark.parametrize(
    ("status", "csms_headers", "expected"),
    [
        (
            401,
            ['WWW-Authenticate: Basic realm="csms", charset="UTF-8"', "X-Internal: do-not-leak"],
            [("www-authenticate", 'Basic realm="csms", charset="UTF-8"')],
        ),
        (503, ["Retry-After: 30"], [("retry-after", "30")]),
    ],
)
async def test_a_csms_refusal_reaches_the_station_with_its_challenge_or_retry_hint(
    open_relay: OpenRelay, status: int, csms_headers: list[str], expected: list[tuple[str, str]]
) -> None:
    csms_args = ["--reject-status", str(status)]
    for header in csms_headers:
        csms_args += ["--reject-header", header]
    async with open_relay(*csms_args) as relay, relay.station("CS01") as station:
        with trio.fail_after(TIMEOUT_S):
            refused = await station.wait_for(lambda e: e["event"] in ("connected", "rejected", "connect_failed"))
    assert refused["event"] == "rejected", refused
    assert refused["status"] == status
    assert "rejected by test csms" in refused["body"]
    received = [(name, value) for name, value in refused["headers"] if name in ("www-authenticate", "retry-after")]
    assert received == expected
    assert "x-internal" not in {name for name, _ in refused["headers"]}
    assert relay.metric("ocpp_lc_handshake_refusals_total", reason="csms_refused") == 1
