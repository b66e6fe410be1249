"""Wiring: build the appliance's parts from settings and run them under one nursery.

This is the only module that knows every part. Tests start the whole appliance with
``app = await nursery.start(run_app, settings)`` (ports 0) and read the bound ports from ``app``.

Theory of operation: :func:`run_app` opens the durable :class:`~router.store.Store` in
``[state] dir`` (unless the caller hands in one it has already opened), builds every part
(:func:`build_app`), starts the station server, the HTTP face and, with ``[controller] connect``, the
controller's own identity toward the CSMS, and reports the :class:`App`. It runs until
:meth:`App.request_shutdown` or :meth:`App.request_restart`: then it stops accepting stations, closes
every station with 1001 (within ``shutdown_grace_s``), cancels the rest (the own connection closes
with 1001 too) and closes the store it opened. A restart is the same graceful shutdown with
:attr:`App.restart_reason` set; starting again is the caller's part (``ocpp-lc run`` does it in the
same process), so that a restart really begins from the configuration and the stored state.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.clearing import LeftoverProfiles
from balancing.csms_limits import CsmsLimitBook, limit_steps
from balancing.limits import LimitBounds, LimitSources
from balancing.loop import Balancer
from balancing.schedules import PeriodLimit
from balancing.upstream import EmsReporter
from firmware_cache import FirmwareCache, FirmwareSettings, RequestInvalid
from firmware_cache.service import STATUS_ACTION
from meters.limits_view import node_limits
from meters.service import MeterService
from mqtt.service import MqttService
from mqtt.site_status import site_status

from .autonomy.service import Autonomy
from .balancing_wiring import build_balancer, clear_leftovers, feed_balancer, link_caller, release_document
from .config import Settings
from .ems_api import EmsApi
from .http import build_http_app, serve_http
from .link import LinkTimings
from .metrics import RouterMetrics
from .observers import ObserverHub
from .own.charging_handlers import register_csms_limits
from .own.connection import CallErrorReply, Reply, Session
from .own.service import OwnIdentity, OwnIdentitySettings, utc_now
from .server import LinkRegistry, StationServer, UpstreamTarget
from .store import Store
from .tls import client_context, server_context
from .trace_api import TraceApi

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
    store: Store
    #: EMS limit sources and the effective site limit (K14); kept in the store's ``ems_limits`` namespace.
    limits: LimitSources
    #: The CSMS's site profiles set on the controller's own identity (K03), in ``csms_limits``.
    csms_limits: CsmsLimitBook
    #: The controller's own identity toward the CSMS; None when ``[controller] connect`` is false.
    own: OwnIdentity | None = None
    #: The firmware cache (L03/L04); it works through the own identity, so None when that is off.
    firmware: FirmwareCache | None = None
    #: The balancing loop; None when ``[balancing] enabled`` is false.
    balancer: Balancer | None = None
    #: With balancing off: the profiles an earlier run left on stations, cleared as they connect.
    leftover_profiles: LeftoverProfiles | None = None
    #: Reports EMS limits to the CSMS (K14); needs the own identity.
    ems_reporter: EmsReporter | None = None
    #: Site autonomy (errata 4.13 to §6.3); None when ``[autonomy] enabled`` is false.
    autonomy: Autonomy | None = None
    #: The site meters (``[[meters]]``) that limit balancing; None without meters or balancing.
    meters: MeterService | None = None
    #: EMS limits and site status over MQTT (``[mqtt]``); None unless a broker is configured.
    mqtt: MqttService | None = None
    station_port: int = 0
    http_port: int = 0
    #: Why the appliance was asked to restart (e.g. "RemoteReset"); None for a plain shutdown.
    restart_reason: str | None = None
    _shutdown: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event)

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown: stop accepting, close every station with 1001, then stop."""
        self._shutdown.set()

    def request_restart(self, reason: str) -> None:
        """Shut down gracefully, recording ``reason`` so that whoever runs the app starts it again.

        Called by the own identity once its answer to the CSMS's Reset is on its way (B11, B12).
        """
        if self.restart_reason is None and not self._shutdown.is_set():
            log.warning("restart requested (%s): shutting down gracefully to start again", reason)
            self.restart_reason = reason
        self.request_shutdown()

    @property
    def shutting_down(self) -> bool:
        """True once a shutdown or restart has been requested."""
        return self._shutdown.is_set()

    @property
    def stopped(self) -> trio.Event:
        """Set when the appliance has finished shutting down."""
        return self._stopped

    def health(self) -> tuple[bool, dict[str, Any]]:
        """What /healthz reports.

        The own link is reported, not judged: a CSMS outage is the CSMS's problem, and the controller
        keeps serving its site through it.
        """
        own: dict[str, Any] = {"connect": self.own is not None}
        if self.own is not None:
            own |= {"link_up": self.own.link_up, "boot_status": self.own.boot_status}
        return True, {
            "status": "ok",
            "stations_connected": len(self.links),
            "station_port": self.station_port,
            "own_identity": own,
        }

    def limits_document(self) -> dict[str, Any]:
        """``GET /api/v1/limits``: the site limit and its sources, and per node the limit in force with
        what the node's meter leaves (:mod:`meters.limits_view`)."""
        at = self.limits.now()
        document = self.limits.status(at)
        document["nodes"] = node_limits(self.settings.site, self.limits.effective(at), self.meters)
        return document

    def status(self) -> dict[str, Any]:
        """What ``GET /api/v1/status`` (and so ``ocpp-lc status``) reports."""
        # connected_at_s is on trio's clock; the wall-clock moment is derived from the age so that the
        # CLI can print when each station connected.
        now_s = trio.current_time()
        wall = utc_now()
        stations = [
            {
                "station_id": link.station_id,
                "subprotocol": link.subprotocol,
                "connected_for_s": round(now_s - link.connected_at_s, 3),
                "connected_since": (wall - datetime.timedelta(seconds=now_s - link.connected_at_s)).isoformat(),
            }
            for link in sorted(self.links, key=lambda link: link.station_id)
        ]
        own: dict[str, Any] = {"identity": self.settings.controller.identity, "connect": self.own is not None}
        if self.own is not None:
            own |= {"link_up": self.own.link_up, "boot_status": self.own.boot_status}
        return {
            "stations": stations,
            "own_identity": own,
            "limits": self.limits_document(),
            "balancing": None if self.balancer is None else self.balancer.status(),
            "meters": None if self.meters is None else self.meters.status(),
            "mqtt": None if self.mqtt is None else self.mqtt.status(),
            "upstream": {"csms_url": self.settings.csms.url, "link_up": own.get("link_up")},
            # Which stations are served locally (site autonomy) and what waits for the CSMS.
            "autonomy": None if self.autonomy is None else self.autonomy.status(),
            "shutting_down": self.shutting_down,
        }


