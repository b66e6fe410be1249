"""Transparent routing end to end (Part 4 §6): independent peers on both sides of the whole appliance.

The station and the CSMS are the PyPI `ocpp` library on `websockets`, each in its own process
(`tests/peers/`); the appliance runs in-process (`run_app`, port 0), so tests can also reach into it
for what only the controller can do (`link.call`) and for its metrics. What these tests prove is
what a CSMS operator or a station would notice: the same bytes arrive in the same order, the
handshake outcome is the CSMS's own, the controller's calls never disturb the OCPP-J call discipline
and never leak upstream, and a close on one side is a close on the other.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from router.link import CallRejected, CallTimeout, LinkError, StationLink
from tests.support.frames import relayed
from tests.support.peers import Event, Peer
from tests.support.schemas import validate_call, validate_frame, validate_frames

if TYPE_CHECKING:
    from tests.e2e.conftest import OpenRelay, Relay

#: Per test: two Python peer processes and the appliance on a loaded two-core machine; a pass takes
#: a few seconds, mostly process start-up.
TIMEOUT_S = 20

#: "Within a few seconds" for one side's close to reach the other (Part 4 §6.3).
CLOSE_PROPAGATION_S = 5

#: How long the station sits on a call in the serialisation tests: long enough that a second call
#: sent too early would arrive well inside the window.
SLOW_ANSWER_S = 1.0

LC_ID = re.compile(r"lc~[0-9a-f]{32}")
CALL, CALLRESULT, CALLERROR = 2, 3, 4

GET_VARIABLES = {
    "getVariableData": [
        {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}},
        {"component": {"name": "EVSE", "evse": {"id": 1}}, "variable": {"name": "Power"}, "attributeType": "MaxSet"},
    ]
}


# -- helpers -----------------------------------------------------------------------------------


def now() -> str:
    """The current time as an OCPP timestamp (RFC 3339, UTC, milliseconds)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tx_default_profile(limit_amperes: float = 16.0) -> dict[str, Any]:
    """A SetChargingProfile request the controller might send: a TxDefaultProfile on EVSE 1."""
    payload = {
        "evseId": 1,
        "chargingProfile": {
            "id": 9001,
            "stackLevel": 0,
            "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute",
            "chargingSchedule": [
                {
                    "id": 1,
                    "startSchedule": now(),
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit_amperes, "numberPhases": 3}],
                }
            ],
        },
    }
    validate_call("SetChargingProfile", payload)  # the test's own request must be beyond reproach
    return payload


def wire_log(peer: Peer) -> list[tuple[str, list[Any]]]:
    """(direction, parsed frame) of each frame a peer saw, in wire order.

    Ordered by the peer's own timestamps: an outgoing frame's is taken before sending, an incoming
    one's after receiving, so anything the far side sent in reaction to a frame sorts after it.
    """
    frames = [e for e in peer.events if e.get("event") == "frame"]
    frames.sort(key=lambda e: float(e["t"]))
    return [(str(e["direction"]), json.loads(e["data"])) for e in frames]


def assert_one_call_at_a_time(log: list[tuple[str, list[Any]]]) -> None:
    """Part 4 §4.1.1 at the station: no CALL arrives while an earlier incoming CALL is unanswered."""
    outstanding: list[Any] | None = None
    for direction, frame in log:
        if direction == "in" and frame[0] == CALL:
            assert outstanding is None, (
                f"{frame[2]} ({frame[1]}) reached the station while {outstanding[2]} ({outstanding[1]}) was unanswered"
            )
            outstanding = frame
        elif direction == "out" and frame[0] in (CALLRESULT, CALLERROR) and outstanding and frame[1] == outstanding[1]:
            outstanding = None


def incoming_calls(peer: Peer, action: str) -> list[str]:
    """The raw CALL frames of `action` a peer received, in order."""
    frames = [(text, json.loads(text)) for text in peer.frames(direction="in")]
    return [text for text, frame in frames if frame[0] == CALL and frame[2] == action]


