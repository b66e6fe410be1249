"""Balancing that stays safe and available under faults (issue #11), end to end.

Independent peers (the PyPI `ocpp` library in subprocesses, `tests/peers/`) stand on both sides of the
controller. The station peers run with `--model-profiles`: each keeps its own model of the charging
profiles it accepted (`tests/peers/profiles.py`, written from Part 2 K01, not from the controller's
code) and reports what governs each EVSE whenever that changes, on its own clock, with a timer at the
next validTo. So the tests ask the *stations* what limit they apply, and when.

* A killed controller (kill -9, ``ocpp-lc run`` in its own process) leaves every station on its own
  default once the validity of the controller's profiles is over; every validTo it sent was at most
  ``profile_validity_s`` after it last spoke to that station (issue Done-when 3).
* An EVSE of a listed station that the site model does not list is balanced like the rest (item 1).
* An EVSE measured above what it may draw is counted at its draw and the others make room (item 3).
* ``ocpp-lc balancing release`` clears the controller's profiles on every connected station; with
  balancing off, a later run clears them from a station that was away at the release (item 4).
* A session on one phase gets a TxProfile with numberPhases 1 (item 6, K01.FR.49).

Every frame on every connection is validated against the OCA schemas at the end of each test.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from router.app import App
from tests.e2e.conftest import OCPP_PATH, OpenRelay, Relay
from tests.e2e.test_readme_installer import UP_LINE, ocpp_lc
from tests.support.peers import Event, Peer, open_csms, open_station
from tests.support.schemas import validate_frames

PROFILE_ID_BASE = 900_000
STACK_LEVEL = 8
#: The shortest validity the configuration accepts ([balancing] profile_validity_s).
VALIDITY_S = 120.0
#: Set-up and each phase of a scenario: Python peer processes and the controller on a loaded two-core box.
PHASE_S = 40.0
BALANCING = {
    "min_interval_s": 0,
    "recompute_interval_s": 1,
    "stack_level": STACK_LEVEL,
    "profile_id_base": PROFILE_ID_BASE,
}
MODEL = "--model-profiles"
CALL, CALLRESULT = 2, 3


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def tx_profile_id(evse_id: int) -> int:
    return PROFILE_ID_BASE + 2 * evse_id


def default_profile_id(evse_id: int) -> int:
    return PROFILE_ID_BASE + 2 * evse_id + 1


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- what a station does ---------------------------------------------------------------------------


async def call(station: Peer, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await station.call(action=action, payload=payload)
    assert answer["event"] == "result", answer
    result: dict[str, Any] = answer["payload"]
    return result


async def booted(*stations: Peer) -> None:
    for station in stations:
        assert (await station.wait_for_event("boot"))["payload"]["status"] == "Accepted"


async def evse_available(station: Peer, evse_id: int) -> None:
    await call(
        station,
        "StatusNotification",
        {"timestamp": now(), "connectorStatus": "Available", "evseId": evse_id, "connectorId": 1},
    )


def started(transaction_id: str, evse_id: int, phases: int | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "eventType": "Started",
        "timestamp": now(),
        "triggerReason": "CablePluggedIn",
        "seqNo": 0,
        "transactionInfo": {"transactionId": transaction_id, "chargingState": "Charging"},
        "evse": {"id": evse_id, "connectorId": 1},
    }
    if phases is not None:
        payload["numberOfPhasesUsed"] = phases
    return payload


def metered(transaction_id: str, seq_no: int, amperes: float) -> dict[str, Any]:
    """A TransactionEvent Updated with the current drawn on each of the three phases."""
    samples = [
        {"value": amperes, "measurand": "Current.Import", "phase": phase, "unitOfMeasure": {"unit": "A"}}
        for phase in ("L1", "L2", "L3")
    ]
    return {
        "eventType": "Updated",
        "timestamp": now(),
        "triggerReason": "MeterValuePeriodic",
        "seqNo": seq_no,
        "transactionInfo": {"transactionId": transaction_id, "chargingState": "Charging"},
        "meterValue": [{"timestamp": now(), "sampledValue": samples}],
    }


# -- what a station's own model says ---------------------------------------------------------------


def limits_of(station: Peer) -> list[Event]:
    return [e for e in station.events if e.get("event") == "limit"]


def current_limit(station: Peer, evse_id: int) -> Event | None:
    """The station's latest report of what governs ``evse_id`` (None: nothing reported, its own default)."""
    found = [e for e in limits_of(station) if e["evseId"] == evse_id]
    return found[-1] if found else None


