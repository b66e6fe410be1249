"""Opening handshakes on wsproto/h11: accept or refuse a station, connect to the CSMS, TLS first.

Once a handshake succeeds, wsproto's part is over: the connection continues as a
:class:`router.websocket.WebSocket` on our own framing, with the permessage-deflate parameters
negotiated here (:mod:`router.deflate`) and any bytes that arrived behind the handshake.

TLS is completed on the trio stream before any websocket byte, so a bad client certificate fails
fast (trio-websocket issue #199 turns it into a 60 s hang).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.extensions import Extension
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .deflate import NegotiatedDeflate, codecs, deflate
from .websocket import CLOSE_DRAIN_S, RECEIVE_CHUNK_BYTES, TransportError, WebSocket

MAX_REJECT_BODY_BYTES: Final = 4096


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


def _leftover(connection: WSConnection) -> bytes:
    """Bytes the peer sent behind its handshake (its first frames), which h11 kept aside.

    wsproto hands them to its own frame decoder on the client side only; we read them from h11
    (a private attribute of wsproto's handshake: checked by tests that send frames in the same
    segment as the handshake).
    """
    h11_connection = getattr(connection.handshake, "_h11_connection", None)
    trailing = getattr(h11_connection, "trailing_data", (b"", False))
    return bytes(trailing[0])


def _opened(
    stream: trio.abc.Stream,
    connection: WSConnection,
    *,
    client: bool,
    subprotocol: str | None,
    extensions: Sequence[object],
    max_message_bytes: int,
) -> WebSocket:
    negotiated = [ext for ext in extensions if isinstance(ext, NegotiatedDeflate) and ext.enabled()]
    return WebSocket(
        stream,
        client=client,
        subprotocol=subprotocol,
        max_message_bytes=max_message_bytes,
        codecs=codecs(negotiated[0]) if negotiated else None,
        leftover=_leftover(connection),
    )


# ---------------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------------


@dataclass
class IncomingHandshake:
    """A station's opening handshake, read but not yet answered."""

    stream: trio.abc.Stream
    connection: WSConnection | None  # None once accepted
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
        assert self.connection is not None, "the handshake was already answered"
        connection = self.connection
        data = connection.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions))
        websocket = _opened(
            self.stream,
            connection,
            client=False,
            subprotocol=subprotocol,
            extensions=extensions,
            max_message_bytes=self.max_message_bytes,
        )
        await websocket._write(data)
        # wsproto's part is over: its h11 and frame state need not stay with the station while it is
        # connected (the handler keeps this object that long).
        self.connection = None
        return websocket

    async def reject(self, status: int, reason: str, *, headers: Sequence[tuple[str, str]] = ()) -> None:
        """Refuse the handshake with an HTTP ``status`` and a plain-text ``reason``, close the stream.

        ``headers`` are added to the answer as given (e.g. a CSMS's ``WWW-Authenticate``); the caller
        must not pass framing headers (content-length, connection, transfer-encoding).
        """
        body = (reason.strip() + "\n").encode()[:MAX_REJECT_BODY_BYTES]
        assert self.connection is not None, "the handshake was already answered"
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
                return _opened(
                    stream,
                    connection,
                    client=True,
                    subprotocol=event.subprotocol,
                    extensions=event.extensions,
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
