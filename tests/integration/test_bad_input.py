"""Bad input from stations and CSMSs, over real sockets on loopback: nothing bad spreads.

Each case checks what the station is told (the reply or close the spec prescribes), what the
metrics say, and that a healthy station connected at the same time is still served afterwards.
The CSMS is the in-process fake from ``conftest.py``; stations are our transport's client, raw TCP
streams for byte-level abuse, and trio-websocket where an independent implementation helps.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

import pytest
import trio
import trio_websocket
from wsproto.frame_protocol import FrameProtocol, Opcode

from router.transport import ConnectionClosed, HandshakeFailed, client_handshake
from tests.integration.conftest import (
    IO_TIMEOUT_S,
    OCPP201,
    STRICT_6_3,
    TASKS_PER_PAIR,
    FakeCsms,
    Lab,
    assert_still_served,
    call,
    metric,
    next_link_event,
    settled_pair_tasks,
)


def masked_frame_head(payload_length: int, opcode: int = 0x1) -> bytes:
    """The head of one final client frame (RFC 6455 §5.2) with a zero mask key (payload as is)."""
    if payload_length < 126:
        head = bytes([0x80 | opcode, 0x80 | payload_length])
    else:
        head = bytes([0x80 | opcode, 0x80 | 126]) + payload_length.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00"


async def http_exchange(port: int, request: bytes, *, then_send_eof: bool = False) -> bytes:
    """Send raw bytes to ``port`` and return everything that comes back until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        if then_send_eof:
            await stream.send_eof()
        answer = bytearray()
        while chunk := await stream.receive_some(65_536):
            answer += chunk
    return bytes(answer)


# ---------------------------------------------------------------------------------------------------
# Frames that are not OCPP-J are relayed: the far end owns validation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "kind", "expected_reply"),
    [
        pytest.param('[2,"1","Heartbeat",{', "json", [4, "-1", "RpcFrameworkError"], id="malformed-json"),
        pytest.param('{"messageTypeId":2,"id":"9"}', "shape", [4, "-1", "RpcFrameworkError"], id="not-an-array"),
        pytest.param('[7,"1","X",{}]', "message_type", [4, "1", "MessageTypeNotSupported"], id="unknown-type"),
    ],
)
async def test_frame_that_is_not_ocppj_is_relayed_unchanged_and_counted(
    lab: Lab, csms: FakeCsms, frame: str, kind: str, expected_reply: list[Any]
) -> None:
    app = await lab.start_app(csms.url)
    with trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        bad = await lab.station(app, "BAD")
        await bad.send_text(frame)
        # The CSMS answers as Part 4 §4.2.3 / §4.4 prescribe, and the router relays that answer back.
        reply = json.loads(await bad.receive_text())
        upstream = await csms.connection("BAD")

        assert upstream.frames == [frame]  # exactly those bytes, not a re-serialisation
        assert reply[:3] == expected_reply
        assert metric(app, "ocpp_lc_invalid_frames_total", direction="station_to_csms", kind=kind) == 1
        assert metric(app, "ocpp_lc_frames_total", direction="station_to_csms", action="other") == 1
        # Neither the sender nor anyone else lost its connection over it.
        assert (await call(bad, "Heartbeat", {}))[0] == 3
        await assert_still_served(healthy)
    assert upstream.closed is None
    assert metric(app, "ocpp_lc_stations_connected") == 2


# ---------------------------------------------------------------------------------------------------
# Frames the router itself refuses: the station is closed with the code RFC 6455 gives
# ---------------------------------------------------------------------------------------------------


