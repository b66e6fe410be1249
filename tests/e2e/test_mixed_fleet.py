"""Mixed fleets end to end (issue 15, Done-when 1 and 3): OCPP 1.6J and 2.0.1 stations under one site limit.

The appliance runs in-process (`open_relay`) with balancing on and a 32 A grid connection. In front of
it the CSMS peer (`tests/peers/csms.py --ocpp16 library`) serves 2.0.1 connections with the `ocpp`
library's 2.0.1 Central System and 1.6 ones with its 1.6 one, so each station meets a CSMS of its own
version. Behind it a 1.6 station (`tests/peers/station16.py`, the library's v16 messages) and a 2.0.1
station (`tests/peers/station.py --model-profiles`); each keeps its own model of the profiles it
accepted and reports, on the system-wide monotonic clock, what it may draw whenever that changes. Every
peer is its own process.

What a site owner and the stations' owners would notice:

* both stations get profiles, the 1.6 one in 1.6 form (SetChargingProfile with csChargingProfiles on
  the connector, a TxProfile naming the CSMS's integer transactionId, validTo) for its connector N;
* at every moment, by the stations' own account, what they may draw together stays within 32 A as
  sessions start and stop; the draws they report stay within it too, and the controller reads the 1.6
  station's MeterValues (text values, ``unit``);
* the CSMS sees exactly the bytes each station sent, and each station exactly the CSMS's, but for the
  controller's own calls (its ``lc~`` ids);
* every frame on every connection validates against its own version's OCA schemas;
* a 1.6 station whose SupportedFeatureProfiles lack SmartCharging is counted at its maximum, shown
  unsteerable with its protocol in ``/api/v1/status`` and ``/metrics``, and is never sent a profile.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import trio

from router.app import App
from tests.e2e.conftest import OpenRelay, Relay
from tests.support.frames import is_controller_exchange, relayed
from tests.support.peers import Peer
from tests.support.schemas import validate_frames

GRID_AMPERES = 32.0
PROFILE_ID_BASE = 900_000
STACK_LEVEL = 8
#: The CSMS's first 1.6 transactionId (an integer, as 1.6 has it).
FIRST_TRANSACTION_ID = 4711
CSMS_ARGS = (
    "--subprotocols",
    "ocpp2.0.1,ocpp1.6",
    "--ocpp16",
    "library",
    "--first-transaction-id",
    str(FIRST_TRANSACTION_ID),
)
BALANCING = {
    "min_interval_s": 0,
    "recompute_interval_s": 1,
    "stack_level": STACK_LEVEL,
    "profile_id_base": PROFILE_ID_BASE,
    "resolution_amperes": 0.1,
    # Idle EVSEs at 0 A: what they may draw is then what the sessions leave, exactly.
    "idle_current_amperes": 0,
}
#: Start-up and each phase: five Python processes and the appliance on a loaded two-core machine.
TIMEOUT_S = 60.0
CALL, CALLRESULT, CALLERROR = 2, 3, 4
V16, V201 = "1.6", "2.0.1"

CS16, CS201, OLD16, BAD16 = "CS16", "CS201", "OLD16", "BAD16"
#: The 1.6 station's session runs on its connector 2 (EVSE 2 to the loop); connector 1 stays idle.
CONNECTOR = 2
#: The unsteerable 1.6 station's maximum, from the site model (and its own hardware).
OLD_MAX_AMPERES = 20.0


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- what the stations received --------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """A SetChargingProfile a station received, read the way its version puts it, and its answer."""

    station_id: str
    received_s: float
    answered_s: float | None
    status: str | None
    evse_id: int
    purpose: str
    limit_amperes: float
    transaction_id: Any
    profile: dict[str, Any]


def profiles_received(station_id: str, station: Peer, version: str) -> list[Received]:
    """Every SetChargingProfile in the station's frame log, in order (1.6: connectorId/csChargingProfiles)."""
    calls: dict[str, tuple[float, dict[str, Any]]] = {}
    answers: dict[str, tuple[float, dict[str, Any]]] = {}
    for event in station.events:
        if event.get("event") != "frame":
            continue
        message = json.loads(event["data"])
        if event["direction"] == "in" and message[0] == CALL and message[2] == "SetChargingProfile":
            calls[message[1]] = (event["t"], message[3])
        elif event["direction"] == "out" and message[0] == CALLRESULT:
            answers[message[1]] = (event["t"], message[2])
        elif event["direction"] == "out" and message[0] == CALLERROR:
            answers[message[1]] = (event["t"], {"status": f"CALLERROR {message[2]}: {message[3]}"})
    result = []
    for message_id, (received_s, payload) in calls.items():
        answered_s, answer = answers.get(message_id, (None, {}))
        if version == V16:
            evse_id, profile = payload["connectorId"], payload["csChargingProfiles"]
            schedule = profile["chargingSchedule"]
        else:
            evse_id, profile = payload["evseId"], payload["chargingProfile"]
            (schedule,) = profile["chargingSchedule"]
        assert schedule["chargingRateUnit"] == "A", schedule
        (period,) = schedule["chargingSchedulePeriod"]
        result.append(
            Received(
                station_id,
                received_s,
                answered_s,
                answer.get("status"),
                evse_id,
                profile["chargingProfilePurpose"],
                float(period["limit"]),
                profile.get("transactionId"),
                profile,
            )
        )
    return result


