"""The websocket seam: handshakes and text messages over a trio stream, on wsproto.

Routing never touches a websocket library directly; it uses this module: accept or refuse a
station's handshake, connect to the CSMS, send and receive text, ping, close with a code.

Why our own shell over wsproto rather than trio-websocket (which wraps the same wsproto):

* permessage-deflate (RFC 7692) must be negotiated on both legs (Part 4 §3.3 requires it of a
  Local Controller); trio-websocket never hands wsproto any extension.
* A pull model gives relaying natural backpressure: a pump reads a message only when it has sent
  the previous one, with no per-connection reader task and queue in between.
* TLS is completed on the trio stream before any websocket byte, so a bad client certificate fails
  fast (trio-websocket issue #199 turns it into a 60 s hang).

Theory of operation: one task at a time calls :meth:`WebSocket.receive_text` (the pump reading
that leg); any task may send, serialised by a lock, because wsproto's ``send`` only produces bytes.
Control frames are handled by whoever reads: pings are answered, pongs wake a waiting
:meth:`WebSocket.ping`, and a close frame is answered and surfaces as :class:`ConnectionClosed`.
While the pump is away (blocked sending on the other leg), :func:`router.liveness.probe` reads in
its place, boundedly, so a pong is seen even then (reads are serialised by a second lock).
Shutting a connection down (:meth:`WebSocket.aclose`) sends a close frame, drains the socket for a
short while so the peer sees it, then closes the stream; call it only once its reader has stopped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .deflate import deflate

log = logging.getLogger("ocpp_lc.transport")

RECEIVE_CHUNK_BYTES: Final = 16_384
#: What we send goes to the stream in pieces this big, so a slow uplink shows its progress.
WRITE_PIECE_BYTES: Final = 16_384
#: How long a closing side keeps reading for the peer's close frame before dropping the stream.
CLOSE_DRAIN_S: Final = 2.0
MAX_REJECT_BODY_BYTES: Final = 4096

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


class TransportError(Exception):
    """Base of everything this module raises."""


class ConnectionClosed(TransportError):
    """The websocket is closed. ``by_peer`` tells who closed it; ``code`` is the close code."""

    def __init__(self, code: int, reason: str, *, by_peer: bool) -> None:
        super().__init__(f"closed with {code} ({reason or 'no reason'})")
        self.code = code
        self.reason = reason
        self.by_peer = by_peer


class HandshakeFailed(TransportError):
    """A handshake did not produce a websocket. ``status`` is an HTTP status when one applies.

    ``kind`` is a short label: ``abandoned`` (the peer went away), ``invalid`` (not a websocket
    handshake), ``tls``, ``refused`` (an HTTP refusal), ``unreachable``. ``headers`` are the
    refusal's response headers (lower-case names, as received) when ``status`` is set.
    """

    def __init__(
        self,
        reason: str,
        status: int | None = None,
        body: bytes = b"",
        *,
        kind: str = "invalid",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.body = body
        self.kind = kind
        self.headers = tuple(headers)


class ByteCounter(Protocol):
    """Anything that counts bytes (a Prometheus counter child, in the appliance)."""

    def inc(self, amount: float = 1) -> None: ...


class WebSocket:
    """One open websocket (either side) over a trio stream."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: WSConnection,
        *,
        subprotocol: str | None,
        extensions: Sequence[object],
        max_message_bytes: int,
    ) -> None:
        self._stream = stream
        self._ws = connection
        self.subprotocol = subprotocol
        self.compressed = any(isinstance(ext, PerMessageDeflate) for ext in extensions)
        self._max_message_bytes = max_message_bytes
        self._send_lock = trio.StrictFIFOLock()
        self._read_lock = trio.Lock()
        self._parts: list[str] = []
        self._part_bytes = 0
        self._ready: deque[str] = deque()
        self._ready_bytes = 0
        now = trio.current_time()
        self.received_at_s = now  # when bytes last arrived from the peer
        self.drained_at_s = now  # when the stream last took a piece of what we send
        self._activity = trio.Event()
        self._pong_waiters: dict[bytes, trio.Event] = {}
        self._closed: ConnectionClosed | None = None
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
        self._activity.set()
        self._activity = trio.Event()

    async def wait_activity(self) -> None:
        """Return once bytes arrive, a piece of ours is sent, a pong comes or a reader stops."""
        await self._activity.wait()

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            view = memoryview(data)
            try:
                # In pieces, so that a large message draining slowly still shows progress.
                for start in range(0, len(view), WRITE_PIECE_BYTES):
                    await self._stream.send_all(view[start : start + WRITE_PIECE_BYTES])
                    self.drained_at_s = trio.current_time()
                    self._pulse()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._mark_closed(ABNORMAL, "connection lost while sending", by_peer=True)
                raise self._closed_error() from exc
        self.bytes_sent += len(data)
        if self._sent_counter is not None:
            self._sent_counter.inc(len(data))

    def _mark_closed(self, code: int, reason: str, *, by_peer: bool) -> None:
        if self._closed is None:
            self._closed = ConnectionClosed(code, reason, by_peer=by_peer)
            for waiter in self._pong_waiters.values():
                waiter.set()

    def _closed_error(self) -> ConnectionClosed:
        assert self._closed is not None
        return ConnectionClosed(self._closed.code, self._closed.reason, by_peer=self._closed.by_peer)

    async def send_text(self, text: str) -> None:
        """Send one text message. Raises :class:`ConnectionClosed` if the connection is closed."""
        if self._closed is not None or self._ws.state is not ConnectionState.OPEN:
            if self._closed is None:
                self._mark_closed(ABNORMAL, "connection is closing", by_peer=False)
            raise self._closed_error()
        await self._write(self._ws.send(TextMessage(data=text)))

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
        await self._write(self._ws.send(Ping(payload=payload)))

    async def receive_text(self) -> str:
        """Return the next complete text message.

        Raises :class:`ConnectionClosed` when the peer closes, vanishes, breaks the protocol, sends
        a binary message (closed with 1003) or a message over the size limit (closed with 1009).
        """
        while not self._ready:
            if self._closed is not None:
                raise self._closed_error()
            async with self._read_lock:
                if not self._ready and self._closed is None:
                    await self._read_some(None)
            self._pulse()  # the stream is free for another reader
        message = self._ready.popleft()
        self._ready_bytes -= len(message)
        return message

    @property
    def reading(self) -> bool:
        """Whether a task is reading the stream right now."""
        return self._read_lock.locked()

    @property
    def read_held_back(self) -> bool:
        """Whether nobody may read now: a reader is at it, or a message waits for the pump."""
        return self.reading or self._ready_bytes + self._part_bytes >= self._max_message_bytes

    async def read_for_liveness(self, deadline_s: float) -> None:
        """Read once in the pump's place, unless :attr:`read_held_back`; give up at ``deadline_s``.

        Control frames are handled as the pump would; messages wait for the pump, at most about
        one message's worth (what is read beyond stays unread: backpressure).
        """
        if self.read_held_back or self._closed is not None:
            return
        async with self._read_lock:
            await self._read_some(deadline_s)
        self._pulse()

    async def _read_some(self, deadline_s: float | None) -> None:
        """Read one chunk (the caller holds the read lock) and act on what it completes."""
        data: bytes | None = None
        with trio.move_on_at(math.inf if deadline_s is None else deadline_s):
            try:
                data = bytes(await self._stream.receive_some(RECEIVE_CHUNK_BYTES))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
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
        try:
            self._ws.receive_data(data)
        except (RemoteProtocolError, LocalProtocolError) as exc:
            await self._fail(PROTOCOL_ERROR, str(exc))
            return
        await self._process_events()

    async def _process_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                chunk = event.data
                self._part_bytes += len(chunk) if chunk.isascii() else len(chunk.encode())
                if self._part_bytes > self._max_message_bytes:
                    await self._fail(MESSAGE_TOO_BIG, f"message over {self._max_message_bytes} bytes")
                    return
                self._parts.append(chunk)
                if event.message_finished:
                    message = self._parts[0] if len(self._parts) == 1 else "".join(self._parts)
                    self._parts.clear()
                    self._part_bytes = 0
                    self._ready.append(message)
                    self._ready_bytes += len(message)
            elif isinstance(event, BytesMessage):
                # OCPP-J messages are JSON text (Part 4 §4.1.2).
                await self._fail(UNSUPPORTED_DATA, "OCPP-J accepts text frames only")
                return
            elif isinstance(event, Ping):
                if self._ws.state is ConnectionState.OPEN:
                    await self._write(self._ws.send(event.response()))
            elif isinstance(event, Pong):
                waiter = self._pong_waiters.get(bytes(event.payload))
                if waiter is not None:
                    waiter.set()
                    self._pulse()
            elif isinstance(event, CloseConnection):
                await self._on_close_frame(event)
                return

    async def _on_close_frame(self, event: CloseConnection) -> None:
        state = self._ws.state
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer started the closing handshake: answer it, then drop the stream.
            self._mark_closed(event.code, event.reason or "", by_peer=True)
            with contextlib.suppress(ConnectionClosed):
                await self._write(self._ws.send(event.response()))
            await self._close_stream()
        elif state is ConnectionState.CLOSED:
            # The answer to a close we sent.
            self._mark_closed(event.code, event.reason or "", by_peer=False)
            await self._close_stream()
        else:
            # wsproto reports a frame it could not parse as a close event with the code to use.
            reason = event.reason or "protocol error"
            if event.code == MESSAGE_TOO_BIG:
                reason = f"message over {self._max_message_bytes} bytes"  # found while inflating it
            await self._fail(event.code, reason)

    async def _fail(self, code: int, reason: str) -> None:
        """Close because of something the peer sent; the reader then raises ConnectionClosed."""
        self._mark_closed(code, reason, by_peer=False)
        await self._send_close(code, reason)
        await self._close_stream()

    async def _send_close(self, code: int, reason: str) -> None:
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            try:
                with trio.move_on_after(CLOSE_DRAIN_S):
                    await self._write(self._ws.send(CloseConnection(code=code, reason=reason[:120])))
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
                    while self._ws.state is not ConnectionState.CLOSED and not self._stream_closed:
                        try:
                            data = await self._stream.receive_some(RECEIVE_CHUNK_BYTES)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            break
                        if not data:
                            break
                        try:
                            self._ws.receive_data(bytes(data))
                        except (RemoteProtocolError, LocalProtocolError):
                            break
                        for event in self._ws.events():
                            if isinstance(event, CloseConnection):
                                break
            await self._close_stream()


