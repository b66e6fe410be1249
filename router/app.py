"""Wiring: build the appliance's parts from settings and run them under one nursery.

This is the only module that knows every part. Tests start the whole appliance with
``app = await nursery.start(run_app, settings)`` (ports 0) and read the bound ports from ``app``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from .config import Settings
from .http import build_http_app, serve_http
from .link import LinkTimings
from .metrics import RouterMetrics
from .observers import ObserverHub
from .server import LinkRegistry, StationServer, UpstreamTarget
from .tls import client_context, server_context

log = logging.getLogger("ocpp_lc.app")


@dataclass
class App:
    """A running appliance: its bound ports and the parts other code (and tests) talk to."""

    settings: Settings
    registry: CollectorRegistry
    metrics: RouterMetrics
    hub: ObserverHub
    links: LinkRegistry
    server: StationServer
    station_port: int = 0
    http_port: int = 0
    _shutdown: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event)

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, close every station with 1001, then stop."""
        self._shutdown.set()

    @property
    def stopped(self) -> trio.Event:
        """Set when the appliance has finished shutting down."""
        return self._stopped

    def health(self) -> tuple[bool, dict[str, Any]]:
        """What /healthz reports."""
        return True, {
            "status": "ok",
            "stations_connected": len(self.links),
            "station_port": self.station_port,
        }


def build_app(settings: Settings, registry: CollectorRegistry | None = None) -> App:
    """Construct every part from ``settings`` (nothing runs yet)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = RouterMetrics(registry)
    hub = ObserverHub(metrics)
    links = LinkRegistry()
    csms = settings.csms
    upstream = UpstreamTarget(
        host=csms.address.host,
        port=csms.address.port,
        path=csms.path,
        ssl_context=client_context(csms.security),
        connect_timeout_s=csms.connect_timeout_s,
    )
    timings = LinkTimings(
        lc_call_timeout_s=settings.routing.lc_call_timeout_s,
        csms_call_hold_s=settings.routing.csms_call_hold_s,
        station_ping_interval_s=settings.stations.ping_interval_s,
        station_ping_timeout_s=settings.stations.ping_timeout_s,
        csms_ping_interval_s=csms.ping_interval_s,
        csms_ping_timeout_s=csms.ping_timeout_s,
        tracked_calls_max=settings.routing.tracked_calls_max,
    )
    server = StationServer(
        base_path=settings.stations.path,
        upstream=upstream,
        timings=timings,
        metrics=metrics,
        hub=hub,
        registry=links,
        max_message_bytes=settings.stations.max_message_bytes,
        handshake_timeout_s=settings.stations.handshake_timeout_s,
        max_stations=settings.stations.max_stations,
        ssl_context=server_context(settings.stations.security),
        tls_handshake_timeout_s=settings.stations.security.handshake_timeout_s,
    )
    return App(settings, registry, metrics, hub, links, server)


async def run_app(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    *,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the appliance until :meth:`App.request_shutdown` (or cancellation).

    Reports the :class:`App` once both the station port and the HTTP face listen.
    """
    app = build_app(settings, registry)
    try:
        async with trio.open_nursery() as nursery:
            stations = settings.stations.address
            app.station_port = await nursery.start(app.server.serve, stations.host, stations.port)
            http = settings.http.address

            def health() -> tuple[bool, dict[str, Any]]:
                app.hub.update_fill_gauges()
                return app.health()

            http_app = build_http_app(app.registry, health)
            app.http_port = await nursery.start(serve_http, http_app, http.host, http.port)
            log.info(
                "ocpp-lc %s up: stations on port %d, HTTP on port %d, CSMS at %s",
                settings.controller.identity,
                app.station_port,
                app.http_port,
                settings.csms.url,
            )
            task_status.started(app)
            await app._shutdown.wait()
            log.info("shutting down: closing %d station connections", len(app.links))
            await app.server.stop_accepting()
            await app.server.close_all(settings.routing.shutdown_grace_s)
            nursery.cancel_scope.cancel()
    finally:
        app._stopped.set()