def latest(station_id: str, station: Peer, version: str, evse_id: int) -> Received | None:
    found = [r for r in profiles_received(station_id, station, version) if r.evse_id == evse_id]
    return found[-1] if found else None


async def profile_answered(
    station_id: str, station: Peer, version: str, evse_id: int, purpose: str, limit_amperes: float
) -> Received:
    """Wait until the latest profile of the EVSE is ``purpose`` at ``limit_amperes``, answered Accepted."""

    def done() -> bool:
        found = latest(station_id, station, version, evse_id)
        # A station that could not take the profile in at all (e.g. its schema check failed) says so at once.
        assert found is None or not str(found.status).startswith("CALLERROR"), found
        return (
            found is not None
            and found.purpose == purpose
            and math.isclose(found.limit_amperes, limit_amperes)
            and found.status == "Accepted"
        )

    await station.wait_until(done)
    found = latest(station_id, station, version, evse_id)
    assert found is not None
    return found


async def controller_settled(app: App, installed: dict[tuple[str, int], float]) -> list[dict[str, Any]]:
    """Wait until the controller has these limits installed and nothing in flight (checked per reallocation)."""
    balancer = app.balancer
    assert balancer is not None
    while True:
        reallocated = balancer.reallocated
        rows = balancer.evse_rows()
        now_installed = {(row["station_id"], row["evse_id"]): row["installed_amperes"] for row in rows}
        if (
            set(now_installed) == set(installed)
            and all(v is not None and math.isclose(v, installed[k]) for k, v in now_installed.items())
            and not any(row["profile_in_flight"] for row in rows)
        ):
            return rows
        await reallocated.wait()


async def controller_measured(app: App, station_id: str, evse_id: int, amperes: float) -> dict[str, Any]:
    """Wait until the controller has read the EVSE's draw as ``amperes``; return its row."""
    balancer = app.balancer
    assert balancer is not None
    while True:
        reallocated = balancer.reallocated
        for row in balancer.evse_rows():
            if (row["station_id"], row["evse_id"]) == (station_id, evse_id) and row[
                "measured_current_amperes"
            ] == amperes:
                return row
        await reallocated.wait()


# -- what the stations say they may draw, and draw -------------------------------------------------


