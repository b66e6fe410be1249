"""The HTTP face over real sockets on loopback: routes, limits, shutdown, and what Prometheus sees."""

from __future__ import annotations

import errno
import gzip
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from router.http import MAX_REQUEST_BODY_BYTES, build_http_app, serve_http

IO_TIMEOUT_S = 10.0


def always_healthy() -> tuple[bool, dict[str, Any]]:
    return True, {"status": "ok"}


def sample_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("ocpp_lc_test_frames", "Frames seen by the test.", ["direction"], registry=registry).labels(
        direction="upstream"
    ).inc(3)
    Gauge("ocpp_lc_test_stations", "Stations connected in the test.", registry=registry).set(2)
    latency = Histogram("ocpp_lc_test_latency_seconds", "Latency in the test.", registry=registry)
    for value_s in (0.001, 0.02, 0.3):
        latency.observe(value_s)
    return registry


@asynccontextmanager
async def serving(app: Any, host: str = "127.0.0.1") -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """Run `serve_http` on port 0 and yield a client for it; the server is cancelled on exit."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_http, app, host, 0)
        authority = f"[{host}]" if ":" in host else host
        # trust_env=False: a proxy configured in the environment must not intercept loopback tests.
        async with httpx.AsyncClient(base_url=f"http://{authority}:{port}", trust_env=False) as client:
            yield client, port
        nursery.cancel_scope.cancel()


async def test_metrics_serves_the_registry_in_prometheus_text_format() -> None:
    app = build_http_app(sample_registry(), always_healthy)
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            response = await client.get("/metrics", headers={"Accept-Encoding": "identity"})

    assert response.status_code == 200  # served directly: no redirect to /metrics/
    # What prometheus_client itself serves to a client that does not ask for a format.
    assert response.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    assert "content-encoding" not in response.headers
    assert 'ocpp_lc_test_frames_total{direction="upstream"} 3.0' in response.text
    assert "ocpp_lc_test_stations 2.0" in response.text
    assert "server" not in response.headers


async def test_metrics_are_gzipped_when_the_scraper_accepts_it() -> None:
    app = build_http_app(sample_registry(), always_healthy)
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            plain = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
            async with client.stream("GET", "/metrics", headers={"Accept-Encoding": "gzip"}) as response:
                compressed = b"".join([chunk async for chunk in response.aiter_raw()])

    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["vary"] == "Accept-Encoding"
    assert gzip.decompress(compressed) == plain.content


async def test_metrics_speak_openmetrics_when_asked() -> None:
    app = build_http_app(sample_registry(), always_healthy)
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})

    assert response.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert response.text.endswith("# EOF\n")


async def test_healthz_is_200_when_healthy_and_503_otherwise() -> None:
    state: dict[str, Any] = {"healthy": True, "details": {"csms": "connected", "stations": 4}}

    def health() -> tuple[bool, dict[str, Any]]:
        return state["healthy"], state["details"]

    app = build_http_app(CollectorRegistry(), health)
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            up = await client.get("/healthz")
            state["healthy"] = False
            state["details"] = {"csms": "unreachable", "stations": 4}
            down = await client.get("/healthz")

    assert up.status_code == 200
    assert up.json() == {"csms": "connected", "stations": 4}
    assert up.headers["cache-control"] == "no-store"
    assert down.status_code == 503
    assert down.json() == {"csms": "unreachable", "stations": 4}


async def test_extra_routes_are_served() -> None:
    async def set_limit(request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"accepted": body["limit_amperes"]})

    app = build_http_app(CollectorRegistry(), always_healthy, [Route("/api/limit", set_limit, methods=["POST"])])
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            response = await client.post("/api/limit", json={"limit_amperes": 32})

    assert response.status_code == 200
    assert response.json() == {"accepted": 32}


async def test_unknown_path_and_wrong_method_are_json_errors() -> None:
    app = build_http_app(CollectorRegistry(), always_healthy)
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            missing = await client.get("/nope")
            wrong_method = await client.post("/metrics")

    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json() == {"error": "not found"}
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"error": "method not allowed"}
    assert "GET" in wrong_method.headers["allow"]


async def test_a_failing_route_is_a_json_500_logged_to_ocpp_lc_http(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(request: Request) -> Response:
        raise RuntimeError("status store unavailable")

    app = build_http_app(CollectorRegistry(), always_healthy, [Route("/status", broken)])
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            response = await client.get("/status")
            healthy_after = await client.get("/healthz")

    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    assert healthy_after.status_code == 200
    logged = [record for record in caplog.records if record.name == "ocpp_lc.http" and record.exc_info]
    assert logged, caplog.text
    assert "status store unavailable" in caplog.text


async def exchange_raw(port: int, request: bytes) -> bytes:
    """Send `request` bytes as they are and read the answer until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        received = bytearray()
        while chunk := await stream.receive_some(65536):
            received += chunk
    return bytes(received)


