"""Site autonomy end to end (issue #12): the CSMS goes away and the site charges on, then it is told everything.

Independent peers on both sides (the PyPI `ocpp` library in subprocesses, `tests/peers/`): stations behind
the controller (in-process, `open_relay`), the CSMS in front of it. The CSMS is killed with SIGKILL (its
sockets vanish, as on a WAN outage) and later started again on the same port. What is checked is what the
people around the site notice:

* the stations stay connected and are answered (Part 4 §6.3 as amended by errata 4.13); a new session
  during the outage is balanced at once (it gets a TxProfile with current); every TransactionEvent and
  transaction MeterValues reaches the CSMS exactly once, in seqNo order, with the station's own payload
  (``offline`` set on those that happened during the outage, E04.FR.03); no CSMS answer to a replayed
  call reaches a station (Done-when 1);
* a station the CSMS never accepted gets Pending (B02) and nothing else through; an unknown idToken gets
  the configured policy; a token accepted locally and refused by the CSMS on replay gets the transaction
  stopped with RequestStopTransaction (Done-when 3);
* a station flooding messages during the outage hits its queue bound and gets CALLERRORs, its own
  transaction messages still fit (they have a reserve) and the other stations are not affected (5).

Every frame the controller wrote to a station or to a CSMS is validated against the OCA schemas.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from router.app import App
from router.autonomy.service import Mode
from tests.e2e.conftest import OCPP_PATH, OpenRelay, Relay
from tests.e2e.test_balancing import now, profiles_received
from tests.support.peers import Peer, open_csms
from tests.support.schemas import validate_frames

#: Each phase: several Python peer processes and the appliance on a loaded two-core machine.
PHASE_S = 60.0
GRID_AMPERES = 32.0
SITE = {"grid": {"max_current_amperes": GRID_AMPERES}}
BALANCING = {"min_interval_s": 0, "recompute_interval_s": 1, "idle_current_amperes": 0}
#: Quick retries, so that the restore follows the CSMS's return closely.
AUTONOMY = {"reconnect_backoff_max_s": 1, "reconnect_rate_per_s": 50}
TOKEN = {"idToken": "TAG-0001", "type": "ISO14443"}
CALL, CALLRESULT, CALLERROR = 2, 3, 4


# -- messages ---------------------------------------------------------------------------------------


def tx_event(station_id: str, event_type: str, seq_no: int, trigger: str, **extra: Any) -> dict[str, Any]:
    state = "Charging" if event_type != "Ended" else "EVConnected"
    info: dict[str, Any] = {"transactionId": f"TX-{station_id}", "chargingState": state}
    if event_type == "Ended":
        info["stoppedReason"] = "EVDisconnected"
    return {
        "eventType": event_type,
        "timestamp": now(),
        "triggerReason": trigger,
        "seqNo": seq_no,
        "transactionInfo": info,
        "evse": {"id": 1, "connectorId": 1},
        **extra,
    }


def meter_value(amperes: float) -> list[dict[str, Any]]:
    return [{"timestamp": now(), "sampledValue": [{"value": amperes, "measurand": "Current.Import", "phase": "L1"}]}]


def status(connector_status: str) -> dict[str, Any]:
    return {"timestamp": now(), "connectorStatus": connector_status, "evseId": 1, "connectorId": 1}


async def call(station: Peer, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await station.call(action=action, payload=payload)
    assert answer["event"] == "result", answer
    result: dict[str, Any] = answer["payload"]
    return result


async def call_error(station: Peer, action: str, payload: dict[str, Any]) -> str:
    answer = await station.call(action=action, payload=payload)
    assert answer["event"] == "error", answer
    return str(answer.get("code"))


# -- what the peers saw -----------------------------------------------------------------------------


def requests(csmss: Iterable[Peer], identity: str, action: str) -> list[dict[str, Any]]:
    """The payloads of ``action`` the CSMS instances received from ``identity``, in order."""
    return [
        e["payload"]
        for csms in csmss
        for e in csms.events
        if e.get("event") == "request" and e.get("identity") == identity and e.get("action") == action
    ]


def assert_only_own_answers(station_id: str, station: Peer) -> None:
    """Every answer the station received answers a call it sent, once; none is a stray CSMS answer."""
    sent = [json.loads(f)[1] for f in station.frames(direction="out") if json.loads(f)[0] == CALL]
    answered = [json.loads(f)[1] for f in station.frames(direction="in") if json.loads(f)[0] in (CALLRESULT, CALLERROR)]
    assert set(answered) <= set(sent), f"{station_id} got answers to calls it never sent"
    assert len(answered) == len(set(answered)), f"{station_id} got a call answered twice"
    assert not [e for e in station.events if e.get("event") == "unmatched_response"], station_id


def assert_stayed_connected(stations: dict[str, Peer]) -> None:
    for station_id, station in stations.items():
        assert not [e for e in station.events if e.get("event") == "disconnected"], f"{station_id} was closed"


def validate_everything(stations: dict[str, Peer], csmss: Iterable[Peer]) -> None:
    csmss = list(csmss)
    for station_id, station in stations.items():
        validate_frames(station.frames(identity=station_id))
        for csms in csmss:
            validate_frames(csms.frames(identity=station_id))


async def modes(app: App, station_ids: Iterable[str], mode: Mode) -> None:
    """Wait until every one of ``station_ids`` is in ``mode`` (woken by each mode change)."""
    autonomy = app.autonomy
    assert autonomy is not None
    ids = list(station_ids)
    while not all(autonomy.mode_of(station_id) == mode for station_id in ids):
        changed = trio.Event()
        autonomy.on_change(changed.set)
        await changed.wait()


async def kill_csms(relay: Relay) -> None:
    """SIGKILL the CSMS: its sockets vanish without a close frame, as when the WAN goes."""
    relay.csms.kill()
    await relay.csms.wait_exited()


def restarted_csms(relay: Relay, *args: str) -> Any:
    """The CSMS again, on the port the controller knows."""
    return open_csms("--path-prefix", OCPP_PATH, "--port", str(relay.csms_port), *args)


@asynccontextmanager
async def open_stations(relay: Relay, *station_ids: str) -> AsyncIterator[dict[str, Peer]]:
    async with AsyncExitStack() as stack:
        yield {station_id: await stack.enter_async_context(relay.station(station_id)) for station_id in station_ids}


async def booted(stations: dict[str, Peer], status_expected: str = "Accepted") -> None:
    for station_id, station in stations.items():
        boot = await station.wait_for_event("boot")
        assert boot.get("payload", {}).get("status") == status_expected, (station_id, boot)


def charging_share(station_id: str, station: Peer) -> float:
    """The current of the latest TxProfile of the station's transaction (0 if none yet)."""
    mine = [
        r
        for r in profiles_received(station_id, station)
        if r.purpose == "TxProfile" and r.profile.get("transactionId") == f"TX-{station_id}"
    ]
    return mine[-1].limit_amperes if mine else 0.0


