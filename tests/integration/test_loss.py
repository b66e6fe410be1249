"""Connection loss (Part 4 §6.3): when one leg of a pair ends, the other is closed, promptly.

Timer cases run on trio's virtual clock (``autojump_clock``) over in-memory streams: with real
sockets the clock could jump while bytes are in flight. A :class:`~router.link.StationLink` is built
directly on two websockets whose far ends the test holds, one as the station and one as the CSMS.
Graceful shutdown is checked on the whole appliance over loopback sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from wsproto.frame_protocol import FrameProtocol, Opcode

from router.link import CloseDecision, LinkTimings, StationLink
from router.metrics import RouterMetrics
from router.observers import ObserverHub
from router.transport import ConnectionClosed, WebSocket, client_handshake, read_handshake
from tests.integration.conftest import (
    IO_TIMEOUT_S,
    OCPP201,
    STRICT_6_3,
    TASKS_PER_STRICT_PAIR,
    FakeCsms,
    Lab,
    assert_still_served,
    metric,
    next_link_event,
    settled_pair_tasks,
)

#: Virtual seconds: generous, since nothing here waits on the real world.
VIRTUAL_TIMEOUT_S = 1000.0
PING_INTERVAL_S = 5.0
PING_TIMEOUT_S = 3.0
#: Keepalives so rare they never fire in a test that is not about them.
QUIET_S = 10_000.0


async def websocket_pair(client_stream: trio.abc.Stream, server_stream: trio.abc.Stream) -> tuple[WebSocket, WebSocket]:
    """Run both sides of an opening handshake over an in-memory stream pair: (client, server)."""
    ends: dict[str, WebSocket] = {}

    async def serve() -> None:
        incoming = await read_handshake(server_stream, max_message_bytes=65_536)
        ends["server"] = await incoming.accept(incoming.subprotocols[0])

    async def dial() -> None:
        ends["client"] = await client_handshake(client_stream, "lc.test", 80, "/ocpp/CS01", [OCPP201])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        nursery.start_soon(dial)
    return ends["client"], ends["server"]


@dataclass
class Leg:
    """The test's end of one leg: its websocket, the raw stream under it, how it saw the close."""

    websocket: WebSocket
    raw: trio.abc.Stream
    is_client: bool
    frames: list[str] = field(default_factory=list)
    closed: ConnectionClosed | None = None
    closed_at_s: float | None = None
    done: trio.Event = field(default_factory=trio.Event)

    async def read_until_closed(self) -> None:
        """Read (which also answers pings) until the router closes this leg."""
        try:
            while True:
                self.frames.append(await self.websocket.receive_text())
        except ConnectionClosed as closed:
            self.closed = closed
            self.closed_at_s = trio.current_time()
        finally:
            self.done.set()

    async def close_frame_in_buffer(self) -> tuple[int, str]:
        """The close frame the router left for a peer that stopped reading, from the raw bytes.

        Read with a bare frame parser: a websocket object would try to answer the pings queued in
        front of it on a stream that is already closed.
        """
        frames = FrameProtocol(client=self.is_client, extensions=[])
        while data := await self.raw.receive_some():
            frames.receive_bytes(bytes(data))
        received = list(frames.received_frames())
        assert received and received[-1].opcode is Opcode.CLOSE, [frame.opcode for frame in received]
        assert all(frame.opcode is Opcode.PING for frame in received[:-1])  # nothing else was pending
        code, reason = received[-1].payload
        return int(code), reason


@dataclass
class Pair:
    link: StationLink
    station: Leg
    csms: Leg
    registry: CollectorRegistry
    started_at_s: float
    decision: CloseDecision | None = None
    ended_at_s: float | None = None