# ---------------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------------


@dataclass
class IncomingHandshake:
    """A station's opening handshake, read but not yet answered."""

    stream: trio.abc.Stream
    connection: WSConnection
    target: str
    subprotocols: list[str]
    extensions: list[str]
    headers: dict[str, str] = field(default_factory=dict)
    max_message_bytes: int = 1_048_576

    async def accept(self, subprotocol: str | None, *, keep_compression_context: bool = False) -> WebSocket:
        """Complete the handshake with ``subprotocol`` (None: no Sec-WebSocket-Protocol header).

        permessage-deflate is accepted whenever offered; see :func:`router.deflate.deflate` for the
        context choice and the inflation bound.
        """
        extensions: list[Extension] = [
            deflate(server=True, keep_context=keep_compression_context, max_message_bytes=self.max_message_bytes)
        ]
        data = self.connection.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
        negotiated = [ext for ext in extensions if ext.enabled()]
        websocket = WebSocket(
            self.stream,
            self.connection,
            subprotocol=subprotocol,
            extensions=negotiated,
            max_message_bytes=self.max_message_bytes,
        )
        await websocket._write(data)
        return websocket

    async def reject(self, status: int, reason: str, *, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Refuse the handshake with an HTTP ``status`` and a plain-text ``reason``, close the stream.

        ``headers`` are added to the answer as given (e.g. a CSMS's ``WWW-Authenticate``); the caller
        must not pass framing headers (content-length, connection, transfer-encoding).
        """
        body = (reason.strip() + "\n").encode()[:MAX_REJECT_BODY_BYTES]
        try:
            data = self.connection.send(
                RejectConnection(
                    status_code=status,
                    headers=[
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        *((name.encode("latin-1"), value.encode("latin-1")) for name, value in headers),
                    ],
                    has_body=True,
                )
            )
            data += self.connection.send(RejectData(data=body, body_finished=True))
            with trio.move_on_after(CLOSE_DRAIN_S):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)


async def _raw_http_error(stream: trio.abc.Stream, status: int, reason: str) -> None:
    """Answer a request that is not a websocket handshake, bypassing wsproto's state."""
    phrase = {400: "Bad Request", 426: "Upgrade Required", 431: "Request Header Fields Too Large"}
    body = (reason + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {phrase.get(status, 'Bad Request')}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n"
    )
    if status == 426:
        head += "upgrade: websocket\r\nsec-websocket-version: 13\r\n"
    try:
        with trio.move_on_after(CLOSE_DRAIN_S):
            await stream.send_all(head.encode() + b"\r\n" + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def read_handshake(stream: trio.abc.Stream, *, max_message_bytes: int) -> IncomingHandshake:
    """Read an opening handshake from a freshly accepted stream (the caller bounds the time).

    A request that is not a valid websocket upgrade (plain HTTP, a wrong method, missing headers)
    is answered with 400/426 and a reason, the stream is closed, and :class:`HandshakeFailed`
    raised. The caller owns ``stream`` until this returns.
    """
    connection = WSConnection(ConnectionType.SERVER)
    received = 0
    while True:
        try:
            data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise HandshakeFailed("connection lost during the handshake", kind="abandoned") from exc
        if not data:
            raise HandshakeFailed("connection closed before the handshake", kind="abandoned")
        received += len(data)
        try:
            connection.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            hint = exc.event_hint
            status = hint.status_code if isinstance(hint, RejectConnection) else 400
            if "Upgrade" in str(exc):
                status = 426
            reason = f"this port speaks OCPP-J over WebSocket only: {exc}"
            await _raw_http_error(stream, status, reason)
            raise HandshakeFailed(str(exc), status) from None
        for event in connection.events():
            if isinstance(event, Request):
                headers: dict[str, str] = {}
                for name, value in event.extra_headers:
                    key = bytes(name).decode("latin-1").lower()
                    text = bytes(value).decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                return IncomingHandshake(
                    stream=stream,
                    connection=connection,
                    target=event.target,
                    subprotocols=list(event.subprotocols),
                    extensions=[str(ext) for ext in event.extensions],
                    headers=headers,
                    max_message_bytes=max_message_bytes,
                )
        if received > 65_536:
            await _raw_http_error(stream, 431, "handshake request too large")
            raise HandshakeFailed("handshake request too large", 431)


async def tls_server_handshake(stream: trio.abc.Stream, context: ssl.SSLContext) -> trio.SSLStream[trio.abc.Stream]:
    """Run the TLS handshake as server before any websocket byte (the caller bounds the time)."""
    tls_stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    try:
        await tls_stream.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as exc:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        raise HandshakeFailed(f"TLS handshake failed: {exc.__cause__ or exc}", kind="tls") from exc
    return tls_stream


# ---------------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------------


async def connect(
    host: str,
    port: int,
    target: str,
    *,
    subprotocols: Sequence[str] = (),
    extra_headers: Sequence[tuple[str, str]] = (),
    ssl_context: ssl.SSLContext | None = None,
    max_message_bytes: int = 1_048_576,
    compress: bool = True,
    keep_compression_context: bool = True,
) -> WebSocket:
    """Open a websocket to ``host:port`` at ``target`` (the caller bounds the time).

    Raises :class:`HandshakeFailed`: with ``status`` set when the server answered the handshake
    with an HTTP refusal (its body in ``body``), without when it could not be reached at all.
    """
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise HandshakeFailed(f"cannot reach {host}:{port}: {exc.strerror or exc}", kind="unreachable") from exc
    stream: trio.abc.Stream = tcp
    try:
        if ssl_context is not None:
            tls = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                raise HandshakeFailed(
                    f"TLS handshake with {host}:{port} failed: {exc.__cause__ or exc}", kind="tls"
                ) from exc
            stream = tls
        return await client_handshake(
            stream,
            host,
            port,
            target,
            subprotocols,
            extra_headers,
            max_message_bytes,
            compress,
            keep_compression_context,
        )
    except BaseException:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        raise


async def client_handshake(
    stream: trio.abc.Stream,
    host: str,
    port: int,
    target: str,
    subprotocols: Sequence[str] = (),
    extra_headers: Sequence[tuple[str, str]] = (),
    max_message_bytes: int = 1_048_576,
    compress: bool = True,
    keep_compression_context: bool = True,
) -> WebSocket:
    """Run the client side of the opening handshake on an open ``stream`` (see :func:`connect`)."""
    connection = WSConnection(ConnectionType.CLIENT)
    offered = (
        [deflate(server=False, keep_context=keep_compression_context, max_message_bytes=max_message_bytes)]
        if compress
        else []
    )
    request = Request(
        host=host if port in (80, 443) else f"{host}:{port}",
        target=target,
        subprotocols=list(subprotocols),
        extensions=list(offered),
        extra_headers=[(name.encode("latin-1"), value.encode("latin-1")) for name, value in extra_headers],
    )
    try:
        await stream.send_all(connection.send(request))
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise HandshakeFailed(f"connection to {host}:{port} lost during the handshake", kind="unreachable") from exc
    status: int | None = None
    refusal_headers: list[tuple[str, str]] = []
    body = bytearray()
    while True:
        try:
            data = await stream.receive_some(RECEIVE_CHUNK_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            if status is not None:
                raise HandshakeFailed(
                    f"refused with HTTP {status}", status, bytes(body), kind="refused", headers=refusal_headers
                )
            raise HandshakeFailed(f"{host}:{port} closed the connection during the handshake", kind="unreachable")
        try:
            connection.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            raise HandshakeFailed(f"invalid handshake answer from {host}:{port}: {exc}") from exc
        for event in connection.events():
            if isinstance(event, AcceptConnection):
                negotiated = [ext for ext in event.extensions if isinstance(ext, PerMessageDeflate)]
                return WebSocket(
                    stream,
                    connection,
                    subprotocol=event.subprotocol,
                    extensions=negotiated,
                    max_message_bytes=max_message_bytes,
                )
            if isinstance(event, RejectConnection):
                status = event.status_code
                refusal_headers = [
                    (bytes(name).decode("latin-1").lower(), bytes(value).decode("latin-1"))
                    for name, value in event.headers
                ]
                if not event.has_body:
                    raise HandshakeFailed(
                        f"refused with HTTP {status}", status, kind="refused", headers=refusal_headers
                    )
            elif isinstance(event, RejectData):
                if len(body) < MAX_REJECT_BODY_BYTES:
                    body += event.data[: MAX_REJECT_BODY_BYTES - len(body)]
                if event.body_finished:
                    raise HandshakeFailed(
                        f"refused with HTTP {status}", status, bytes(body), kind="refused", headers=refusal_headers
                    )