def answer_to(peer: Peer, message_id: str) -> str:
    """The one frame a peer sent in answer to `message_id`."""
    frames = [(text, json.loads(text)) for text in peer.frames(direction="out")]
    (text,) = [text for text, frame in frames if frame[0] != CALL and frame[1] == message_id]
    return text


async def round_trip(station: Peer) -> None:
    """A Heartbeat through the controller and back.

    It proves the pair is up and relaying, that the controller is done with whatever the station
    sent before (one pump reads the station's frames in order), and that the station has applied
    every command written before (it reads stdin in order).
    """
    reply = await station.call(action="Heartbeat", payload={})
    assert reply["event"] == "result", reply


def live_link(relay: Relay, station_id: str) -> StationLink:
    link = relay.app.links.get(station_id)
    assert link is not None, f"{station_id} is not relayed"
    return link


def established_connections_to(port: int) -> int:
    """TCP connections on this host in state ESTABLISHED towards 127.0.0.1:`port` (Linux /proc)."""
    count = 0
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            remote_port, state = int(fields[2].rsplit(":", 1)[1], 16), fields[3]
            if remote_port == port and state == "01":  # 01: TCP_ESTABLISHED
                count += 1
    return count


async def csms_call_later(csms: Peer, ref: str, identity: str, action: str, payload: dict[str, Any]) -> None:
    """Have the CSMS send a call without waiting for its answer (collect it with `csms_answer`)."""
    await csms.command({"cmd": "call", "ref": ref, "identity": identity, "action": action, "payload": payload})


async def csms_answer(csms: Peer, ref: str) -> Event:
    return await csms.wait_for(lambda e: e.get("event") in ("result", "error") and e.get("ref") == ref)


# -- 1. transparent relaying -------------------------------------------------------------------