async def test_binary_frame_closes_the_station_with_1003_and_its_upstream(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url)
    with app.hub.subscribe("test", 100) as events, trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        async with trio_websocket.open_websocket(
            "127.0.0.1",
            app.station_port,
            "/ocpp/BIN",
            use_ssl=False,
            subprotocols=[OCPP201],
            connect_timeout=IO_TIMEOUT_S,
            disconnect_timeout=IO_TIMEOUT_S,
        ) as station:
            # OCPP-J messages are JSON text (Part 4 §4.1.2); a binary message is unsupported data.
            await station.send_message(b"\x00\x01 not text")
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await station.get_message()
        assert closed.value.reason.code == 1003

        upstream = await csms.connection("BIN")
        upstream_closed = await csms.wait_ended(upstream)
        event = await next_link_event(events, "disconnected", "BIN")
        await assert_still_served(healthy)

    assert upstream.frames == []
    assert upstream_closed.code == 1001
    assert upstream_closed.by_peer
    assert event.reason == "station_binary_frame"
    assert metric(app, "ocpp_lc_pair_closes_total", reason="station_binary_frame") == 1
    assert metric(app, "ocpp_lc_stations_connected") == 1


async def test_message_over_the_limit_closes_with_1009_and_never_reaches_the_csms(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, stations={"max_message_bytes": 2048})
    with app.hub.subscribe("test", 100) as events, trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        async with trio_websocket.open_websocket(
            "127.0.0.1",
            app.station_port,
            "/ocpp/BIG",
            use_ssl=False,
            subprotocols=[OCPP201],
            connect_timeout=IO_TIMEOUT_S,
            disconnect_timeout=IO_TIMEOUT_S,
        ) as station:
            payload = {"vendorId": "x", "data": "y" * 4096}
            await station.send_message(json.dumps([2, "1", "DataTransfer", payload]))
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await station.get_message()
        assert closed.value.reason.code == 1009

        upstream = await csms.connection("BIG")
        upstream_closed = await csms.wait_ended(upstream)
        event = await next_link_event(events, "disconnected", "BIG")
        await assert_still_served(healthy)

    assert upstream.frames == []  # no part of it was relayed
    assert upstream_closed.code == 1001
    assert event.reason == "station_message_too_big"
    assert metric(app, "ocpp_lc_pair_closes_total", reason="station_message_too_big") == 1


async def test_compressed_message_over_the_limit_is_measured_inflated(lab: Lab, csms: FakeCsms) -> None:
    # permessage-deflate squeezes 100 kB of one letter into a few hundred bytes on the wire: the limit
    # must apply to the message, not to what travelled.
    app = await lab.start_app(csms.url, stations={"max_message_bytes": 2048})
    with trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        station = await lab.station(app, "ZIP", compress=True)
        assert station.compressed
        await station.send_text(json.dumps([2, "1", "DataTransfer", {"vendorId": "x", "data": "y" * 100_000}]))
        with pytest.raises(ConnectionClosed) as closed:
            await station.receive_text()
        upstream = await csms.connection("ZIP")
        await csms.wait_ended(upstream)
        await assert_still_served(healthy)
    assert closed.value.code == 1009
    assert upstream.frames == []


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        # OCPP-J text must be UTF-8 (Part 4 §4.1.2); RFC 6455 §8.1 closes such a message with 1007.
        pytest.param(masked_frame_head(4) + b'["\xc3(', 1007, id="invalid-utf8"),
        # A client must mask its frames (RFC 6455 §5.1).
        pytest.param(bytes([0x81, 2]) + b"[]", 1002, id="unmasked"),
        pytest.param(masked_frame_head(2, opcode=0x3) + b"[]", 1002, id="reserved-opcode"),
    ],
)
async def test_websocket_protocol_violation_closes_only_that_station(
    lab: Lab, csms: FakeCsms, frame: bytes, code: int
) -> None:
    app = await lab.start_app(csms.url)
    with app.hub.subscribe("test", 100) as events, trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        stream = await trio.open_tcp_stream("127.0.0.1", app.station_port)
        async with stream:
            await client_handshake(stream, "127.0.0.1", app.station_port, "/ocpp/RUDE", [OCPP201], compress=False)
            await stream.send_all(frame)
            frames = FrameProtocol(client=True, extensions=[])
            while data := await stream.receive_some():
                frames.receive_bytes(bytes(data))
        received = list(frames.received_frames())
        upstream = await csms.connection("RUDE")
        upstream_closed = await csms.wait_ended(upstream)
        event = await next_link_event(events, "disconnected", "RUDE")
        await assert_still_served(healthy)

    assert [f.opcode for f in received] == [Opcode.CLOSE]
    assert received[0].payload[0] == code
    assert upstream.frames == []
    assert upstream_closed.code == 1001
    assert event.reason == "station_protocol_error"


