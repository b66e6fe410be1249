"""Live trace of one station's relayed OCPP-J frames over the HTTP face (what ``ocpp-lc trace`` reads).

Route: ``GET /api/v1/trace/{identity}`` (``Authorization: Bearer <[http] token>`` when a token is
configured; a missing or wrong one is answered 401 with ``WWW-Authenticate: Bearer``, compared in
constant time as in :mod:`router.ems_api`). The answer is a stream of NDJSON lines that runs until the
client goes away or the controller stops:

* first a hello: ``{"trace": identity, "connected": true|false, "t": ...}``; tracing a station that is
  not connected is allowed, and the trace waits for it (and follows it across reconnections);
* one line per frame: ``{"t": wall-clock ISO 8601 UTC, "dt_s": seconds since the previous frame of this
  trace (0 for the first), "direction": "station->csms" | "csms->station" | "lc->station" |
  "station->lc", "frame": the exact text as it travelled}`` (lc: the controller's own calls, never relayed);
* ``{"t": ..., "event": "connected", "subprotocol": ...}`` and ``{"t": ..., "event": "disconnected",
  "reason": ...}`` when the station's pair comes up or goes down;
* ``{"t": ..., "dropped": n}`` when ``n`` frames (or events) were lost, somewhere before this line and
  after the previous such line, because the client did not keep up: observing never slows forwarding
  (:mod:`router.observers`), so a slow trace loses lines instead;
* an empty line every :data:`KEEPALIVE_S` seconds of silence, so that proxies and the client can tell
  an idle trace from a dead connection (NDJSON readers skip empty lines).

Only what the pair relays is traced: the calls the controller itself sends to the station (LC calls,
Part 4 §6.4) and their answers are not published as raw frames by :mod:`router.link`, so they do not
appear here.

At most ``max_traces`` (default 8) traces are open at once; another one is answered 429. Each open
trace holds one of a fixed set of observer names (``trace0`` ..), so that the hub's drop counter
(``ocpp_lc_observer_dropped_total{observer="traceN"}``) belongs to that trace alone while it is open
and its growth is exactly what this trace lost.

Frames may carry anything a station or CSMS sends (e.g. an authorization token), so their content is
never logged; only the opening and closing of a trace are, with the identity.
"""

from __future__ import annotations

import datetime
import hmac
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from .metrics import RouterMetrics
from .observers import LinkEvent, Observation, ObserverHub, RawFrame
from .server import MAX_IDENTITY_CHARS

__all__ = ["DEFAULT_MAX_TRACES", "KEEPALIVE_S", "TRACE_PREFIX", "TraceApi"]

log = logging.getLogger("ocpp_lc.trace")

TRACE_PREFIX = "/api/v1/trace"
DEFAULT_MAX_TRACES = 8
#: Seconds of silence after which an empty line is sent (well under common proxy idle timeouts of 60 s).
KEEPALIVE_S = 5.0
#: Events buffered per trace before the hub drops (and counts) them; each frame also brings its parsed
#: observation, which the trace skips, so this holds about half as many frames.
DEFAULT_CAPACITY = 1000