@asynccontextmanager
async def relayed_pair(timings: LinkTimings) -> AsyncIterator[Pair]:
    """A running StationLink between a test station and a test CSMS, over memory streams."""
    station_raw, router_station_raw = trio.testing.memory_stream_pair()
    router_csms_raw, csms_raw = trio.testing.memory_stream_pair()
    station_ws, router_station_ws = await websocket_pair(station_raw, router_station_raw)
    router_csms_ws, csms_ws = await websocket_pair(router_csms_raw, csms_raw)
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    link = StationLink(
        "CS01", router_station_ws, router_csms_ws, metrics=metrics, hub=ObserverHub(metrics), timings=timings
    )
    pair = Pair(link, Leg(station_ws, station_raw, True), Leg(csms_ws, csms_raw, False), registry, trio.current_time())

    async def run_link() -> None:
        pair.decision = await link.run()
        pair.ended_at_s = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_link)
        yield pair
        nursery.cancel_scope.cancel()


def timings(**overrides: float) -> LinkTimings:
    values = {
        "station_ping_interval_s": QUIET_S,
        "station_ping_timeout_s": PING_TIMEOUT_S,
        "csms_ping_interval_s": QUIET_S,
        "csms_ping_timeout_s": PING_TIMEOUT_S,
    } | overrides
    return LinkTimings(**values)  # type: ignore[arg-type]


def closes(pair: Pair, reason: str) -> float:
    value = pair.registry.get_sample_value("ocpp_lc_pair_closes_total", {"reason": reason})
    return 0.0 if value is None else value


# ---------------------------------------------------------------------------------------------------
# One side closes or vanishes: the other side is told at once
# ---------------------------------------------------------------------------------------------------


async def test_station_close_is_passed_on_to_the_csms(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT_S):
        async with relayed_pair(timings()) as pair, trio.open_nursery() as nursery:
            nursery.start_soon(pair.csms.read_until_closed)
            await pair.station.websocket.aclose(1000, "rebooting")
            await pair.csms.done.wait()
            await pair.link.done.wait()

    assert pair.csms.closed is not None
    assert (pair.csms.closed.code, pair.csms.closed.reason) == (1000, "rebooting")
    assert pair.csms.closed_at_s == pair.started_at_s  # no timer involved: same virtual instant
    assert pair.decision is not None and pair.decision.reason == "station_closed"
    assert closes(pair, "station_closed") == 1


@pytest.mark.parametrize(("code", "reason"), [(1000, "bye"), (1001, "CSMS restarting"), (4000, "account suspended")])
async def test_csms_close_is_passed_on_to_the_station(
    autojump_clock: trio.testing.MockClock, code: int, reason: str
) -> None:
    # The station must not behave differently behind the controller (Part 4 §6.1): it gets the code
    # and reason the CSMS closed with, including a private-use (4000-4999) code, which RFC 6455
    # §7.4.2 lets an application send.
    with trio.fail_after(VIRTUAL_TIMEOUT_S):
        async with relayed_pair(timings()) as pair, trio.open_nursery() as nursery:
            nursery.start_soon(pair.station.read_until_closed)
            await pair.csms.websocket.aclose(code, reason)
            await pair.station.done.wait()
            await pair.link.done.wait()

    assert pair.station.closed is not None
    assert (pair.station.closed.code, pair.station.closed.reason) == (code, reason)
    assert pair.station.closed_at_s == pair.started_at_s
    assert pair.decision is not None and pair.decision.reason == "csms_closed"


async def test_station_that_vanishes_gets_its_upstream_closed_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT_S):
        async with relayed_pair(timings()) as pair, trio.open_nursery() as nursery:
            nursery.start_soon(pair.csms.read_until_closed)
            await pair.station.raw.aclose()  # no close frame: the TCP connection is just gone (1006)
            await pair.csms.done.wait()
            await pair.link.done.wait()

    assert pair.csms.closed is not None
    assert pair.csms.closed.code == 1001  # 1006 is never sent on the wire (RFC 6455 §7.4.1)
    assert pair.csms.closed.reason  # with a reason the CSMS operator can read
    assert pair.csms.closed.by_peer
    assert pair.csms.closed_at_s == pair.started_at_s
    assert pair.decision is not None and pair.decision.reason == "station_lost"
    assert closes(pair, "station_lost") == 1