# -- Done-when 1 ------------------------------------------------------------------------------------


async def test_the_site_charges_through_a_csms_outage_and_the_csms_learns_everything_once(
    open_relay: OpenRelay,
) -> None:
    async with (
        open_relay(site=SITE, balancing=BALANCING, autonomy=AUTONOMY) as relay,
        open_stations(relay, "CS1", "CS2", "CS3") as stations,
    ):
        sent: dict[str, list[dict[str, Any]]] = {station_id: [] for station_id in stations}
        meter: dict[str, list[dict[str, Any]]] = {station_id: [] for station_id in stations}
        during_outage: set[tuple[str, int]] = set()

        async def transaction(station_id: str, payload: dict[str, Any], offline: bool = False) -> dict[str, Any]:
            sent[station_id].append(payload)
            if offline:
                during_outage.add((station_id, payload["seqNo"]))
            return await call(stations[station_id], "TransactionEvent", payload)

        with trio.fail_after(PHASE_S):
            await booted(stations)
            for station in stations.values():
                await call(station, "StatusNotification", status("Available"))
            for station_id in ("CS1", "CS2"):
                answer = await transaction(station_id, tx_event(station_id, "Started", 0, "Authorized", idToken=TOKEN))
                assert answer["idTokenInfo"]["status"] == "Accepted"
            for station_id in ("CS1", "CS2"):
                await stations[station_id].wait_until(lambda s=station_id: charging_share(s, stations[s]) > 0)

        # The WAN goes: the CSMS vanishes while two sessions run.
        await kill_csms(relay)
        first_csms = relay.csms
        with trio.fail_after(PHASE_S):
            for number, station_id in enumerate(("CS1", "CS2"), start=1):
                payload = tx_event(
                    station_id, "Updated", 1, "MeterValuePeriodic", meterValue=meter_value(10.0 + number)
                )
                assert await transaction(station_id, payload, offline=True) == {}
                values = {"evseId": 1, "meterValue": meter_value(9.5)}
                meter[station_id].append(values)
                assert await call(stations[station_id], "MeterValues", values) == {}
            # A third EV arrives: its session is authorised from the cache and balanced at once.
            await call(stations["CS3"], "StatusNotification", status("Occupied"))
            answer = await transaction("CS3", tx_event("CS3", "Started", 0, "Authorized", idToken=TOKEN), offline=True)
            assert answer["idTokenInfo"]["status"] == "Accepted"
            await stations["CS3"].wait_until(lambda: charging_share("CS3", stations["CS3"]) > 0)
            assert 0 < charging_share("CS3", stations["CS3"]) <= GRID_AMPERES
            heartbeat = await call(stations["CS3"], "Heartbeat", {})
            assert "currentTime" in heartbeat
            await transaction("CS3", tx_event("CS3", "Updated", 1, "ChargingStateChanged"), offline=True)
            assert relay.app.autonomy is not None
            assert {s.station_id for s in relay.app.autonomy.stations()} == set(stations)
            view = relay.app.status()["autonomy"]
            assert {(s["station_id"], s["mode"]) for s in view["stations"]} == {(s, "local") for s in stations}
            assert view["queue_messages"] >= 7  # 6 transaction messages and CS3's status at least
        assert_stayed_connected(stations)

        # The CSMS is back: each station's messages are replayed, then the pairs relay again.
        async with restarted_csms(relay) as (second_csms, _):
            with trio.fail_after(PHASE_S):
                await modes(relay.app, stations, "relaying")
                for station_id in stations:
                    ended = tx_event(station_id, "Ended", len(sent[station_id]), "EVCommunicationLost")
                    await transaction(station_id, ended)
                for station_id in stations:
                    await second_csms.wait_until(
                        lambda s=station_id: (
                            len(requests([second_csms], s, "TransactionEvent")) >= 1
                            and requests([second_csms], s, "TransactionEvent")[-1]["eventType"] == "Ended"
                        )
                    )
            csmss = [first_csms, second_csms]
            for station_id in stations:
                received = requests(csmss, station_id, "TransactionEvent")
                expected = [
                    {**payload, "offline": True} if (station_id, payload["seqNo"]) in during_outage else payload
                    for payload in sent[station_id]
                ]
                assert received == expected, station_id  # once each, in seqNo order, the station's payload
                assert [p["seqNo"] for p in received] == list(range(len(received)))
                assert requests(csmss, station_id, "MeterValues") == meter[station_id]
            # State kept as latest is sent once: CS3's Occupied, after its queued events.
            cs3_status = requests([second_csms], "CS3", "StatusNotification")
            assert [p["connectorStatus"] for p in cs3_status] == ["Occupied"]
            assert_stayed_connected(stations)
            for station_id, station in stations.items():
                assert_only_own_answers(station_id, station)
            validate_everything(stations, csmss)
        assert relay.metric("ocpp_lc_autonomy_replayed_total", outcome="result") >= 6


