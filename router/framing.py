"""RFC 6455 framing for an open websocket, without I/O: bytes in, events out; messages in, bytes out.

The opening handshake stays on wsproto/h11 (:mod:`router.transport`); once a connection is open,
this module does the per-frame work, which is where a relay spends its time. wsproto builds several
objects per frame (a frame, an event, extension callbacks); here one :meth:`FrameParser.receive`
call parses every complete frame of one network read in a single loop and returns plain tuples.

Theory of operation. :class:`FrameParser` keeps the unparsed tail of what was read and the state of
one data message in progress (its fragments, their UTF-8 decoder, whether it is compressed). For
each complete frame it checks, in this order, what RFC 6455 §5.2 requires of the header (reserved
bits, opcode, masking, control frame size and fragmentation), then the message sequence (a
continuation needs a started message and a new message needs the old one finished), then our own
policies (binary frames: 1003, OCPP-J is text, Part 4 §4.1.2; size: 1009). The first violation
ends parsing with a ``FAIL`` event carrying the close code; what came before it is still
returned, so messages already complete are relayed before the close. A close frame ends parsing too.

Events are ``(kind, value)`` tuples: ``(TEXT, str)``, ``(PING, bytes)``, ``(PONG, bytes)``,
``(CLOSE, (code, reason))`` and ``(FAIL, (code, reason))``.

Memory: a frame is buffered until complete, which the size limit bounds; a compressed message is
inflated at most to the limit (RFC 7692 bombs, see :class:`Inflater`).
"""

from __future__ import annotations

import codecs
import os
import zlib
from collections.abc import Callable
from typing import Final

_Mask = Callable[[bytes | bytearray, bytes | bytearray], bytes]
_c_apply_mask: _Mask | None
try:  # The `websockets` package ships the mask in C; the pure-Python XOR below is ~10x slower.
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - depends on the installation
    _c_apply_mask = None

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

TEXT: Final = OP_TEXT
CLOSE: Final = OP_CLOSE
PING: Final = OP_PING
PONG: Final = OP_PONG
FAIL: Final = -1

Event = tuple[int, object]

PROTOCOL_ERROR: Final = 1002
UNSUPPORTED_DATA: Final = 1003
NO_STATUS: Final = 1005
INVALID_PAYLOAD: Final = 1007
MESSAGE_TOO_BIG: Final = 1009

#: Codes a peer may put in a close frame (RFC 6455 §7.4.1 and the IANA registry: 1012-1014), plus
#: 3000-4999 (libraries, applications). 1004-1006 and 1015 must never travel.
_VALID_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})
_KNOWN_OPCODES: Final = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG})
#: What a sender strips from the end of every compressed message (RFC 7692 §7.2.1).
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame."""
    return code in _VALID_CLOSE_CODES or 3000 <= code <= 4999


def _py_apply_mask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    size = len(data)
    key = (bytes(mask) * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")


def apply_mask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (RFC 6455 §5.3); masking and unmasking alike."""
    if _c_apply_mask is not None:
        return _c_apply_mask(data, mask)
    return _py_apply_mask(data, mask)


class Inflater:
    """Inflates the peer's compressed messages (RFC 7692), never one past ``max_message_bytes``.

    ``window_bits`` is the largest LZ77 window the peer was allowed; ``keep_context`` whether the peer
    keeps its window between messages (if not, our state is dropped after every message, so an idle
    connection holds none).
    """

    def __init__(self, window_bits: int, *, keep_context: bool, max_message_bytes: int) -> None:
        self.window_bits = window_bits
        self.keep_context = keep_context
        self.max_message_bytes = max_message_bytes
        self._zlib: zlib._Decompress | None = None
        self._inflated = 0

    def inflate(self, data: bytes | bytearray, *, final: bool) -> bytes | int:
        """Inflate one frame's payload; the message's text so far, or a close code on failure."""
        if self._zlib is None:
            self._zlib = zlib.decompressobj(-self.window_bits)
        decompressor = self._zlib
        room = self.max_message_bytes - self._inflated
        try:
            # One byte more than there is room for tells "exactly full" from "too big".
            out = decompressor.decompress(data, room + 1)
            if final and len(out) <= room and not decompressor.unconsumed_tail:
                out += decompressor.decompress(_DEFLATE_TAIL, room + 1 - len(out))
        except zlib.error:
            return INVALID_PAYLOAD
        self._inflated += len(out)
        if self._inflated > self.max_message_bytes or decompressor.unconsumed_tail:
            return MESSAGE_TOO_BIG
        if final:
            self._inflated = 0
            if not self.keep_context:
                self._zlib = None
        return out