async def governed_by(station: Peer, evse_id: int, check: Callable[[Event], bool]) -> Event:
    """Wait until the station's model says ``evse_id`` is governed as ``check`` wants."""

    def done() -> bool:
        found = current_limit(station, evse_id)
        return found is not None and check(found)

    await station.wait_until(done)
    found = current_limit(station, evse_id)
    assert found is not None
    return found


def by(purpose: str, limit: float | None = None) -> Callable[[Event], bool]:
    return lambda e: e["purpose"] == purpose and (limit is None or math.isclose(e["limit"], limit))


def profile_calls(station: Peer, action: str) -> list[dict[str, Any]]:
    """Payloads of every ``action`` CALL the controller sent the station, in order."""
    result = []
    for frame in station.frames(direction="in"):
        message = json.loads(frame)
        if message[0] == CALL and message[2] == action:
            result.append(message[3])
    return result


def assert_installed_sum_within(stations: dict[str, Peer], max_evse_amperes: float, limit_amperes: float) -> int:
    """At every change any station's model reported, once every EVSE had a profile of ours, the limits the
    stations apply add up to at most ``limit_amperes`` (an EVSE on its own default counts at its maximum).
    Returns how many moments were checked."""
    timeline = sorted(
        ((e["t"], station_id, e) for station_id, station in stations.items() for e in limits_of(station)),
        key=lambda item: item[0],
    )
    applied: dict[tuple[str, int], float] = {}
    evses = {(station_id, e["evseId"]) for _, station_id, e in timeline}
    checked = 0
    for _, station_id, event in timeline:
        limit = event["limit"]
        applied[(station_id, event["evseId"])] = max_evse_amperes if limit is None else float(limit)
        if set(applied) == evses:
            assert sum(applied.values()) <= limit_amperes + 1e-6, (event, applied)
            checked += 1
    return checked


# -- what the controller says ----------------------------------------------------------------------


async def controller_until(app: App, check: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Wait until the controller's EVSE rows satisfy ``check`` with nothing in flight (re-read after every
    reallocation, which runs on every answer and at least every recompute interval)."""
    balancer = app.balancer
    assert balancer is not None
    while True:
        reallocated = balancer.reallocated
        rows = balancer.evse_rows()
        if check(rows) and not any(row["profile_in_flight"] for row in rows):
            return rows
        await reallocated.wait()


def row_of(rows: list[dict[str, Any]], station_id: str, evse_id: int = 1) -> dict[str, Any]:
    (row,) = [r for r in rows if r["station_id"] == station_id and r["evse_id"] == evse_id]
    return row


def validate_all(relay_csms: Peer, stations: dict[str, Peer]) -> None:
    for station_id, station in stations.items():
        validate_frames(station.frames(identity=station_id))
        validate_frames(relay_csms.frames(identity=station_id))


@asynccontextmanager
async def open_stations(
    relay: Relay, *identities: str, args: tuple[str, ...] = (MODEL,)
) -> AsyncIterator[dict[str, Peer]]:
    async with AsyncExitStack() as stack:
        yield {identity: await stack.enter_async_context(relay.station(identity, *args)) for identity in identities}


# -- A: the controller killed ---------------------------------------------------------------------

#: How long before the earliest validTo the stations' clocks are set, after the kill (see the test).
LEAD_S = 5.0
#: A timer of the station's firing late on a loaded machine: far below the validity.
TIMER_SLACK_S = 15.0


def controller_config(csms_port: int, state_dir: Path) -> str:
    return f"""
