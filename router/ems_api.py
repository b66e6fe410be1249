"""The EMS API on the HTTP face: set, release and read the site limits an EMS imposes (K14).

Routes (JSON; every one needs ``Authorization: Bearer <[http] token>`` when a token is configured):

* ``PUT /api/v1/limits/{source}``: set the limit of one named source (body: :class:`~balancing.limits.
  LimitRequest`); 200 with the accepted limit once it is stored durably; 422 with a reason per field
  (``{"error": ..., "fields": {"limit": "..."}}``) and the limit in force unchanged.
* ``DELETE /api/v1/limits/{source}``: release it; 200, or 404 if the source had no limit.
* ``GET /api/v1/limits``: the effective limit per phase and its source, and every EMS source with its
  age and whether it is stale; from the App also ``nodes``: per node the limit in force and its source
  (config, CSMS, EMS or a meter) and what the node's meter measures (``meters/limits_view.py``).
* ``GET /api/v1/status``: what ``ocpp-lc status`` prints: connected stations, the own identity, the
  limits in force and the upstream (CSMS) state; the document comes from the App.
* ``GET /api/v1/allocations``: one row per EVSE the balancing loop knows (allocation, installed limit,
  measured draw); with balancing turned off, none and a note saying so.

A missing or wrong token is answered 401 with ``WWW-Authenticate: Bearer``; the comparison runs in
constant time. Without a configured token the configuration only lets the HTTP face listen on loopback,
and the API is open to local processes, like ``/metrics``.

Metrics are computed when scraped (a collector, not gauges set by a loop), so a limit going stale shows
at once and a released source leaves no stale series behind.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from balancing.limits import PHASE_NAMES, SOURCE_NAME, LimitInvalid, LimitSources, describe

__all__ = ["API_PREFIX", "MAX_LIMIT_BODY_BYTES", "EmsApi"]

log = logging.getLogger("ocpp_lc.ems_api")

API_PREFIX = "/api/v1"
#: A schedule of the largest allowed size is about 10 KiB of JSON.
MAX_LIMIT_BODY_BYTES = 64 * 1024
_NO_STORE = {"Cache-Control": "no-store"}
_UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Bearer realm="ocpp-lc"', **_NO_STORE}

Handler = Callable[[Request], Awaitable[Response]]


class EmsApi:
    """The EMS routes over a :class:`~balancing.limits.LimitSources`, with their metrics on ``registry``."""

    def __init__(
        self,
        limits: LimitSources,
        registry: CollectorRegistry,
        *,
        token: str | None,
        allocations: Callable[[], Sequence[dict[str, Any]]] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        release_balancing: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        limits_document: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._limits = limits
        self._token = None if token is None else token.encode()
        self._allocations = allocations
        self._status = status
        self._release_balancing = release_balancing
        self._limits_document = limits_document or limits.status
        self.requests = Counter(
            "ocpp_lc_ems_api_requests",
            "EMS API requests by operation (set, release, read_limits, read_allocations, "
            "read_status, release_balancing) and outcome (ok, invalid, unauthorized, not_found).",
            ["operation", "outcome"],
            registry=registry,
        )
        registry.register(_LimitCollector(limits))

    def routes(self) -> list[BaseRoute]:
        """The routes to hand to the HTTP face."""
        return [
            Route(f"{API_PREFIX}/limits", self._guard("read_limits", self._read_limits), methods=["GET"]),
            Route(
                f"{API_PREFIX}/limits/{{source}}",
                self._guard("set", self._set),
                methods=["PUT"],
                max_body_size=MAX_LIMIT_BODY_BYTES,
            ),
            Route(f"{API_PREFIX}/limits/{{source}}", self._guard("release", self._release), methods=["DELETE"]),
            Route(
                f"{API_PREFIX}/allocations", self._guard("read_allocations", self._read_allocations), methods=["GET"]
            ),
            Route(f"{API_PREFIX}/status", self._guard("read_status", self._read_status), methods=["GET"]),
            Route(
                f"{API_PREFIX}/balancing/release",
                self._guard("release_balancing", self._release_all),
                methods=["POST"],
            ),
        ]

    def _guard(self, operation: str, handler: Callable[[Request], Awaitable[tuple[str, Response]]]) -> Handler:
        async def guarded(request: Request) -> Response:
            if not self._authorized(request.headers.get("authorization", "")):
                self.requests.labels(operation, "unauthorized").inc()
                return JSONResponse(
                    {"error": "missing or wrong bearer token"},
                    status_code=HTTPStatus.UNAUTHORIZED,
                    headers=_UNAUTHORIZED_HEADERS,
                )
            outcome, response = await handler(request)
            self.requests.labels(operation, outcome).inc()
            return response

        return guarded

    def _authorized(self, header: str) -> bool:
        if self._token is None:
            return True  # loopback only (config refuses anything else without a token)
        scheme, _, credentials = header.partition(" ")
        # compare_digest: the time taken must not tell an attacker how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._token)

    async def _set(self, request: Request) -> tuple[str, Response]:
        source = request.path_params["source"]
        body = await request.body()
        try:
            limit = self._limits.set(source, body)
        except LimitInvalid as invalid:
            log.info("EMS limit for %r refused: %s", source[:64], invalid)
            document = {
                "error": "invalid limit; the limit in force is unchanged",
                "fields": invalid.problems,
            }
            return "invalid", JSONResponse(document, status_code=HTTPStatus.UNPROCESSABLE_ENTITY, headers=_NO_STORE)
        log.info(
            "EMS limit for %r set: %s %s, valid until %s",
            source,
            [value for _, value in limit.periods],
            limit.unit,
            limit.valid_until.isoformat(),
        )
        return "ok", JSONResponse(describe(limit, self._limits.now()), headers=_NO_STORE)

    async def _release(self, request: Request) -> tuple[str, Response]:
        source = request.path_params["source"]
        if not SOURCE_NAME.fullmatch(source) or not self._limits.release(source):
            return "not_found", JSONResponse(
                {"error": "this source has no limit"}, status_code=HTTPStatus.NOT_FOUND, headers=_NO_STORE
            )
        log.info("EMS limit for %r released", source)
        return "ok", JSONResponse({"released": source}, headers=_NO_STORE)

    async def _release_all(self, request: Request) -> tuple[str, Response]:
        if self._release_balancing is None:
            return "not_found", JSONResponse(
                {"error": "balancing is turned off ([balancing] enabled = false): nothing to release"},
                status_code=HTTPStatus.NOT_FOUND,
                headers=_NO_STORE,
            )
        log.warning("balancing released on request: the controller's profiles are cleared on every station")
        document = await self._release_balancing()
        return "ok", JSONResponse(document, headers=_NO_STORE)

    async def _read_limits(self, request: Request) -> tuple[str, Response]:
        return "ok", JSONResponse(self._limits_document(), headers=_NO_STORE)

    async def _read_status(self, request: Request) -> tuple[str, Response]:
        # Without an App status (the API alone, in tests) the limits are still worth reporting.
        document = self._status() if self._status is not None else {"limits": self._limits_document()}
        return "ok", JSONResponse(document, headers=_NO_STORE)

    async def _read_allocations(self, request: Request) -> tuple[str, Response]:
        effective = self._limits.effective()
        document: dict[str, Any] = {
            "at": effective.at.isoformat(),
            "allocations": list(self._allocations()) if self._allocations is not None else [],
        }
        if self._allocations is None:
            document["note"] = "balancing is turned off ([balancing] enabled = false): no allocations are made"
        return "ok", JSONResponse(document, headers=_NO_STORE)


class _LimitCollector(Collector):
    """Effective limit per phase with its source, EMS limit age and staleness, computed per scrape."""

    def __init__(self, limits: LimitSources) -> None:
        self._limits = limits

    def collect(self) -> Iterator[GaugeMetricFamily]:
        effective = self._limits.effective()
        at = effective.at
        phase = GaugeMetricFamily(
            "ocpp_lc_site_limit_amperes",
            "Per-phase current limit in force on the grid connection, by phase and where it comes from "
            "(config, csms, ems:<source>, failsafe:<source>); absent when nothing limits that phase.",
            labels=["phase", "source"],
        )
        for name, value, source in zip(
            PHASE_NAMES, effective.phase_current_amperes, effective.phase_sources, strict=True
        ):
            if value is not None and source is not None:
                phase.add_metric([name, source], value)
        yield phase
        power = GaugeMetricFamily(
            "ocpp_lc_site_limit_watts",
            "Power limit in force on the grid connection and where it comes from; absent when none.",
            labels=["source"],
        )
        if effective.power_watts is not None and effective.power_source is not None:
            power.add_metric([effective.power_source], effective.power_watts)
        yield power
        age = GaugeMetricFamily(
            "ocpp_lc_ems_limit_age_seconds", "Seconds since each EMS source last set its limit.", labels=["source"]
        )
        stale = GaugeMetricFamily(
            "ocpp_lc_ems_limit_stale",
            "1 when an EMS source's limit has outlived its validity and the failsafe limit applies instead.",
            labels=["source"],
        )
        for limit in self._limits.sources():
            age.add_metric([limit.source], limit.age_s(at))
            stale.add_metric([limit.source], 1.0 if limit.is_stale(at) else 0.0)
        yield age
        yield stale
        yield GaugeMetricFamily(
            "ocpp_lc_ems_failsafe_active",
            "1 while any EMS source is stale and the failsafe limit is in force for it.",
            value=1.0 if effective.failsafe_active else 0.0,
        )