class Deflater:
    """Compresses our messages (RFC 7692) with a window of ``window_bits`` and zlib's ``mem_level``.

    Without ``keep_context`` every message is compressed on its own by a compressor made for it and
    dropped after it, so an idle connection holds no zlib state. Such a compressor gains little on
    a short message (~1.9-fold on 400 bytes of OCPP) for ~45 µs of CPU, several times what the rest
    of relaying it costs: messages under ``min_bytes`` are then sent uncompressed, which RFC 7692
    allows message by message (RSV1 clear). With the context kept, compressing is cheap and pays.
    """

    def __init__(self, window_bits: int, mem_level: int, *, keep_context: bool, min_bytes: int = 1024) -> None:
        self.window_bits = window_bits
        self.mem_level = mem_level
        self.keep_context = keep_context
        self.min_bytes = 0 if keep_context else min_bytes
        self._zlib: zlib._Compress | None = None

    def _new(self) -> zlib._Compress:
        # zlib has no 8-bit raw deflate window; RFC 7692 allows 9-15 only anyway.
        return zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.window_bits, self.mem_level)

    def deflate(self, data: bytes) -> bytes | None:
        """One message's compressed payload, its RFC 7692 tail removed; None: send it uncompressed."""
        if len(data) < self.min_bytes:
            return None
        compressor = self._zlib if self._zlib is not None else self._new()
        if self.keep_context:
            self._zlib = compressor
        out = compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if out.endswith(_DEFLATE_TAIL) else out


def encode_frame(opcode: int, payload: bytes, *, mask: bool, rsv1: bool = False, fin: bool = True) -> bytes:
    """One frame: header, masking key (clients mask, RFC 6455 §5.3) and payload."""
    size = len(payload)
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if mask else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 65_536:
        head = bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


def encode_close(code: int | None, reason: str, *, mask: bool) -> bytes:
    """A close frame; ``None`` (or 1005) sends one without a status code."""
    payload = b"" if code is None or code == NO_STATUS else code.to_bytes(2, "big") + reason.encode()[:123]
    return encode_frame(OP_CLOSE, payload, mask=mask)


