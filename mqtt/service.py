"""The MQTT face: stay connected to the broker, apply EMS limits, publish the site's status.

:class:`MqttService` runs one task (``await nursery.start(service.run)``, which reports at once: a
broker that is down must not hold up the appliance). It connects (:mod:`mqtt.session`), subscribes to
``<prefix>/ems/+/limit`` with QoS 1 (:mod:`mqtt.ems` applies what arrives), publishes ``online`` on
``<prefix>/availability`` (retained; the will left with the broker says ``offline`` if the controller
vanishes) and the site status on ``<prefix>/status`` (retained). When the session fails it waits and
tries again: the wait doubles from ``reconnect_min_s`` up to ``reconnect_max_s``, each one drawn between
half and all of that (jitter, so that many controllers behind one broker do not return in step), and
starts again from the minimum once a session has been accepted.

A broker that is gone changes no limit: every EMS source keeps its own validity and then the failsafe
current, exactly as when an HTTP EMS falls silent (K14); nothing becomes unlimited.

Status publishing samples the document every ``status_min_interval_s`` and publishes it when it
differs from the last one published (ignoring its timestamp), and at least every ``status_interval_s``.
The sampling is the rate limit the home-automation side needs, not a wait for something to happen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from balancing.limits import LimitSources, LimitStore

from .ems import OUTCOMES, EmsTopics
from .session import Broker, Session, SessionLost, connect
from .settings import MqttSettings

log = logging.getLogger("ocpp_lc.mqtt")

ONLINE, OFFLINE = b"online", b"offline"
StatusDocument = Callable[[], dict[str, Any]]


class MqttMetrics:
    """The MQTT face's counters and gauges."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "ocpp_lc_mqtt_messages",
            "EMS limit messages received over MQTT by outcome: applied, cleared (empty payload), repeated "
            "(a retained limit already applied), or why it was refused (not_json, invalid, expired, "
            "unknown_source, error); a refused message leaves the limit in force unchanged.",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.messages.labels(outcome)
        self.connected = Gauge(
            "ocpp_lc_mqtt_connected", "1 while the controller is connected to the MQTT broker.", registry=registry
        )
        self.attempts = Counter(
            "ocpp_lc_mqtt_connection_attempts",
            "Connections attempted to the MQTT broker by outcome (ok, unreachable, timeout, tls, refused, "
            "lost before CONNACK, error).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("ok", "unreachable", "timeout", "tls", "refused", "lost", "error"):
            self.attempts.labels(outcome)
        self.reconnects = Counter(
            "ocpp_lc_mqtt_reconnects",
            "Sessions with the MQTT broker accepted after an earlier one was lost.",
            registry=registry,
        )
        self.status_published = Counter(
            "ocpp_lc_mqtt_status_published", "Site status documents published on the status topic.", registry=registry
        )
        self.last_message_at: float | None = None  # time.monotonic(), for the age gauge
        registry.register(_AgeCollector(self))


class _AgeCollector(Collector):
    def __init__(self, metrics: MqttMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ocpp_lc_mqtt_last_message_age_seconds",
            "Seconds since the last EMS limit message arrived over MQTT (absent before the first).",
        )
        at = self._metrics.last_message_at
        if at is not None:
            family.add_metric([], max(0.0, time.monotonic() - at))
        yield family


def ssl_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """The TLS client context ``[mqtt]`` asks for, or None without TLS."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(cafile=settings.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert_file is not None and settings.key_file is not None:
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


@contextlib.contextmanager
def _lone_session_lost() -> Iterator[None]:
    """A session's nursery raises SessionLost in a group; the loop handles it on its own."""
    try:
        yield
    except* SessionLost as group:
        raise group.exceptions[0] from None


class MqttService:
    """The ``[mqtt]`` face over ``limits``; ``status_document`` builds what ``<prefix>/status`` carries."""

    def __init__(
        self,
        settings: MqttSettings,
        limits: LimitSources,
        registry: CollectorRegistry,
        *,
        digests: LimitStore,
        status_document: StatusDocument,
        rng: random.Random | None = None,
    ) -> None:
        assert settings.host is not None, "MqttService needs [mqtt] host"
        self.settings = settings
        self.metrics = MqttMetrics(registry)
        self.ems = EmsTopics(limits, settings.topic_prefix, digests=digests, accepted_sources=settings.sources)
        self._status_document = status_document
        self._rng = rng if rng is not None else random.Random()
        prefix = settings.topic_prefix
        self.status_topic = f"{prefix}/status"
        self.availability_topic = f"{prefix}/availability"
        self._broker = Broker(
            host=settings.host,
            port=settings.broker_port,
            client_id=settings.client_id,
            keepalive_s=settings.keepalive_s,
            connect_timeout_s=settings.connect_timeout_s,
            username=settings.username,
            password=settings.password_value(),
            ssl_context=ssl_context(settings),
            will_topic=self.availability_topic,
            will_payload=OFFLINE,
        )
        self._session: Session | None = None
        self.last_error: str | None = None
        self.connected_since: float | None = None  # time.monotonic()
        #: Set after each message handled and each session accepted or lost (tests wait on it).
        self.changed = trio.Event()

    # --- status for operators ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``mqtt`` part of ``GET /api/v1/status`` (no credentials)."""
        since = self.connected_since
        return {
            "broker": f"{self._broker.host}:{self._broker.port}",
            "tls": self._broker.ssl_context is not None,
            "connected": self._session is not None,
            "connected_for_s": None if since is None else round(time.monotonic() - since, 1),
            "last_error": self.last_error,
            "topic_prefix": self.settings.topic_prefix,
        }

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # --- running -----------------------------------------------------------------------------------

    def backoff_s(self, failures: int) -> float:
        """The wait before attempt ``failures + 1``: doubling from the minimum to the maximum, with jitter."""
        settings = self.settings
        ceiling = min(settings.reconnect_max_s, settings.reconnect_min_s * 2 ** min(failures - 1, 30))
        return self._rng.uniform(ceiling / 2, ceiling)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled (reports at once, connected or not)."""
        task_status.started()
        failures = 0
        sessions = 0
        while True:
            try:
                session = await connect(self._broker, self._message)
                with _lone_session_lost():
                    async with trio.open_nursery() as nursery:
                        await nursery.start(session.run)
                        self._accepted(session, reconnect=sessions > 0)
                        sessions += 1
                        failures = 0
                        nursery.start_soon(self._publish_status, session)
            except SessionLost as lost:
                failures += 1
                self._lost(lost, failures)
            except Exception as error:  # defence in depth: the MQTT face must never stop the appliance
                failures += 1
                log.exception("MQTT: the session failed unexpectedly; retrying")
                self._lost(SessionLost(type(error).__name__, "error"), failures)
            finally:
                if self._session is not None:
                    self._session = None
                    self.connected_since = None
                    self.metrics.connected.set(0)
                    self._notify()
            await trio.sleep(self.backoff_s(max(failures, 1)))

    def _accepted(self, session: Session, *, reconnect: bool) -> None:
        self._session = session
        self.connected_since = time.monotonic()
        self.metrics.connected.set(1)
        self.metrics.attempts.labels("ok").inc()
        if reconnect:
            self.metrics.reconnects.inc()
        log.info(
            "MQTT: connected to %s:%d%s as %r; EMS limits on %s",
            self._broker.host,
            self._broker.port,
            " with TLS" if self._broker.ssl_context is not None else "",
            self._broker.client_id,
            self.ems.subscription,
        )
        self.last_error = None
        session.publish(self.availability_topic, ONLINE, retain=True)
        session.subscribe(self.ems.subscription, qos=1)
        self._notify()

    def _lost(self, lost: SessionLost, failures: int) -> None:
        was_connected = self._session is not None
        if not was_connected:
            self.metrics.attempts.labels(lost.outcome).inc()
        self.last_error = lost.reason
        self._notify()
        # Logged when it changes (a broker down for an hour is one line, not one per attempt).
        if was_connected or failures == 1:
            log.warning(
                "MQTT: %s %s:%d (%s); EMS limits keep their own validity, then the failsafe; retrying",
                "lost the broker" if was_connected else "cannot reach the broker",
                self._broker.host,
                self._broker.port,
                lost.reason,
            )

    def _message(self, topic: str, payload: bytes, retained: bool) -> None:
        handled = self.ems.handle(topic, payload, retained=retained)
        self.metrics.messages.labels(handled.outcome).inc()
        self.metrics.last_message_at = time.monotonic()
        self._notify()

    async def _publish_status(self, session: Session) -> None:
        settings = self.settings
        published: dict[str, Any] | None = None
        published_at_s = -math.inf
        while True:
            document = self._status_document()
            now_s = trio.current_time()
            if document != published or now_s - published_at_s >= settings.status_interval_s:
                stamped = {**document, "at": self.ems.now().isoformat()}
                session.publish(self.status_topic, json.dumps(stamped).encode(), retain=True)
                self.metrics.status_published.inc()
                self._notify()
                published, published_at_s = document, now_s
            await trio.sleep(settings.status_min_interval_s)
