"""#14.2: the RFC 6455 framer (router/framing.py), by property: round trips, violations, wsproto's verdict.

Every generated frame sequence is also fed to wsproto's frame decoder (the independent
implementation the transport used before), and both must see the same messages and, for a
violation, the same close code. Two verdicts are ours by policy and have no wsproto counterpart:
binary messages close with 1003 (OCPP-J is text, Part 4 §4.1.2) and oversized ones with 1009.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from router import framing
from router.framing import CLOSE, FAIL, PING, PONG, TEXT, Deflater, FrameParser, Inflater

MAX = 4096
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bytes | None = b"\x01\x02\x03\x04"
) -> bytes:
    """One frame built by hand (not by the code under test): ``rsv`` is the 3 reserved bits."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    size = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        head = bytes([first, mask_bit | size])
    elif size < 65_536:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", size)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", size)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@dataclass
class Outcome:
    """What a decoder made of a byte string: messages and control payloads in order, then a close code."""

    events: list[tuple[str, object]]
    code: int | None = None


def ours(data: bytes, chunks: list[int], *, compressed: bool, max_bytes: int = MAX) -> Outcome:
    inflater = Inflater(15, keep_context=True, max_message_bytes=max_bytes) if compressed else None
    parser = FrameParser(peer_masks=True, max_message_bytes=max_bytes, inflater=inflater)
    outcome = Outcome([])
    pieces, start = [], 0
    for size in chunks:
        pieces.append(data[start : start + size])
        start += size
    pieces.append(data[start:])
    names = {TEXT: "text", PING: "ping", PONG: "pong"}
    for piece in pieces:
        for kind, value in parser.receive(piece):
            if kind in names:
                outcome.events.append((names[kind], value))
            elif kind == CLOSE:
                code, reason = value  # type: ignore[misc]
                outcome.events.append(("close", (code, reason)))
                return outcome
            else:
                assert kind == FAIL
                outcome.code = value[0]  # type: ignore[index]
                return outcome
    return outcome


def wsprotos(data: bytes, *, compressed: bool) -> Outcome:
    extensions = []
    if compressed:
        extension = PerMessageDeflate()
        extension.accept("permessage-deflate")
        extensions.append(extension)
    decoder = FrameProtocol(client=False, extensions=extensions)
    decoder.receive_bytes(data)
    outcome = Outcome([])
    parts: list[str] = []
    try:
        for received in decoder.received_frames():
            if received.opcode is Opcode.TEXT or received.opcode is Opcode.CONTINUATION:
                parts.append(received.payload)
                if received.message_finished:
                    outcome.events.append(("text", "".join(parts)))
                    parts = []
            elif received.opcode is Opcode.BINARY:
                outcome.code = 1003  # our policy, applied to wsproto's event as the old transport did
                return outcome
            elif received.opcode is Opcode.PING:
                outcome.events.append(("ping", bytes(received.payload)))
            elif received.opcode is Opcode.PONG:
                outcome.events.append(("pong", bytes(received.payload)))
            elif received.opcode is Opcode.CLOSE:
                code, reason = received.payload
                outcome.events.append(("close", (int(code), reason)))
                return outcome
    except ParseFailed as exc:
        outcome.code = int(exc.code)
    return outcome


# -- valid sequences ------------------------------------------------------------------------------

texts = st.text(max_size=300)
controls = st.tuples(st.sampled_from([0x9, 0xA]), st.binary(max_size=125))


