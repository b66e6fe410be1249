"""The test peers talk to each other directly: proof that the harness works before it judges the controller.

No controller is involved here. Each test starts the CSMS peer and a station peer as subprocesses and
checks, through their events, what the controller tests will rely on.
"""

from __future__ import annotations

import base64

import pytest
import trio

from tests.support.peers import Peer, PeerExited, open_csms, open_station
from tests.support.schemas import SchemaError, validate_frame, validate_frames

#: Generous for two Python processes on a loaded two-core machine; a pass takes well under a second.
TIMEOUT_S = 15


def _url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ocpp"


async def _wait_booted(csms: Peer, station: Peer, identity: str) -> None:
    await station.wait_for_event("connected")
    await csms.wait_for_event("request", identity=identity, action="BootNotification")
    boot = await station.wait_for_event("boot")
    assert boot["payload"]["status"] == "Accepted"


async def test_boot_and_heartbeat_round_trip_is_schema_valid() -> None:
    async with open_csms() as (csms, port), open_station(_url(port), "CS01") as station:
        with trio.fail_after(TIMEOUT_S):
            connected = await csms.wait_for_event("connected", identity="CS01")
            assert connected["path"] == "/ocpp/CS01"
            assert connected["subprotocol"] == "ocpp2.0.1"
            await _wait_booted(csms, station, "CS01")

            reply = await station.call(action="Heartbeat", payload={})
            assert reply["event"] == "result"
            assert reply["payload"]["currentTime"].endswith("Z")
            await csms.wait_for_event("request", identity="CS01", action="Heartbeat")

    # Every frame either side saw is valid OCPP 2.0.1, results checked against their CALL's action.
    station_frames = station.frames()
    assert [validate_frame(f)[0] for f in station.frames(direction="out")] == [2, 2]
    validate_frames(station_frames)
    validate_frames(csms.frames(identity="CS01"))
    # The two ends saw the same frames, byte for byte and in the same order.
    assert csms.frames(identity="CS01", direction="in") == station.frames(direction="out")
    assert csms.frames(identity="CS01", direction="out") == station.frames(direction="in")


