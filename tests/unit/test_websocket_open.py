"""#14.1: the open connection on our framer: bytes behind the handshake, per-leg deflate windows."""

from __future__ import annotations

import base64
import os
import zlib

import trio
import trio.testing

from router.transport import WebSocket, read_handshake


def request(extensions: str | None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET /ocpp/CS1 HTTP/1.1",
        "Host: lc.test",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: ocpp2.0.1",
    ]
    if extensions is not None:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(payload: bytes, *, rsv1: bool = False) -> bytes:
    """One final masked text frame (mask key 0) built by hand."""
    head = bytes([0x80 | (0x40 if rsv1 else 0) | 0x1])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    else:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


async def serve(data: bytes) -> tuple[WebSocket, bytes, trio.abc.Stream]:
    """Send ``data`` (a handshake and whatever follows) in one piece; the server's websocket and answer."""
    client, server_stream = trio.testing.memory_stream_pair()
    await client.send_all(data)
    incoming = await read_handshake(server_stream, max_message_bytes=65_536)
    websocket = await incoming.accept("ocpp2.0.1")
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await client.receive_some(4096)
    return websocket, answer, client


async def test_a_message_sent_in_the_same_segment_as_the_handshake_is_not_lost() -> None:
    # A station may send its BootNotification right behind its upgrade request, before the 101
    # arrives (RFC 6455 §4.1 lets a client pipeline); wsproto's server side dropped those bytes.
    with trio.fail_after(5):
        websocket, _, _ = await serve(request(None) + client_frame(b'[2,"1","BootNotification",{}]'))
        assert await websocket.receive_text() == '[2,"1","BootNotification",{}]'


async def test_a_station_that_lets_us_choose_its_window_is_asked_for_a_small_one() -> None:
    with trio.fail_after(5):
        websocket, answer, _ = await serve(request("permessage-deflate; client_max_window_bits"))
    assert websocket.compressed
    assert b"client_max_window_bits=10" in answer
    assert b"server_no_context_takeover" in answer  # our context toward stations is dropped


async def test_a_station_that_does_not_let_us_choose_keeps_its_full_window() -> None:
    # Its compressor may refer 30 KiB back (RFC 7692 §7.1.2.2 default of 15 bits): we must inflate that.
    block = os.urandom(3000).hex().encode()  # 6 KB that only a far reference can shrink
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = (compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    second = (compressor.compress(block) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
    assert len(second) < 200  # it did refer back to the first message
    with trio.fail_after(5):
        websocket, answer, _ = await serve(
            request("permessage-deflate") + client_frame(first, rsv1=True) + client_frame(second, rsv1=True)
        )
        assert b"client_max_window_bits" not in answer
        assert await websocket.receive_text() == block.decode()
        assert await websocket.receive_text() == block.decode()


async def test_an_offer_with_unknown_parameters_is_declined_and_the_next_taken() -> None:
    with trio.fail_after(5):
        websocket, answer, _ = await serve(
            request("permessage-deflate; x_unknown=1, permessage-deflate; client_no_context_takeover")
        )
    assert websocket.compressed
    assert b"x_unknown" not in answer
    assert b"client_no_context_takeover" in answer