async def test_traffic_in_both_directions_is_relayed_byte_for_byte_and_answered(open_relay: OpenRelay) -> None:
    token = {"idToken": "04A1B2C3D4", "type": "ISO14443"}
    station_calls: list[tuple[str, dict[str, Any]]] = [
        ("Heartbeat", {}),
        ("StatusNotification", {"timestamp": now(), "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1}),
        (
            "TransactionEvent",
            {
                "eventType": "Started",
                "timestamp": now(),
                "triggerReason": "Authorized",
                "seqNo": 0,
                "transactionInfo": {"transactionId": "tx-1", "chargingState": "EVConnected"},
                "idToken": token,
                "evse": {"id": 1, "connectorId": 1},
            },
        ),
        (
            "TransactionEvent",
            {
                "eventType": "Updated",
                "timestamp": now(),
                "triggerReason": "MeterValuePeriodic",
                "seqNo": 1,
                "transactionInfo": {"transactionId": "tx-1", "chargingState": "Charging"},
                "meterValue": [
                    {"timestamp": now(), "sampledValue": [{"value": 7200.5, "measurand": "Power.Active.Import"}]}
                ],
            },
        ),
        (
            "TransactionEvent",
            {
                "eventType": "Ended",
                "timestamp": now(),
                "triggerReason": "EVCommunicationLost",
                "seqNo": 2,
                "transactionInfo": {"transactionId": "tx-1", "stoppedReason": "EVDisconnected"},
            },
        ),
    ]
    for action, payload in station_calls:
        validate_call(action, payload)
    start = {"idToken": token, "remoteStartId": 7, "evseId": 1}

    async with open_relay() as relay, relay.station("CS01") as station:
        with trio.fail_after(TIMEOUT_S):
            assert (await station.wait_for_event("connected"))["subprotocol"] == "ocpp2.0.1"
            boot = await station.wait_for_event("boot")
            assert boot["payload"]["status"] == "Accepted", boot
            replies: list[dict[str, Any]] = []
            for action, payload in station_calls:
                reply = await station.call(action=action, payload=payload)
                assert reply["event"] == "result", reply
                replies.append(reply["payload"])
                await relay.csms.wait_for_event("request", identity="CS01", action=action, payload=payload)
            assert replies[2] == {"idTokenInfo": {"status": "Accepted"}}, "the CSMS's verdict on the token"

            variables = await relay.csms.call(identity="CS01", action="GetVariables", payload=GET_VARIABLES)
            assert variables["event"] == "result", variables
            assert [r["attributeValue"] for r in variables["payload"]["getVariableResult"]] == ["42", "42"]
            started = await relay.csms.call(identity="CS01", action="RequestStartTransaction", payload=start)
            assert started["event"] == "result", started
            assert started["payload"] == {"status": "Accepted"}
            assert (await station.wait_for_event("request", action="RequestStartTransaction"))["payload"] == start

    # The CSMS cannot tell it is not talking to the station directly (§6.1): same bytes, same order.
    csms_in, csms_out = relay.csms.frames("CS01", "in"), relay.csms.frames("CS01", "out")
    assert csms_in == relayed(station.frames(direction="out"))
    assert csms_out == relayed(station.frames(direction="in"))
    assert [json.loads(f)[2] for f in csms_in if json.loads(f)[0] == CALL] == [
        "BootNotification",
        *(action for action, _ in station_calls),
    ]
    assert [json.loads(f)[2] for f in csms_out if json.loads(f)[0] == CALL] == [
        "GetVariables",
        "RequestStartTransaction",
    ]
    assert len(csms_in) == len(csms_out) == 8
    validate_frames(station.frames())
    validate_frames(relay.csms.frames("CS01"))
    # Counted under their action, answers included; later traffic proves these were all counted.
    assert relay.metric("ocpp_lc_frames_total", direction="station_to_csms", action="TransactionEvent") == 3
    assert relay.metric("ocpp_lc_frames_total", direction="csms_to_station", action="TransactionEvent") == 3


# -- 2. the CSMS's refusal is the station's refusal --------------------------------------------


async def test_csms_refusing_the_handshake_refuses_the_station_and_leaves_nothing_open(
    open_relay: OpenRelay,
) -> None:
    async with open_relay("--reject-status", "401") as relay, relay.station("CS01") as station:
        with trio.fail_after(TIMEOUT_S):
            rejected = await station.wait_for_event("rejected")
            assert rejected["status"] == 401
            assert "rejected by test csms" in rejected["body"]
            refused = await relay.csms.wait_for_event("refused")
            assert refused["path"] == "/ocpp/CS01"
            assert (await station.wait_for_event("exited"))["returncode"] == 0

            assert relay.metric("ocpp_lc_handshake_refusals_total", reason="csms_refused") == 1
            assert relay.metric("ocpp_lc_stations_connected") == 0
            assert relay.metric("ocpp_lc_upstream_links_up") == 0
            assert len(relay.app.links) == 0
            # The upstream socket was closed before the station heard the refusal.
            assert established_connections_to(relay.csms_port) == 0
    assert not any(e["event"] == "connected" for e in relay.csms.events)


# -- 3. the CSMS picks the subprotocol ---------------------------------------------------------


async def test_station_gets_the_subprotocol_the_csms_picked(open_relay: OpenRelay) -> None:
    async with (
        open_relay("--subprotocols", "ocpp1.6") as relay,
        relay.station("CS16", "--subprotocols", "ocpp2.0.1,ocpp1.6", "--no-boot") as station,
    ):
        with trio.fail_after(TIMEOUT_S):
            assert (await station.wait_for_event("connected"))["subprotocol"] == "ocpp1.6"
            upstream = await relay.csms.wait_for_event("connected", identity="CS16")
            assert upstream["subprotocol"] == "ocpp1.6"
            assert upstream["headers"]["sec-websocket-protocol"] == "ocpp2.0.1, ocpp1.6"

            # 1.6 frames relay like any others (the echo peers answer every CALL with {}).
            boot = {"chargePointVendor": "V", "chargePointModel": "M"}
            reply = await station.call(action="BootNotification", payload=boot)
            assert (reply["event"], reply["payload"]) == ("result", {}), reply
            back = await relay.csms.call(identity="CS16", action="GetConfiguration", payload={"key": ["X"]})
            assert (back["event"], back["payload"]) == ("result", {}), back

    assert relay.csms.frames("CS16", "in") == relayed(station.frames(direction="out"))
    assert relay.csms.frames("CS16", "out") == relayed(station.frames(direction="in"))
    # Besides what it relays, the controller only asks a 1.6 station whether it does smart charging (#15).
    assert len(relayed(station.frames())) == 4


async def test_no_common_subprotocol_completes_the_handshake_without_one_then_closes(open_relay: OpenRelay) -> None:
    async with open_relay("--subprotocols", "ocpp1.6") as relay, relay.station("CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            # Part 4 §3.2: the CSMS answers without Sec-WebSocket-Protocol and closes at once...
            upstream = await relay.csms.wait_for_event("connected", identity="CS01")
            assert upstream["subprotocol"] is None
            await relay.csms.wait_for_event("disconnected", identity="CS01")
            # ...and so does the controller towards the station, as the CSMS would have done directly.
            connected = await station.wait_for_event("connected")
            assert connected["subprotocol"] is None
            closed = await station.wait_for_event("disconnected")
            assert closed["code"] == 1002, closed
            assert relay.metric("ocpp_lc_handshake_refusals_total", reason="no_subprotocol") == 1
            assert relay.metric("ocpp_lc_stations_connected") == 0
            assert len(relay.app.links) == 0
    assert not any(e["event"] == "frame" for e in station.events)


# -- 4. permessage-deflate on each leg ---------------------------------------------------------


async def test_compression_is_negotiated_on_each_leg_independently(open_relay: OpenRelay) -> None:
    async with (
        open_relay() as relay,
        relay.station("CSZ", "--no-boot") as deflating,
        relay.station("CSP", "--no-boot", "--no-deflate") as plain,
    ):
        with trio.fail_after(TIMEOUT_S):
            station_leg = await deflating.wait_for_event("connected")
            assert station_leg["extensions"].startswith("permessage-deflate"), station_leg
            csms_leg = await relay.csms.wait_for_event("connected", identity="CSZ")
            assert csms_leg["extensions"].startswith("permessage-deflate"), csms_leg

            # Part 4 §3.3: the controller supports compression; a station without it is still served.
            assert (await plain.wait_for_event("connected"))["extensions"] is None
            csms_leg = await relay.csms.wait_for_event("connected", identity="CSP")
            assert csms_leg["extensions"].startswith("permessage-deflate"), csms_leg

            await round_trip(deflating)
            await round_trip(plain)
            assert relay.metric("ocpp_lc_compression_negotiated_total", leg="csms") == 2
            assert relay.metric("ocpp_lc_compression_negotiated_total", leg="station") == 1
    for identity, station in (("CSZ", deflating), ("CSP", plain)):
        assert relay.csms.frames(identity, "in") == relayed(station.frames(direction="out"))
        assert relay.csms.frames(identity, "out") == relayed(station.frames(direction="in"))


# -- 5. identity and credentials pass through unchanged ----------------------------------------


async def test_authorization_and_percent_encoded_identity_reach_the_csms_unchanged(open_relay: OpenRelay) -> None:
    async with (
        open_relay() as relay,
        relay.station("RDAM 123", "--basic-auth-password", "s3cret-Pa55") as spaced,
        relay.station("CS/Ü#1", "--no-boot") as escaped,
    ):
        with trio.fail_after(TIMEOUT_S):
            upstream = await relay.csms.wait_for_event("connected", identity="RDAM 123")
            assert upstream["path"] == "/ocpp/RDAM%20123"
            # Security profile 1: the station's own Basic credentials, so A01 works through the LC.
            assert upstream["authorization"] == "Basic " + base64.b64encode(b"RDAM 123:s3cret-Pa55").decode()
            assert (await spaced.wait_for_event("boot"))["payload"]["status"] == "Accepted"

            upstream = await relay.csms.wait_for_event("connected", identity="CS/Ü#1")
            assert upstream["path"] == "/ocpp/CS%2F%C3%9C%231"
            assert upstream["authorization"] is None
            await round_trip(escaped)

            assert {link.station_id for link in relay.app.links} == {"RDAM 123", "CS/Ü#1"}


# -- 6. the controller's own calls and the one-call-at-a-time rule -----------------------------


async def test_controller_call_waits_for_an_outstanding_csms_call(open_relay: OpenRelay) -> None:
    profile = tx_default_profile()
    async with open_relay() as relay, relay.station("CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await station.command({"cmd": "set_delay", "action": "GetVariables", "seconds": SLOW_ANSWER_S})
            await round_trip(station)
            link = live_link(relay, "CS01")

            await csms_call_later(relay.csms, "gv", "CS01", "GetVariables", GET_VARIABLES)
            await station.wait_for_event("request", action="GetVariables")
            # The CSMS's call is now outstanding at the station: ours must wait for its answer.
            result = await link.call("SetChargingProfile", profile)
            variables = await csms_answer(relay.csms, "gv")
            assert variables["event"] == "result", variables

    log = wire_log(station)
    assert_one_call_at_a_time(log)
    (ours,) = incoming_calls(station, "SetChargingProfile")
    _, message_id, _, sent_payload = validate_frame(ours)  # what the controller wrote is schema-valid
    assert LC_ID.fullmatch(message_id)
    assert sent_payload == profile
    reply = answer_to(station, message_id)
    assert result == json.loads(reply)[2] == {"status": "Accepted"}
    # §6.4: the answer to the controller's call stays with the controller...
    assert reply not in relay.csms.frames("CS01", "in")
    assert message_id not in "".join(relay.csms.frames("CS01"))
    # ...while everything else still passes byte for byte.
    assert relay.csms.frames("CS01", "in") == [f for f in station.frames(direction="out") if f != reply]
    assert relay.csms.frames("CS01", "out") == [f for f in station.frames(direction="in") if f != ours]
    order = [(direction, frame[0], frame[1]) for direction, frame in log]
    gv_id = json.loads(incoming_calls(station, "GetVariables")[0])[1]
    assert order.index(("out", CALLRESULT, gv_id)) < order.index(("in", CALL, message_id))
    assert relay.metric("ocpp_lc_lc_calls_total", action="SetChargingProfile", outcome="result") == 1
    assert relay.metric("ocpp_lc_held_csms_calls_total") == 0


async def test_csms_call_is_held_while_a_controller_call_is_outstanding(open_relay: OpenRelay) -> None:
    profile = tx_default_profile()
    results: list[dict[str, Any]] = []

    async def controller_call(link: StationLink) -> None:
        results.append(await link.call("SetChargingProfile", profile))

    async with open_relay() as relay, relay.station("CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await station.command({"cmd": "set_delay", "action": "SetChargingProfile", "seconds": SLOW_ANSWER_S})
            await round_trip(station)
            link = live_link(relay, "CS01")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(controller_call, link)
                await station.wait_for_event("request", action="SetChargingProfile")
                # Ours is outstanding at the station: the CSMS's call must be held back until answered.
                await csms_call_later(relay.csms, "gv", "CS01", "GetVariables", GET_VARIABLES)
                variables = await csms_answer(relay.csms, "gv")
            assert variables["event"] == "result", variables
            assert relay.metric("ocpp_lc_held_csms_calls_total") == 1

    assert_one_call_at_a_time(wire_log(station))
    (ours,) = incoming_calls(station, "SetChargingProfile")
    _, message_id, _, _ = validate_frame(ours)
    assert LC_ID.fullmatch(message_id)
    reply = answer_to(station, message_id)
    assert results == [json.loads(reply)[2]] == [{"status": "Accepted"}]
    assert reply not in relay.csms.frames("CS01", "in")
    # The held call reached the station unchanged, only later.
    (theirs,) = incoming_calls(station, "GetVariables")
    assert relay.csms.frames("CS01", "out") == [f for f in station.frames(direction="in") if f != ours]
    order = [(direction, frame[0], frame[1]) for direction, frame in wire_log(station)]
    assert order.index(("out", CALLRESULT, message_id)) < order.index(("in", CALL, json.loads(theirs)[1]))


async def test_holding_a_csms_call_does_not_hold_the_csms_answers_to_the_station(open_relay: OpenRelay) -> None:
    """While a CSMS call waits for the station to answer ours, the CSMS's other frames keep flowing.

    Holding a call is only needed for CALLs (§4.1.1); the CSMS's answers to the station's own calls
    may cross it (§4.1.1, note). A station that waited on them would behave differently behind the
    controller than connected directly (§6.1): its own message timeouts would fire.
    """
    async with open_relay() as relay, relay.station("CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await station.command({"cmd": "set_delay", "action": "SetChargingProfile", "seconds": 2 * SLOW_ANSWER_S})
            await round_trip(station)
            link = live_link(relay, "CS01")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(link.call, "SetChargingProfile", tx_default_profile()))
                await station.wait_for_event("request", action="SetChargingProfile")
                await csms_call_later(relay.csms, "gv", "CS01", "GetVariables", GET_VARIABLES)
                await relay.csms.wait_for(lambda e: e.get("event") == "frame" and '"GetVariables"' in e["data"])
                # The CSMS's GetVariables is held now. The station's own call must still be answered.
                asked_s = trio.current_time()
                await round_trip(station)
                waited_s = trio.current_time() - asked_s
                assert (await csms_answer(relay.csms, "gv"))["event"] == "result"
    (ours,) = incoming_calls(station, "SetChargingProfile")
    log = wire_log(station)
    order = [(direction, frame[0], frame[1]) for direction, frame in log]
    heartbeat_id = [frame[1] for direction, frame in log if direction == "out" and frame[2:3] == ["Heartbeat"]][-1]
    assert order.index(("in", CALLRESULT, heartbeat_id)) < order.index(("out", CALLRESULT, json.loads(ours)[1])), (
        f"the station's Heartbeat was answered only after it answered the controller's call ({waited_s:.2f} s)"
    )


async def test_csms_leg_keepalive_survives_a_held_csms_call(open_relay: OpenRelay) -> None:
    """A CSMS call held for the controller's call must not make the CSMS look dead (Part 4 §5.2)."""
    async with (
        open_relay(csms={"ping_interval_s": 1.0, "ping_timeout_s": 1.0}) as relay,
        relay.station("CS01", "--no-boot") as station,
    ):
        with trio.fail_after(TIMEOUT_S):
            # Longer than a ping interval plus its timeout on the CSMS leg.
            await station.command({"cmd": "set_delay", "action": "SetChargingProfile", "seconds": 3 * SLOW_ANSWER_S})
            await round_trip(station)
            link = live_link(relay, "CS01")
            outcomes: list[object] = []

            async def controller_call() -> None:
                try:
                    outcomes.append(await link.call("SetChargingProfile", tx_default_profile()))
                except LinkError as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(controller_call)
                await station.wait_for_event("request", action="SetChargingProfile")
                await csms_call_later(relay.csms, "gv", "CS01", "GetVariables", GET_VARIABLES)
                variables = await csms_answer(relay.csms, "gv")
            assert relay.metric("ocpp_lc_pair_closes_total", reason="csms_timeout") == 0, (
                "the CSMS leg was declared dead while its call was held"
            )
            assert outcomes == [{"status": "Accepted"}]
            assert variables["event"] == "result", variables
            assert relay.app.links.get("CS01") is link and not link.done.is_set()


# -- 7. how controller calls fail --------------------------------------------------------------


async def test_controller_call_errors_timeouts_and_late_answers(open_relay: OpenRelay) -> None:
    async with open_relay() as relay, relay.station("CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            refusal = {"code": "NotSupported", "description": "no smart charging here", "details": {"hint": "x"}}
            await station.command({"cmd": "set_response", "action": "SetChargingProfile", "error": refusal})
            await round_trip(station)
            link = live_link(relay, "CS01")

            with pytest.raises(CallRejected) as rejected:
                await link.call("SetChargingProfile", tx_default_profile())
            assert (rejected.value.code, rejected.value.description) == ("NotSupported", "no smart charging here")
            assert rejected.value.details == {"hint": "x"}

            # Now the station sits on the call far beyond the caller's patience.
            await station.command({"cmd": "set_response", "action": "SetChargingProfile", "payload": None})
            await station.command({"cmd": "set_delay", "action": "SetChargingProfile", "seconds": 600})
            await round_trip(station)
            with pytest.raises(CallTimeout):
                await link.call("SetChargingProfile", tx_default_profile(10.0), timeout_s=1.0)

            # The timed-out call does not block the CSMS's calls to the station.
            variables = await relay.csms.call(identity="CS01", action="GetVariables", payload=GET_VARIABLES)
            assert variables["event"] == "result", variables
            assert relay.metric("ocpp_lc_held_csms_calls_total") == 0

            # A late answer (with the right id) is dropped and counted, never relayed.
            late_id = json.loads(incoming_calls(station, "SetChargingProfile")[-1])[1]
            late = json.dumps([CALLRESULT, late_id, {"status": "Accepted"}], separators=(",", ":"))
            await station.command({"cmd": "send_raw", "data": late})
            await round_trip(station)  # relayed after the controller has dealt with the late answer
            assert relay.metric("ocpp_lc_late_replies_total") == 1

    first_id = json.loads(incoming_calls(station, "SetChargingProfile")[0])[1]
    for message_id in (first_id, late_id):
        assert LC_ID.fullmatch(message_id)
        assert message_id not in "".join(relay.csms.frames("CS01"))
    assert not any(e["event"] == "unmatched_response" for e in relay.csms.events)
    for frame in incoming_calls(station, "SetChargingProfile"):
        validate_frame(frame)
    # (No one-call-at-a-time check here: once our call timed out, §4.1.1 lets the next one go.)
    assert relay.metric("ocpp_lc_lc_calls_total", action="SetChargingProfile", outcome="error") == 1
    assert relay.metric("ocpp_lc_lc_calls_total", action="SetChargingProfile", outcome="timeout") == 1


# -- 8. a close on one side is a close on the other (Part 4 §6.3) ------------------------------


async def test_station_closing_closes_its_csms_connection(open_relay: OpenRelay) -> None:
    async with open_relay() as relay, relay.station("CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await round_trip(station)
            link = live_link(relay, "CS01")
            assert relay.metric("ocpp_lc_stations_connected") == 1
        with trio.fail_after(CLOSE_PROPAGATION_S):
            await station.command({"cmd": "close", "code": 1000, "reason": "maintenance"})
            gone = await relay.csms.wait_for_event("disconnected", identity="CS01")
            assert (gone["code"], gone["reason"]) == (1000, "maintenance")
            await link.done.wait()
            # The handler drops the pair in the same step as it marks it done.
            assert relay.metric("ocpp_lc_stations_connected") == 0
            assert relay.metric("ocpp_lc_pair_closes_total", reason="station_closed") == 1


async def test_csms_closing_closes_the_station_connection(open_relay: OpenRelay) -> None:
    # The strict §6.3 rule (site autonomy off); with it on, the station is served locally instead.
    async with open_relay(autonomy={"enabled": False}) as relay, relay.station("CS01", "--no-boot") as station:
        with trio.fail_after(TIMEOUT_S):
            await round_trip(station)
            link = live_link(relay, "CS01")
        with trio.fail_after(CLOSE_PROPAGATION_S):
            await relay.csms.command({"cmd": "close", "identity": "CS01", "code": 1000, "reason": "bye"})
            gone = await station.wait_for_event("disconnected")
            assert (gone["code"], gone["reason"]) == (1000, "bye")
            await link.done.wait()
            assert relay.metric("ocpp_lc_stations_connected") == 0
            assert relay.metric("ocpp_lc_pair_closes_total", reason="csms_closed") == 1