def own_identity_settings(settings: Settings, ssl_context: ssl.SSLContext | None) -> OwnIdentitySettings:
    """The own identity's settings from the configuration (the CSMS leg's values where both have one)."""
    controller, csms = settings.controller, settings.csms
    return OwnIdentitySettings(
        identity=controller.identity,
        csms_host=csms.address.host,
        csms_port=csms.address.port,
        csms_path=csms.path,
        ssl_context=ssl_context,
        basic_auth_password=controller.basic_auth_password_value(),
        security_profile=csms.security.security_profile,
        connect_timeout_s=csms.connect_timeout_s,
        message_timeout_s=controller.message_timeout_s,
        heartbeat_interval_s=controller.heartbeat_interval_s,
        # The device model's WebSocketPingInterval is whole seconds; [csms] allows fractions.
        websocket_ping_interval_s=round(csms.ping_interval_s),
        ping_timeout_s=csms.ping_timeout_s,
        retry_wait_minimum_s=controller.retry_wait_minimum_s,
        retry_random_range_s=controller.retry_random_range_s,
        retry_repeat_times=controller.retry_repeat_times,
        boot_retry_s=controller.boot_retry_s,
        max_message_bytes=settings.stations.max_message_bytes,
        vendor_name=controller.vendor_name,
        model=controller.model,
        serial_number=controller.serial_number,
    )


