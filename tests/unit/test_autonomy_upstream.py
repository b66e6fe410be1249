"""The autonomous CSMS leg behind a real :class:`StationLink`, over in-memory websockets (issue #12 items 2, 3).

The set-up is :mod:`tests.support.autonomy_site`: the station and the CSMS are plain websocket ends a test
drives; the link and the leg are the appliance's own. Timers (reconnect waits, ping timeouts, max_offline_s)
run on trio's virtual clock (``autojump_clock``) and are asserted in virtual seconds. Every frame the
controller writes to the station is validated.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import trio
from prometheus_client import CollectorRegistry

from router import ocppj
from router.autonomy.service import Autonomy, ReconnectPacer
from router.autonomy.settings import AutonomySettings
from router.store import Store
from router.transport import ConnectionClosed
from tests.support.autonomy_site import NOW, TOKEN, UNREACHABLE, T, boot_online, open_site, tx


async def test_a_lost_csms_leg_is_served_locally_restored_with_backoff_replayed_then_relayed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_site(tmp_path, script=[UNREACHABLE, UNREACHABLE, UNREACHABLE]) as site:
        with trio.fail_after(120):
            await boot_online(site)
            assert site.csms is not None
            await site.csms.aclose(1001, "CSMS going down")
            await site.mode("local")
            # Answered locally, and kept durably for the CSMS.
            updated = tx("Updated", 1)
            await site.station_call("t-1", "TransactionEvent", updated)
            assert await site.station_receives() == [3, "t-1", {}]
            await site.station_call("a-1", "Authorize", {"idToken": TOKEN})
            assert (await site.station_receives())[2]["idTokenInfo"]["status"] == "Accepted"  # from the cache
            await site.station_call("h-1", "Heartbeat", {})
            assert (await site.station_receives())[2] == {"currentTime": "2026-12-03T12:00:00.000Z"}
            # Three attempts fail; the fourth opens the leg again, after waits that double (with jitter).
            csms = await site.restored.receive()
            replayed = json.loads(await csms.receive_text())
            assert replayed[0] == 2 and ocppj.is_lc_message_id(replayed[1]) and replayed[2] == "TransactionEvent"
            assert replayed[3] == {**updated, "offline": True}  # the station's payload, flagged (E04.FR.03)
            await csms.send_text(ocppj.encode_result(replayed[1], {}))
            await site.mode("relaying")
            # Relayed byte for byte again; the answer to the replayed call never reached the station.
            frame = await site.station_call("h-2", "Heartbeat", {})
            assert await csms.receive_text() == frame
            await csms.send_text(ocppj.encode_result("h-2", {"currentTime": T}))
            assert await site.station_receives() == [3, "h-2", {"currentTime": T}]
        gaps = [later - earlier for earlier, later in zip(site.attempts_s, site.attempts_s[1:], strict=False)]
        assert len(site.attempts_s) == 4
        assert 0.5 <= gaps[0] < gaps[2] and 2.0 <= gaps[2] <= 4.0 + 0.1, gaps
        assert site.autonomy.queue.messages("CS01") == 0


async def test_a_call_the_csms_took_but_never_answered_is_answered_locally_and_replayed(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_site(tmp_path) as site:
        with trio.fail_after(60):
            await boot_online(site)
            assert site.csms is not None
            frame = await site.station_call("t-1", "TransactionEvent", tx("Updated", 1))
            assert await site.csms.receive_text() == frame
            await site.csms.abort()  # gone before it answered
            assert await site.station_receives() == [3, "t-1", {}]
            csms = await site.restored.receive()
            replayed = json.loads(await csms.receive_text())
            assert replayed[3]["seqNo"] == 1
            await csms.send_text(ocppj.encode_result(replayed[1], {}))
            await site.mode("relaying")


async def test_a_csms_silent_past_its_ping_timeout_is_treated_as_lost(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_site(tmp_path, script=[UNREACHABLE] * 100) as site:
        with trio.fail_after(60):
            await boot_online(site)
            start_s = trio.current_time()
            # Nobody reads the CSMS end any more: no pong comes back.
            await site.mode("local")
            assert 10 + 5 <= trio.current_time() - start_s <= 10 + 5 + 1
            await site.station_call("h-1", "Heartbeat", {})
            assert (await site.station_receives())[2] == {"currentTime": "2026-12-03T12:00:00.000Z"}


async def test_a_csms_refusing_the_station_on_restore_closes_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_site(tmp_path, script=[UNREACHABLE, 401]) as site:
        with trio.fail_after(60):
            await boot_online(site)
            assert site.csms is not None
            await site.csms.aclose(1001, "bye")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await site.station.receive_text()
        assert closed.value.code == 1008 and "401" in closed.value.reason


async def test_past_max_offline_the_station_is_closed_as_under_the_strict_rule(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_site(tmp_path, online=False, script=[UNREACHABLE] * 1000, max_offline_s=60) as site:
        site.autonomy.boots.learn("CS01", {"status": "Accepted", "interval": 300})
        with trio.fail_after(120):
            start_s = trio.current_time()
            await site.station_call("h-1", "Heartbeat", {})
            assert (await site.station_receives())[2] == {"currentTime": "2026-12-03T12:00:00.000Z"}
            with pytest.raises(ConnectionClosed) as closed:
                await site.station.receive_text()
        assert (closed.value.code, closed.value.reason) == (1001, "CSMS connection lost")
        assert 60 <= trio.current_time() - start_s < 61
        assert site.autonomy.past_max_offline("CS01")


async def test_the_pacer_spreads_reconnections_over_the_site(autojump_clock: trio.testing.MockClock) -> None:
    pacer = ReconnectPacer(4.0, random.Random(3))
    turns: list[float] = []

    async def one() -> None:
        await pacer.turn()
        turns.append(trio.current_time())

    start_s = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    offsets = sorted(t - start_s for t in turns)
    # Eight stations at 4 a second: one in each quarter-second slot, two seconds in all.
    assert [int(offset // 0.25) for offset in offsets] == list(range(8))


async def test_a_replaced_pair_ending_late_does_not_erase_the_mode_of_its_successor(tmp_path: Path) -> None:
    with Store.open(tmp_path / "state") as store:
        autonomy = Autonomy(AutonomySettings(), store, registry=CollectorRegistry(), wall_clock=lambda: NOW)
        older, newer = object(), object()
        autonomy.claim("CS01", older, "local")
        autonomy.claim("CS01", newer, "local")  # the station connected again
        autonomy.set_mode("CS01", "replaying", older)  # the older pair, still winding down
        autonomy.set_mode("CS01", None, older)  # and its end, after the newer one began
        assert [(s.station_id, s.mode) for s in autonomy.stations()] == [("CS01", "local")]
        autonomy.set_mode("CS01", None, newer)
        assert autonomy.stations() == []


async def test_during_the_replay_new_calls_queue_behind_and_csms_calls_reach_the_station(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_site(tmp_path) as site:
        with trio.fail_after(60):
            await boot_online(site)
            assert site.csms is not None
            await site.csms.aclose(1001, "bye")
            await site.mode("local")
            await site.station_call("t-1", "TransactionEvent", tx("Updated", 1))
            assert await site.station_receives() == [3, "t-1", {}]
            csms = await site.restored.receive()
            first = json.loads(await csms.receive_text())
            assert first[3]["seqNo"] == 1
            # Before the CSMS answers: the station's next event is answered locally at once ...
            await site.station_call("t-2", "TransactionEvent", tx("Updated", 2))
            assert await site.station_receives() == [3, "t-2", {}]
            # ... and a call of the CSMS's reaches the station, whose answer goes back to the CSMS.
            get = ocppj.encode_call(
                "g-1", "GetVariables", {"getVariableData": [{"component": {"name": "X"}, "variable": {"name": "Y"}}]}
            )
            await csms.send_text(get)
            assert await site.station.receive_text() == get
            result = ocppj.encode_result(
                "g-1",
                {
                    "getVariableResult": [
                        {"attributeStatus": "Accepted", "component": {"name": "X"}, "variable": {"name": "Y"}}
                    ]
                },
            )
            await site.station.send_text(result)
            assert await csms.receive_text() == result
            await csms.send_text(ocppj.encode_result(first[1], {}))
            second = json.loads(await csms.receive_text())  # one outstanding at a time, in order
            assert second[3]["seqNo"] == 2 and second[1] != first[1]
            await csms.send_text(ocppj.encode_result(second[1], {}))
            await site.mode("relaying")
