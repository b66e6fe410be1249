"""The appliance's HTTP face: one Starlette app served by hypercorn's trio worker.

`build_http_app` assembles the routes every deployment has (`/metrics`, `/healthz`) plus whatever
the wiring module passes in (EMS limit API, firmware files, status API). `serve_http` runs that app in
the current trio run until its cancel scope is cancelled.

Theory of operation for `serve_http`: we resolve and bind the listening socket ourselves, so a bind
failure is a plain `OSError` raised before anything starts, and the bound port (port 0 in tests) is
read from the socket rather than parsed out of hypercorn's "http://host:port" strings. The accept loop
is trio's `serve_listeners`; each connection is handled by hypercorn's `TCPServer` (h11 parsing, keep
alive, the ASGI bridge). This replaces `hypercorn.trio.serve` (about forty lines of it) for one reason:
hypercorn writes responses under a shielded cancel scope, so cancelling its tasks cannot interrupt a
write to a client that has stopped reading, and shutdown would wait for that client for ever. Owning
the listener lets us remember every accepted stream and close them all when we are cancelled, which
wakes such a write with `ClosedResourceError`. The price is that we import three hypercorn modules
that are not its documented API (`trio.tcp_server`, `trio.worker_context`, `app_wrappers`); the
integration tests exercise all of them.
"""

from __future__ import annotations

import gzip
import logging
import socket
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from http import HTTPStatus
from typing import Any, cast

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

__all__ = ["HTTP_LOGGER_NAME", "MAX_REQUEST_BODY_BYTES", "build_http_app", "serve_http"]

HTTP_LOGGER_NAME = "ocpp_lc.http"
MAX_REQUEST_BODY_BYTES = 1024 * 1024
"""Default cap on a request body; a larger one is answered 413 without being buffered."""

_logger = logging.getLogger(HTTP_LOGGER_NAME)

_LISTEN_BACKLOG = 128
_KEEP_ALIVE_TIMEOUT_S = 5.0
"""Idle keep-alive connections, and clients that are slow to finish their request headers, are dropped
after this long. Prometheus reconnects per scrape at worst; nothing of ours needs longer."""
_MAX_HEADER_BYTES = 16 * 1024
_GZIP_MIN_BYTES = 1024

_NO_STORE = {"Cache-Control": "no-store"}
# Python 3.11's phrases plus the RFC 9110 names Starlette uses for 413 and 422.
_REASON_PHRASES = frozenset({status.phrase for status in HTTPStatus} | {"Content Too Large", "Unprocessable Content"})