[controller]
connect = false
[stations]
listen = "127.0.0.1:0"
path = "{OCPP_PATH}"
[csms]
url = "ws://127.0.0.1:{csms_port}{OCPP_PATH}"
[http]
listen = "127.0.0.1:0"
[state]
dir = "{state_dir}"
[site.grid]
max_current_amperes = 32
[balancing]
min_interval_s = 0
recompute_interval_s = 1
profile_id_base = {PROFILE_ID_BASE}
stack_level = {STACK_LEVEL}
profile_validity_s = {VALIDITY_S}
"""


async def _collect(stream: trio.abc.ReceiveStream, log: bytearray) -> None:
    while chunk := await stream.receive_some():
        log += chunk


def spoke_last_wall(station: Peer) -> float:
    """Wall-clock time of the last frame the controller sent the station (its monotonic time, mapped
    through the station's own wall/monotonic pairs, which its model events carry)."""
    pair = next(e for e in station.events if e.get("event") == "profile_set")
    offset = pair["wall"] - pair["t"]
    last = [e["t"] for e in station.events if e.get("event") == "frame" and e["direction"] == "in"][-1]
    return float(last + offset)


async def test_a_killed_controller_leaves_every_station_on_its_own_default_within_the_profile_validity(
    tmp_path: Path,
) -> None:
    """Issue #11 Done-when 3. The stations' validity timers are real, but after the kill their clocks are
    set ahead to ``LEAD_S`` before the earliest validTo instead of waiting ~2 minutes in real time: what the
    controller decided (validTo ≤ last contact + validity) is read from the frames, and the stations'
    own timers then show they fall back at validTo, no earlier and no later."""
    config = tmp_path / "lc.toml"
    stations: dict[str, Peer] = {}
    async with open_csms("--path-prefix", OCPP_PATH) as (csms, csms_port):
        config.write_text(controller_config(csms_port, tmp_path / "state"), encoding="utf-8")
        log = bytearray()
        async with trio.open_nursery() as nursery:
            controller: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    [*ocpp_lc(), "run", "--config", str(config)],
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            assert controller.stderr is not None
            with trio.fail_after(PHASE_S):
                while (up := UP_LINE.search(log)) is None:
                    chunk = await controller.stderr.receive_some()
                    assert chunk, f"the controller exited before serving:\n{log.decode()}"
                    log += chunk
            nursery.start_soon(_collect, controller.stderr, log)
            url = f"ws://127.0.0.1:{int(up.group(1))}{OCPP_PATH}"
            async with (
                open_station(url, "CS1", MODEL, "--stay-offline") as cs1,
                open_station(url, "CS2", MODEL, "--stay-offline") as cs2,
            ):
                stations = {"CS1": cs1, "CS2": cs2}
                with trio.fail_after(PHASE_S):
                    await booted(cs1, cs2)
                    for station in stations.values():
                        await evse_available(station, 1)
                    for station in stations.values():
                        await governed_by(station, 1, by("TxDefaultProfile"))
                    await call(cs1, "TransactionEvent", started("TX-A1", 1))
                    # Its first TxProfile may still be 0 A (while the other EVSE's limit is unknown on a
                    # busy machine, nothing more is safe): the one that lets it charge.
                    charging = await governed_by(cs1, 1, lambda e: by("TxProfile")(e) and e["limit"] > 0)
                    assert charging["profileId"] == tx_profile_id(1), charging

                killed_wall = time.time()
                controller.kill()  # SIGKILL: nothing of the controller runs any more
                with trio.fail_after(PHASE_S):
                    await controller.wait()
                    for station in stations.values():
                        await station.wait_for_event("disconnected")
                # At the kill, each station was on a profile of ours (that is what must wear off).
                for station in stations.values():
                    assert current_limit(station, 1)["source"] == "profile"  # type: ignore[index]

                latest_valid_to: dict[str, datetime] = {}
                for station_id, station in stations.items():
                    sets = [e for e in station.events if e.get("event") == "profile_set"]
                    assert sets, station_id
                    last_spoke = spoke_last_wall(station)
                    for event in sets:
                        assert event["validTo"] is not None, f"{station_id}: a profile without validTo: {event}"
                        valid_to = parse_time(event["validTo"]).timestamp()
                        # Sent with the validity ahead of the moment it was sent, which is before it arrived.
                        assert valid_to <= event["wall"] + VALIDITY_S, (station_id, event)
                        assert valid_to > event["wall"] + VALIDITY_S / 2, (station_id, event)
                        assert valid_to <= last_spoke + VALIDITY_S
                    latest_valid_to[station_id] = max(parse_time(e["validTo"]) for e in sets)
                    assert latest_valid_to[station_id].timestamp() > killed_wall  # still held at the kill
                    assert latest_valid_to[station_id].timestamp() <= killed_wall + VALIDITY_S

                # Set each station's clock ahead to just before the earliest validTo; their own timers do
                # the rest. Until then, our profiles still govern them.
                jump_s = min(latest_valid_to.values()).timestamp() - LEAD_S - time.time()
                for station in stations.values():
                    await station.command({"cmd": "advance_clock", "seconds": max(0.0, jump_s)})
                with trio.fail_after(PHASE_S):
                    for station in stations.values():
                        await station.wait_for_event("clock")
                        assert current_limit(station, 1)["source"] == "profile"  # type: ignore[index]
                spread_s = (max(latest_valid_to.values()) - min(latest_valid_to.values())).total_seconds()
                with trio.fail_after(LEAD_S + spread_s + PHASE_S):
                    for station_id, station in stations.items():
                        own = await governed_by(station, 1, lambda e: e["source"] == "own-default")
                        fell_back_at = parse_time(own["stationTime"])
                        assert fell_back_at >= latest_valid_to[station_id], (station_id, own)
                        assert fell_back_at.timestamp() <= killed_wall + VALIDITY_S + TIMER_SLACK_S, (station_id, own)
                        assert own["limit"] is None
            nursery.cancel_scope.cancel()
        for station_id, station in stations.items():
            validate_frames(station.frames(identity=station_id))
            validate_frames(csms.frames(identity=station_id))
        assert b"Traceback" not in bytes(log), log.decode()


# -- B: an EVSE the site model does not list --------------------------------------------------------


async def test_b_an_unlisted_evse_of_a_listed_station_is_balanced_with_the_rest(open_relay: OpenRelay) -> None:
    """Item 1: CS1 is listed with EVSE 2 only; its EVSE 1 and unlisted CS2 are balanced all the same, and
    what the stations apply never adds up to more than the 40 A grid connection."""
    grid_amperes, evse_max_amperes = 40.0, 32.0
    site = {
        "grid": {"max_current_amperes": grid_amperes},
        "stations": [{"station_id": "CS1", "evse_max_current_amperes": evse_max_amperes, "evses": [{"evse_id": 2}]}],
    }
    async with open_relay(site=site, balancing=BALANCING) as relay, open_stations(relay, "CS1", "CS2") as stations:
        cs1, cs2 = stations["CS1"], stations["CS2"]
        evses = [(cs1, 1), (cs1, 2), (cs2, 1)]
        with trio.fail_after(PHASE_S):
            await booted(cs1, cs2)
            for station, evse_id in evses:
                await evse_available(station, evse_id)
            for station, evse_id in evses:
                await governed_by(station, evse_id, by("TxDefaultProfile"))
            for station, evse_id in [(cs1, 2), (cs1, 1), (cs2, 1)]:
                await call(station, "TransactionEvent", started(f"TX-{station.name[-3:]}-{evse_id}", evse_id))
                await governed_by(station, evse_id, by("TxProfile"))
            share = math.floor(grid_amperes / 3 * 10) / 10
            for station, evse_id in evses:
                await governed_by(station, evse_id, by("TxProfile", share))
            rows = await controller_until(
                relay.app, lambda rows: all(row["installed_amperes"] == share for row in rows) and len(rows) == 3
            )
        unlisted = row_of(rows, "CS1", 1)
        assert unlisted["transaction_id"] == "TX-CS1-1" and unlisted["compliant"] is True, unlisted
        tx_profiles = [p for p in profile_calls(cs1, "SetChargingProfile") if p["chargingProfile"]["id"] == 900_002]
        assert tx_profiles, "no TxProfile for the unlisted EVSE"
        tx_profile = tx_profiles[-1]
        assert tx_profile["evseId"] == 1
        assert tx_profile["chargingProfile"]["transactionId"] == "TX-CS1-1"  # K01.FR.03
        assert tx_profile["chargingProfile"]["chargingProfilePurpose"] == "TxProfile"
        # From the moment every EVSE held a profile of ours, at every change on any station.
        assert assert_installed_sum_within(stations, evse_max_amperes, grid_amperes) >= 6
    validate_all(relay.csms, stations)


# -- C: overdraw -----------------------------------------------------------------------------------


OVERDRAW_GRID_AMPERES, OVERDRAW_EVSE_MAX_AMPERES, DRAW_AMPERES, GRACE_S = 32.0, 20.0, 24.0, 5.0
OVERDRAW_SITE = {
    "grid": {"max_current_amperes": OVERDRAW_GRID_AMPERES},
    "defaults": {"max_current_amperes": OVERDRAW_EVSE_MAX_AMPERES},
}


def overdraw_balancing(min_interval_s: float) -> dict[str, Any]:
    return {**BALANCING, "overdraw_grace_s": GRACE_S, "overdraw_margin_amperes": 2.0, "min_interval_s": min_interval_s}


async def two_sessions_at_16(relay: Relay, stations: dict[str, Peer]) -> None:
    """CS1 and CS2 each start a session; the controller gives each 16 A of the 32 A and knows it is installed."""
    await booted(*stations.values())
    for station_id, station in stations.items():
        await evse_available(station, 1)
        await governed_by(station, 1, by("TxDefaultProfile"))
        await call(station, "TransactionEvent", started(f"TX-{station_id}", 1))
    for station in stations.values():
        await governed_by(station, 1, by("TxProfile", 16.0))
    await controller_until(relay.app, lambda rows: all(row["installed_amperes"] == 16.0 for row in rows))


async def overdraw_until_counted(app: App, cs1: Peer) -> int:
    """CS1's EV draws DRAW_AMPERES whatever its limit, reported every second as a meter would, until the
    controller counts it as overdrawing; returns the next seqNo. Asserts it was not before GRACE_S."""
    balancer = app.balancer
    assert balancer is not None
    seq_no = 1
    started_s = trio.current_time()
    while not row_of(balancer.evse_rows(), "CS1")["overdrawing"]:
        await call(cs1, "TransactionEvent", metered("TX-CS1", seq_no, DRAW_AMPERES))
        seq_no += 1
        with trio.move_on_after(1.0):
            await balancer.reallocated.wait()
    assert trio.current_time() - started_s >= GRACE_S  # not before the grace period is over
    return seq_no


async def test_c_an_evse_drawing_above_its_limit_is_counted_at_its_draw_and_the_others_make_room(
    open_relay: OpenRelay,
) -> None:
    """Item 3: two sessions share 32 A (16 A each). CS1's EV draws 24 A per phase for longer than
    overdraw_grace_s: CS2 comes down so that CS1's draw and CS2's limit fit the 32 A, the status and the
    metrics say CS1 overdraws; once CS1 draws within its limit again, CS2 gets its 16 A back.

    EVSEs here may carry 20 A: the controller counts an overdrawing EVSE at its draw or its maximum,
    whichever is higher, so a draw above the maximum is what makes the draw itself the number to watch."""
    grid_amperes, evse_max_amperes, draw_amperes = OVERDRAW_GRID_AMPERES, OVERDRAW_EVSE_MAX_AMPERES, DRAW_AMPERES
    async with (
        open_relay(site=OVERDRAW_SITE, balancing=overdraw_balancing(1.0)) as relay,
        open_stations(relay, "CS1", "CS2") as stations,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.app.http_port}", trust_env=False) as http,
    ):
        cs1, cs2 = stations["CS1"], stations["CS2"]
        with trio.fail_after(PHASE_S):
            await two_sessions_at_16(relay, stations)
        with trio.fail_after(GRACE_S + PHASE_S):
            seq_no = await overdraw_until_counted(relay.app, cs1)
        with trio.fail_after(PHASE_S):
            lowered = await governed_by(cs2, 1, lambda e: e["limit"] + draw_amperes <= grid_amperes)
            assert lowered["purpose"] == "TxProfile" and lowered["limit"] > 0, lowered
            await controller_until(relay.app, lambda rows: row_of(rows, "CS2")["installed_amperes"] == lowered["limit"])
            status = (await http.get("/api/v1/status")).json()["balancing"]
            metrics = (await http.get("/metrics")).text
        assert status["overdrawing"] == 1, status
        assert row_of(status["evses"], "CS1")["overdrawing"] is True
        assert row_of(status["evses"], "CS1")["measured_current_amperes"] == draw_amperes
        assert row_of(status["evses"], "CS2")["overdrawing"] is False
        assert "ocpp_lc_balancing_overdraws_total 1.0" in metrics.splitlines(), metrics
        assert "ocpp_lc_balancing_overdrawing_evses 1.0" in metrics.splitlines()
        # Overdrawing earns CS1 nothing: its limit is still at most its 16 A.
        assert current_limit(cs1, 1)["limit"] <= 16.0  # type: ignore[index]

        # The EV follows its limit again: CS2 gets its share back.
        with trio.fail_after(PHASE_S):
            await call(cs1, "TransactionEvent", metered("TX-CS1", seq_no, 16.0))
            await governed_by(cs2, 1, by("TxProfile", 16.0))
            await controller_until(
                relay.app,
                lambda rows: (
                    not row_of(rows, "CS1")["overdrawing"] and all(row["installed_amperes"] == 16.0 for row in rows)
                ),
            )
            metrics = (await http.get("/metrics")).text
        assert "ocpp_lc_balancing_overdrawing_evses 0.0" in metrics.splitlines(), metrics
        assert "ocpp_lc_balancing_overdraws_total 1.0" in metrics.splitlines()
        assert assert_installed_sum_within(stations, evse_max_amperes, grid_amperes) > 0
    validate_all(relay.csms, stations)