async def test_csms_that_vanishes_gets_the_station_closed_with_1001(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT_S):
        async with relayed_pair(timings()) as pair, trio.open_nursery() as nursery:
            nursery.start_soon(pair.station.read_until_closed)
            await pair.csms.raw.aclose()
            await pair.station.done.wait()
            await pair.link.done.wait()

    # §6.3: the station must see the loss, so that it queues messages as it would directly.
    assert pair.station.closed is not None
    assert pair.station.closed.code == 1001
    assert pair.station.closed.reason
    assert pair.station.closed_at_s == pair.started_at_s
    assert pair.decision is not None and pair.decision.reason == "csms_lost"


# ---------------------------------------------------------------------------------------------------
# A side that goes silent is found by its keepalive (Part 4 §5.2)
# ---------------------------------------------------------------------------------------------------


async def test_station_that_stops_answering_pings_is_closed_after_interval_plus_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link_timings = timings(station_ping_interval_s=PING_INTERVAL_S, station_ping_timeout_s=PING_TIMEOUT_S)
    with trio.fail_after(VIRTUAL_TIMEOUT_S):
        async with relayed_pair(link_timings) as pair, trio.open_nursery() as nursery:
            # The CSMS keeps reading; the station reads nothing, so it answers no ping.
            nursery.start_soon(pair.csms.read_until_closed)
            await pair.csms.done.wait()
            await pair.link.done.wait()
            station_close = await pair.station.close_frame_in_buffer()

    assert pair.csms.closed_at_s == pytest.approx(pair.started_at_s + PING_INTERVAL_S + PING_TIMEOUT_S)
    assert pair.csms.closed is not None and pair.csms.closed.code == 1001
    assert station_close[0] == 1001  # the station is told too, if it ever reads again
    assert pair.decision is not None and pair.decision.reason == "station_timeout"
    assert closes(pair, "station_timeout") == 1


async def test_dead_csms_is_detected_after_interval_plus_timeout_and_the_station_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link_timings = timings(csms_ping_interval_s=PING_INTERVAL_S, csms_ping_timeout_s=PING_TIMEOUT_S)
    with trio.fail_after(VIRTUAL_TIMEOUT_S):
        async with relayed_pair(link_timings) as pair, trio.open_nursery() as nursery:
            nursery.start_soon(pair.station.read_until_closed)
            await pair.station.done.wait()
            await pair.link.done.wait()
            csms_close = await pair.csms.close_frame_in_buffer()

    assert pair.station.closed_at_s == pytest.approx(pair.started_at_s + PING_INTERVAL_S + PING_TIMEOUT_S)
    assert pair.station.closed is not None and pair.station.closed.code == 1001
    assert csms_close[0] == 1001
    assert pair.decision is not None and pair.decision.reason == "csms_timeout"


async def test_peers_that_answer_pings_are_never_timed_out(autojump_clock: trio.testing.MockClock) -> None:
    link_timings = timings(
        station_ping_interval_s=PING_INTERVAL_S,
        station_ping_timeout_s=PING_TIMEOUT_S,
        csms_ping_interval_s=PING_INTERVAL_S,
        csms_ping_timeout_s=PING_TIMEOUT_S,
    )
    with trio.fail_after(VIRTUAL_TIMEOUT_S):
        async with relayed_pair(link_timings) as pair, trio.open_nursery() as nursery:
            nursery.start_soon(pair.station.read_until_closed)
            nursery.start_soon(pair.csms.read_until_closed)
            # A hundred ping rounds on each leg, in virtual time.
            await trio.sleep(100 * (PING_INTERVAL_S + PING_TIMEOUT_S))
            assert not pair.link.done.is_set()
            assert pair.station.closed is None and pair.csms.closed is None
            # Traffic still flows both ways after all that.
            await pair.station.websocket.send_text('[2,"1","Heartbeat",{}]')
            await pair.csms.websocket.send_text('[3,"1",{"currentTime":"2025-01-01T00:00:00Z"}]')
            await pair.station.websocket.aclose(1000, "done")
            await pair.link.done.wait()
    assert pair.csms.frames == ['[2,"1","Heartbeat",{}]']
    assert pair.decision is not None and pair.decision.reason == "station_closed"