async def test_csms_call_is_answered_by_the_station() -> None:
    request = {
        "getVariableData": [
            {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}},
            {
                "component": {"name": "EVSE", "evse": {"id": 1}},
                "variable": {"name": "Power"},
                "attributeType": "MaxSet",
            },
        ]
    }
    async with open_csms() as (csms, port), open_station(_url(port), "CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await csms.wait_for_event("connected", identity="CS01")
            reply = await csms.call(identity="CS01", action="GetVariables", payload=request)
            assert reply["event"] == "result", reply
            results = reply["payload"]["getVariableResult"]
            assert [r["attributeValue"] for r in results] == ["42", "42"]
            assert results[1]["component"] == {"name": "EVSE", "evse": {"id": 1}}
            assert results[1]["attributeType"] == "MaxSet"
            seen = await station.wait_for_event("request", action="GetVariables")
            assert seen["payload"] == request

            validate_frames(station.frames())

            # An invalid request is refused by the peer before it reaches the wire...
            refused = await csms.call(identity="CS01", action="GetVariables", payload={})
            assert refused["event"] == "error" and "invalid request" in refused["error"]
            assert len(station.frames()) == 2
            # ...unless the test asks for it; the station's library then answers with a CALLERROR.
            forced = await csms.call(identity="CS01", action="GetVariables", payload={}, validate=False)
            assert forced["event"] == "error" and forced["code"] in ("ProtocolError", "FormatViolation")
            with pytest.raises(SchemaError, match="getVariableData"):
                validate_frame(station.frames(direction="in")[-1])
            validate_frame(station.frames(direction="out")[-1])


async def test_set_response_and_set_delay_steer_the_answers() -> None:
    async with open_csms() as (csms, port), open_station(_url(port), "CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await station.wait_for_event("connected")
            await csms.command(
                {
                    "cmd": "set_response",
                    "action": "Heartbeat",
                    "payload": {"currentTime": "$now", "customData": {"vendorId": "test"}},
                }
            )
            reply = await station.call(action="Heartbeat", payload={})
            assert reply["payload"]["customData"] == {"vendorId": "test"}
            assert reply["payload"]["currentTime"] != "$now"
            validate_frames(station.frames())

            await csms.command(
                {"cmd": "set_response", "action": "Heartbeat", "error": {"code": "SecurityError", "description": "no"}}
            )
            failed = await station.call(action="Heartbeat", payload={})
            assert failed["event"] == "error" and failed["code"] == "SecurityError"

            await station.command({"cmd": "set_delay", "action": "Reset", "seconds": 0.3})
            started = trio.current_time()
            reply = await csms.call(identity="CS01", action="Reset", payload={"type": "Immediate"})
            assert reply["payload"] == {"status": "Accepted"}
            assert trio.current_time() - started >= 0.3


async def test_refused_handshake_is_reported_with_its_status() -> None:
    async with open_csms("--reject-status", "401") as (csms, port), open_station(_url(port), "CS01") as station:
        with trio.fail_after(TIMEOUT_S):
            rejected = await station.wait_for_event("rejected")
            assert rejected["status"] == 401
            assert rejected["body"] == "rejected by test csms"
            refused = await csms.wait_for_event("refused")
            assert refused == {"event": "refused", "path": "/ocpp/CS01", "status": 401}
            exited = await station.wait_for_event("exited")
            assert exited["returncode"] == 0
    assert not any(e["event"] == "connected" for e in csms.events)


async def test_compression_and_basic_auth_are_visible_at_both_ends() -> None:
    async with (
        open_csms() as (csms, port),
        open_station(_url(port), "CS 01/a", "--no-boot", "--basic-auth-password", "s3cret") as deflating,
        open_station(_url(port), "CS02", "--no-boot", "--no-deflate") as plain,
    ):
        with trio.fail_after(TIMEOUT_S):
            station_side = await deflating.wait_for_event("connected")
            assert station_side["extensions"].startswith("permessage-deflate")
            csms_side = await csms.wait_for_event("connected", identity="CS 01/a")
            assert csms_side["path"] == "/ocpp/CS%2001%2Fa"
            assert csms_side["extensions"].startswith("permessage-deflate")
            assert csms_side["authorization"] == "Basic " + base64.b64encode(b"CS 01/a:s3cret").decode()
            assert csms_side["headers"]["authorization"] == csms_side["authorization"]

            assert (await plain.wait_for_event("connected"))["extensions"] is None
            csms_side = await csms.wait_for_event("connected", identity="CS02")
            assert csms_side["extensions"] is None
            assert csms_side["authorization"] is None


async def test_station_without_subprotocol_is_accepted_then_closed() -> None:
    async with (
        open_csms() as (csms, port),
        open_station(_url(port), "CS01", "--subprotocols", "", "--no-boot") as station,
    ):
        with trio.fail_after(TIMEOUT_S):
            connected = await csms.wait_for_event("connected", identity="CS01")
            assert connected["subprotocol"] is None
            await csms.wait_for_event("disconnected", identity="CS01")
            assert (await station.wait_for_event("connected"))["subprotocol"] is None
            closed = await station.wait_for_event("disconnected")
            assert closed["code"] == 1002


async def test_close_command_ends_the_station_and_the_harness_reports_it() -> None:
    async with open_csms() as (csms, port), open_station(_url(port), "CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await station.wait_for_event("connected")
            await csms.command({"cmd": "close", "identity": "CS01", "code": 1000, "reason": "bye"})
            closed = await station.wait_for_event("disconnected")
            assert (closed["code"], closed["reason"]) == (1000, "bye")
            await csms.wait_for_event("disconnected", identity="CS01")
            with pytest.raises(PeerExited, match="exited") as excinfo:
                await station.wait_for_event("never printed")
            assert "returncode 0" in str(excinfo.value)


def test_schema_errors_are_assertion_errors() -> None:
    with pytest.raises(AssertionError, match="vendorName"):
        validate_frame('[2,"1","BootNotification",{"reason":"PowerUp","chargingStation":{"model":"m"}}]')
    with pytest.raises(SchemaError, match="error code"):
        validate_frame('[4,"1","Oops","",{}]')
