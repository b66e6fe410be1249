"""Is the peer of a websocket alive? A ping whose verdict only silence can make "dead".

Theory of operation (Part 4 §5: websocket pings keep a connection known to be alive). A relayed
leg is read by its pump, which stops reading while it waits to send on the *other* leg: a slow
station or uplink then left this leg's pongs unread, and a ping queued behind a large message of
ours counted its queueing time, so a slow but healthy peer was closed as dead. Here:

* anything that arrives from the peer after the ping was asked for proves it alive, its pong or any
  other byte;
* the time allowed for an answer starts once the ping is on its way; while it still waits behind a
  message of ours, the clock restarts whenever a piece of that message is taken by the stream (a
  draining uplink is not a dead peer; a write that never progresses is);
* while the pump is away, the probe reads in its place, so control frames are still handled; it
  reads no further than about one message ahead of the pump (backpressure). When reading is held
  back like that, the silence is ours, not the peer's, and the peer counts as alive.
"""

from __future__ import annotations

import trio

from .transport import ConnectionClosed, WebSocket


async def probe(websocket: WebSocket, payload: bytes, timeout_s: float) -> bool:
    """Ping the peer; return False if nothing came from it in time (it is dead), else True.

    Raises :class:`router.transport.ConnectionClosed` if the connection is or becomes closed.
    """
    asked_s = trio.current_time()
    pong = websocket.expect_pong(payload)
    sent_at_s: list[float] = []
    try:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await websocket.send_ping(payload)
                sent_at_s.append(trio.current_time())

            nursery.start_soon(send)
            alive = await _sign_of_life(websocket, pong, asked_s, sent_at_s, timeout_s)
            if not alive:
                # The link ends on this verdict; a ping stuck behind a message may be dropped.
                nursery.cancel_scope.cancel()
    finally:
        websocket.forget_pong(payload)
    closed = websocket.closed
    if closed is not None:
        raise ConnectionClosed(closed.code, closed.reason, by_peer=closed.by_peer)
    return alive


async def _sign_of_life(
    websocket: WebSocket, pong: trio.Event, asked_s: float, sent_at_s: list[float], timeout_s: float
) -> bool:
    while True:
        if pong.is_set() or websocket.received_at_s > asked_s or websocket.closed is not None:
            return True  # (a close is raised by the caller)
        started_s = sent_at_s[0] if sent_at_s else max(asked_s, websocket.drained_at_s)
        deadline_s = started_s + timeout_s
        if trio.current_time() >= deadline_s:
            return False
        if not websocket.read_held_back:
            await websocket.read_for_liveness(deadline_s)
            continue
        if not websocket.reading:
            return True  # a message waits for the pump: we hold the peer back, not it us
        with trio.move_on_at(deadline_s):
            await websocket.wait_activity()