_NO_STORE = {"Cache-Control": "no-store"}
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="ocpp-lc"', **_NO_STORE}
#: X-Accel-Buffering: nginx (a common reverse proxy) would otherwise buffer the stream.
_STREAM_HEADERS = [
    (b"content-type", b"application/x-ndjson"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
#: link.py's direction names, as users read them.
_DIRECTIONS = {
    "station_to_csms": "station->csms",
    "csms_to_station": "csms->station",
    # The controller's own calls (balancing profiles …) and their answers, never relayed (Part 4 §6.4).
    "lc_to_station": "lc->station",
    "station_to_lc": "station->lc",
}

WallClock = Callable[[], datetime.datetime]


def _utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _line(document: dict[str, Any]) -> bytes:
    # ensure_ascii=False: frames are UTF-8 text and are shown as they travelled.
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _direction(name: str) -> str:
    return _DIRECTIONS.get(name, name.replace("_to_", "->"))


class TraceApi:
    """The trace route over an :class:`ObserverHub`.

    ``connected(identity)`` says whether a station is connected now (for the hello line);
    ``wall_clock`` turns trio's clock into the ``t`` of each line.
    """

    def __init__(
        self,
        hub: ObserverHub,
        metrics: RouterMetrics,
        registry: CollectorRegistry,
        *,
        token: str | None,
        connected: Callable[[str], bool],
        max_traces: int = DEFAULT_MAX_TRACES,
        capacity: int = DEFAULT_CAPACITY,
        keepalive_s: float = KEEPALIVE_S,
        wall_clock: WallClock = _utc_now,
    ) -> None:
        self._hub = hub
        self._metrics = metrics
        self._token = None if token is None else token.encode()
        self._connected = connected
        self._capacity = capacity
        self._keepalive_s = keepalive_s
        self._wall_clock = wall_clock
        #: One flag per observer name ``trace<i>``: the set of names stays fixed (a metric label).
        self._slots = [False] * max_traces
        self._open = Gauge("ocpp_lc_traces_open", "Live traces (ocpp-lc trace) being streamed.", registry=registry)

    def routes(self) -> list[BaseRoute]:
        """The routes to hand to the HTTP face."""
        # :path: a percent-decoded identity may contain '/' (the station server accepts "a%2Fb").
        return [Route(f"{TRACE_PREFIX}/{{identity:path}}", self._trace, methods=["GET"])]

    def _authorized(self, header: str) -> bool:
        if self._token is None:
            return True  # loopback only (config refuses anything else without a token)
        scheme, _, credentials = header.partition(" ")
        # compare_digest: the time taken must not tell an attacker how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)

    async def _trace(self, request: Request) -> Response:
        if not self._authorized(request.headers.get("authorization", "")):
            return JSONResponse(
                {"error": "missing or wrong bearer token"},
                status_code=HTTPStatus.UNAUTHORIZED,
                headers=_UNAUTHORIZED_HEADERS,
            )
        identity: str = request.path_params["identity"]
        if not identity or len(identity) > MAX_IDENTITY_CHARS or ":" in identity or not identity.isprintable():
            return JSONResponse(
                {
                    "error": f"no station can have this identity (1 to {MAX_IDENTITY_CHARS} printable "
                    "characters, no ':')"
                },
                status_code=HTTPStatus.NOT_FOUND,
                headers=_NO_STORE,
            )
        return _TraceResponse(self, identity)

    def _take_slot(self) -> int | None:
        for index, taken in enumerate(self._slots):
            if not taken:
                self._slots[index] = True
                self._open.inc()
                return index
        return None

    def _release_slot(self, index: int) -> None:
        self._slots[index] = False
        self._open.dec()

    def _dropped_so_far(self, observer: str) -> float:
        # Read through collect(), the counter's public face; only this trace uses `observer` meanwhile.
        for family in self._metrics.observer_dropped.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("observer") == observer:
                    return sample.value
        return 0.0

    async def stream(self, identity: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Stream the trace of ``identity`` as the ASGI response on ``send`` until the client leaves.

        Answers 429 instead when ``max_traces`` are open. The subscription and the slot are released
        however this ends: the client disconnecting (seen on ``receive``), a write failing, or
        cancellation when the HTTP face stops.
        """
        slot = self._take_slot()
        if slot is None:
            refusal = JSONResponse(
                {"error": f"too many traces open ({len(self._slots)}); close one and try again"},
                status_code=HTTPStatus.TOO_MANY_REQUESTS,
                headers={"Retry-After": "5", **_NO_STORE},
            )
            await refusal(scope, receive, send)
            return
        observer = f"trace{slot}"
        log.info("trace of %r opened", identity)
        try:
            with self._hub.subscribe(observer, self._capacity, station_id=identity, raw=True) as events:
                # Subscribed before asking: a connection that comes up now is in the channel.
                connected_now = self._connected(identity)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                    await send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
                    hello = {"trace": identity, "connected": connected_now, "t": _iso(self._wall_clock())}
                    await _send_body(send, _line(hello))
                    await self._relay(events, observer, send)
        finally:
            self._release_slot(slot)
            log.info("trace of %r closed", identity)

    async def _relay(self, events: trio.MemoryReceiveChannel[Observation], observer: str, send: Send) -> None:
        dropped_before = self._dropped_so_far(observer)
        previous_frame_s: float | None = None
        while True:
            event = None
            with trio.move_on_after(self._keepalive_s):
                event = await events.receive()
            if event is None:
                await _send_body(send, b"\n")
                continue
            lines: list[bytes] = []
            if events.statistics().current_buffer_used == 0:
                # Events are lost only while the buffer is full; once it is drained, whatever was lost
                # came before anything received from now on, so the line goes here.
                dropped_now = self._dropped_so_far(observer)
                if dropped_now > dropped_before:
                    lost = int(dropped_now - dropped_before)
                    dropped_before = dropped_now
                    lines.append(_line({"t": _iso(self._wall_clock()), "dropped": lost}))
            # trio's clock says when it happened; the wall clock now, minus the age, says at what time.
            at = _iso(self._wall_clock() - datetime.timedelta(seconds=trio.current_time() - event.time_s))
            if isinstance(event, RawFrame):
                dt_s = 0.0 if previous_frame_s is None else event.time_s - previous_frame_s
                previous_frame_s = event.time_s
                document = {"t": at, "dt_s": round(dt_s, 6), "direction": _direction(event.direction)}
                lines.insert(0, _line({**document, "frame": event.text}))
            elif isinstance(event, LinkEvent):
                described: dict[str, Any] = {"t": at, "event": event.kind}
                if event.kind == "connected":
                    described["subprotocol"] = event.subprotocol
                else:
                    described["reason"] = event.reason
                lines.insert(0, _line(described))
            # Parsed observations (ObservedMessage) come along with the raw frames; a trace shows the frames.
            if lines:
                await _send_body(send, b"".join(lines))


class _TraceResponse(Response):
    """The streaming answer: owns the subscription for exactly as long as the client listens."""

    def __init__(self, api: TraceApi, identity: str) -> None:
        self._api = api
        self._identity = identity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._api.stream(self._identity, scope, receive, send)


async def _send_body(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    # The client leaving is the only way a trace ends (short of shutdown): hypercorn reports it as
    # http.disconnect, and the stream (with its subscription) is cancelled at once.
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