def build_http_app(
    registry: CollectorRegistry,
    health: Callable[[], tuple[bool, dict[str, Any]]],
    routes: Sequence[BaseRoute] = (),
    *,
    max_request_body_bytes: int = MAX_REQUEST_BODY_BYTES,
) -> Starlette:
    """Build the appliance's HTTP app.

    - `GET /metrics`: the Prometheus exposition of `registry` (OpenMetrics when the scraper asks for
      it, gzip when it accepts it).
    - `GET /healthz`: the JSON object from `health()`, with status 200 when its flag is true and 503
      otherwise.
    - `routes` are appended after these two.

    Unknown paths and other HTTP errors are answered as JSON `{"error": "..."}`. Request bodies larger
    than `max_request_body_bytes` are refused with 413 as soon as the limit is crossed (or at once from
    `Content-Length`); a route may raise or lower it with `Route(..., max_body_size=...)`.

    Both built-in handlers run inline on the trio thread, not in a worker thread: collectors and the
    health callback read trio-owned state, so they must be quick and must not block.
    """

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = encoder(registry)
        headers = dict(_NO_STORE)
        if len(body) >= _GZIP_MIN_BYTES and _accepts_gzip(request.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
            headers["Vary"] = "Accept-Encoding"
        return Response(body, headers=headers, media_type=content_type)

    async def healthz(request: Request) -> Response:
        healthy, details = health()
        status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
        return JSONResponse(details, status_code=status, headers=_NO_STORE)

    return Starlette(
        routes=[
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            *routes,
        ],
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        max_body_size=max_request_body_bytes,
    )


async def serve_http(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` over plain HTTP/1.1 on `host`:`port` until cancelled.

    `host` may be a name or an IPv4/IPv6 literal (`"::1"`; `"::"` also takes IPv4 on Linux); it is
    resolved once and its first address is bound. `port` may be 0: `task_status.started(bound_port)`
    reports the port actually bound, once the socket is listening.

    A bind failure raises `OSError` before `started()`. On cancellation the listening socket and every
    open connection are closed at once: in-flight responses are cut off. The ASGI lifespan protocol is
    not run (our resources belong to trio nurseries, not to the app). Hypercorn's access log is off;
    its error log goes to the `ocpp_lc.http` logger.
    """
    listen_socket = await _bind_listening_socket(host, port)
    with listen_socket:
        bound_port: int = listen_socket.getsockname()[1]
        config = _hypercorn_config()
        asgi_app = ASGIWrapper(cast(ASGIFramework, app))
        context = WorkerContext(max_requests=None)
        open_streams: weakref.WeakSet[trio.SocketStream] = weakref.WeakSet()
        listener = _TrackingListener(trio.SocketListener(trio.socket.from_stdlib_socket(listen_socket)), open_streams)

        async def handle_connection(stream: trio.SocketStream) -> None:
            # TCPServer is annotated for SSL streams but tells a plain one apart itself.
            await TCPServer(asgi_app, config, context, ConnectionState({}), stream)  # type: ignore[arg-type]

        async with trio.open_nursery() as connection_nursery:
            connection_nursery.start_soon(_close_streams_when_cancelled, open_streams)
            connection_nursery.start_soon(
                partial(trio.serve_listeners, handle_connection, [listener], handler_nursery=connection_nursery)
            )
            _logger.info("serving HTTP on %s", _url_authority(listen_socket))
            task_status.started(bound_port)


class _TrackingListener(trio.abc.Listener[trio.SocketStream]):
    """Remembers (weakly) every stream it accepts, so they can be closed on shutdown."""

    def __init__(self, listener: trio.SocketListener, open_streams: weakref.WeakSet[trio.SocketStream]) -> None:
        self._listener = listener
        self._open_streams = open_streams

    async def accept(self) -> trio.SocketStream:
        stream = await self._listener.accept()
        self._open_streams.add(stream)
        return stream

    async def aclose(self) -> None:
        await self._listener.aclose()


async def _close_streams_when_cancelled(open_streams: weakref.WeakSet[trio.SocketStream]) -> None:
    # Hypercorn's TCPServer sends under a shielded cancel scope, so cancelling it cannot stop a write
    # to a client that has stopped reading (a stalled firmware download). Closing the socket wakes
    # that write with ClosedResourceError, which hypercorn treats as the client going away. Closing
    # an already closed stream is a no-op, and streams hypercorn has finished with have left the set.
    try:
        await trio.sleep_forever()
    finally:
        for stream in list(open_streams):
            stream.socket.close()


def _hypercorn_config() -> Config:
    config = Config()
    config.accesslog = None
    config.errorlog = _logger
    config.keep_alive_timeout = _KEEP_ALIVE_TIMEOUT_S
    config.h11_max_incomplete_size = _MAX_HEADER_BYTES
    config.include_server_header = False
    # read_timeout stays None: hypercorn applies it to every read, including while it is sending a
    # long response, so it would cut off a slow firmware download whose client has nothing to send.
    config.read_timeout = None
    return config


async def _bind_listening_socket(host: str, port: int) -> socket.socket:
    """Resolve `host` and return a non-blocking stdlib socket listening on its first address."""
    addresses = await trio.socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = addresses[0]
    listen_socket = socket.socket(family, type_, proto)
    try:
        listen_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen_socket.bind(address)
        listen_socket.listen(_LISTEN_BACKLOG)
        listen_socket.setblocking(False)
    except BaseException:
        listen_socket.close()
        raise
    return listen_socket


def _url_authority(listen_socket: socket.socket) -> str:
    address, port = listen_socket.getsockname()[:2]
    return f"[{address}]:{port}" if listen_socket.family == socket.AF_INET6 else f"{address}:{port}"


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    # Starlette fills `detail` with the reason phrase when a route gave none: say that in lower case,
    # and pass a route's own words through unchanged.
    message = exc.detail.lower() if exc.detail in _REASON_PHRASES else exc.detail
    if exc.status_code in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises the exception after sending this, and hypercorn logs it to ocpp_lc.http.
    return JSONResponse({"error": "internal server error"}, status_code=HTTPStatus.INTERNAL_SERVER_ERROR)


def _accepts_gzip(accept_encoding: str) -> bool:
    for coding in accept_encoding.split(","):
        name, _, params = coding.strip().partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in ("q=0", "q=0.0", "q=0.00", "q=0.000")
    return False