class FrameParser:
    """Parses what one peer sends on an open connection (see the module docstring).

    ``peer_masks``: the peer is a client, whose frames must be masked (and a server's must not be).
    ``inflater``: set when permessage-deflate was negotiated (RSV1 marks a compressed message).
    """

    def __init__(self, *, peer_masks: bool, max_message_bytes: int, inflater: Inflater | None = None) -> None:
        self._peer_masks = peer_masks
        self._max = max_message_bytes
        # A compressed frame may be a little larger than what it inflates to (stored blocks).
        self._max_wire = max_message_bytes + (max_message_bytes >> 10) + 64
        self._inflater = inflater
        self._buffer = bytearray()
        self._done = False
        # The data message in progress (fragmented): its parts, size, decoder, compression.
        self._in_message = False
        self._compressed = False
        self._parts: list[str] = []
        self._part_bytes = 0
        self._wire_bytes = 0
        self._decoder: codecs.IncrementalDecoder | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes read but not yet parsed (part of a frame) or held in an unfinished message."""
        return len(self._buffer) + self._part_bytes

    @property
    def done(self) -> bool:
        """Whether parsing ended (a close frame or a violation)."""
        return self._done

    def receive(self, data: bytes | bytearray) -> list[Event]:
        """Parse ``data`` after what came before; return the events of every frame it completes."""
        if self._done:
            return []
        buf: bytes | bytearray = data
        if self._buffer:
            self._buffer += data  # amortised: a large frame arriving in pieces is not copied each time
            buf = self._buffer
        events: list[Event] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if end - head < 2:
                    break
                length = int.from_bytes(buf[head : head + 2], "big")
                head += 2
            elif length == 127:
                if end - head < 8:
                    break
                length = int.from_bytes(buf[head : head + 8], "big")
                head += 8
            masked = b1 & 0x80
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            failure = self._check_header(b0, opcode, fin, masked, length)
            if failure is not None:
                events.append(failure)
                self._finish()
                return events
            if masked:
                head += 4
            if end - head < length:
                break
            payload = buf[head : head + length]
            if masked:
                payload = apply_mask(payload, buf[head - 4 : head])
            pos = head + length
            event: Event | None
            if opcode >= OP_CLOSE:
                event = self._control(opcode, payload)
            else:
                event = self._data(opcode, bool(fin), bool(b0 & 0x40), payload)
            if event is not None:
                events.append(event)
                if event[0] == FAIL or event[0] == CLOSE:
                    self._finish()
                    return events
        if pos == end:
            self._buffer = bytearray()
        elif pos or buf is not self._buffer:
            self._buffer = bytearray(buf[pos:])
        return events

    def _finish(self) -> None:
        self._done = True
        self._buffer = bytearray()
        self._parts = []
        self._part_bytes = 0
        self._decoder = None

    def _check_header(self, b0: int, opcode: int, fin: int, masked: int, length: int) -> Event | None:
        if b0 & 0x30:
            return (FAIL, (PROTOCOL_ERROR, "reserved bits set"))
        if opcode not in _KNOWN_OPCODES:
            return (FAIL, (PROTOCOL_ERROR, f"reserved opcode {opcode:#x}"))
        if b0 & 0x40 and (self._inflater is None or opcode not in (OP_TEXT, OP_BINARY)):
            return (FAIL, (PROTOCOL_ERROR, "RSV1 set on a frame that cannot be compressed"))
        if bool(masked) != self._peer_masks:
            return (FAIL, (PROTOCOL_ERROR, "frame not masked" if self._peer_masks else "frame masked by a server"))
        if length >> 63:
            return (FAIL, (PROTOCOL_ERROR, "frame length out of range"))
        if opcode >= OP_CLOSE:
            if not fin:
                return (FAIL, (PROTOCOL_ERROR, "fragmented control frame"))
            if length > 125:
                return (FAIL, (PROTOCOL_ERROR, "control frame payload over 125 bytes"))
            return None
        if opcode == OP_CONTINUATION:
            if not self._in_message:
                return (FAIL, (PROTOCOL_ERROR, "continuation frame without a message"))
        elif self._in_message:
            return (FAIL, (PROTOCOL_ERROR, "new message before the previous one ended"))
        elif opcode == OP_BINARY:
            # OCPP-J messages are JSON text (Part 4 §4.1.2).
            return (FAIL, (UNSUPPORTED_DATA, "OCPP-J accepts text frames only"))
        if opcode == OP_TEXT:
            over = length > (self._max_wire if b0 & 0x40 else self._max)
        elif self._compressed:
            over = self._wire_bytes + length > self._max_wire
        else:
            over = self._part_bytes + length > self._max
        if over:
            return (FAIL, (MESSAGE_TOO_BIG, f"message over {self._max} bytes"))
        return None

    def _control(self, opcode: int, payload: bytes | bytearray) -> Event:
        if opcode == OP_PING:
            return (PING, bytes(payload))
        if opcode == OP_PONG:
            return (PONG, bytes(payload))
        if not payload:
            return (CLOSE, (NO_STATUS, ""))
        if len(payload) == 1:
            return (FAIL, (PROTOCOL_ERROR, "close frame with a 1-byte payload"))
        code = int.from_bytes(payload[:2], "big")
        if not valid_close_code(code):
            return (FAIL, (PROTOCOL_ERROR, f"close frame with invalid code {code}"))
        try:
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            return (FAIL, (INVALID_PAYLOAD, "close reason is not UTF-8"))
        return (CLOSE, (code, reason))

    def _data(self, opcode: int, fin: bool, rsv1: bool, payload: bytes | bytearray) -> Event | None:
        if opcode == OP_TEXT:
            self._compressed = rsv1
            if fin:  # the common case: a whole message in one frame
                data: bytes | bytearray = payload
                if rsv1:
                    assert self._inflater is not None
                    inflated_all = self._inflater.inflate(payload, final=True)
                    if isinstance(inflated_all, int):
                        return self._inflate_failed(inflated_all)
                    data = inflated_all
                try:
                    return (TEXT, data.decode())
                except UnicodeDecodeError:
                    return (FAIL, (INVALID_PAYLOAD, "text is not UTF-8"))
            self._in_message = True
            self._decoder = codecs.getincrementaldecoder("utf-8")()
        if self._compressed:
            assert self._inflater is not None
            self._wire_bytes += len(payload)
            inflated = self._inflater.inflate(payload, final=fin)
            if isinstance(inflated, int):
                return self._inflate_failed(inflated)
            payload = inflated
        elif self._part_bytes + len(payload) > self._max:
            return (FAIL, (MESSAGE_TOO_BIG, f"message over {self._max} bytes"))
        assert self._decoder is not None
        try:
            self._parts.append(self._decoder.decode(payload, fin))
        except UnicodeDecodeError:
            return (FAIL, (INVALID_PAYLOAD, "text is not UTF-8"))
        self._part_bytes += len(payload)
        if not fin:
            return None
        text = "".join(self._parts)
        self._in_message = False
        self._parts = []
        self._part_bytes = 0
        self._wire_bytes = 0
        self._decoder = None
        return (TEXT, text)

    def _inflate_failed(self, code: int) -> Event:
        if code == MESSAGE_TOO_BIG:
            return (FAIL, (MESSAGE_TOO_BIG, f"message over {self._max} bytes"))
        return (FAIL, (INVALID_PAYLOAD, "compressed data is corrupt"))