def limits_timeline(stations: dict[str, Peer]) -> list[tuple[float, dict[tuple[str, int], float | None]]]:
    """After each `limit` event of any station (in monotonic order): what every EVSE may draw then."""
    events = sorted(
        (
            (e["t"], station_id, e)
            for station_id, peer in stations.items()
            for e in peer.events
            if e["event"] == "limit"
        ),
        key=lambda item: item[0],
    )
    state: dict[tuple[str, int], float | None] = {}
    timeline = []
    for t, station_id, event in events:
        assert event["limit"] is None or event["unit"] == "A", event
        state[(station_id, event["evseId"])] = event["limit"]
        timeline.append((t, dict(state)))
    return timeline


def assert_within_grid(stations: dict[str, Peer], evses: set[tuple[str, int]], since_s: float) -> int:
    """From the moment every EVSE is governed by a profile on: together within the grid limit, always."""
    checked = 0
    for t, state in limits_timeline(stations):
        if t < since_s:
            continue
        assert set(state) == evses, state
        assert all(limit is not None for limit in state.values()), f"an EVSE fell back to its own default: {state}"
        total = sum(limit for limit in state.values() if limit is not None)
        assert total <= GRID_AMPERES + 1e-9, f"the stations may draw {total} A together (at t={t}): {state}"
        checked += 1
    return checked


def station_limit(station: Peer, evse_id: int) -> float:
    """What the station itself says the EVSE may draw now (its latest `limit` event)."""
    found = [e for e in station.events if e["event"] == "limit" and e["evseId"] == evse_id]
    assert found and found[-1]["limit"] is not None, found
    return float(found[-1]["limit"])


@dataclass
class Draws:
    """The draws the stations reported, in order: (monotonic time, station, EVSE, A per phase)."""

    reported: list[tuple[float, str, int, float]]

    def add(self, station_id: str, evse_id: int, amperes: float) -> None:
        self.reported.append((time.monotonic(), station_id, evse_id, amperes))

    def assert_within_grid(self) -> None:
        latest_draw: dict[tuple[str, int], float] = {}
        for _, station_id, evse_id, amperes in sorted(self.reported):
            latest_draw[(station_id, evse_id)] = amperes
            total = sum(latest_draw.values())
            assert total <= GRID_AMPERES + 1e-9, f"the stations drew {total} A together: {latest_draw}"


async def draw_16(station: Peer, station_id: str, connector_id: int, demand: float, draws: Draws) -> float:
    """The 1.6 station draws what it may of ``demand`` (its own model) and reports it in a MeterValues."""
    count = sum(1 for e in station.events if e["event"] == "meter")
    await station.command({"cmd": "meter", "connectorId": connector_id, "demand": demand})
    await station.wait_until(lambda: sum(1 for e in station.events if e["event"] == "meter") > count)
    event = [e for e in station.events if e["event"] == "meter"][-1]
    # The MeterValues it sent has been answered once the CSMS's answer is back at the station.
    await station.wait_until(lambda: _answered(station, "MeterValues"))
    draws.add(station_id, connector_id, float(event["amperes"]))
    return float(event["amperes"])


def _answered(station: Peer, action: str) -> bool:
    """The station's latest ``action`` CALL has its answer."""
    pending: str | None = None
    for event in station.events:
        if event.get("event") != "frame":
            continue
        message = json.loads(event["data"])
        if event["direction"] == "out" and message[0] == CALL and message[2] == action:
            pending = message[1]
        elif event["direction"] == "in" and message[0] in (CALLRESULT, CALLERROR) and message[1] == pending:
            pending = None
    return pending is None


async def draw_201(station: Peer, station_id: str, evse_id: int, demand: float, draws: Draws) -> float:
    """The 2.0.1 station's EV draws what the station says it may (its own model) and reports it."""
    amperes = min(demand, station_limit(station, evse_id))
    samples = [
        {"value": amperes, "measurand": "Current.Import", "phase": phase, "unitOfMeasure": {"unit": "A"}}
        for phase in ("L1", "L2", "L3")
    ]
    await call_ok(
        station, "MeterValues", {"evseId": evse_id, "meterValue": [{"timestamp": now(), "sampledValue": samples}]}
    )
    draws.add(station_id, evse_id, amperes)
    return amperes


