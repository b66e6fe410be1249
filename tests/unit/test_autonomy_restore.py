"""The restore after an outage, in the corners: the CSMS not accepting the replayed boot, a station that
reboots or reconnects during the replay (issue #12, the known gaps of the first build).

The set-up is :mod:`tests.support.autonomy_site`: the appliance's own link and autonomous leg over
in-memory websockets, timers on trio's virtual clock, every frame the controller writes to the station
validated against the OCA schemas.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from router import ocppj
from router.link import LinkTimings, StationLink
from router.metrics import RouterMetrics
from router.observers import ObserverHub
from router.store import Store
from router.transport import ConnectionClosed, HandshakeFailed, WebSocket
from tests.support.autonomy_site import (
    BOOT,
    Site,
    T,
    autonomous_pair,
    boot_online,
    make_autonomy,
    open_site,
    receive_call,
    tx,
    wait_for_mode,
)
from tests.support.schemas import validate_frame
from tests.unit.test_link import ws_pair


async def go_local_with_a_reboot(site: Site) -> None:
    """Online first; then the CSMS goes, and the station reboots and sends one event while served locally."""
    await boot_online(site)
    assert site.csms is not None
    await site.csms.aclose(1001, "CSMS going down")
    await site.mode("local")
    await site.station_call("b-2", "BootNotification", {**BOOT, "reason": "PowerUp"})
    assert (await site.station_receives())[2]["status"] == "Accepted"  # the CSMS's last verdict
    await site.station_call("t-1", "TransactionEvent", tx("Updated", 1))
    assert await site.station_receives() == [3, "t-1", {}]


async def answer_boot(csms: WebSocket, boot: list[Any], status: str, interval: int) -> None:
    """The CSMS answers the replayed ``boot`` with ``status`` and ``interval``."""
    await csms.send_text(ocppj.encode_result(boot[1], {"currentTime": T, "interval": interval, "status": status}))


async def accept_then_take_the_event(site: Site, csms: WebSocket, boot: list[Any]) -> None:
    """The CSMS accepts ``boot``; the event kept by :func:`go_local_with_a_reboot` follows; then the pair relays."""
    await answer_boot(csms, boot, "Accepted", 300)
    event, _ = await receive_call(csms)
    assert event[2] == "TransactionEvent" and event[3]["seqNo"] == 1
    await csms.send_text(ocppj.encode_result(event[1], {}))
    await site.mode("relaying")


async def test_a_replayed_boot_answered_pending_holds_the_queue_and_is_sent_again_after_its_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # B02.FR.02 / B01.FR.08: nothing but the boot until the CSMS accepts it; B02.FR.08: the boot again
    # after the interval it gave; B02.FR.06: the connection stays open meanwhile.
    async with open_site(tmp_path) as site:
        with trio.fail_after(120):
            await go_local_with_a_reboot(site)
            csms = await site.restored.receive()
            boot, _ = await receive_call(csms)
            assert boot[2] == "BootNotification" and boot[3]["reason"] == "PowerUp"
            await answer_boot(csms, boot, "Pending", 30)
            answered_s = trio.current_time()
            again, again_s = await receive_call(csms)
            assert again[2] == "BootNotification" and again[3] == boot[3]  # not the queued event
            assert 30 <= again_s - answered_s < 31
            await accept_then_take_the_event(site, csms, again)
        assert site.autonomy.queue.messages("CS01") == 0
        assert site.autonomy.boots.accepted_interval("CS01") == 300


async def test_a_replayed_boot_answered_rejected_closes_the_csms_leg_until_its_interval_then_boots_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # B03.FR.02: nothing to the CSMS before the retry interval; B03.FR.04: the connection may be closed
    # meanwhile. The station itself stays connected and is still answered locally; nothing is lost.
    async with open_site(tmp_path) as site:
        with trio.fail_after(120):
            await go_local_with_a_reboot(site)
            csms = await site.restored.receive()
            boot, _ = await receive_call(csms)
            assert boot[2] == "BootNotification"
            await answer_boot(csms, boot, "Rejected", 40)
            answered_s = trio.current_time()
            with pytest.raises(ConnectionClosed):
                await csms.receive_text()  # closed by the controller, the queued event not sent
            # Still connected, answered as the CSMS would answer a rejected station (B03.FR.07).
            await site.station_call("h-1", "Heartbeat", {})
            assert (await site.station_receives())[:3] == [4, "h-1", "SecurityError"]
            csms = await site.restored.receive()
            assert site.attempts_s[-1] - answered_s >= 40
            again, again_s = await receive_call(csms)
            assert again[2] == "BootNotification" and again_s - answered_s >= 40
            await accept_then_take_the_event(site, csms, again)
        assert all(attempt - answered_s >= 40 for attempt in site.attempts_s[1:])
        assert site.autonomy.queue.messages("CS01") == 0


async def test_a_boot_the_station_sends_during_the_replay_goes_before_the_rest_of_the_queue(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # B01.FR.08: after a reboot nothing, cached messages included, reaches the CSMS before the boot.
    async with open_site(tmp_path) as site:
        with trio.fail_after(60):
            await boot_online(site)
            assert site.csms is not None
            await site.csms.aclose(1001, "bye")
            await site.mode("local")
            for seq_no in (1, 2):
                await site.station_call(f"t-{seq_no}", "TransactionEvent", tx("Updated", seq_no))
                assert await site.station_receives() == [3, f"t-{seq_no}", {}]
            csms = await site.restored.receive()
            first, _ = await receive_call(csms)
            assert first[3]["seqNo"] == 1
            await site.station_call("b-2", "BootNotification", BOOT)  # the station reboots meanwhile
            assert (await site.station_receives())[2]["status"] == "Accepted"
            await csms.send_text(ocppj.encode_result(first[1], {}))
            boot, _ = await receive_call(csms)
            assert boot[2] == "BootNotification"
            await answer_boot(csms, boot, "Accepted", 300)
            second, _ = await receive_call(csms)
            assert second[2] == "TransactionEvent" and second[3]["seqNo"] == 2
            await csms.send_text(ocppj.encode_result(second[1], {}))
            await site.mode("relaying")


async def test_a_station_reconnecting_during_the_replay_repeats_no_message(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The new pair takes the replay over only once the old one has its answer: each message reaches the
    # CSMS once (a repeat is kept for a crash, which seqNo lets the CSMS spot).
    with Store.open(tmp_path / "state") as store:
        registry = CollectorRegistry()
        metrics = RouterMetrics(registry)
        hub = ObserverHub(metrics)
        autonomy = make_autonomy(store, registry, reconnect_backoff_max_s=8.0)
        autonomy.boots.learn("CS01", {"status": "Accepted", "interval": 300})
        legs_send, legs = trio.open_memory_channel[WebSocket](8)

        async def connect() -> WebSocket:
            client, server = await ws_pair()
            await legs_send.send(server)
            return client

        timings = LinkTimings(csms_ping_interval_s=0, lc_call_timeout_s=20)

        async def pair(nursery: trio.Nursery, real: WebSocket | None) -> tuple[StationLink, WebSocket]:
            station_end, lc_station = await ws_pair()
            upstream, link = autonomous_pair(
                "CS01", lc_station, real, autonomy=autonomy, connect=connect, metrics=metrics, timings=timings, hub=hub
            )

            async def run() -> None:
                # As the station handler does: the leg's tasks live and die with the pair.
                async with trio.open_nursery() as tasks:
                    await tasks.start(upstream.run)
                    upstream.call_station = link.call
                    await link.run()
                    tasks.cancel_scope.cancel()

            nursery.start_soon(run)
            return link, station_end

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                old_link, station = await pair(nursery, None)  # the CSMS is unreachable: served locally
                sent: dict[str, str] = {}
                for seq_no in (1, 2):
                    sent[f"t-{seq_no}"] = "TransactionEvent"
                    await station.send_text(ocppj.encode_call(f"t-{seq_no}", "TransactionEvent", tx("Updated", seq_no)))
                    assert validate_frame(await station.receive_text(), sent) == [3, f"t-{seq_no}", {}]
                old_csms = await legs.receive()
                first, _ = await receive_call(old_csms)
                assert first[3]["seqNo"] == 1
                # The station connects again (the CSMS is back, so the new pair has its leg at once) and
                # the server replaces the old pair, whose replayed call is still unanswered.
                new_real, new_csms = await ws_pair()
                new_link, _station = await pair(nursery, new_real)
                old_link.close("replaced", 1000, "replaced by a newer connection")
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(ConnectionClosed):  # the old leg goes once its call is answered
                    await old_csms.send_text(ocppj.encode_result(first[1], {}))
                    await old_csms.receive_text()
                following, _ = await receive_call(new_csms)
                assert following[3]["seqNo"] == 2  # not seqNo 1 a second time
                await new_csms.send_text(ocppj.encode_result(following[1], {}))
                await wait_for_mode(autonomy, "CS01", "relaying")
                assert autonomy.queue.messages("CS01") == 0
                new_link.close("test over")


async def test_once_one_station_reaches_the_csms_again_the_others_stop_backing_off(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Found by tests/bench/outage.py: with a reconnect rate the site does not saturate, stations sat out
    # their backoff (up to reconnect_backoff_max_s) after the CSMS was back. One station getting through
    # now wakes the others, which then come at the pacer's rate.
    back_at_s = 100.0
    with Store.open(tmp_path / "state") as store:
        registry = CollectorRegistry()
        metrics = RouterMetrics(registry)
        autonomy = make_autonomy(store, registry, reconnect_backoff_max_s=600.0, reconnect_rate_per_s=10.0)
        restored: dict[str, float] = {}
        done = trio.Event()

        def connector(station_id: str) -> Any:
            async def connect() -> WebSocket:
                if trio.current_time() < back_at_s:
                    raise HandshakeFailed("connection refused", kind="unreachable")
                restored.setdefault(station_id, trio.current_time())
                if len(restored) == 2:
                    done.set()
                client, _server = await ws_pair()
                return client

            return connect

        with trio.fail_after(1000):
            async with trio.open_nursery() as nursery:
                for index, station_id in enumerate(("CS01", "CS02")):
                    autonomy.boots.learn(station_id, {"status": "Accepted", "interval": 300})
                    _station_end, lc_station = await ws_pair()
                    upstream, link = autonomous_pair(
                        station_id,
                        lc_station,
                        None,
                        autonomy=autonomy,
                        connect=connector(station_id),
                        metrics=metrics,
                        timings=LinkTimings(csms_ping_interval_s=0),
                    )
                    await nursery.start(upstream.run)
                    nursery.start_soon(link.run)
                    await trio.sleep(7.0 * index)  # their backoffs out of step
                await done.wait()
                nursery.cancel_scope.cancel()
        first, second = sorted(restored.values())
        assert back_at_s <= first and second - first < 1.0, restored


async def test_a_csms_holding_the_replayed_boot_pending_is_no_outage_however_long_it_lasts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # #12 leftover A. B02.FR.06: while the CSMS answers Pending neither side closes the connection; B02.FR.01:
    # the CSMS holds a station Pending for as long as it wants to (to read or set its configuration). So the
    # hold has no time limit, and it is not time without the CSMS: max_offline_s (60 s here) bounds only that.
    # A hold longer than max_offline_s must leave the station served, and a loss of the leg after it must
    # get the station the whole max_offline_s again (not a close on the spot, as the strict rule would do).
    async with open_site(tmp_path, max_offline_s=60) as site:
        with trio.fail_after(600):
            await go_local_with_a_reboot(site)
            csms = await site.restored.receive()
            held_from_s = trio.current_time()
            while trio.current_time() - held_from_s < 150:  # six Pending answers, 30 s apart
                boot, _ = await receive_call(csms)
                assert boot[2] == "BootNotification"  # never the queued event while Pending (B02.FR.02)
                pending = {"currentTime": T, "interval": 30, "status": "Pending"}
                await csms.send_text(ocppj.encode_result(boot[1], pending))
            assert site.upstream.mode == "replaying"
            assert not site.autonomy.past_max_offline("CS01")
            assert site.autonomy.longest_offline_s() < 31  # the alert on time offline does not fire
            assert site.metric("ocpp_lc_autonomy_replayed_boot_held_total", status="Pending") == 6  # counted
            await site.station_call("h-1", "Heartbeat", {})  # still connected, answered as the CSMS would
            assert (await site.station_receives())[:3] == [4, "h-1", "SecurityError"]
            await csms.aclose(1001, "CSMS restarting")  # the leg drops during the hold
            csms = await site.restored.receive()  # restored: the station was not closed
            boot, _ = await receive_call(csms)
            assert boot[2] == "BootNotification"
            await accept_then_take_the_event(site, csms, boot)
        assert site.autonomy.queue.messages("CS01") == 0


async def test_a_report_the_csms_asks_for_while_it_holds_the_replayed_boot_pending_reaches_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # #12 leftover B. B02.FR.01: a CSMS holds a station Pending to read its configuration first; B02.FR.02:
    # what it asks for with GetBaseReport may be sent while Pending, and B02.FR.09 exempts it from the
    # SecurityError. So the station's NotifyReport must get its answer, not SecurityError, and must reach
    # the CSMS now: queued behind the held boot, the report the CSMS waits for to accept would never come.
    async with open_site(tmp_path) as site:
        with trio.fail_after(120):
            await go_local_with_a_reboot(site)
            csms = await site.restored.receive()
            boot, _ = await receive_call(csms)
            assert boot[2] == "BootNotification"
            await answer_boot(csms, boot, "Pending", 30)
            get = ocppj.encode_call("g-1", "GetBaseReport", {"requestId": 6, "reportBase": "FullInventory"})
            await csms.send_text(get)
            assert await site.station_receives() == json.loads(get)
            accepted = ocppj.encode_result("g-1", {"status": "Accepted"})
            await site.station.send_text(accepted)
            assert await csms.receive_text() == accepted
            report = await site.station_call("r-1", "NotifyReport", {"requestId": 6, "generatedAt": T, "seqNo": 0})
            assert await csms.receive_text() == report  # as the station sent it, during the hold
            await csms.send_text(ocppj.encode_result("r-1", {}))
            assert await site.station_receives() == [3, "r-1", {}]  # the CSMS's own answer
            again, _ = await receive_call(csms)  # the hold goes on: the boot again after its interval
            assert again[2] == "BootNotification"
            await accept_then_take_the_event(site, csms, again)  # and nothing else: the report was not queued
        assert site.autonomy.queue.messages("CS01") == 0


async def test_a_report_sent_on_during_the_pending_hold_is_answered_locally_if_the_leg_goes_first(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Like any call the lost CSMS left open: answered as the CSMS would, kept, and delivered on restore.
    async with open_site(tmp_path) as site:
        with trio.fail_after(120):
            await go_local_with_a_reboot(site)
            csms = await site.restored.receive()
            boot, _ = await receive_call(csms)
            await answer_boot(csms, boot, "Pending", 30)
            part = {"requestId": 6, "generatedAt": T, "seqNo": 0}
            report = await site.station_call("r-1", "NotifyReport", part)
            assert await csms.receive_text() == report
            await csms.aclose(1001, "gone before it answered")
            assert await site.station_receives() == [3, "r-1", {}]
            csms = await site.restored.receive()
            delivered: list[tuple[str, Any]] = []
            for verdict in ("Accepted", None, None):  # the boot, then the queue: the event, the report
                call, _ = await receive_call(csms)
                delivered.append((call[2], call[3].get("seqNo")))
                answer = {"currentTime": T, "interval": 300, "status": verdict} if verdict else {}
                await csms.send_text(ocppj.encode_result(call[1], answer))
            await site.mode("relaying")
        assert delivered == [("BootNotification", None), ("TransactionEvent", 1), ("NotifyReport", 0)]