# ---------------------------------------------------------------------------------------------------
# Graceful shutdown of the whole appliance
# ---------------------------------------------------------------------------------------------------


async def test_shutdown_closes_every_station_with_1001_within_the_grace_time(lab: Lab, csms: FakeCsms) -> None:
    grace_s = 1.0
    count = 10
    app = await lab.start_app(csms.url, routing={"shutdown_grace_s": grace_s})
    closed: dict[str, tuple[ConnectionClosed, float]] = {}

    async def station_until_closed(identity: str, ready: trio.MemorySendChannel[str]) -> None:
        station = await lab.station(app, identity)
        async with ready:
            await ready.send(identity)
        try:
            await station.receive_text()
        except ConnectionClosed as exc:
            closed[identity] = (exc, trio.current_time())

    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            send_ready, receive_ready = trio.open_memory_channel[str](count)
            async with send_ready:
                for index in range(count):
                    nursery.start_soon(station_until_closed, f"CS{index:02d}", send_ready.clone())
            async for _ in receive_ready:
                pass  # every station is connected once all clones are closed
            assert metric(app, "ocpp_lc_stations_connected") == count
            requested_at_s = trio.current_time()
            app.request_shutdown()
        await app.stopped.wait()
        stopped_after_s = trio.current_time() - requested_at_s
        await csms.wait_until(lambda: all(conn.ended for conn in csms.connections))

    assert sorted(closed) == [f"CS{index:02d}" for index in range(count)]
    for identity, (exc, at_s) in closed.items():
        assert (exc.code, exc.by_peer) == (1001, True), identity
        assert at_s - requested_at_s <= grace_s, identity
    assert stopped_after_s <= grace_s + 0.5
    assert {conn.closed.code for conn in csms.connections if conn.closed} == {1001}
    assert metric(app, "ocpp_lc_pair_closes_total", reason="shutdown") == count
    assert await settled_pair_tasks() == []


async def test_shutdown_is_bounded_by_the_grace_time_even_with_a_station_that_stopped_reading(
    lab: Lab, csms: FakeCsms
) -> None:
    # A hung station (connected, reading nothing) never answers the closing handshake. The 1001 is
    # sent at once, but the operator's shutdown_grace_s is what bounds how long stopping takes.
    grace_s = 0.5
    app = await lab.start_app(csms.url, routing={"shutdown_grace_s": grace_s})
    with trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        await lab.station(app, "HUNG")
        requested_at_s = trio.current_time()
        app.request_shutdown()
        with pytest.raises(ConnectionClosed) as closed:
            await healthy.receive_text()
        await app.stopped.wait()
        stopped_after_s = trio.current_time() - requested_at_s

    assert closed.value.code == 1001
    assert stopped_after_s <= grace_s + 0.5, f"stopping took {stopped_after_s:.2f} s with a {grace_s} s grace time"


async def test_csms_closing_its_socket_closes_the_station_and_frees_the_pair(lab: Lab, csms: FakeCsms) -> None:
    # §6.3 end to end over loopback: the CSMS ends one station's connection; only that station goes
    # (the strict rule: site autonomy off).
    app = await lab.start_app(csms.url, autonomy=STRICT_6_3)
    with app.hub.subscribe("test", 100) as events, trio.fail_after(IO_TIMEOUT_S):
        other = await lab.station(app, "OTHER")
        station = await lab.station(app, "CS01")
        csms.close(await csms.connection("CS01"), 1001, "CSMS restarting")
        with pytest.raises(ConnectionClosed) as closed:
            await station.receive_text()
        event = await next_link_event(events, "disconnected", "CS01")
        await assert_still_served(other)

    assert (closed.value.code, closed.value.reason) == (1001, "CSMS restarting")
    assert event.reason == "csms_closed"
    assert metric(app, "ocpp_lc_stations_connected") == 1
    assert metric(app, "ocpp_lc_upstream_links_up") == 1
    assert len(await settled_pair_tasks()) == TASKS_PER_STRICT_PAIR