async def test_c_an_overdrawing_evse_is_not_sent_its_profile_over_and_over(open_relay: OpenRelay) -> None:
    """Item 3 with ``min_interval_s = 0`` (the setting the other end-to-end tests use): once CS1 counts as
    overdrawing and CS2 has come down, nothing changes, so the controller has nothing new to tell CS1. Over
    an observation window of three recompute intervals CS1 may get a profile per interval, not a flood."""
    window_s = 3 * BALANCING["recompute_interval_s"]
    async with (
        open_relay(site=OVERDRAW_SITE, balancing=overdraw_balancing(0.0)) as relay,
        open_stations(relay, "CS1", "CS2") as stations,
    ):
        cs1, cs2 = stations["CS1"], stations["CS2"]
        with trio.fail_after(PHASE_S):
            await two_sessions_at_16(relay, stations)
        with trio.fail_after(GRACE_S + PHASE_S):
            await overdraw_until_counted(relay.app, cs1)
            await governed_by(cs2, 1, lambda e: e["limit"] + DRAW_AMPERES <= OVERDRAW_GRID_AMPERES)
        before = len(profile_calls(cs1, "SetChargingProfile"))
        await trio.sleep(window_s)  # an observation window: what arrives in it is the finding, not a sync
        sent = len(profile_calls(cs1, "SetChargingProfile")) - before
        assert sent <= window_s + 2, f"CS1 got {sent} SetChargingProfile in {window_s} s without any change"
    validate_all(relay.csms, stations)


