"""What site autonomy shows operators on ``/metrics``: counters and histograms, and per-scrape gauges.

Counters, the replay histogram and the gauges the autonomy parts set as things change live in
:class:`AutonomyMetrics`. What changes with time alone (how long the site has been without its CSMS,
how much of a replay is left) is computed per scrape by :class:`AutonomyCollector` from a read-only
:class:`AutonomyReading`, so it never goes stale between two events.

Label values are bounded: modes, outcomes and authorization statuses come from small fixed sets; no
station id is a label here (a site of a thousand stations in an outage would make a thousand series of
each). Per-station detail is in ``ocpp-lc status`` instead; the gauges give a site-wide maximum beside
the count of stations (``ocpp_lc_autonomy_stations{mode}``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .auth_cache import LocalAuthorization

#: From a station with a handful of messages (a second or two) to a large site's long outage.
_REPLAY_BUCKETS_S: Final = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: How the authorization cache decides (its ``Outcome``), with the status each answers.
_AUTHORIZATION_SERIES: Final = (
    ("cached", "Accepted"),
    ("exempt", "Accepted"),
    ("unknown_accepted", "Accepted"),
    ("unknown_rejected", "Unknown"),
)


class AutonomyReading(Protocol):
    """What the per-scrape gauges read (``router.autonomy.service.Autonomy`` provides it)."""

    def longest_offline_s(self) -> float:
        """How long the station served locally for the longest has been without its CSMS (0: none)."""
        ...

    def replay_remaining_messages(self) -> int:
        """Messages still to deliver to the CSMS for the stations whose replay is under way."""
        ...

    def fullest_station_messages(self) -> int:
        """The most messages kept for any one station."""
        ...


class AutonomyMetrics:
    """The counters, histogram and event-driven gauges the autonomy parts keep."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        queue_max_bytes: int,
        queue_max_messages_per_station: int,
        max_offline_s: float,
    ) -> None:
        self.stations = Gauge(
            "ocpp_lc_autonomy_stations",
            "Stations whose CSMS connection is down and that the controller serves itself, by mode "
            "(local: CSMS unreachable; replaying: CSMS back, queue being delivered).",
            ["mode"],
            registry=registry,
        )
        self.local_answers = Counter(
            "ocpp_lc_autonomy_local_answers_total",
            "Station calls the controller answered itself, by what became of the message "
            "(queued, latest, dropped, queue_full, store_failed).",
            ["kept"],
            registry=registry,
        )
        self.local_authorizations = Counter(
            "ocpp_lc_autonomy_local_authorizations_total",
            "idTokens the controller judged itself while the CSMS was unreachable (Authorize and "
            "TransactionEvent), by how (cached: the CSMS's earlier answer; exempt: a token type nobody "
            "checks; unknown_accepted / unknown_rejected: [autonomy] unknown_id_tokens) and the status answered.",
            ["outcome", "status"],
            registry=registry,
        )
        self.queue_messages = Gauge(
            "ocpp_lc_autonomy_queue_messages", "Messages kept on disk for the CSMS (all stations).", registry=registry
        )
        self.queue_bytes = Gauge(
            "ocpp_lc_autonomy_queue_bytes", "Stored size of the messages kept for the CSMS.", registry=registry
        )
        self.queue_limit_bytes = Gauge(
            "ocpp_lc_autonomy_queue_limit_bytes",
            "The bound on the stored size of every station's kept messages ([autonomy] queue_max_bytes).",
            registry=registry,
        )
        self.queue_limit_messages = Gauge(
            "ocpp_lc_autonomy_queue_limit_messages_per_station",
            "The bound on the messages kept for one station ([autonomy] queue_max_messages_per_station).",
            registry=registry,
        )
        self.max_offline = Gauge(
            "ocpp_lc_autonomy_max_offline_seconds",
            "How long a station is served locally at most ([autonomy] max_offline_s); then it is closed.",
            registry=registry,
        )
        self.queue_limit_bytes.set(queue_max_bytes)
        self.queue_limit_messages.set(queue_max_messages_per_station)
        self.max_offline.set(max_offline_s)
        self.replayed = Counter(
            "ocpp_lc_autonomy_replayed_total",
            "Kept messages delivered to the CSMS after an outage, by its answer (result, error).",
            ["outcome"],
            registry=registry,
        )
        self.boot_held = Counter(
            "ocpp_lc_autonomy_replayed_boot_held_total",
            "Replayed BootNotifications the CSMS answered Pending or Rejected, by status: the station's kept "
            "messages wait until it accepts the boot (a Pending hold lasts as long as the CSMS answers Pending).",
            ["status"],
            registry=registry,
        )
        self.replay_duration = Histogram(
            "ocpp_lc_autonomy_replay_duration_seconds",
            "Per station, from its CSMS connection coming back to its kept messages all delivered "
            "(then it is relayed again).",
            buckets=_REPLAY_BUCKETS_S,
            registry=registry,
        )
        self.refused_after_local_accept = Counter(
            "ocpp_lc_autonomy_refused_after_local_accept_total",
            "Transactions whose idToken was accepted locally and refused by the CSMS on replay, by what the "
            "controller did (stop_requested, left_running).",
            ["action"],
            registry=registry,
        )
        # Series that exist from the start, so that rules and dashboards see 0, not nothing.
        for mode in ("local", "replaying"):
            self.stations.labels(mode)
        for kept in ("queued", "latest", "dropped", "queue_full", "store_failed"):
            self.local_answers.labels(kept)
        for outcome, status in _AUTHORIZATION_SERIES:
            self.local_authorizations.labels(outcome, status)
        for outcome in ("result", "error"):
            self.replayed.labels(outcome)
        for status in ("Pending", "Rejected"):
            self.boot_held.labels(status)
        # (refused_after_local_accept's children are not made in advance: its label is named "action",
        # which elsewhere holds OCPP action names only, and tests/integration/test_metrics.py holds it to that.)

    def count_authorization(self, authorization: LocalAuthorization) -> None:
        """Count one idToken judged locally and answered to the station."""
        self.local_authorizations.labels(authorization.outcome, authorization.status).inc()


class AutonomyCollector(Collector):
    """Per-scrape gauges: the longest current outage, what is left of the replays, the fullest station."""

    def __init__(self, reading: AutonomyReading) -> None:
        self._reading = reading

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        reading = self._reading
        yield GaugeMetricFamily(
            "ocpp_lc_autonomy_offline_longest_seconds",
            "How long the station served locally (or replaying) for the longest has been without its CSMS "
            "connection; 0 when every station is relayed. ocpp_lc_autonomy_stations counts them.",
            value=reading.longest_offline_s(),
        )
        yield GaugeMetricFamily(
            "ocpp_lc_autonomy_replay_remaining_messages",
            "Kept messages still to be delivered to the CSMS for the stations whose replay is under way.",
            value=reading.replay_remaining_messages(),
        )
        yield GaugeMetricFamily(
            "ocpp_lc_autonomy_queue_fullest_station_messages",
            "The most messages kept for any one station (compare with "
            "ocpp_lc_autonomy_queue_limit_messages_per_station).",
            value=reading.fullest_station_messages(),
        )
