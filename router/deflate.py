"""permessage-deflate (RFC 7692) with inflation bounded by the message size limit.

wsproto's own extension inflates whatever arrives in one go: deflate expands up to ~1000-fold, so a
16 KiB read of a hostile frame can become ~16 MiB before anyone looks at its size, and a thousand
such stations exhaust the box. :class:`BoundedDeflate` inflates with ``max_length`` set to what is
left of the configured maximum message size, and fails the connection with 1009 (message too big)
as soon as one message's inflated size would pass it. Memory per connection then stays at the
limit plus zlib's window, whatever the compression ratio.

It relies on the hooks wsproto's frame decoder calls for every data frame
(``frame_inbound_payload_data`` per chunk of payload, ``frame_inbound_complete`` at a frame's end)
and on the decompressor state its ``PerMessageDeflate`` keeps (wsproto 1.2/1.3); negotiation and
compression of what we send are wsproto's, unchanged.
"""

from __future__ import annotations

import zlib

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

#: The four bytes a sender strips from the end of every compressed message (RFC 7692 §7.2.2).
_TAIL = b"\x00\x00\xff\xff"


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate that never inflates one message past ``max_message_bytes``."""

    def __init__(self, max_message_bytes: int, **parameters: bool) -> None:
        super().__init__(**parameters)
        self.max_message_bytes = max_message_bytes
        self._inflated_bytes = 0  # of the message being received

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        assert self._decompressor is not None
        room = self.max_message_bytes - self._inflated_bytes
        try:
            # One byte more than there is room for tells "exactly full" from "too big".
            out = self._decompressor.decompress(data, room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated_bytes += len(out)
        if self._inflated_bytes > self.max_message_bytes or self._decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_header(
        self, proto: FrameDecoder | FrameProtocol, opcode: Opcode, rsv: RsvBits, payload_length: int
    ) -> CloseReason | RsvBits:
        if opcode.iscontrol():
            # Control frames are never compressed (RFC 7692 §6.1) and, arriving between messages or
            # between the fragments of one, must not touch the state of the data messages.
            if rsv.rsv1:
                return CloseReason.PROTOCOL_ERROR
            self._inbound_is_compressible = False
            return RsvBits(True, False, False)
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(self, proto: FrameDecoder | FrameProtocol, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(bytes(data))

    def frame_inbound_complete(self, proto: FrameDecoder | FrameProtocol, fin: bool) -> bytes | CloseReason | None:
        if not self._inbound_is_compressible:
            return None  # a control frame (see frame_inbound_header)
        if not fin:
            return None
        compressed = self._inbound_compressed
        self._inbound_compressed = None
        if not compressed:
            self._inflated_bytes = 0
            return None
        out = self._inflate(_TAIL)
        self._inflated_bytes = 0
        no_context_takeover = self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        if no_context_takeover:
            self._decompressor = None
        return out


def deflate(*, server: bool, keep_context: bool, max_message_bytes: int) -> BoundedDeflate:
    """permessage-deflate as we offer (client) or accept (server) it.

    ``keep_context`` decides whether *our* compressor keeps its LZ77 window between messages. Kept,
    repetitive OCPP messages shrink several times better, at ~200 KiB of zlib state per connection;
    dropped after every message, an idle connection costs only the peer's inflate window. The
    peer's own choice about its compressor is always honoured. What the peer sends is inflated to
    at most ``max_message_bytes`` per message.
    """
    if server:
        # RFC 7692 §7.1.1.1: a server may declare server_no_context_takeover unasked.
        return BoundedDeflate(max_message_bytes, server_no_context_takeover=not keep_context)
    return BoundedDeflate(max_message_bytes, client_no_context_takeover=not keep_context)
