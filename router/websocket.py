"""One open websocket over a trio stream: text messages, pings and the closing handshake.

The per-frame work is :mod:`router.framing`'s (sans-IO); this is its thin trio shell. The opening
handshake is :mod:`router.handshake`'s, on wsproto; :mod:`router.transport` exports both.

Theory of operation: one task at a time calls :meth:`WebSocket.receive_text` (the pump reading
that leg). A read parses every frame the chunk completes at once; complete messages wait in a
short queue, which at most one read's worth fills (backpressure: the next read happens only when
the pump asks for a message and none is left). Any task may send, serialised by a lock; a lock
that is free is taken without a scheduling round trip (the socket operation that follows is the
checkpoint). Control frames are handled by whoever reads: pings are answered, pongs wake a waiting
:meth:`WebSocket.ping`, and a close frame is answered and surfaces as :class:`ConnectionClosed`.
While the pump is away (blocked sending on the other leg), :func:`router.liveness.probe` reads in
its place, boundedly, so a pong is seen even then (reads are serialised by a second lock).
Shutting a connection down (:meth:`WebSocket.aclose`) sends a close frame, drains the socket for a
short while so the peer sees it, then closes the stream; call it only once its reader has stopped.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Final, Protocol, cast

import trio

from . import framing
from .framing import CLOSE, FAIL, PING, PONG, TEXT, Deflater, FrameParser, Inflater

RECEIVE_CHUNK_BYTES: Final = 16_384
#: What we send goes to the stream in pieces this big, so a slow uplink shows its progress.
WRITE_PIECE_BYTES: Final = 16_384
#: How long a closing side keeps reading for the peer's close frame before dropping the stream.
CLOSE_DRAIN_S: Final = 2.0

# Close codes (RFC 6455 §7.4.1) that the router chooses deliberately.
NORMAL: Final = 1000
GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
UNSUPPORTED_DATA: Final = 1003
ABNORMAL: Final = 1006  # never sent: what a vanished peer "closed" with
POLICY_VIOLATION: Final = 1008
MESSAGE_TOO_BIG: Final = 1009
INTERNAL_ERROR: Final = 1011
TRY_AGAIN_LATER: Final = 1013

_LOST: Final = (trio.BrokenResourceError, trio.ClosedResourceError)


class TransportError(Exception):
    """Base of everything this module raises."""


class ConnectionClosed(TransportError):
    """The websocket is closed. ``by_peer`` tells who closed it; ``code`` is the close code."""

    def __init__(self, code: int, reason: str, *, by_peer: bool) -> None:
        super().__init__(f"closed with {code} ({reason or 'no reason'})")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


class ByteCounter(Protocol):
    """Anything that counts bytes (a Prometheus counter child, in the appliance)."""

    def inc(self, amount: float = 1) -> None: ...


class _Turn:
    """A strict-FIFO mutex that costs nothing until two tasks want it at once.

    trio's locks carry a parking lot each (~0.7 KiB), four per station pair, most of which never
    sees contention; here waiters exist only while there are some. Taking a free turn does not
    checkpoint: callers always do I/O (a checkpoint) next. A released turn passes straight to the
    oldest waiter.
    """

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[trio.Event] | None = None

    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        if not self._held:
            self._held = True
            return
        if self._waiters is None:
            self._waiters = deque()
        handed = trio.Event()
        self._waiters.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.release()  # the turn came as we were cancelled: pass it on
            else:
                self._waiters.remove(handed)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # still held: it is the next task's now
            if not self._waiters:
                self._waiters = None
        else:
            self._held = False


class WebSocket:
    """One open websocket (either side) over a trio stream.

    ``client``: we opened it (our frames are masked, the peer's must not be). ``leftover``: bytes
    that arrived behind the opening handshake. ``codecs``: permessage-deflate's inflater and
    deflater when it was negotiated.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool,
        subprotocol: str | None,
        max_message_bytes: int,
        codecs: tuple[Inflater, Deflater] | None = None,
        leftover: bytes = b"",
    ) -> None:
        self._stream = stream
        # A plain TCP stream is read and written through its descriptor: the same non-blocking
        # calls and waits trio's SocketStream makes, without its layers of context managers (which
        # cost a measurable part of relaying a small message). TLS streams go through trio.
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._mask = client
        self.subprotocol = subprotocol
        self.compressed = codecs is not None
        self._deflater = codecs[1] if codecs is not None else None
        self._parser = FrameParser(
            peer_masks=not client,
            max_message_bytes=max_message_bytes,
            inflater=codecs[0] if codecs is not None else None,
        )
        self._max_message_bytes = max_message_bytes
        self._send_lock = _Turn()
        self._read_lock = _Turn()
        # Messages read but not yet taken by the pump (at most one read's worth), and the next one.
        self._ready: list[str] = []
        self._next_ready = 0
        self._ready_bytes = 0
        self._leftover = leftover
        now = trio.current_time()
        self.received_at_s = now  # when bytes last arrived from the peer
        self.drained_at_s = now  # when the stream last took a piece of what we send
        self._activity: trio.Event | None = None  # exists only while someone waits for activity
        self._pong_waiters: dict[bytes, trio.Event] = {}
        self._closed: ConnectionClosed | None = None
        self._close_sent = False
        self._stream_closed = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self._sent_counter: ByteCounter | None = None
        self._received_counter: ByteCounter | None = None

    def count_bytes(self, sent: ByteCounter, received: ByteCounter) -> None:
        """Also add the bytes this connection moves on the network to ``sent`` and ``received``."""
        self._sent_counter = sent
        self._received_counter = received

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection closed, or None while it is open."""
        return self._closed

    def _pulse(self) -> None:
        """Wake whoever waits in :meth:`wait_activity`."""
        if self._activity is not None:
            self._activity.set()
            self._activity = None

    async def wait_activity(self) -> None:
        """Return once bytes arrive, a piece of ours is sent, a pong comes or a reader stops."""
        if self._activity is None:
            self._activity = trio.Event()
        await self._activity.wait()

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        lock = self._send_lock
        await lock.acquire()
        try:
            if len(data) <= WRITE_PIECE_BYTES:
                await self._send_all(data)
                self.drained_at_s = trio.current_time()
                self._pulse()
            else:
                view = memoryview(data)
                # In pieces, so that a large message draining slowly still shows progress.
                for start in range(0, len(view), WRITE_PIECE_BYTES):
                    await self._send_all(view[start : start + WRITE_PIECE_BYTES])
                    self.drained_at_s = trio.current_time()
                    self._pulse()
        except _LOST as exc:
            self._mark_closed(ABNORMAL, "connection lost while sending", by_peer=True)
            raise self._closed_error() from exc
        finally:
            lock.release()
        self.bytes_sent += len(data)
        if self._sent_counter is not None:
            self._sent_counter.inc(len(data))

    async def _send_all(self, data: bytes | memoryview) -> None:
        # The scheduling is trio's own (a cancellation check first; one checkpoint after a send
        # that completed at once; none after one that had to wait), without its layers.
        sock = self._socket
        if sock is None:
            await self._stream.send_all(data)
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        sent = 0
        waited = False
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the stream was closed")
            try:
                sent += os.write(fd, view[sent:])
            except BlockingIOError:
                pass
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket failed: {exc}") from exc
            if sent >= len(view):
                if not waited:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
            await trio.lowlevel.wait_writable(sock)
            waited = True

    async def _receive_some(self) -> bytes:
        sock = self._socket
        if sock is None:
            return bytes(await self._stream.receive_some(RECEIVE_CHUNK_BYTES))
        await trio.lowlevel.checkpoint_if_cancelled()
        waited = False
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the stream was closed")
            try:
                data = os.read(fd, RECEIVE_CHUNK_BYTES)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket failed: {exc}") from exc
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()  # data was there: let others run
            return data

    def _mark_closed(self, code: int, reason: str, *, by_peer: bool) -> None:
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason, by_peer=by_peer)
            for waiter in self._pong_waiters.values():
                waiter.set()

    def _closed_error(self) -> ConnectionClosed:
        assert self._closed is not None
        return ConnectionClosed(self._closed.code, self._closed.reason, by_peer=self._closed.by_peer)

    def _encode_text(self, text: str) -> bytes:
        payload = text.encode()
        if self._deflater is not None:
            compressed = self._deflater.deflate(payload)
            if compressed is not None:
                return framing.encode_frame(framing.OP_TEXT, compressed, mask=self._mask, rsv1=True)
        return framing.encode_frame(framing.OP_TEXT, payload, mask=self._mask)

    async def send_text(self, text: str) -> None:
        """Send one text message. Raises :class:`ConnectionClosed` if the connection is closed."""
        if self._closed is not None or self._close_sent:
            if self._closed is None:
                self._mark_closed(ABNORMAL, "connection is closing", by_peer=False)
            raise self._closed_error()
        await self._write(self._encode_text(text))

    async def ping(self, payload: bytes) -> None:
        """Send a ping and return when its pong arrives (the caller bounds the wait).

        Pongs are noticed by whichever task is reading; a ping therefore only completes while the
        connection is being read (see :func:`router.liveness.probe` for a leg whose pump may be away).
        """
        waiter = self.expect_pong(payload)
        try:
            await self.send_ping(payload)
            await waiter.wait()
        finally:
            self._pong_waiters.pop(payload, None)
        if self._closed is not None:
            raise self._closed_error()

    def expect_pong(self, payload: bytes) -> trio.Event:
        """An event set when the pong to ``payload`` arrives (or the connection closes)."""
        if self._closed is not None:
            raise self._closed_error()
        return self._pong_waiters.setdefault(payload, trio.Event())

    def forget_pong(self, payload: bytes) -> None:
        """Stop expecting the pong to ``payload``."""
        self._pong_waiters.pop(payload, None)

    async def send_ping(self, payload: bytes) -> None:
        """Send a ping frame (its pong sets what :meth:`expect_pong` returned)."""
        if self._closed is not None:
            raise self._closed_error()
        await self._write(framing.encode_frame(framing.OP_PING, payload, mask=self._mask))

    async def receive_text(self) -> str:
        """Return the next complete text message.

        Raises :class:`ConnectionClosed` when the peer closes, vanishes, breaks the protocol, sends
        a binary message (closed with 1003) or a message over the size limit (closed with 1009).
        """
        while self._next_ready >= len(self._ready):
            if self._closed is not None:
                raise self._closed_error()
            lock = self._read_lock
            await lock.acquire()
            try:
                if self._next_ready >= len(self._ready) and self._closed is None:
                    await self._read_some(None)
            finally:
                lock.release()
            self._pulse()  # the stream is free for another reader
        message = self._ready[self._next_ready]
        self._next_ready += 1
        if self._next_ready == len(self._ready):
            self._ready = []
            self._next_ready = 0
        self._ready_bytes -= len(message)
        return message

    @property
    def reading(self) -> bool:
        """Whether a task is reading the stream right now."""
        return self._read_lock.locked()

    @property
    def read_held_back(self) -> bool:
        """Whether nobody may read now: a reader is at it, or a message waits for the pump."""
        return self.reading or self._ready_bytes + self._parser.buffered_bytes >= self._max_message_bytes

    async def read_for_liveness(self, deadline_s: float) -> None:
        """Read once in the pump's place, unless :attr:`read_held_back`; give up at ``deadline_s``.

        Control frames are handled as the pump would; messages wait for the pump, at most about
        one message's worth (what is read beyond stays unread: backpressure).
        """
        if self.read_held_back or self._closed is not None:
            return
        await self._read_lock.acquire()
        try:
            await self._read_some(deadline_s)
        finally:
            self._read_lock.release()
        self._pulse()

    async def _read_some(self, deadline_s: float | None) -> None:
        """Read one chunk (the caller holds the read lock) and act on what it completes."""
        data: bytes | bytearray | None = None
        if self._leftover:
            data, self._leftover = self._leftover, b""
        else:
            try:
                if deadline_s is None:  # the pump: no cancel scope per read (it costs ~10 µs)
                    data = await self._receive_some()
                else:
                    with trio.move_on_at(deadline_s):
                        data = await self._receive_some()
            except _LOST:
                data = b""
            if data is None:
                return  # the deadline passed with nothing read
            if not data:
                self._mark_closed(ABNORMAL, "connection lost", by_peer=True)
                await self._close_stream()
                return
            self.received_at_s = trio.current_time()
            self.bytes_received += len(data)
            if self._received_counter is not None:
                self._received_counter.inc(len(data))
        ready = self._ready
        for kind, value in self._parser.receive(data):
            if kind == TEXT:
                assert isinstance(value, str)
                ready.append(value)
                self._ready_bytes += len(value)
            elif kind == PING:
                assert isinstance(value, bytes)
                if self._closed is None and not self._close_sent:
                    await self._write(framing.encode_frame(framing.OP_PONG, value, mask=self._mask))
            elif kind == PONG:
                waiter = self._pong_waiters.get(cast("bytes", value))
                if waiter is not None:
                    waiter.set()
                    self._pulse()
            elif kind == CLOSE:
                code, reason = cast("tuple[int, str]", value)
                await self._on_close_frame(code, reason)
            elif kind == FAIL:
                code, reason = cast("tuple[int, str]", value)
                await self._fail(code, reason)

    async def _on_close_frame(self, code: int, reason: str) -> None:
        if not self._close_sent:
            # The peer started the closing handshake: answer it (RFC 6455 §5.5.1), drop the stream.
            self._mark_closed(code, reason, by_peer=True)
            self._close_sent = True
            try:
                with trio.move_on_after(CLOSE_DRAIN_S):
                    await self._write(framing.encode_close(code, reason, mask=self._mask))
            except ConnectionClosed:
                pass
        else:
            # The answer to a close we sent.
            self._mark_closed(code, reason, by_peer=False)
        await self._close_stream()

    async def _fail(self, code: int, reason: str) -> None:
        """Close because of something the peer sent; the reader then raises ConnectionClosed."""
        self._mark_closed(code, reason, by_peer=False)
        await self._send_close(code, reason)
        await self._close_stream()

    async def _send_close(self, code: int, reason: str) -> None:
        if self._close_sent or self._stream_closed:
            return
        self._close_sent = True
        try:
            with trio.move_on_after(CLOSE_DRAIN_S):
                await self._write(framing.encode_close(code, reason[:120], mask=self._mask))
        except ConnectionClosed:
            pass

    async def _close_stream(self) -> None:
        if not self._stream_closed:
            self._stream_closed = True
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    async def abort(self) -> None:
        """Drop the connection without a closing handshake (wakes any task blocked on it)."""
        self._mark_closed(ABNORMAL, "aborted", by_peer=False)
        await self._close_stream()

    async def aclose(self, code: int = NORMAL, reason: str = "") -> None:
        """Close with ``code``: send a close frame, wait briefly for the peer's, close the stream.

        Idempotent. Must not run while another task is inside :meth:`receive_text`.
        """
        with trio.CancelScope(shield=True):
            if self._closed is None:
                self._mark_closed(code, reason, by_peer=False)
                await self._send_close(code, reason)
                with trio.move_on_after(CLOSE_DRAIN_S):
                    while not self._parser.done and not self._stream_closed:
                        try:
                            data = self._leftover or await self._receive_some()
                        except _LOST:
                            break
                        self._leftover = b""
                        if not data:
                            break
                        self._parser.receive(data)  # messages after our close are dropped
            await self._close_stream()