async def call_ok(station: Peer, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await station.call(action=action, payload=payload)
    assert answer["event"] == "result", answer
    result: dict[str, Any] = answer["payload"]
    return result


def transaction_event_201(event_type: str, seq_no: int) -> dict[str, Any]:
    """The 2.0.1 station's session TX-201 on EVSE 1: Started (with its EVSE) or Ended."""
    if event_type == "Started":
        return {
            "eventType": "Started",
            "timestamp": now(),
            "triggerReason": "CablePluggedIn",
            "seqNo": seq_no,
            "transactionInfo": {"transactionId": "TX-201", "chargingState": "Charging"},
            "evse": {"id": 1, "connectorId": 1},
        }
    return {
        "eventType": "Ended",
        "timestamp": now(),
        "triggerReason": "EVCommunicationLost",
        "seqNo": seq_no,
        "transactionInfo": {"transactionId": "TX-201", "stoppedReason": "EVDisconnected"},
    }


async def start_16(station: Peer, connector_id: int) -> int:
    """Plug in and authorise at the 1.6 station; return the transactionId the CSMS gave."""
    authorized = await call_ok(station, "Authorize", {"idTag": "TAG-16"})
    assert authorized["idTagInfo"]["status"] == "Accepted"
    await call_ok(
        station,
        "StatusNotification",
        {"connectorId": connector_id, "errorCode": "NoError", "status": "Preparing", "timestamp": now()},
    )
    started = await call_ok(
        station,
        "StartTransaction",
        {"connectorId": connector_id, "idTag": "TAG-16", "meterStart": 0, "timestamp": now()},
    )
    transaction_id = started["transactionId"]
    assert isinstance(transaction_id, int)
    await station.wait_for_event("transaction", transactionId=transaction_id)
    return transaction_id


# -- the site --------------------------------------------------------------------------------------


@asynccontextmanager
async def open_site(
    open_relay: OpenRelay, stations: list[tuple[str, str, tuple[str, ...]]], site: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Relay, dict[str, Peer]]]:
    """The appliance between the CSMS peer and the stations ``(identity, version, peer args)``."""
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            open_relay(*CSMS_ARGS, site=site or {"grid": {"max_current_amperes": GRID_AMPERES}}, balancing=BALANCING)
        )
        peers = {}
        for identity, version, args in stations:
            opener = relay.station16 if version == V16 else relay.station
            peers[identity] = await stack.enter_async_context(opener(identity, *args))
        yield relay, peers


def assert_relayed_byte_for_byte(relay: Relay, identity: str, station: Peer) -> None:
    """The CSMS saw exactly the station's frames and the station the CSMS's, but the controller's own calls."""
    assert relay.csms.frames(identity, "in") == relayed(station.frames(direction="out"))
    assert relay.csms.frames(identity, "out") == relayed(station.frames(direction="in"))


def controller_calls(station: Peer) -> list[str]:
    """The actions the controller itself called at the station (its `lc~` ids)."""
    return [
        json.loads(frame)[2]
        for frame in station.frames(direction="in")
        if is_controller_exchange(frame) and json.loads(frame)[0] == CALL
    ]


# -- the scenarios ---------------------------------------------------------------------------------