# ---------------------------------------------------------------------------------------------------
# Handshakes the router refuses itself, before anything is opened upstream
# ---------------------------------------------------------------------------------------------------


async def test_unusable_identity_is_refused_with_404_before_anything_opens_upstream(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url)
    bad_paths = {
        "/ocpp/" + "A" * 49: "longer than 48",  # Part 4 §3.1.1: identity is at most 48 characters
        "/ocpp/CS:01": "':'",  # the identity is the Basic-auth user name: no ':'
        "/ocpp/CS%3A01": "':'",  # ... also when percent-encoded
        "/ocpp/CS%3a01": "':'",
        "/other/CS01": "path must be /ocpp/",
        "/ocpp/": "path must be /ocpp/",
        "/ocpp/CS01/extra": "one identity segment",
    }
    with trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        refusals: dict[str, HandshakeFailed] = {}
        for path in bad_paths:
            with pytest.raises(HandshakeFailed) as refused:
                await lab.station(app, "unused", path=path)
            refusals[path] = refused.value
        connections_for_healthy = csms.tcp_connections
        await assert_still_served(healthy)
        # A 48-character identity is still fine (the boundary), and does open its upstream.
        longest = await lab.station(app, "B" * 48)
        await assert_still_served(longest)

    for path, hint in bad_paths.items():
        assert refusals[path].status == 404, path
        assert hint in refusals[path].body.decode(), (path, refusals[path].body)
    assert connections_for_healthy == 1  # only the healthy station's upstream: nothing for the refused
    assert [conn.identity for conn in csms.connections] == ["HEALTHY", "B" * 48]
    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="identity") == len(bad_paths)
    assert metric(app, "ocpp_lc_stations_connected") == 2


@pytest.mark.parametrize(
    ("offered", "upstream_attempts"),
    [pytest.param((), 0, id="none-offered"), pytest.param(("ocpp9.9",), 1, id="none-agreed-by-the-csms")],
)
async def test_station_without_a_common_subprotocol_is_closed_after_the_handshake(
    lab: Lab, csms: FakeCsms, offered: tuple[str, ...], upstream_attempts: int
) -> None:
    app = await lab.start_app(csms.url)
    with trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        # Part 4 §3.2: with no version to agree on, the handshake completes without a subprotocol and
        # the connection is closed at once; the station sees what a CSMS would have done directly.
        station = await lab.station(app, "NOPROTO", subprotocols=offered)
        assert station.subprotocol is None
        with pytest.raises(ConnectionClosed) as closed:
            await station.receive_text()
        attempts = csms.of("NOPROTO")
        await csms.wait_until(lambda: all(conn.ended for conn in attempts))
        await assert_still_served(healthy)

    assert (closed.value.code, closed.value.by_peer) == (1002, True)
    # Offered nothing: nothing to ask the CSMS. Offered only what the CSMS refuses: its socket is closed.
    assert len(attempts) == upstream_attempts
    assert all(conn.subprotocols == list(offered) and conn.accepted_subprotocol is None for conn in attempts)
    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="no_subprotocol") == 1
    assert metric(app, "ocpp_lc_stations_connected") == 1
    assert metric(app, "ocpp_lc_upstream_links_up") == 1
    assert app.links.get("NOPROTO") is None
    assert len(await settled_pair_tasks()) == TASKS_PER_PAIR  # only the healthy station's