def build_app(settings: Settings, store: Store, registry: CollectorRegistry | None = None) -> App:
    """Construct every part from ``settings`` on an open ``store`` (nothing runs yet)."""
    registry = registry if registry is not None else CollectorRegistry()
    metrics = RouterMetrics(registry)
    hub = ObserverHub(metrics)
    links = LinkRegistry()
    csms = settings.csms
    # One context for every connection the controller opens to the CSMS: the relayed legs and its own.
    csms_context = client_context(csms.security)
    upstream = UpstreamTarget(
        host=csms.address.host,
        port=csms.address.port,
        path=csms.path,
        ssl_context=csms_context,
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

    def station_security_event(event_type: str, tech_info: str) -> None:
        # A04: the station leg's refusals go to the CSMS under the controller's own identity, rate-limited
        # there; with the own connection off they are only logged and counted (by the server).
        if app.own is not None:
            app.own.security_events.report(event_type, tech_info, source="station")

    # Site autonomy: built before the server, which hands it every OCPP 2.0.1 pair's CSMS leg.
    autonomy = (
        Autonomy(settings.autonomy, store, registry=registry, wall_clock=utc_now) if settings.autonomy.enabled else None
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
        own_identity=settings.controller.identity if settings.controller.connect else None,
        certificate_organization=settings.stations.security.organization,
        security_event=station_security_event,
        autonomy=autonomy,
    )
    own_settings = own_identity_settings(settings, csms_context)
    grid = settings.site.grid
    csms_book = CsmsLimitBook(
        store.namespace(CSMS_LIMITS_NAMESPACE),
        # The grid connection bounds GetCompositeSchedule answers; unconfigured, the largest EMS limit.
        grid_limit=PeriodLimit(
            grid.max_current_amperes if grid.max_current_amperes is not None else settings.ems.max_current_amperes,
            "A",
            3,
        ),
        max_stack_level=own_settings.profile_stack_level,
        max_periods=own_settings.periods_per_schedule,
    )
    listeners: list[Callable[[], None]] = []

    def limits_changed() -> None:
        for listener in listeners:
            listener()

    limits = LimitSources(
        store.namespace(EMS_LIMITS_NAMESPACE),
        limit_bounds(settings),
        config_limits=SiteLimits.uniform(grid.max_current_amperes, grid.max_power_watts),
        csms_limits=csms_book.site_limits_at,
        csms_next_change=csms_book.next_change_after,
        on_change=limits_changed,
        registry=registry,
    )
    csms_book.other_limits = limit_steps(limits.effective, limits.next_change_after)
    app = App(settings, registry, metrics, hub, links, server, store, limits, csms_book, autonomy=autonomy)
    if settings.balancing.enabled:
        if settings.meters:
            failsafe = settings.ems.failsafe_current_amperes
            app.meters = MeterService(settings.meters, settings.site, registry, failsafe_amperes=failsafe)
        state = store.namespace(BALANCING_NAMESPACE)
        app.balancer = build_balancer(settings, limits, links, registry, state, app.meters)
        listeners.append(app.balancer.wake)
        csms_book.on_change(app.balancer.wake)
    else:
        if settings.meters:
            log.warning("[[meters]] configured but [balancing] enabled = false: the meters are not read")
        # Balancing switched off: what an earlier run installed is taken off the stations as they connect.
        leftovers = LeftoverProfiles(
            store.namespace(BALANCING_NAMESPACE), link_caller(links), settings.balancing.profile_id_base
        )
        if leftovers.pending:
            app.leftover_profiles = leftovers
    if settings.mqtt.enabled:
        app.mqtt = MqttService(
            settings.mqtt,
            limits,
            registry,
            digests=store.namespace(MQTT_RETAINED_NAMESPACE),
            status_document=lambda: site_status(limits, app.balancer),
        )
    if settings.controller.connect:
        app.own = OwnIdentity(
            dataclasses.replace(own_settings, max_charging_profiles=csms_book.max_profiles),
            store=store,
            registry=registry,
            # The device model's LocalController.ChargingStation: who is connected right now.
            connected_stations=lambda: list(links.links),
            request_restart=app.request_restart,
            # SmartChargingCtrlr.Entries[ChargingProfiles]: the CSMS's site profiles it holds.
            charging_profiles=lambda: len(csms_book.profiles),
            # TLS failures of the own connection count where those of the relayed legs do (leg "own").
            count_security_event=lambda event, leg: metrics.security_events.labels(event, leg).inc(),
        )
        register_csms_limits(app.own, csms_book, utc_now)
        app.firmware = FirmwareCache(
            firmware_settings(settings),
            state=store.namespace(FIRMWARE_NAMESPACE),
            notifier=app.own,
            registry=registry,
        )
        wire_firmware(app.own, app.firmware)
        model = app.own.device_model
        app.ems_reporter = EmsReporter(
            limits,
            store.namespace(EMS_REPORTED_NAMESPACE),
            app.own.send,
            significance_percent=lambda: model.float_value("SmartChargingCtrlr", "LimitChangeSignificance"),
            with_schedules=lambda: model.value("SmartChargingCtrlr", "NotifyChargingLimitWithSchedules") == "true",
        )
        listeners.append(app.ems_reporter.wake)
    return app


#: Store namespace of what the CSMS was last told about EMS limits (K14).
EMS_REPORTED_NAMESPACE = "ems_reported"


#: Store namespace of what the balancing loop knows of each station (EVSEs, transactions, installed limits).
BALANCING_NAMESPACE = "balancing"


#: Store namespace of the digests of the retained MQTT limits already applied (mqtt/ems.py).
MQTT_RETAINED_NAMESPACE = "mqtt_retained"


#: Store namespace of the EMS limits in force.
EMS_LIMITS_NAMESPACE = "ems_limits"
#: Store namespace of the CSMS's site profiles (K03).
CSMS_LIMITS_NAMESPACE = "csms_limits"


def limit_bounds(settings: Settings) -> LimitBounds:
    """What an EMS may ask for, from ``[ems]``."""
    ems = settings.ems
    return LimitBounds(
        max_current_amperes=ems.max_current_amperes,
        failsafe_current_amperes=ems.failsafe_current_amperes,
        default_validity_s=ems.default_validity_s,
    )


#: Store namespace of the firmware cache's index.
FIRMWARE_NAMESPACE = "firmware"


def firmware_settings(settings: Settings) -> FirmwareSettings:
    """The firmware cache's settings from the configuration."""
    firmware = settings.firmware
    return FirmwareSettings(
        cache_dir=firmware.cache_path(settings.state.path),
        max_file_bytes=firmware.max_file_bytes,
        disk_budget_bytes=firmware.disk_budget_bytes,
        download_timeout_s=firmware.download_timeout_s,
        default_retries=firmware.retries,
        default_retry_interval_s=float(firmware.retry_interval_s),
        ca_file=Path(firmware.ca_file) if firmware.ca_file else None,
    )


def wire_firmware(own: OwnIdentity, cache: FirmwareCache) -> None:
    """Route PublishFirmware, UnpublishFirmware and the status trigger on the own identity to ``cache``."""

    def publish(payload: dict[str, Any]) -> Reply:
        try:
            answer = cache.publish(payload)
        except RequestInvalid as error:
            raise CallErrorReply(error.code, error.description) from None

        async def answered(session: Session) -> None:
            answer.sent()  # the first status may follow the answer now

        return Reply(answer.payload, then=answered)

    def unpublish(payload: dict[str, Any]) -> Reply:
        try:
            return Reply(cache.unpublish(payload))
        except RequestInvalid as error:
            raise CallErrorReply(error.code, error.description) from None

    async def trigger(session: Session) -> None:
        await own.send(STATUS_ACTION, cache.trigger_payload())

    own.add_handler("PublishFirmware", publish)
    own.add_handler("UnpublishFirmware", unpublish)
    own.add_trigger(STATUS_ACTION, trigger)


async def run_app(
    settings: Settings,
    registry: CollectorRegistry | None = None,
    *,
    store: Store | None = None,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the appliance until :meth:`App.request_shutdown` / :meth:`App.request_restart` (or cancellation).

    Uses ``store`` if given (the caller keeps owning it and closes it); otherwise opens the store in
    ``settings.state.path`` and closes it on the way out, raising :class:`~router.store.StoreError`
    (or :class:`~router.store.StoreDamaged`) before anything starts if it cannot. Reports the
    :class:`App` once the station port and the HTTP face listen and the own identity has started.
    """
    owned = store is None
    # Opening runs SQLite's check of the file: a blocking moment before anything listens, like a bind.
    opened = Store.open(settings.state.path) if store is None else store
    try:
        app = build_app(settings, opened, registry)
        await _serve(app, task_status)
    finally:
        if owned:
            opened.close()


async def _serve(app: App, task_status: trio.TaskStatus[App]) -> None:
    settings = app.settings
    try:
        async with trio.open_nursery() as nursery:
            if app.balancer is not None:
                await nursery.start(
                    feed_balancer,
                    app.hub,
                    app.balancer,
                    settings.balancing.observer_queue,
                    link_caller(app.links),
                )
                await nursery.start(app.balancer.run)
                if app.meters is not None:
                    await nursery.start(app.meters.run)
            elif app.leftover_profiles is not None:
                await nursery.start(clear_leftovers, app.hub, app.leftover_profiles)
            stations = settings.stations.address
            app.station_port = await nursery.start(app.server.serve, stations.host, stations.port)
            http = settings.http.address

            def health() -> tuple[bool, dict[str, Any]]:
                app.hub.update_fill_gauges()
                return app.health()

            ems_api = EmsApi(
                app.limits,
                app.registry,
                token=settings.http.token_value(),
                status=app.status,
                limits_document=app.limits_document,
                allocations=None if app.balancer is None else app.balancer.evse_rows,
                release_balancing=None if app.balancer is None else release_document(app.balancer),
            )
            routes = ems_api.routes()
            trace_api = TraceApi(
                app.hub,
                app.metrics,
                app.registry,
                token=settings.http.token_value(),
                connected=lambda station_id: app.links.get(station_id) is not None,
                capacity=settings.routing.observer_queue,
            )
            routes += trace_api.routes()
            if app.firmware is not None:
                # Before the HTTP face and the own identity: files are re-verified before they are
                # served, and PublishFirmware needs the cache's nursery.
                await nursery.start(app.firmware.run)
                routes += app.firmware.routes()
            http_app = build_http_app(app.registry, health, routes)
            app.http_port = await nursery.start(serve_http, http_app, http.host, http.port)
            if app.firmware is not None:
                app.firmware.public_base_url = settings.firmware.public_base(http, app.http_port)
                if app.firmware.public_base_url is None:
                    log.warning(
                        "firmware: [http] listens on every interface and [firmware] public_base_url is not set: "
                        "PublishFirmware will be rejected until it is"
                    )
            if app.own is not None:
                await nursery.start(app.own.run)
            if app.ems_reporter is not None:
                await nursery.start(app.ems_reporter.run)
            if app.mqtt is not None:
                await nursery.start(app.mqtt.run)
            log.info(
                "ocpp-lc %s up: stations on port %d, HTTP on port %d, CSMS at %s, state in %s%s",
                settings.controller.identity,
                app.station_port,
                app.http_port,
                settings.csms.url,
                app.store.path.parent,
                "" if app.own is not None else " (own connection to the CSMS turned off)",
            )
            task_status.started(app)
            await app._shutdown.wait()
            if app.balancer is not None:
                app.balancer.stop()  # no more profiles to stations that are being closed
            log.info("shutting down: closing %d station connections", len(app.links))
            await app.server.stop_accepting()
            await app.server.close_all(settings.routing.shutdown_grace_s)
            nursery.cancel_scope.cancel()
    finally:
        app._stopped.set()