async def test_a_16_and_a_201_station_share_32_amperes_as_sessions_start_and_stop(open_relay: OpenRelay) -> None:
    """Done-when 1: both get profiles (the 1.6 one in 1.6 form), within 32 A together at every moment."""
    draws = Draws([])
    async with (
        open_site(open_relay, [(CS16, V16, ("--connectors", "2")), (CS201, V201, ("--model-profiles",))]) as (
            relay,
            stations,
        ),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.app.http_port}", trust_env=False) as http,
    ):
        cs16, cs201 = stations[CS16], stations[CS201]
        with trio.fail_after(TIMEOUT_S):
            for station in stations.values():
                assert (await station.wait_for_event("connected"))["subprotocol"] in ("ocpp1.6", "ocpp2.0.1")
                assert (await station.wait_for_event("boot"))["payload"]["status"] == "Accepted"
            # The controller asks the 1.6 station whether it does smart charging; it does.
            configuration = await cs16.wait_for_event("request", action="GetConfiguration")
            assert configuration["payload"] == {"key": ["SupportedFeatureProfiles"]}

            # 1. The EVSEs become known: each gets a TxDefaultProfile of 0 A, the 1.6 one per connector.
            for connector_id in (1, CONNECTOR):
                await call_ok(
                    cs16,
                    "StatusNotification",
                    {"connectorId": connector_id, "errorCode": "NoError", "status": "Available", "timestamp": now()},
                )
            await call_ok(
                cs201,
                "StatusNotification",
                {"timestamp": now(), "connectorStatus": "Available", "evseId": 1, "connectorId": 1},
            )
            for connector_id in (1, CONNECTOR):
                default = await profile_answered(CS16, cs16, V16, connector_id, "TxDefaultProfile", 0.0)
                assert default.profile["chargingProfileId"] == PROFILE_ID_BASE + 2 * connector_id + 1
                assert default.profile["stackLevel"] == STACK_LEVEL
                assert "transactionId" not in default.profile and "validTo" in default.profile
            await profile_answered(CS201, cs201, V201, 1, "TxDefaultProfile", 0.0)
            evses = {(CS16, 1), (CS16, CONNECTOR), (CS201, 1)}
            await controller_settled(relay.app, dict.fromkeys(evses, 0.0))
            governed_s = time.monotonic()

            # 2. A session on the 1.6 station's connector 2: its TxProfile names the CSMS's integer id.
            transaction_id = await start_16(cs16, CONNECTOR)
            assert transaction_id == FIRST_TRANSACTION_ID
            tx = await profile_answered(CS16, cs16, V16, CONNECTOR, "TxProfile", GRID_AMPERES)
            assert tx.transaction_id == FIRST_TRANSACTION_ID  # an integer on the wire, as 1.6 has it
            assert tx.profile["chargingProfileId"] == PROFILE_ID_BASE + 2 * CONNECTOR
            await controller_settled(relay.app, {(CS16, 1): 0.0, (CS16, CONNECTOR): 32.0, (CS201, 1): 0.0})
            assert await draw_16(cs16, CS16, CONNECTOR, 32.0, draws) == 32.0
            row = await controller_measured(relay.app, CS16, CONNECTOR, 32.0)
            assert (row["protocol"], row["steerable"], row["transaction_id"]) == ("ocpp1.6", True, str(transaction_id))

            # 3. A session on the 2.0.1 station: the 1.6 one comes down first, then both have 16 A.
            await call_ok(cs201, "TransactionEvent", transaction_event_201("Started", 0))
            down = await profile_answered(CS16, cs16, V16, CONNECTOR, "TxProfile", 16.0)
            up = await profile_answered(CS201, cs201, V201, 1, "TxProfile", 16.0)
            assert up.transaction_id == "TX-201"
            assert down.answered_s is not None and down.answered_s < up.received_s  # decrease before increase
            await controller_settled(relay.app, {(CS16, 1): 0.0, (CS16, CONNECTOR): 16.0, (CS201, 1): 16.0})
            assert await draw_16(cs16, CS16, CONNECTOR, 32.0, draws) == 16.0
            assert await draw_201(cs201, CS201, 1, 32.0, draws) == 16.0
            await controller_measured(relay.app, CS16, CONNECTOR, 16.0)
            await controller_measured(relay.app, CS201, 1, 16.0)
            phases = (await http.get("/api/v1/status")).json()["balancing"]["phases"]
            assert phases["L1"]["measured_amperes"] == 32.0 and phases["L1"]["committed_amperes"] <= GRID_AMPERES

            # 4. The 1.6 session stops: its connector is back on 0 A, the 2.0.1 session gets the 32 A.
            stop = {"transactionId": transaction_id, "meterStop": 1000, "timestamp": now(), "reason": "EVDisconnected"}
            await call_ok(cs16, "StopTransaction", stop)
            await call_ok(
                cs16,
                "StatusNotification",
                {"connectorId": CONNECTOR, "errorCode": "NoError", "status": "Finishing", "timestamp": now()},
            )
            await profile_answered(CS201, cs201, V201, 1, "TxProfile", GRID_AMPERES)
            await controller_settled(relay.app, {(CS16, 1): 0.0, (CS16, CONNECTOR): 0.0, (CS201, 1): 32.0})
            assert station_limit(cs16, CONNECTOR) == 0.0  # its own TxDefaultProfile again, by its own account
            # The 1.6 EV stopped drawing with its session (it reports 0 A), the 2.0.1 one takes the 32 A.
            assert await draw_16(cs16, CS16, CONNECTOR, 32.0, draws) == 0.0
            assert await draw_201(cs201, CS201, 1, 32.0, draws) == 32.0

            # 5. The 2.0.1 session ends too.
            await call_ok(cs201, "TransactionEvent", transaction_event_201("Ended", 1))
            await controller_settled(relay.app, dict.fromkeys(evses, 0.0))

            rows = (await http.get("/api/v1/allocations")).json()["allocations"]
            assert {(r["station_id"], r["protocol"], r["steerable"]) for r in rows} == {
                (CS16, "ocpp1.6", True),
                (CS201, "ocpp2.0.1", True),
            }

    # What the stations may draw, by their own account, at every change: within the 32 A throughout.
    assert assert_within_grid(stations, evses, governed_s) >= 4
    draws.assert_within_grid()
    # The 1.6 station got only 1.6 profiles (never a 2.0.1 shape), all of them accepted.
    received = profiles_received(CS16, cs16, V16)
    assert {r.purpose for r in received} == {"TxDefaultProfile", "TxProfile"}
    assert all(r.status == "Accepted" and isinstance(r.transaction_id, int | None) for r in received), received
    assert not any('"evseId"' in f or '"chargingProfile"' in f for f in controller_frames(cs16))
    assert {r.purpose for r in profiles_received(CS201, cs201, V201)} == {"TxDefaultProfile", "TxProfile"}
    # Byte for byte, but for the controller's own calls; every frame valid in its own version.
    for identity, station in stations.items():
        assert_relayed_byte_for_byte(relay, identity, station)
    validate_frames(cs16.frames(identity=CS16), version=V16)
    validate_frames(relay.csms.frames(identity=CS16), version=V16)
    validate_frames(cs201.frames(identity=CS201))
    validate_frames(relay.csms.frames(identity=CS201))
    assert set(controller_calls(cs16)) == {"GetConfiguration", "SetChargingProfile"}