# -- Done-when 3 ------------------------------------------------------------------------------------


async def test_an_unknown_station_is_pending_and_a_token_refused_on_replay_stops_its_transaction(
    open_relay: OpenRelay,
) -> None:
    autonomy = {**AUTONOMY, "unknown_id_tokens": "accept", "stop_invalid_transactions": True}
    async with open_relay(autonomy=autonomy, balancing={"enabled": False}) as relay:
        async with open_stations(relay, "CS1") as known:
            with trio.fail_after(PHASE_S):
                await booted(known)
            await kill_csms(relay)
            async with open_stations(relay, "NEW9") as unknown:
                with trio.fail_after(PHASE_S):
                    # Never accepted by the CSMS: Pending (B02), and nothing else goes through us.
                    connected = await unknown["NEW9"].wait_for_event("connected")
                    assert connected["subprotocol"] == "ocpp2.0.1"
                    await booted(unknown, "Pending")
                    code = await call_error(unknown["NEW9"], "StatusNotification", status("Available"))
                    assert code == "SecurityError"
                    # An idToken nobody knows: the installer's policy, here accept.
                    fresh = {"idToken": "NEVER-SEEN", "type": "ISO14443"}
                    authorize = await call(known["CS1"], "Authorize", {"idToken": fresh})
                    assert authorize["idTokenInfo"]["status"] == "Accepted"
                    started = tx_event("CS1", "Started", 0, "Authorized", idToken=fresh)
                    answer = await call(known["CS1"], "TransactionEvent", started)
                    assert answer["idTokenInfo"]["status"] == "Accepted"
                    assert_stayed_connected(known)
                refusing = json.dumps({"action": "TransactionEvent", "payload": {"idTokenInfo": {"status": "Invalid"}}})
                async with restarted_csms(relay, "--set-response", refusing) as (second_csms, _):
                    with trio.fail_after(PHASE_S):
                        stop = await known["CS1"].wait_for_event("request", action="RequestStopTransaction")
                    assert stop["payload"] == {"transactionId": "TX-CS1"}
                    replayed = requests([second_csms], "CS1", "TransactionEvent")
                    assert replayed == [{**started, "offline": True}]
                    stations = {**known, **unknown}
                    for station_id, station in stations.items():
                        assert_only_own_answers(station_id, station)
                    validate_everything(stations, [relay.csms, second_csms])
        assert relay.metric("ocpp_lc_autonomy_refused_after_local_accept_total", action="stop_requested") == 1


