"""#13.3: a compressed message is inflated only up to the size limit, then the connection closes 1009.

Deflate expands at most ~1032-fold, so the 100 MiB bombs here are ~100 KiB on the wire (a 1 KiB
stream can only reach ~1 MiB). They are built without ever holding the inflated text in memory.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tracemalloc
import zlib

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import PerMessageDeflate

from router.transport import ConnectionClosed, WebSocket, read_handshake

MIB = 1024 * 1024


def deflate_bomb(inflated_bytes: int, *, step_bytes: int = MIB) -> bytes:
    """A permessage-deflate payload (raw deflate, RFC 7692 tail removed) of that many spaces."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b" " * step_bytes
    parts = [compressor.compress(chunk) for _ in range(inflated_bytes // step_bytes)]
    parts.append(compressor.compress(b" " * (inflated_bytes % step_bytes)))
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(parts)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def client_frame(payload: bytes, *, first: bool = True, fin: bool = True, compressed: bool = True) -> bytes:
    """One masked client frame (mask key 0, which RFC 6455 allows) carrying ``payload``."""
    opcode = 0x1 if first else 0x0
    head = bytes([(0x80 if fin else 0) | (0x40 if compressed and first else 0) | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([0x80 | size])
    elif size < 65_536:
        head += bytes([0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


async def open_compressed(max_message_bytes: int) -> tuple[trio.abc.Stream, WebSocket]:
    """A raw client stream that negotiated permessage-deflate, and the server websocket it talks to."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    raw = WSConnection(ConnectionType.CLIENT)
    server: list[WebSocket] = []

    async def serve() -> None:
        incoming = await read_handshake(server_stream, max_message_bytes=max_message_bytes)
        server.append(await incoming.accept("ocpp2.0.1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        request = Request(host="x", target="/ocpp/A", subprotocols=["ocpp2.0.1"], extensions=[PerMessageDeflate()])
        await client_stream.send_all(raw.send(request))
        accepted: list[AcceptConnection] = []
        while not accepted:
            raw.receive_data(await client_stream.receive_some(4096))
            accepted = [event for event in raw.events() if isinstance(event, AcceptConnection)]
    assert server[0].compressed
    return client_stream, server[0]


async def test_a_deflate_bomb_is_refused_with_1009_without_inflating_it() -> None:
    bound = MIB
    bomb = deflate_bomb(100 * MIB)
    assert len(bomb) < 120 * 1024
    with trio.fail_after(30):
        client_stream, server = await open_compressed(bound)
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_stream.send_all, client_frame(bomb))
                with pytest.raises(ConnectionClosed) as closed:
                    await server.receive_text()
                nursery.cancel_scope.cancel()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert closed.value.code == 1009 and not closed.value.by_peer
    # Inflated text is held only up to the bound (plus the copies wsproto makes of one chunk of it),
    # never the ~16 MiB one network read of this bomb inflates to.
    assert peak < 5 * bound, f"receiving the bomb took {peak / MIB:.1f} MiB"


async def test_the_bound_is_per_message_across_fragments_and_exact() -> None:
    bound = 64 * 1024
    with trio.fail_after(10):
        # Exactly at the limit: delivered.
        client_stream, server = await open_compressed(bound)
        await client_stream.send_all(client_frame(deflate_bomb(bound)))
        assert await server.receive_text() == " " * bound
        # One byte over, spread over three fragments that are each well under it: refused.
        client_stream, server = await open_compressed(bound)
        payload = deflate_bomb(bound + 1)
        third = len(payload) // 3
        await client_stream.send_all(
            client_frame(payload[:third], fin=False)
            + client_frame(payload[third : 2 * third], first=False, fin=False)
            + client_frame(payload[2 * third :], first=False)
        )
        with pytest.raises(ConnectionClosed) as closed:
            await server.receive_text()
        assert closed.value.code == 1009
        assert closed.value.reason == f"message over {bound} bytes"


# The controller's receive path in a process of its own, so its resident memory can be read: the
# peak (VmHWM) is reset once everything is set up, and read again after the bomb was refused.
_RSS_CHILD = textwrap.dedent(
    """
    import re, sys, trio
    from tests.unit.test_deflate_bomb import MIB, client_frame, deflate_bomb, open_compressed
    from router.transport import ConnectionClosed

    def status_kib(key):
        return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

    async def main(bound):
        bomb = client_frame(deflate_bomb(100 * MIB))
        client_stream, server = await open_compressed(bound)
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident size
        before = status_kib("VmHWM")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_stream.send_all, bomb)
            try:
                await server.receive_text()
            except ConnectionClosed as closed:
                assert closed.code == 1009, closed
            else:
                raise AssertionError("the bomb was delivered")
            nursery.cancel_scope.cancel()
        print((status_kib("VmHWM") - before) * 1024)

    trio.run(main, int(sys.argv[1]))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_deflate_bomb_never_raises_resident_memory_past_the_bound() -> None:
    bound = MIB
    done = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(bound)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    rise_bytes = int(done.stdout.strip())
    # The bound, the copies of one inflated chunk, and allocator slack; a 100 MiB bomb inflated
    # before the size check would add at least 16 MiB (one 16 KiB read's worth).
    assert rise_bytes < bound + 6 * MIB, f"resident memory rose by {rise_bytes / MIB:.1f} MiB"


def _compressed(text: str) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def test_pings_between_and_inside_compressed_messages_leave_them_intact() -> None:
    # RFC 6455 §5.4: control frames may come between messages and between the fragments of one.
    ping = b"\x89\x82\x00\x00\x00\x00hi"  # masked client ping, payload "hi"
    with trio.fail_after(10):
        client_stream, server = await open_compressed(65_536)
        first, second = _compressed('[2,"a","Heartbeat",{}]'), _compressed('[2,"b","Heartbeat",{}]')
        await client_stream.send_all(
            client_frame(first)
            + ping
            + client_frame(second[:5], fin=False)
            + ping
            + client_frame(second[5:], first=False)
        )
        assert await server.receive_text() == '[2,"a","Heartbeat",{}]'
        assert await server.receive_text() == '[2,"b","Heartbeat",{}]'