def controller_frames(station: Peer) -> list[str]:
    return [frame for frame in station.frames(direction="in") if is_controller_exchange(frame)]


async def test_a_16_station_without_smart_charging_is_counted_at_its_maximum_and_never_sent_a_profile(
    open_relay: OpenRelay,
) -> None:
    """Done-when 3: SupportedFeatureProfiles without SmartCharging: counted at 20 A, unsteerable, left alone."""
    site = {
        "grid": {"max_current_amperes": GRID_AMPERES},
        "stations": [{"station_id": OLD16, "evse_max_current_amperes": OLD_MAX_AMPERES}],
    }
    draws = Draws([])
    async with (
        open_site(
            open_relay,
            [
                (OLD16, V16, ("--no-smart-charging", "--max-current", str(OLD_MAX_AMPERES))),
                (CS201, V201, ("--model-profiles",)),
            ],
            site,
        ) as (relay, stations),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.app.http_port}", trust_env=False) as http,
    ):
        old, cs201 = stations[OLD16], stations[CS201]
        balancer = relay.app.balancer
        assert balancer is not None
        with trio.fail_after(TIMEOUT_S):
            for station in stations.values():
                assert (await station.wait_for_event("boot"))["payload"]["status"] == "Accepted"
            await old.wait_for_event("request", action="GetConfiguration")
            # Known unsteerable once its answer is in (the controller's own call; nothing to relay).
            while (record := balancer.station_record(OLD16)) is None or record.steerable:
                await balancer.reallocated.wait()

            await call_ok(
                old,
                "StatusNotification",
                {"connectorId": 1, "errorCode": "NoError", "status": "Available", "timestamp": now()},
            )
            await call_ok(
                cs201,
                "StatusNotification",
                {"timestamp": now(), "connectorStatus": "Available", "evseId": 1, "connectorId": 1},
            )
            await profile_answered(CS201, cs201, V201, 1, "TxDefaultProfile", 0.0)
            transaction_id = await start_16(old, 1)
            await call_ok(cs201, "TransactionEvent", transaction_event_201("Started", 0))
            # The old station is counted at its 20 A: the 2.0.1 session gets what is left of 32 A.
            await profile_answered(CS201, cs201, V201, 1, "TxProfile", GRID_AMPERES - OLD_MAX_AMPERES)
            assert await draw_16(old, OLD16, 1, 32.0, draws) == OLD_MAX_AMPERES  # its own default: its maximum
            assert await draw_201(cs201, CS201, 1, 32.0, draws) == GRID_AMPERES - OLD_MAX_AMPERES
            await controller_measured(relay.app, OLD16, 1, OLD_MAX_AMPERES)
            await controller_measured(relay.app, CS201, 1, GRID_AMPERES - OLD_MAX_AMPERES)

            status = (await http.get("/api/v1/status")).json()["balancing"]
            rows = {(row["station_id"], row["evse_id"]): row for row in status["evses"]}
            old_row = rows[(OLD16, 1)]
            assert (old_row["protocol"], old_row["steerable"], old_row["compliant"]) == ("ocpp1.6", False, False)
            assert old_row["transaction_id"] == str(transaction_id)
            assert (rows[(CS201, 1)]["protocol"], rows[(CS201, 1)]["steerable"]) == ("ocpp2.0.1", True)
            assert status["phases"]["L1"]["committed_amperes"] <= GRID_AMPERES
            assert status["phases"]["L1"]["measured_amperes"] == GRID_AMPERES
            metrics = (await http.get("/metrics")).text.splitlines()
            assert 'ocpp_lc_balancing_evses{protocol="ocpp1.6",steerable="false"} 1.0' in metrics, metrics
            assert 'ocpp_lc_balancing_evses{protocol="ocpp2.0.1",steerable="true"} 1.0' in metrics

            # Its session ends; the 2.0.1 one still has room for the old station's maximum left.
            stop = {"transactionId": transaction_id, "meterStop": 500, "timestamp": now()}
            await call_ok(old, "StopTransaction", stop)
            await draw_16(old, OLD16, 1, 0.0, draws)
            await draw_201(cs201, CS201, 1, 32.0, draws)

    # Never sent a profile: the controller's only call there was its GetConfiguration.
    assert controller_calls(old) == ["GetConfiguration"]
    assert not [e for e in old.events if e["event"] in ("profile_refused", "profile_set", "profile_cleared")]
    draws.assert_within_grid()
    for identity, station in stations.items():
        assert_relayed_byte_for_byte(relay, identity, station)
    validate_frames(old.frames(identity=OLD16), version=V16)
    validate_frames(relay.csms.frames(identity=OLD16), version=V16)
    validate_frames(cs201.frames(identity=CS201))
    validate_frames(relay.csms.frames(identity=CS201))