# -- Done-when 5 (flooding) -------------------------------------------------------------------------


async def test_a_station_flooding_during_an_outage_hits_its_queue_bound_and_no_other_station_notices(
    open_relay: OpenRelay,
) -> None:
    bound = 100  # the smallest the configuration allows; other than transaction data may use 3/4 of it
    autonomy = {**AUTONOMY, "queue_max_messages_per_station": bound}
    async with (
        open_relay(autonomy=autonomy, balancing={"enabled": False}) as relay,
        open_stations(relay, "FLOOD", "QUIET") as stations,
    ):
        with trio.fail_after(PHASE_S):
            await booted(stations)
        await kill_csms(relay)
        flood, quiet = stations["FLOOD"], stations["QUIET"]
        outcomes: list[str] = []
        with trio.fail_after(PHASE_S):
            for number in range(bound * 3 // 4 + 5):
                event = {"type": "SettingSystemTime", "timestamp": now(), "techInfo": f"event {number}"}
                answer = await flood.call(action="SecurityEventNotification", payload=event)
                outcomes.append("result" if answer["event"] == "result" else str(answer.get("code")))
            # Told, so it keeps them itself; its transactions still have room (the reserve).
            assert outcomes == ["result"] * (bound * 3 // 4) + ["InternalError"] * 5
            started = tx_event("FLOOD", "Started", 0, "Authorized")
            assert await call(flood, "TransactionEvent", started) == {}
            # The quiet station is answered as usual, its unknown token by the default policy (reject).
            assert await call(quiet, "TransactionEvent", tx_event("QUIET", "Started", 0, "CablePluggedIn")) == {}
            authorize = await call(quiet, "Authorize", {"idToken": {"idToken": "NOBODY", "type": "ISO14443"}})
            assert authorize["idTokenInfo"]["status"] == "Unknown"
        assert relay.metric("ocpp_lc_autonomy_local_answers_total", kept="queue_full") == 5
        assert_stayed_connected(stations)
        for station_id, station in stations.items():
            assert_only_own_answers(station_id, station)
            validate_frames(station.frames(identity=station_id))
