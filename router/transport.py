"""The websocket seam: handshakes and text messages over a trio stream.

Routing never touches a websocket library directly; it uses this module: accept or refuse a
station's handshake, connect to the CSMS, send and receive text, ping, close with a code. It
gathers two parts: the opening handshakes (:mod:`router.handshake`, on wsproto/h11) and the open
connection (:mod:`router.websocket`, on our own RFC 6455 framing, :mod:`router.framing`).

Why our own shell rather than trio-websocket (which wraps wsproto):

* permessage-deflate (RFC 7692) must be negotiated on both legs (Part 4 §3.3 requires it of a
  Local Controller), with window sizes chosen per leg (:mod:`router.deflate`); trio-websocket never
  hands wsproto any extension.
* A pull model gives relaying natural backpressure: a pump reads a message only when it has sent
  the previous one, with no per-connection reader task and queue in between.
* TLS is completed on the trio stream before any websocket byte, so a bad client certificate fails
  fast (trio-websocket issue #199 turns it into a 60 s hang).
* The open state is where a relay spends its CPU: one parser pass per network read, plain tuples
  instead of event objects, a C mask, and no scheduling round trip for a free lock.
"""

from __future__ import annotations

from .handshake import (
    MAX_REJECT_BODY_BYTES,
    HandshakeFailed,
    IncomingHandshake,
    client_handshake,
    connect,
    read_handshake,
    tls_server_handshake,
)
from .websocket import (
    ABNORMAL,
    CLOSE_DRAIN_S,
    GOING_AWAY,
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    NORMAL,
    POLICY_VIOLATION,
    PROTOCOL_ERROR,
    RECEIVE_CHUNK_BYTES,
    TRY_AGAIN_LATER,
    UNSUPPORTED_DATA,
    WRITE_PIECE_BYTES,
    ByteCounter,
    ConnectionClosed,
    TransportError,
    WebSocket,
)

__all__ = [
    "ABNORMAL",
    "CLOSE_DRAIN_S",
    "GOING_AWAY",
    "INTERNAL_ERROR",
    "MAX_REJECT_BODY_BYTES",
    "MESSAGE_TOO_BIG",
    "NORMAL",
    "POLICY_VIOLATION",
    "PROTOCOL_ERROR",
    "RECEIVE_CHUNK_BYTES",
    "TRY_AGAIN_LATER",
    "UNSUPPORTED_DATA",
    "WRITE_PIECE_BYTES",
    "ByteCounter",
    "ConnectionClosed",
    "HandshakeFailed",
    "IncomingHandshake",
    "TransportError",
    "WebSocket",
    "client_handshake",
    "connect",
    "read_handshake",
    "tls_server_handshake",
]