async def test_a_16_station_slow_to_say_it_lacks_smart_charging_is_still_never_sent_a_profile(
    open_relay: OpenRelay,
) -> None:
    """Done-when 3, when the station is slow to answer: its EVSE becomes known (StatusNotification) while
    the controller's GetConfiguration is still unanswered. Whatever the loop planned meanwhile must not
    reach a station that turns out to have no SmartCharging."""
    site = {
        "grid": {"max_current_amperes": GRID_AMPERES},
        "stations": [{"station_id": OLD16, "evse_max_current_amperes": OLD_MAX_AMPERES}],
    }
    args = ("--no-smart-charging", "--delay", "GetConfiguration=2")
    async with open_site(open_relay, [(OLD16, V16, args)], site) as (relay, stations):
        old = stations[OLD16]
        balancer = relay.app.balancer
        assert balancer is not None
        with trio.fail_after(TIMEOUT_S):
            await old.wait_for_event("boot")
            await old.wait_for_event("request", action="GetConfiguration")
            await call_ok(
                old,
                "StatusNotification",
                {"connectorId": 1, "errorCode": "NoError", "status": "Available", "timestamp": now()},
            )
            await old.wait_until(lambda: _answered_by_station(old, "GetConfiguration"))
            while (record := balancer.station_record(OLD16)) is None or record.steerable:
                await balancer.reallocated.wait()
            # Whatever was queued behind the GetConfiguration has had its turn once the loop has run
            # again with nothing in flight.
            while any(row["profile_in_flight"] for row in balancer.evse_rows()) or not balancer.evse_rows():
                await balancer.reallocated.wait()
            await balancer.reallocated.wait()
            rows = balancer.evse_rows()
            assert [(r["station_id"], r["protocol"], r["steerable"]) for r in rows] == [(OLD16, "ocpp1.6", False)]
    assert controller_calls(old) == ["GetConfiguration"]
    assert not [e for e in old.events if e["event"] == "profile_refused"]
    validate_frames(old.frames(identity=OLD16), version=V16)


