"""A station pair over in-memory streams: observers, call tracking and the controller's calls.

These run on trio's virtual clock (``autojump_clock``): timeouts are asserted in virtual seconds.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from router.link import CallRejected, CallTimeout, LinkTimings, StationLink
from router.metrics import RouterMetrics
from router.observers import LinkEvent, ObservedMessage, ObserverHub
from router.ocppj import MessageType
from router.transport import CLOSE_DRAIN_S, WebSocket, client_handshake, read_handshake
from tests.support.schemas import validate_frame

TX_STARTED = {
    "eventType": "Started",
    "timestamp": "2026-11-25T10:00:00Z",
    "triggerReason": "Authorized",
    "seqNo": 0,
    "transactionInfo": {"transactionId": "tx-1", "chargingState": "Charging"},
    "evse": {"id": 1, "connectorId": 1},
    "idToken": {"idToken": "TAG1", "type": "ISO14443"},
}


async def ws_pair(
    streams: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
    *,
    max_message_bytes: int = 65_536,
    compress: bool = True,
) -> tuple[WebSocket, WebSocket]:
    """(client end, server end) of one websocket over an in-memory stream pair."""
    client_stream, server_stream = streams or trio.testing.memory_stream_pair()
    server: list[WebSocket] = []

    async def serve() -> None:
        incoming = await read_handshake(server_stream, max_message_bytes=max_message_bytes)
        server.append(await incoming.accept("ocpp2.0.1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await client_handshake(
            client_stream,
            "lc",
            80,
            "/ocpp/CS01",
            subprotocols=["ocpp2.0.1"],
            max_message_bytes=max_message_bytes,
            compress=compress,
        )
    return client, server[0]


@dataclass
class Pair:
    link: StationLink
    station: WebSocket  # the station's own end
    csms: WebSocket  # the CSMS's own end
    hub: ObserverHub
    registry: CollectorRegistry


@asynccontextmanager
async def relayed_pair(timings: LinkTimings | None = None) -> AsyncIterator[Pair]:
    station_end, lc_station_side = await ws_pair()
    lc_csms_side, csms_end = await ws_pair()
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    hub = ObserverHub(metrics)
    link = StationLink(
        "CS01",
        lc_station_side,
        lc_csms_side,
        metrics=metrics,
        hub=hub,
        timings=timings or LinkTimings(station_ping_interval_s=0, csms_ping_interval_s=0),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        yield Pair(link, station_end, csms_end, hub, registry)
        link.close("test")
        nursery.cancel_scope.cancel()


async def test_observers_see_a_transaction_together_with_the_csms_answer(autojump_clock: trio.abc.Clock) -> None:
    async with relayed_pair() as pair:
        with pair.hub.subscribe("test", 10) as events:
            await pair.station.send_text(json.dumps([2, "m1", "TransactionEvent", TX_STARTED]))
            assert json.loads(await pair.csms.receive_text())[1] == "m1"
            answer = {"chargingPriority": 3, "idTokenInfo": {"status": "Accepted"}}
            await pair.csms.send_text(json.dumps([3, "m1", answer]))
            assert json.loads(await pair.station.receive_text()) == [3, "m1", answer]
            seen = [await events.receive() for _ in range(3)]
    connected, call, result = seen
    assert isinstance(connected, LinkEvent)
    assert isinstance(call, ObservedMessage) and isinstance(result, ObservedMessage)
    assert (call.source, call.message_type, call.action) == ("station", MessageType.CALL, "TransactionEvent")
    # K03.FR.04-06 need the priority together with the transaction it belongs to.
    assert (result.source, result.action, result.payload["chargingPriority"]) == ("csms", "TransactionEvent", 3)
    assert result.request["transactionInfo"]["transactionId"] == "tx-1"
    assert pair.registry.get_sample_value(
        "ocpp_lc_call_duration_seconds_count", {"leg": "csms", "action": "TransactionEvent"}
    )


async def test_a_slow_observer_loses_events_but_never_slows_forwarding(autojump_clock: trio.abc.Clock) -> None:
    async with relayed_pair() as pair:
        await trio.testing.wait_all_tasks_blocked()  # the link's "connected" event is out of the way
        with pair.hub.subscribe("sleepy", 2):
            for number in range(20):
                await pair.station.send_text(json.dumps([2, f"h{number}", "Heartbeat", {}]))
                assert json.loads(await pair.csms.receive_text())[1] == f"h{number}"
                await pair.csms.send_text(json.dumps([3, f"h{number}", {"currentTime": "2026-11-25T10:00:00Z"}]))
                await pair.station.receive_text()
    dropped = pair.registry.get_sample_value("ocpp_lc_observer_dropped_total", {"observer": "sleepy"})
    assert dropped == 40 - 2


async def test_link_events_mark_connect_and_disconnect(autojump_clock: trio.abc.Clock) -> None:
    registry = CollectorRegistry()
    hub = ObserverHub(RouterMetrics(registry))
    with hub.subscribe("test", 10) as events:
        station_end, lc_station_side = await ws_pair()
        lc_csms_side, _csms_end = await ws_pair()
        link = StationLink(
            "CS01", lc_station_side, lc_csms_side, metrics=RouterMetrics(CollectorRegistry()), hub=hub,
            timings=LinkTimings(station_ping_interval_s=0, csms_ping_interval_s=0),
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            await station_end.aclose(1000, "bye")
        first, last = await events.receive(), await events.receive()
    assert isinstance(first, LinkEvent) and first.kind == "connected"
    assert isinstance(last, LinkEvent) and (last.kind, last.reason) == ("disconnected", "station_closed")


async def test_controller_call_gets_the_station_answer_which_never_goes_upstream(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with relayed_pair() as pair, trio.open_nursery() as nursery:
        results: list[dict[str, object]] = []

        async def call() -> None:
            results.append(await pair.link.call("ClearChargingProfile", {"chargingProfileId": 900}))

        nursery.start_soon(call)
        frame = await pair.station.receive_text()
        validate_frame(frame)  # what the controller writes is schema-valid
        message_id = json.loads(frame)[1]
        await pair.station.send_text(json.dumps([3, message_id, {"status": "Accepted"}]))
        # A station call afterwards is the next thing the CSMS sees: the answer was not relayed (§6.4).
        await pair.station.send_text(json.dumps([2, "m9", "Heartbeat", {}]))
        assert json.loads(await pair.csms.receive_text())[1] == "m9"
    assert results == [{"status": "Accepted"}]
    assert pair.registry.get_sample_value(
        "ocpp_lc_lc_calls_total", {"action": "ClearChargingProfile", "outcome": "result"}
    )


async def test_controller_call_timeout_then_late_answer_is_dropped(autojump_clock: trio.abc.Clock) -> None:
    async with relayed_pair(
        LinkTimings(lc_call_timeout_s=5, station_ping_interval_s=0, csms_ping_interval_s=0)
    ) as pair:
        started = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                with pytest.raises(CallTimeout):
                    await pair.link.call("GetCompositeSchedule", {"duration": 60, "evseId": 1})
                assert trio.current_time() - started == pytest.approx(5)

            nursery.start_soon(call)
            message_id = json.loads(await pair.station.receive_text())[1]
        await pair.station.send_text(json.dumps([3, message_id, {"status": "Rejected"}]))
        await pair.station.send_text(json.dumps([2, "m2", "Heartbeat", {}]))
        assert json.loads(await pair.csms.receive_text())[1] == "m2"
    assert pair.registry.get_sample_value("ocpp_lc_late_replies_total") == 1


async def test_controller_call_rejected_with_a_callerror(autojump_clock: trio.abc.Clock) -> None:
    async with relayed_pair() as pair, trio.open_nursery() as nursery:

        async def call() -> None:
            with pytest.raises(CallRejected) as caught:
                await pair.link.call("SetChargingProfile", {"evseId": 1, "chargingProfile": {}})
            assert caught.value.code == "FormatViolation"

        nursery.start_soon(call)
        message_id = json.loads(await pair.station.receive_text())[1]
        await pair.station.send_text(json.dumps([4, message_id, "FormatViolation", "bad profile", {}]))


async def test_a_csms_call_waits_while_a_controller_call_is_outstanding(autojump_clock: trio.abc.Clock) -> None:
    # Part 4 §4.1.1: the station must never have two calls from our side outstanding.
    async with relayed_pair() as pair, trio.open_nursery() as nursery:

        async def call() -> None:
            await pair.link.call("ClearChargingProfile", {"chargingProfileId": 1})

        nursery.start_soon(call)
        lc_call = json.loads(await pair.station.receive_text())
        await pair.csms.send_text(json.dumps([2, "c1", "GetVariables", {"getVariableData": []}]))
        with trio.move_on_after(10) as waited:
            await pair.station.receive_text()
        assert waited.cancelled_caught, "the CSMS call overtook the controller's call"
        await pair.station.send_text(json.dumps([3, lc_call[1], {"status": "Accepted"}]))
        assert json.loads(await pair.station.receive_text())[1] == "c1"
    assert pair.registry.get_sample_value("ocpp_lc_held_csms_calls_total") == 1


async def test_an_unanswered_csms_call_frees_the_slot_after_the_hold_time(autojump_clock: trio.abc.Clock) -> None:
    timings = LinkTimings(csms_call_hold_s=20, lc_call_timeout_s=60, station_ping_interval_s=0, csms_ping_interval_s=0)
    async with relayed_pair(timings) as pair, trio.open_nursery() as nursery:
        await pair.csms.send_text(json.dumps([2, "c1", "GetVariables", {"getVariableData": []}]))
        assert json.loads(await pair.station.receive_text())[1] == "c1"
        started = trio.current_time()

        async def call() -> None:
            await pair.link.call("ClearChargingProfile", {"chargingProfileId": 1})

        nursery.start_soon(call)
        lc_call = json.loads(await pair.station.receive_text())
        assert trio.current_time() - started == pytest.approx(20)
        await pair.station.send_text(json.dumps([3, lc_call[1], {"status": "Accepted"}]))
    assert pair.registry.get_sample_value("ocpp_lc_unanswered_calls_total") == 1


# -- #13.5: an answer to the controller's call is recognised by its id alone ------------------------


@pytest.mark.parametrize(
    "malformed",
    [
        '[4, "{id}", "FormatViolation", "four elements"]',
        '[4, "{id}", "GenericError", "no details", null]',
        '[3, "{id}", null]',
        '[3, "{id}"]',
    ],
    ids=["callerror-4-elements", "callerror-null-details", "callresult-null-payload", "two-elements"],
)
async def test_a_malformed_answer_to_a_controller_call_stays_local_and_ends_the_call(
    autojump_clock: trio.abc.Clock, malformed: str
) -> None:
    # §6.4: answers to the controller's own calls are never relayed to the CSMS, whatever their shape.
    async with relayed_pair(
        LinkTimings(lc_call_timeout_s=30, station_ping_interval_s=0, csms_ping_interval_s=0)
    ) as pair:
        async with trio.open_nursery() as nursery:
            failures: list[tuple[BaseException, float]] = []

            async def call() -> None:
                started = trio.current_time()
                try:
                    await pair.link.call("ClearChargingProfile", {"chargingProfileId": 900})
                except CallRejected as exc:
                    failures.append((exc, trio.current_time() - started))

            nursery.start_soon(call)
            message_id = json.loads(await pair.station.receive_text())[1]
            await pair.station.send_text(malformed.replace("{id}", message_id))
        # The call ended as a failure at once, not after its 30 s timeout.
        assert len(failures) == 1
        assert failures[0][1] < 1
        await pair.station.send_text(json.dumps([2, "m9", "Heartbeat", {}]))
        assert json.loads(await pair.csms.receive_text())[1] == "m9"  # the malformed answer never went up
    assert pair.registry.get_sample_value(
        "ocpp_lc_lc_calls_total", {"action": "ClearChargingProfile", "outcome": "error"}
    )


# -- #13.7: the call slot covers malformed CSMS calls; our ids are tracked exactly -------------------


async def test_a_csms_answer_whose_id_looks_like_ours_is_relayed(autojump_clock: trio.abc.Clock) -> None:
    async with relayed_pair() as pair:
        await pair.csms.send_text(json.dumps([2, "lc~4711", "GetVariables", {"getVariableData": []}]))
        assert json.loads(await pair.station.receive_text())[1] == "lc~4711"
        answer = json.dumps([3, "lc~4711", {"getVariableResult": []}])
        await pair.station.send_text(answer)
        with trio.fail_after(5):
            assert await pair.csms.receive_text() == answer


async def test_a_malformed_csms_call_waits_for_the_slot_like_any_other(autojump_clock: trio.abc.Clock) -> None:
    # Part 4 §4.1.1: a frame meant as a call is a call to the station, even if it does not parse.
    async with relayed_pair() as pair, trio.open_nursery() as nursery:

        async def call() -> None:
            await pair.link.call("ClearChargingProfile", {"chargingProfileId": 1})

        nursery.start_soon(call)
        lc_call = json.loads(await pair.station.receive_text())
        await pair.csms.send_text('[2, "c1", "GetVariables", null]')
        with trio.move_on_after(10) as waited:
            await pair.station.receive_text()
        assert waited.cancelled_caught, "the malformed CSMS call overtook the controller's call"
        await pair.station.send_text(json.dumps([3, lc_call[1], {"status": "Accepted"}]))
        assert await pair.station.receive_text() == '[2, "c1", "GetVariables", null]'  # byte-for-byte
        # The station's error answer to it reaches the CSMS and frees the slot for the next call.
        error = json.dumps([4, "c1", "FormatViolation", "payload must be an object", {}])
        await pair.station.send_text(error)
        assert await pair.csms.receive_text() == error


# -- #13.6: a held CSMS call never stalls the rest of the CSMS leg ----------------------------------


async def test_answers_from_the_csms_flow_while_its_calls_wait_for_the_slot(autojump_clock: trio.abc.Clock) -> None:
    async with relayed_pair() as pair, trio.open_nursery() as nursery:

        async def call() -> None:
            await pair.link.call("ClearChargingProfile", {"chargingProfileId": 1})

        nursery.start_soon(call)
        lc_call = json.loads(await pair.station.receive_text())
        # Two CSMS calls wait behind the controller's (the CSMS gave up on the first and sent another).
        await pair.csms.send_text(json.dumps([2, "c1", "GetVariables", {"getVariableData": []}]))
        await pair.csms.send_text(json.dumps([2, "c2", "GetVariables", {"getVariableData": []}]))
        await pair.station.send_text(json.dumps([2, "h1", "Heartbeat", {}]))
        assert json.loads(await pair.csms.receive_text())[1] == "h1"
        await trio.sleep(2)
        sent_at = trio.current_time()
        await pair.csms.send_text(json.dumps([3, "h1", {"currentTime": "2026-11-25T10:00:00Z"}]))
        assert json.loads(await pair.station.receive_text())[1] == "h1"
        assert trio.current_time() - sent_at < 0.5  # not queued behind the held calls
        await pair.station.send_text(json.dumps([3, lc_call[1], {"status": "Accepted"}]))
        assert json.loads(await pair.station.receive_text())[1] == "c1"


def test_the_default_call_hold_ends_before_a_csms_gives_up() -> None:
    # A CSMS typically times its calls out after 30 s; a hold at least that long would keep its next
    # call waiting behind one it has already abandoned.
    assert LinkTimings().csms_call_hold_s < 30


# -- #13.9: a slow but healthy peer is not closed as dead -------------------------------------------


class SlowReader(trio.abc.Stream):
    """A stream end that takes at most ``piece_bytes`` per ``period_s`` (a slow uplink's far side)."""

    def __init__(self, inner: trio.abc.Stream, piece_bytes: int, period_s: float) -> None:
        self._inner = inner
        self._piece_bytes = piece_bytes
        self._period_s = period_s

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.sleep(self._period_s)
        return await self._inner.receive_some(min(max_bytes or self._piece_bytes, self._piece_bytes))

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_slow_uplink_is_not_mistaken_for_a_dead_peer(autojump_clock: trio.abc.Clock) -> None:
    # A 256 KiB message takes ~16 s to reach the CSMS at 16 KiB/s. Meanwhile the controller's ping to
    # the CSMS waits behind it, and the station's pongs arrive while the pump reading the station is
    # blocked sending to the CSMS: neither peer is silent, so with 3 s ping timeouts both stay up.
    timings = LinkTimings(
        station_ping_interval_s=2, station_ping_timeout_s=3, csms_ping_interval_s=2, csms_ping_timeout_s=3
    )
    station_end, lc_station_side = await ws_pair(max_message_bytes=1 << 20)
    lc_stream, csms_stream = trio.testing.lockstep_stream_pair()
    lc_csms_side, csms_end = await ws_pair(
        (lc_stream, SlowReader(csms_stream, 16_384, 1.0)), max_message_bytes=1 << 20, compress=False
    )
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    link = StationLink(
        "CS01", lc_station_side, lc_csms_side, metrics=metrics, hub=ObserverHub(metrics), timings=timings
    )
    big = json.dumps([2, "big", "DataTransfer", {"vendorId": "x", "data": "y" * 262_144}])
    arrived: list[tuple[str, float]] = []
    both_arrived = trio.Event()

    async def csms_reads() -> None:
        while True:
            arrived.append((await csms_end.receive_text(), trio.current_time()))
            if len(arrived) == 2:
                both_arrived.set()

    async def station_reads() -> None:
        while True:
            await station_end.receive_text()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            nursery.start_soon(csms_reads)
            nursery.start_soon(station_reads)
            started = trio.current_time()
            await station_end.send_text(big)
            await station_end.send_text(json.dumps([2, "h1", "Heartbeat", {}]))
            await both_arrived.wait()
            assert not link.done.is_set(), "the pair was closed as dead"
            link.close("test")
            nursery.cancel_scope.cancel()
    assert arrived[0][0] == big  # byte-for-byte
    assert arrived[0][1] - started > 10  # it really was slow
    assert json.loads(arrived[1][0])[1] == "h1"
    for reason in ("station_timeout", "csms_timeout"):
        assert not registry.get_sample_value("ocpp_lc_pair_closes_total", {"reason": reason})


async def test_a_silent_station_is_still_closed_after_the_ping_timeout(autojump_clock: trio.abc.Clock) -> None:
    timings = LinkTimings(station_ping_interval_s=10, station_ping_timeout_s=5, csms_ping_interval_s=0)
    async with relayed_pair(timings) as pair:
        # Nobody reads the station's end: it never answers the ping, and nothing else arrives.
        started = trio.current_time()
        with trio.fail_after(60):
            await pair.link.done.wait()
        # Dead at 10 s + 5 s; closing then waits up to CLOSE_DRAIN_S for a close frame that never comes.
        assert 15 <= trio.current_time() - started <= 15 + CLOSE_DRAIN_S
    assert pair.registry.get_sample_value("ocpp_lc_pair_closes_total", {"reason": "station_timeout"}) == 1