# -- D: release ------------------------------------------------------------------------------------


async def test_d_release_clears_our_profiles_and_balancing_off_clears_what_a_station_away_kept(
    open_relay: OpenRelay, tmp_path: Path
) -> None:
    """Item 4. First run: CS1 and CS2 hold our profiles, CS2 leaves, ``ocpp-lc balancing release`` clears
    CS1's (both ids of its EVSE) and exits 0; nothing is set afterwards. Second run over the same state with
    ``[balancing] enabled = false``: CS2, back, has its profiles cleared; CS1 (released) is not pending."""
    state = {"dir": str(tmp_path / "shared-state")}
    ids = [tx_profile_id(1), default_profile_id(1)]
    site = {"grid": {"max_current_amperes": 32.0}}
    async with open_relay(site=site, balancing=BALANCING, state=state) as relay:
        async with relay.station("CS2", MODEL) as cs2_first, relay.station("CS1", MODEL) as cs1:
            with trio.fail_after(PHASE_S):
                await booted(cs1, cs2_first)
                for station in (cs1, cs2_first):
                    await evse_available(station, 1)
                    await governed_by(station, 1, by("TxDefaultProfile"))
                await call(cs1, "TransactionEvent", started("TX-CS1", 1))
                await governed_by(cs1, 1, by("TxProfile"))
                await controller_until(relay.app, lambda rows: all(row["compliant"] for row in rows))
                await cs2_first.command({"cmd": "stop"})
                await cs2_first.wait_for_event("disconnected")
                await controller_until(relay.app, lambda rows: not row_of(rows, "CS2")["connected"])

                released = await trio.run_process(
                    [*ocpp_lc(), "balancing", "release", "--url", f"http://127.0.0.1:{relay.app.http_port}"],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert released.returncode == 0, released.stderr.decode()
                output = released.stdout.decode()
                assert "CS1: cleared 2 profile ids" in output, output
                assert "1 of 1 connected stations cleared" in output, output
                cleared = [p["chargingProfileId"] for p in profile_calls(cs1, "ClearChargingProfile")]
                assert sorted(cleared) == ids
                await cs1.wait_until(lambda: current_limit(cs1, 1)["source"] == "own-default")  # type: ignore[index]
                sets_at_release = len(profile_calls(cs1, "SetChargingProfile"))

                # Released: what would have made the loop act (a new session) changes nothing.
                await call(cs1, "TransactionEvent", {**started("TX-CS1b", 1), "seqNo": 0})
                await call(
                    cs1,
                    "StatusNotification",
                    {"timestamp": now(), "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1},
                )
                await trio.sleep(3 * BALANCING["recompute_interval_s"])  # an observation window, not a sync
            assert len(profile_calls(cs1, "SetChargingProfile")) == sets_at_release
            frames = [json.loads(f) for f in cs1.frames(direction="in")]
            first_clear = next(i for i, m in enumerate(frames) if m[0] == CALL and m[2] == "ClearChargingProfile")
            assert not [m for m in frames[first_clear:] if m[0] == CALL and m[2] == "SetChargingProfile"]
        first_run = {"CS1": cs1, "CS2": cs2_first}
        validate_all(relay.csms, first_run)
        cs2_profiles_left = {e["id"] for e in cs2_first.events if e.get("event") == "profile_set"}
        assert cs2_profiles_left == {default_profile_id(1)}, cs2_profiles_left

    async with open_relay(site=site, balancing={**BALANCING, "enabled": False}, state=state) as relay:
        leftovers = relay.app.leftover_profiles
        assert relay.app.balancer is None and leftovers is not None
        assert leftovers.pending == ["CS2"]  # CS1's were cleared by the release
        async with relay.station("CS2") as cs2, relay.station("CS1") as cs1_again:
            with trio.fail_after(PHASE_S):
                await booted(cs2, cs1_again)
                await cs2.wait_until(lambda: len(profile_calls(cs2, "ClearChargingProfile")) == 2)
                # The answers to the clears reach the controller before this call (one socket, in order).
                await call(cs2, "Heartbeat", {})
            assert leftovers.pending == []
            assert sorted(p["chargingProfileId"] for p in profile_calls(cs2, "ClearChargingProfile")) == ids
            assert not profile_calls(cs2, "SetChargingProfile")
            assert not profile_calls(cs1_again, "ClearChargingProfile")
        validate_all(relay.csms, {"CS1": cs1_again, "CS2": cs2})


# -- E: numberPhases -------------------------------------------------------------------------------


async def test_e_a_one_phase_session_gets_a_tx_profile_with_number_phases_1(open_relay: OpenRelay) -> None:
    """Item 6, K01.FR.49: without numberPhases a station assumes 3. CS1's EV charges on one phase
    (numberOfPhasesUsed 1): its TxProfile says numberPhases 1; CS2's three-phase session says nothing;
    CS3, a one-phase station in the site model, is offered its idle current on one phase."""
    site = {
        "grid": {"max_current_amperes": 32.0},
        "stations": [{"station_id": "CS3", "phases": 1}],
    }
    async with (
        open_relay(site=site, balancing=BALANCING) as relay,
        open_stations(relay, "CS1", "CS2", "CS3") as stations,
    ):
        cs1, cs2, cs3 = stations["CS1"], stations["CS2"], stations["CS3"]
        with trio.fail_after(PHASE_S):
            await booted(cs1, cs2, cs3)
            for station in stations.values():
                await evse_available(station, 1)
            # Before the sessions take the room: the idle one-phase station is offered its idle current.
            idle = await governed_by(cs3, 1, lambda e: e["purpose"] == "TxDefaultProfile" and e["limit"] > 0)
            await call(cs1, "TransactionEvent", started("TX-CS1", 1, phases=1))
            await call(cs2, "TransactionEvent", started("TX-CS2", 1, phases=3))
            one_phase = await governed_by(cs1, 1, lambda e: e["purpose"] == "TxProfile" and e["limit"] > 0)
            three_phase = await governed_by(cs2, 1, lambda e: e["purpose"] == "TxProfile" and e["limit"] > 0)
        assert one_phase["numberPhases"] == 1, one_phase
        assert three_phase["numberPhases"] is None, three_phase
        assert idle["numberPhases"] == 1, idle
        for payload in profile_calls(cs1, "SetChargingProfile"):
            profile = payload["chargingProfile"]
            if profile["chargingProfilePurpose"] == "TxProfile":
                (period,) = profile["chargingSchedule"][0]["chargingSchedulePeriod"]
                assert period["numberPhases"] == 1, profile
        for payload in profile_calls(cs3, "SetChargingProfile"):
            for period in payload["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"]:
                assert period["numberPhases"] == 1, payload
        for payload in profile_calls(cs2, "SetChargingProfile"):
            for period in payload["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"]:
                assert "numberPhases" not in period, payload
    validate_all(relay.csms, stations)