def _answered_by_station(station: Peer, action: str) -> bool:
    """The station has answered the controller's ``action`` CALL."""
    ids = [
        json.loads(f)[1]
        for f in station.frames(direction="in")
        if json.loads(f)[0] == CALL and json.loads(f)[2] == action
    ]
    answered = {
        json.loads(f)[1] for f in station.frames(direction="out") if json.loads(f)[0] in (CALLRESULT, CALLERROR)
    }
    return bool(ids) and ids[-1] in answered


async def test_a_16_station_that_says_nonsense_affects_no_other_station(open_relay: OpenRelay) -> None:
    """Bad 1.6 input (a MeterValues whose sampledValue is a number, a GetConfiguration answer whose
    configurationKey is one) is relayed as it is and read as nothing: balancing goes on for the others."""
    bad_configuration = '{"configurationKey": 5}'
    stations = [
        (BAD16, V16, ("--answer", f"GetConfiguration={bad_configuration}")),
        (CS201, V201, ("--model-profiles",)),
    ]
    async with open_site(open_relay, stations) as (relay, peers):
        bad, cs201 = peers[BAD16], peers[CS201]
        with trio.fail_after(TIMEOUT_S):
            for station in peers.values():
                await station.wait_for_event("boot")
            await bad.wait_until(lambda: _answered_by_station(bad, "GetConfiguration"))
            nonsense = {"connectorId": 1, "meterValue": [{"timestamp": now(), "sampledValue": 5}]}
            answer = await bad.call(action="MeterValues", payload=nonsense, validate=False)
            assert answer["event"] == "error"  # the CSMS (the ocpp library) refuses it, as it should
            # The others are still balanced: a new EVSE gets its TxDefaultProfile, a session its TxProfile.
            await call_ok(
                cs201,
                "StatusNotification",
                {"timestamp": now(), "connectorStatus": "Available", "evseId": 1, "connectorId": 1},
            )
            await profile_answered(CS201, cs201, V201, 1, "TxDefaultProfile", 0.0)
            await call_ok(cs201, "TransactionEvent", transaction_event_201("Started", 0))
            await profile_answered(CS201, cs201, V201, 1, "TxProfile", GRID_AMPERES)
    assert json.loads(relay.csms.frames(BAD16, "in")[-1])[3] == nonsense  # relayed as it was
    for identity, station in peers.items():
        assert_relayed_byte_for_byte(relay, identity, station)