async def test_plain_http_and_garbage_are_answered_or_closed_and_counted(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url, stations={"handshake_timeout_s": 0.5})
    with trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")

        # A browser (or a station configured with http://) gets a readable 4xx, not a hang.
        answer = await http_exchange(
            app.station_port, b"GET /ocpp/CS01 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        assert 400 <= status < 500, head
        assert b"WebSocket" in body

        # Bytes that are not HTTP at all: a 400 and the connection closed.
        garbage = await http_exchange(app.station_port, b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")

        # Half a handshake, then silence: closed after stations.handshake_timeout_s.
        start_s = trio.current_time()
        silence = await http_exchange(app.station_port, b"GET /ocpp/CS01 HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        waited_s = trio.current_time() - start_s
        assert silence == b""
        assert 0.5 <= waited_s < 0.5 + 2.0

        # Half a handshake, then the station hangs up its sending side: closed at once.
        start_s = trio.current_time()
        half_closed = await http_exchange(
            app.station_port, b"GET /ocpp/CS01 HTTP/1.1\r\nHost: 127.0.0.1\r\n", then_send_eof=True
        )
        assert half_closed == b""
        assert trio.current_time() - start_s < 0.5  # not left to the handshake timeout

        await assert_still_served(healthy)

    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="not_websocket") == 2
    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="handshake_timeout") == 1
    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="abandoned") == 1
    assert csms.tcp_connections == 1  # only the healthy station's upstream


# ---------------------------------------------------------------------------------------------------
# Stations that vanish, CSMSs that hang
# ---------------------------------------------------------------------------------------------------