@st.composite
def sequences(
    draw: st.DrawFn, compressed: bool, interleave: bool = True, close: bool = True
) -> tuple[bytes, list[tuple[str, object]], list[int]]:
    """Valid client frames: messages (some fragmented, control frames between fragments), a close."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    wire = bytearray()
    expected: list[tuple[str, object]] = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            opcode, payload = draw(controls)
            wire += frame(opcode, payload)
            expected.append(("ping" if opcode == 0x9 else "pong", payload))
            continue
        text = draw(texts)
        body = text.encode()
        if compressed:
            body = (compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
        # Cut anywhere, mid-character too: UTF-8 is checked across fragments.
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        fragments = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        for index, fragment in enumerate(fragments):
            last = index == len(fragments) - 1
            rsv = 0b100 if compressed and index == 0 else 0
            wire += frame(0x1 if index == 0 else 0x0, fragment, fin=last, rsv=rsv)
            if not last and interleave and draw(st.booleans()):
                opcode, payload = draw(controls)
                wire += frame(opcode, payload)
                expected.append(("ping" if opcode == 0x9 else "pong", payload))
        expected.append(("text", text))
    if close:
        code = draw(st.sampled_from([None, 1000, 1001, 1011, 3000, 4999]))
        reason = draw(st.text(max_size=20)) if code else ""
        close_payload = b"" if code is None else struct.pack("!H", code) + reason.encode()[:123]
        wire += frame(0x8, close_payload)
        expected.append(("close", (code or 1005, close_payload[2:].decode())))
    chunks = draw(st.lists(st.integers(1, 64), max_size=12))
    return bytes(wire), expected, chunks


@SETTINGS
@given(case=sequences(compressed=False))
def test_any_valid_sequence_round_trips_like_wsproto_in_any_chunking(
    case: tuple[bytes, list[tuple[str, object]], list[int]],
) -> None:
    wire, expected, chunks = case
    assert ours(wire, chunks, compressed=False) == Outcome(expected)
    assert wsprotos(wire, compressed=False) == Outcome(expected)


@SETTINGS
@given(case=sequences(compressed=True))
def test_any_valid_compressed_sequence_round_trips(case: tuple[bytes, list[tuple[str, object]], list[int]]) -> None:
    wire, expected, chunks = case
    assert ours(wire, chunks, compressed=True) == Outcome(expected)


@SETTINGS
@given(case=sequences(compressed=True, interleave=False))
def test_compressed_sequences_read_like_wsproto(case: tuple[bytes, list[tuple[str, object]], list[int]]) -> None:
    # Without control frames between the fragments of a compressed message: wsproto 1.3 then skips
    # inflating the rest of the message (the bug router/deflate.py used to patch, RFC 6455 §5.4).
    wire, expected, chunks = case
    assert ours(wire, chunks, compressed=True) == Outcome(expected)
    assert wsprotos(wire, compressed=True) == Outcome(expected)


@SETTINGS
@given(text=texts, compressed=st.booleans(), keep=st.booleans(), masked=st.booleans())
def test_what_we_encode_the_other_side_decodes(text: str, compressed: bool, keep: bool, masked: bool) -> None:
    # Our writer (frames, mask, deflate) read back by our parser and by wsproto, both sides.
    deflater = Deflater(12, 4, keep_context=keep, min_bytes=0)
    wire = b""
    for _ in range(2):  # twice: the second message depends on the kept context, if any
        payload = deflater.deflate(text.encode()) if compressed else text.encode()
        assert payload is not None
        wire += framing.encode_frame(framing.OP_TEXT, payload, mask=masked, rsv1=compressed)
    inflater = Inflater(12, keep_context=keep, max_message_bytes=MAX) if compressed else None
    parser = FrameParser(peer_masks=masked, max_message_bytes=MAX, inflater=inflater)
    assert parser.receive(wire) == [(TEXT, text), (TEXT, text)]
    extensions = []
    if compressed:
        extension = PerMessageDeflate()
        extension.accept("permessage-deflate; client_max_window_bits=12")
        extensions.append(extension)
    decoder = FrameProtocol(client=not masked, extensions=extensions)
    decoder.receive_bytes(wire)
    assert [received.payload for received in decoder.received_frames()] == [text, text]


def test_short_messages_go_uncompressed_only_without_a_kept_context() -> None:
    # RFC 7692 decides per message (RSV1); a fresh compressor costs more than it saves on short ones.
    assert Deflater(10, 3, keep_context=False).deflate(b'[3,"1",{}]') is None
    assert Deflater(10, 3, keep_context=False).deflate(b"x" * 2000) is not None
    assert Deflater(12, 4, keep_context=True).deflate(b'[3,"1",{}]') is not None
    parser = FrameParser(
        peer_masks=False, max_message_bytes=MAX, inflater=Inflater(15, keep_context=False, max_message_bytes=MAX)
    )
    assert parser.receive(framing.encode_frame(framing.OP_TEXT, b"[]", mask=False)) == [(TEXT, "[]")]


def test_the_pure_python_mask_equals_the_c_one() -> None:
    for size in range(0, 70):
        data = bytes(range(size))
        assert framing._py_apply_mask(data, b"\xaa\x01\xff\x10") == bytes(
            b ^ b"\xaa\x01\xff\x10"[i % 4] for i, b in enumerate(data)
        )


# -- invalid sequences ----------------------------------------------------------------------------

#: Each violation, after any valid prefix: (the bytes, the code RFC 6455 or our policy prescribes,
#: whether wsproto has the same verdict).
VIOLATIONS = {
    "rsv2": (frame(0x1, b"x", rsv=0b010), 1002, True),
    "rsv3": (frame(0x1, b"x", rsv=0b001), 1002, True),
    "rsv1-without-deflate": (frame(0x1, b"x", rsv=0b100), 1002, True),
    "reserved-opcode": (frame(0x3, b"[]"), 1002, True),
    "reserved-control-opcode": (frame(0xB, b""), 1002, True),
    "unmasked": (frame(0x1, b"[]", mask=None), 1002, True),
    "fragmented-ping": (frame(0x9, b"p", fin=False), 1002, True),
    "ping-over-125": (frame(0x9, b"p" * 126), 1002, True),
    "continuation-first": (frame(0x0, b"x"), 1002, True),
    "text-inside-message": (frame(0x1, b"a", fin=False) + frame(0x1, b"b"), 1002, True),
    "bad-utf8": (frame(0x1, b'["\xc3('), 1007, True),
    "bad-utf8-across-fragments": (frame(0x1, b"a\xc3", fin=False) + frame(0x0, b"("), 1007, True),
    "close-1-byte": (frame(0x8, b"\x03"), 1002, True),
    "close-code-999": (frame(0x8, struct.pack("!H", 999)), 1002, True),
    "close-code-1005": (frame(0x8, struct.pack("!H", 1005)), 1002, True),
    "close-code-2000": (frame(0x8, struct.pack("!H", 2000)), 1002, True),
    "close-code-5000": (frame(0x8, struct.pack("!H", 5000)), 1002, True),
    "close-reason-bad-utf8": (frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1007, True),
    "binary": (frame(0x2, b"\x00\x01"), 1003, False),
    "oversize-frame": (frame(0x1, b"x" * (MAX + 1)), 1009, False),
    "oversize-fragments": (frame(0x1, b"x" * MAX, fin=False) + frame(0x0, b"x"), 1009, False),
}


@SETTINGS
@given(
    prefix=sequences(compressed=False, close=False),
    name=st.sampled_from(sorted(VIOLATIONS)),
    chunks=st.lists(st.integers(1, 64), max_size=12),
)
def test_any_invalid_sequence_closes_with_the_right_code(
    prefix: tuple[bytes, list[tuple[str, object]], list[int]], name: str, chunks: list[int]
) -> None:
    wire, expected, _ = prefix
    bad, code, shared = VIOLATIONS[name]
    # What follows a violation is never looked at.
    data = wire + bad + frame(0x1, b"after")
    assert ours(data, chunks, compressed=False) == Outcome(expected, code)
    if shared:
        assert wsprotos(data, compressed=False) == Outcome(expected, code)


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        pytest.param(frame(0x9, b"p", rsv=0b100), 1002, id="rsv1-on-ping"),
        pytest.param(
            frame(0x1, b"", fin=False, rsv=0b100) + frame(0x0, b"", rsv=0b100), 1002, id="rsv1-on-continuation"
        ),
        pytest.param(frame(0x1, b"\xff\xff\xff\xff", rsv=0b100), 1007, id="corrupt-deflate"),
    ],
)
def test_compressed_violations_close_like_wsproto(bad: bytes, code: int) -> None:
    assert ours(bad, [], compressed=True) == Outcome([], code)
    assert wsprotos(bad, compressed=True) == Outcome([], code)


def test_a_close_frame_with_code_1014_is_valid_here() -> None:
    # 1014 (bad gateway) is in IANA's registry; wsproto 1.3 still refuses it as "reserved".
    assert ours(frame(0x8, struct.pack("!H", 1014)), [], compressed=False) == Outcome([("close", (1014, ""))])


def test_a_server_frame_that_is_masked_is_refused() -> None:
    parser = FrameParser(peer_masks=False, max_message_bytes=MAX)
    assert parser.receive(frame(0x1, b"[]")) == [(FAIL, (1002, "frame masked by a server"))]
    assert FrameParser(peer_masks=False, max_message_bytes=MAX).receive(frame(0x1, b"[]", mask=None)) == [(TEXT, "[]")]


def test_a_header_announcing_too_much_fails_before_the_payload_arrives() -> None:
    # Memory: a peer announcing a huge frame is refused at its header, nothing is buffered.
    parser = FrameParser(peer_masks=True, max_message_bytes=MAX)
    head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"\x00\x00\x00\x00"
    assert parser.receive(head) == [(FAIL, (1009, f"message over {MAX} bytes"))]
    assert parser.buffered_bytes == 0
