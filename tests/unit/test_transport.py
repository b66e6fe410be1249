"""The websocket seam over in-memory streams: handshakes, compression, limits and closing."""

from __future__ import annotations

import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from router.transport import (
    HandshakeFailed,
    IncomingHandshake,
    WebSocket,
    client_handshake,
    read_handshake,
)


async def open_pair(
    *, compress: bool = True, subprotocol: str | None = "ocpp2.0.1", max_message_bytes: int = 65_536
) -> tuple[WebSocket, WebSocket, IncomingHandshake]:
    """A client and a server websocket joined by an in-memory stream pair."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    seen: list[IncomingHandshake] = []
    server: list[WebSocket] = []

    async def serve() -> None:
        incoming = await read_handshake(server_stream, max_message_bytes=max_message_bytes)
        seen.append(incoming)
        server.append(await incoming.accept(subprotocol))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = await client_handshake(
            client_stream,
            "csms.test",
            80,
            "/ocpp/CS%2001",
            subprotocols=["ocpp2.0.1", "ocpp1.6"],
            extra_headers=[("Authorization", "Basic Q1M6c2VjcmV0")],
            max_message_bytes=max_message_bytes,
            compress=compress,
        )
    return client, server[0], seen[0]


async def test_handshake_carries_path_subprotocols_and_authorization() -> None:
    with trio.fail_after(5):
        client, server, incoming = await open_pair()
    assert incoming.target == "/ocpp/CS%2001"
    assert incoming.subprotocols == ["ocpp2.0.1", "ocpp1.6"]
    assert incoming.headers["authorization"] == "Basic Q1M6c2VjcmV0"
    assert client.subprotocol == server.subprotocol == "ocpp2.0.1"


async def test_permessage_deflate_is_negotiated_and_shrinks_what_travels() -> None:
    with trio.fail_after(5):
        client, server, _ = await open_pair(compress=True)
        assert client.compressed and server.compressed
        text = (
            '[2,"1","MeterValues",{"evseId":1,"meterValue":['
            + ",".join(['{"sampledValue":[{"value":1}]}'] * 50)
            + "]}]"
        )
        sent_before = client.bytes_sent
        await client.send_text(text)
        assert await server.receive_text() == text
        assert client.bytes_sent - sent_before < len(text) // 4


async def test_without_an_offer_nothing_is_compressed() -> None:
    with trio.fail_after(5):
        client, server, _ = await open_pair(compress=False)
    assert not client.compressed and not server.compressed


async def test_text_arrives_exactly_as_sent_in_both_directions() -> None:
    with trio.fail_after(5):
        client, server, _ = await open_pair()
        for text in ['[2,"a","Heartbeat",{}]', '[3,"a",{"t":"Grüße ⚡"}]', "not json at all", " " * 40_000]:
            await client.send_text(text)
            assert await server.receive_text() == text
            await server.send_text(text)
            assert await client.receive_text() == text


async def test_a_message_over_the_limit_closes_with_1009() -> None:
    with trio.fail_after(5):
        client, server, _ = await open_pair(max_message_bytes=1024)
        await client.send_text("x" * 2000)
        try:
            await server.receive_text()
        except Exception as exc:
            closed = exc
        assert getattr(closed, "code", None) == 1009
        assert server.closed is not None and not server.closed.by_peer
        # The client hears the close frame with the same code.
        try:
            await client.receive_text()
        except Exception as exc:
            heard = exc
        assert getattr(heard, "code", None) == 1009


async def test_a_binary_frame_closes_with_1003() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    raw = WSConnection(ConnectionType.CLIENT)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                incoming = await read_handshake(server_stream, max_message_bytes=4096)
                server = await incoming.accept("ocpp2.0.1")
                try:
                    await server.receive_text()
                except Exception as exc:
                    assert getattr(exc, "code", None) == 1003
                    return
                raise AssertionError("a binary frame was accepted")

            nursery.start_soon(serve)
            await client_stream.send_all(raw.send(Request(host="x", target="/ocpp/A", subprotocols=["ocpp2.0.1"])))
            accepted = False
            while not accepted:
                raw.receive_data(await client_stream.receive_some(4096))
                accepted = any(isinstance(event, AcceptConnection) for event in raw.events())
            await client_stream.send_all(raw.send(BytesMessage(data=b"\x00\x01")))
            codes = []
            while not codes:
                raw.receive_data(await client_stream.receive_some(4096))
                codes = [event.code for event in raw.events() if isinstance(event, CloseConnection)]
            assert codes == [1003]


async def test_ping_returns_when_the_pong_arrives() -> None:
    with trio.fail_after(5):
        client, server, _ = await open_pair()
        async with trio.open_nursery() as nursery:
            # Both sides answer and notice control frames only while they read, as relaying pumps
            # always do.
            nursery.start_soon(server.receive_text)
            nursery.start_soon(client.receive_text)
            await client.ping(b"p1")
            await server.ping(b"p2")
            nursery.cancel_scope.cancel()


async def test_closing_is_seen_by_the_peer_with_code_and_reason() -> None:
    with trio.fail_after(5):
        client, server, _ = await open_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.aclose, 4001, "bye now")
            try:
                await server.receive_text()
            except Exception as exc:
                closed = exc
        assert (getattr(closed, "code", None), getattr(closed, "reason", None)) == (4001, "bye now")
        assert server.closed is not None and server.closed.by_peer


async def test_a_refusal_reaches_the_client_with_status_and_reason() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                incoming = await read_handshake(server_stream, max_message_bytes=4096)
                await incoming.reject(401, "wrong password")

            nursery.start_soon(serve)
            try:
                await client_handshake(client_stream, "x", 80, "/ocpp/A", subprotocols=["ocpp2.0.1"])
            except HandshakeFailed as exc:
                refused = exc
    assert refused.status == 401
    assert refused.body == b"wrong password\n"


async def test_plain_http_gets_a_readable_refusal() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def serve() -> None:
                try:
                    await read_handshake(server_stream, max_message_bytes=4096)
                except HandshakeFailed as exc:
                    assert exc.status == 426
                    return
                raise AssertionError("plain HTTP was taken for a handshake")

            nursery.start_soon(serve)
            await client_stream.send_all(b"GET /ocpp/A HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await client_stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 426 ")
    assert b"OCPP-J over WebSocket" in answer