async def test_a_hundred_stations_dropping_mid_message_release_everything(lab: Lab, csms: FakeCsms) -> None:
    count = 100
    app = await lab.start_app(csms.url)
    streams: list[trio.SocketStream] = []

    async def connect_and_send_half_a_frame(index: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", app.station_port)
        streams.append(stream)
        await client_handshake(stream, "127.0.0.1", app.station_port, f"/ocpp/DROP{index}", [OCPP201], compress=False)
        message = json.dumps([2, f"m{index}", "Heartbeat", {}]).encode()
        await stream.send_all(masked_frame_head(len(message)) + message[: len(message) // 2])

    with app.hub.subscribe("test", 4 * count) as events, trio.fail_after(3 * IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(connect_and_send_half_a_frame, index)
        assert metric(app, "ocpp_lc_stations_connected") == count + 1

        for index, stream in enumerate(streams):
            if index % 2:
                # SO_LINGER 0: the kernel resets the connection instead of closing it politely.
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
        for _ in range(count):
            await next_link_event(events, "disconnected")
        drops = [conn for conn in csms.connections if conn.identity.startswith("DROP")]
        await csms.wait_until(lambda: all(conn.ended for conn in drops))
        await assert_still_served(healthy)

    assert len(drops) == count
    assert all(conn.frames == [] for conn in drops)  # no half message went upstream
    assert {(conn.closed.code, conn.closed.by_peer) for conn in drops if conn.closed} == {(1001, True)}
    assert sum(1 for conn in drops if conn.closed) == count
    assert metric(app, "ocpp_lc_pair_closes_total", reason="station_lost") == count
    assert metric(app, "ocpp_lc_stations_connected") == 1
    assert metric(app, "ocpp_lc_upstream_links_up") == 1
    assert len(await settled_pair_tasks()) == TASKS_PER_PAIR  # only the healthy station's


async def test_csms_that_never_answers_leaves_timing_to_the_station(lab: Lab, csms: FakeCsms) -> None:
    csms.answers_calls = False
    # Keepalives every second on both legs: if the router timed the call out, or mistook the quiet
    # for a dead peer, it would show within the window below.
    app = await lab.start_app(
        csms.url,
        stations={"ping_interval_s": 1.0, "ping_timeout_s": 1.0},
        csms={"ping_interval_s": 1.0, "ping_timeout_s": 1.0},
        routing={"csms_call_hold_s": 1.0, "lc_call_timeout_s": 1.0},
    )
    with app.hub.subscribe("test", 100) as events, trio.fail_after(IO_TIMEOUT_S):
        station = await lab.station(app, "WAITING")
        await station.send_text(json.dumps([2, "w1", "Heartbeat", {}]))
        upstream = await csms.connection("WAITING")
        await csms.wait_until(lambda: len(upstream.frames) == 1)
        with trio.move_on_after(2.5) as window:
            unexpected = await station.receive_text()  # keeps answering pings while it waits
        assert window.cancelled_caught, f"the station got {unexpected!r}"
        assert station.closed is None
        assert upstream.closed is None
        assert metric(app, "ocpp_lc_stations_connected") == 1

        # The station gives up (its own timeout) and closes: everything of its pair is released.
        await station.aclose(1000, "call timed out")
        upstream_closed = await csms.wait_ended(upstream)
        event = await next_link_event(events, "disconnected", "WAITING")

    assert upstream_closed.code == 1000
    assert upstream_closed.reason == "call timed out"
    assert event.reason == "station_closed"
    assert metric(app, "ocpp_lc_stations_connected") == 0
    assert metric(app, "ocpp_lc_upstream_links_up") == 0
    assert await settled_pair_tasks() == []


async def test_unreachable_csms_refuses_the_station_with_502(lab: Lab) -> None:
    # A bound socket that does not listen: connecting to it is refused for as long as it stays open.
    with trio.socket.socket() as closed_port:
        await closed_port.bind(("127.0.0.1", 0))
        port = closed_port.getsockname()[1]
        # The strict §6.3 rule (site autonomy off); with it on, the station is served locally instead.
        app = await lab.start_app(f"ws://127.0.0.1:{port}/csms", autonomy=STRICT_6_3)
        with trio.fail_after(IO_TIMEOUT_S), pytest.raises(HandshakeFailed) as refused:
            await lab.station(app, "CS01")
    assert refused.value.status == 502
    assert refused.value.body.decode().startswith("CSMS unreachable")
    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="csms_unreachable") == 1
    assert metric(app, "ocpp_lc_stations_connected") == 0


async def test_csms_that_never_answers_the_handshake_gets_the_station_a_504(lab: Lab) -> None:
    silent = await lab.start_csms(answer_handshake=False)
    app = await lab.start_app(silent.url, csms={"connect_timeout_s": 0.5}, autonomy=STRICT_6_3)
    with trio.fail_after(IO_TIMEOUT_S):
        start_s = trio.current_time()
        with pytest.raises(HandshakeFailed) as refused:
            await lab.station(app, "CS01")
        waited_s = trio.current_time() - start_s
    assert refused.value.status == 504
    assert b"0.5 s" in refused.value.body
    assert 0.5 <= waited_s < 0.5 + 2.0
    assert silent.tcp_connections == 1
    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="csms_timeout") == 1


async def test_csms_refusal_reaches_the_station_with_its_status(lab: Lab) -> None:
    refusing = await lab.start_csms(refuse_status=401)
    app = await lab.start_app(refusing.url)
    with trio.fail_after(IO_TIMEOUT_S), pytest.raises(HandshakeFailed) as refused:
        await lab.station(app, "CS01")
    assert refused.value.status == 401  # what the station would have seen connected directly
    assert refused.value.body == b"unknown charging station\n"
    assert metric(app, "ocpp_lc_handshake_refusals_total", reason="csms_refused") == 1


async def test_second_connection_with_the_same_identity_replaces_the_first(lab: Lab, csms: FakeCsms) -> None:
    app = await lab.start_app(csms.url)
    with app.hub.subscribe("test", 100) as events, trio.fail_after(IO_TIMEOUT_S):
        healthy = await lab.station(app, "HEALTHY")
        old = await lab.station(app, "CS01")
        old_upstream = await csms.connection("CS01", 0)
        new = await lab.station(app, "CS01")
        new_upstream = await csms.connection("CS01", 1)
        with pytest.raises(ConnectionClosed) as closed:
            await old.receive_text()
        old_upstream_closed = await csms.wait_ended(old_upstream)
        event = await next_link_event(events, "disconnected", "CS01")
        # The newer connection is the one relayed now.
        await assert_still_served(new)
        await assert_still_served(healthy)

    assert (closed.value.code, closed.value.by_peer) == (1000, True)
    assert closed.value.reason  # the old station is told why
    assert old_upstream_closed.code == 1000
    assert new_upstream.closed is None
    assert new_upstream.frames and old_upstream.frames == []
    assert event.reason == "replaced"
    assert metric(app, "ocpp_lc_pair_closes_total", reason="replaced") == 1
    assert metric(app, "ocpp_lc_stations_connected") == 2