async def test_oversized_request_bodies_are_refused_without_being_buffered() -> None:
    # Raw sockets, so that the client never sends a byte the server does not read: a server that
    # closes on unread data sends a TCP reset, which can destroy its own 413 in the client's buffer.
    received_bytes: list[int] = []

    async def upload(request: Request) -> Response:
        received_bytes.append(len(await request.body()))
        return JSONResponse({"ok": True})

    app = build_http_app(CollectorRegistry(), always_healthy, [Route("/upload", upload, methods=["POST"])])
    too_big = MAX_REQUEST_BODY_BYTES + 1
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, port):
            small = await client.post("/upload", content=b"x" * 1000)
            # Refused from the declared length alone: the body is never sent.
            declared = await exchange_raw(
                port, b"POST /upload HTTP/1.1\r\nHost: lc\r\nContent-Length: %d\r\n\r\n" % too_big
            )
            # No length declared: refused as soon as the streamed body crosses the limit.
            streamed = await exchange_raw(
                port,
                b"POST /upload HTTP/1.1\r\nHost: lc\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % too_big
                + b"x" * too_big,
            )

    assert small.status_code == 200
    assert declared.startswith(b"HTTP/1.1 413 "), declared[:200]
    assert streamed.startswith(b"HTTP/1.1 413 "), streamed[:200]
    assert streamed.endswith(b'{"error":"content too large"}'), streamed[-200:]
    assert received_bytes == [1000]


async def test_cancelling_the_server_stops_it_and_frees_the_port() -> None:
    app = build_http_app(CollectorRegistry(), always_healthy)
    with trio.fail_after(IO_TIMEOUT_S):
        # The client outlives the server, so its idle keep-alive connection is open during shutdown.
        async with httpx.AsyncClient(trust_env=False) as client:
            async with trio.open_nursery() as nursery:
                port: int = await nursery.start(serve_http, app, "127.0.0.1", 0)
                assert (await client.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
                nursery.cancel_scope.cancel()

            with trio.socket.socket() as probe, pytest.raises(ConnectionRefusedError):
                await probe.connect(("127.0.0.1", port))

        # The same port can be served again straight away.
        async with serving_on_port(app, port) as client:
            assert (await client.get("/healthz")).status_code == 200


@asynccontextmanager
async def serving_on_port(app: Any, port: int) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        assert await nursery.start(serve_http, app, "127.0.0.1", port) == port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            yield client
        nursery.cancel_scope.cancel()


async def test_a_client_that_stops_reading_does_not_hold_up_shutdown() -> None:
    # Hypercorn writes responses under a shielded cancel scope, so a download whose client stopped
    # reading could block shutdown for ever. A watchdog closes the client after a while so that a
    # regression fails this test instead of hanging it.
    async def big(request: Request) -> Response:
        return Response(b"x" * (32 * 1024 * 1024), media_type="application/octet-stream")

    app = build_http_app(CollectorRegistry(), always_healthy, [Route("/big", big)])
    watchdog_s = 5.0
    watchdog_fired = False

    async def close_after_a_while(stream: trio.SocketStream) -> None:
        nonlocal watchdog_fired
        await trio.sleep(watchdog_s)
        watchdog_fired = True
        await stream.aclose()

    with trio.fail_after(IO_TIMEOUT_S):
        async with trio.open_nursery() as test_nursery:
            async with trio.open_nursery() as server_nursery:
                port: int = await server_nursery.start(serve_http, app, "127.0.0.1", 0)
                stalled = await trio.open_tcp_stream("127.0.0.1", port)
                test_nursery.start_soon(close_after_a_while, stalled)
                await stalled.send_all(b"GET /big HTTP/1.1\r\nHost: lc\r\n\r\n")
                first = await stalled.receive_some(1024)
                assert first.startswith(b"HTTP/1.1 200")
                await trio.sleep(0.2)  # the server fills the socket buffers and blocks in a write
                cancelled_at = trio.current_time()
                server_nursery.cancel_scope.cancel()
            shutdown_s = trio.current_time() - cancelled_at
            test_nursery.cancel_scope.cancel()
        await stalled.aclose()

    assert not watchdog_fired
    assert shutdown_s < 1.0


async def test_a_port_in_use_is_an_oserror_before_started() -> None:
    app = build_http_app(CollectorRegistry(), always_healthy)
    with trio.socket.socket() as occupier:
        await occupier.bind(("127.0.0.1", 0))
        occupier.listen(1)
        port = occupier.getsockname()[1]
        with trio.fail_after(IO_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                with pytest.raises(OSError) as in_use:
                    await nursery.start(serve_http, app, "127.0.0.1", port)
    assert in_use.value.errno == errno.EADDRINUSE


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback on this host")
async def test_serves_on_ipv6_loopback() -> None:
    app = build_http_app(CollectorRegistry(), always_healthy)
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app, host="::1") as (client, port):
            response = await client.get("/healthz")
    assert port > 0
    assert response.status_code == 200


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package `prometheus` provides it)",
)
async def test_promtool_accepts_the_exposition() -> None:
    app = build_http_app(sample_registry(), always_healthy)
    with trio.fail_after(IO_TIMEOUT_S):
        async with serving(app) as (client, _):
            response = await client.get("/metrics")
        checked = await trio.run_process(
            ["promtool", "check", "metrics"],
            stdin=response.content,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    report = (checked.stdout + checked.stderr).decode()
    assert checked.returncode == 0, report
    assert report.strip() == "", report  # no lint warnings either
