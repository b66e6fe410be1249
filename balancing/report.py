"""What the balancing loop shows operators: its metrics, per-EVSE rows and the status document.

Counters and histograms live in :class:`BalancingMetrics`; per-EVSE and per-phase gauges are made per
scrape by :class:`BalancingCollector` from the loop's records, so they never go stale. The functions
read a :class:`~balancing.loop.Balancer` and change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .rollout import bound_amperes, grid_phases_of
from .site import GRID_NODE_ID

if TYPE_CHECKING:
    from .loop import Balancer


class BalancingMetrics:
    """Counters and histograms of the loop; per-station gauges come from :class:`BalancingCollector`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.profiles = Counter(
            "ocpp_lc_balancing_profiles",
            "Charging profiles of the controller's own sent to stations, by kind (decrease, retry, increase, "
            "renew) and outcome (sent, accepted, rejected, error, timeout, gone).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.reallocations = Counter(
            "ocpp_lc_balancing_reallocations", "Allocations computed by the balancing loop.", registry=registry
        )
        self.reallocation_seconds = Histogram(
            "ocpp_lc_balancing_reallocation_seconds",
            "Time from the start of a balancing round to its last step started (a round computed in a child "
            "process includes the child's time, during which the event loop goes on).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
        self.child_rounds = Counter(
            "ocpp_lc_balancing_child_rounds",
            "Balancing rounds of a large site computed in a forked child process, by outcome (computed; "
            "failed: the child crashed or timed out, and the round was computed on the event loop; "
            "foreseen: the round its answers would have woken, found empty by the child before, not run).",
            ["outcome"],
            registry=registry,
        )
        for outcome in ("computed", "failed", "foreseen"):
            self.child_rounds.labels(outcome)
        self.csms_conflicts = Counter(
            "ocpp_lc_balancing_csms_profile_conflicts",
            "CSMS profiles or clears at a station that touched the controller's reserved profile ids or "
            "stack level (its profiles there are re-installed).",
            registry=registry,
        )
        self.ignored = Counter(
            "ocpp_lc_balancing_ignored_messages",
            "Relayed messages the balancing loop could not read (wrong shape); relayed all the same.",
            ["action"],
            registry=registry,
        )
        self.overdraws = Counter(
            "ocpp_lc_balancing_overdraws",
            "Times an EVSE was found drawing above the limit it accepted for longer than the grace period.",
            registry=registry,
        )


def evse_rows(balancer: Balancer) -> list[dict[str, Any]]:
    """One row per known EVSE: session, allocation, installed limit and measured draw."""
    rows = []
    for record in sorted(balancer.records(), key=lambda r: r.key):
        applied = balancer.rollout.evses.get(record.key)
        allocated = balancer.allocation.evses.get(record.key)
        installed = None
        trusted = False
        if applied is not None:
            trusted = applied.trusted
            installed = applied.accepted_amperes if trusted else None
        measured = balancer.measured_amperes(record)
        valid_until = record.valid_until.get(record.governing)
        station = balancer.station_record(record.station_id)
        rows.append(
            {
                "station_id": record.station_id,
                "evse_id": record.evse_id,
                "protocol": None if station is None else station.protocol,
                "steerable": True if station is None else station.steerable,
                "connected": balancer.connected(record.station_id),
                "transaction_id": record.transaction_id,
                "charging_state": record.charging_state,
                "priority": record.priority,
                "phases_used": record.phases_used,
                "allocated_amperes": None if allocated is None else round(allocated.current_amperes, 3),
                "installed_amperes": installed,
                "profile_in_flight": applied is not None and applied.in_flight_amperes is not None,
                "profile_valid_until": None if valid_until is None else valid_until.isoformat(),
                "compliant": trusted,
                "overdrawing": applied is not None and applied.overdraw_amperes is not None,
                "unconfirmed_since_restart": applied is not None and applied.restored,
                "measured_current_amperes": None if measured is None else round(measured, 3),
                "measured_power_watts": None if record.measured is None else record.measured.power_watts,
            }
        )
    return rows


def phase_bounds_amperes(balancer: Balancer) -> tuple[float, float, float]:
    """The most the site may draw per grid phase now, from what every EVSE may draw (its bound)."""
    totals = [0.0, 0.0, 0.0]
    for _, applied in sorted(balancer.rollout.evses.items()):
        station = balancer.site.station(applied.station_id)
        bound = bound_amperes(station, applied)
        for phase in grid_phases_of(station, applied):
            totals[phase] += bound
    return (totals[0], totals[1], totals[2])


def measured_phase_amperes(balancer: Balancer) -> tuple[float, float, float]:
    """The measured draw per grid phase, summed over the sessions (highest phase current each)."""
    totals = [0.0, 0.0, 0.0]
    for record in balancer.records():
        measured = balancer.measured_amperes(record)
        if measured is None or record.transaction_id is None:
            continue
        for phase in balancer.site.station(record.station_id).grid_phases(record.phases_used):
            totals[phase] += measured
    return (totals[0], totals[1], totals[2])


def grid_limit_amperes(balancer: Balancer) -> tuple[float | None, float | None, float | None]:
    """The per-phase limit on the grid node now: configuration and outside limits together."""
    configured = balancer.site.node_limits(GRID_NODE_ID).max_current_amperes
    outside = balancer.limits.phase_current_amperes
    result: list[float | None] = []
    for phase in range(3):
        values = [v for v in (configured, None if outside is None else outside[phase]) if v is not None]
        value = min(values) if values else None
        result.append(None if value is None or math.isinf(value) else value)
    return (result[0], result[1], result[2])


def status(balancer: Balancer) -> dict[str, Any]:
    """The balancing part of ``GET /api/v1/status`` and of ``GET /api/v1/allocations``."""
    limit = grid_limit_amperes(balancer)
    bounds = phase_bounds_amperes(balancer)
    measured = measured_phase_amperes(balancer)
    phases = {}
    for index, name in enumerate(("L1", "L2", "L3")):
        value = limit[index]
        phases[name] = {
            "limit_amperes": value,
            "committed_amperes": round(bounds[index], 3),
            "measured_amperes": round(measured[index], 3),
            "headroom_amperes": None if value is None else round(value - bounds[index], 3),
        }
    rows = evse_rows(balancer)
    return {
        "phases": phases,
        "overcommitted": balancer.allocation.overcommitted,
        "released": balancer.released,
        "sessions": sum(1 for row in rows if row["transaction_id"] is not None),
        "overdrawing": sum(1 for row in rows if row["overdrawing"]),
        "unconfirmed_since_restart": sum(1 for row in rows if row["unconfirmed_since_restart"]),
        "evses": rows,
        "reallocation_seconds": round(balancer.last_duration_s, 6),
    }


class BalancingCollector(Collector):
    """Per-scrape gauges: per-EVSE allocation, installed limit and draw; per-phase limit, commitment, headroom."""

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        balancer = self._balancer
        allocated = GaugeMetricFamily(
            "ocpp_lc_balancing_allocated_amperes",
            "Per-phase current the allocator gives each EVSE with a session.",
            labels=["station", "evse"],
        )
        installed = GaugeMetricFamily(
            "ocpp_lc_balancing_installed_amperes",
            "Per-phase limit of the controller's profile the EVSE last accepted (absent while unknown).",
            labels=["station", "evse"],
        )
        measured = GaugeMetricFamily(
            "ocpp_lc_balancing_measured_current_amperes",
            "Highest per-phase current measured at each EVSE with a session (from meter values).",
            labels=["station", "evse"],
        )
        noncompliant = GaugeMetricFamily(
            "ocpp_lc_balancing_noncompliant_evses",
            "EVSEs whose limit is unknown, rejected or overdrawn, counted at their maximum.",
        )
        overdrawing = GaugeMetricFamily(
            "ocpp_lc_balancing_overdrawing_evses",
            "EVSEs measured above the limit they accepted for longer than the grace period, counted at their draw.",
        )
        unconfirmed = GaugeMetricFamily(
            "ocpp_lc_balancing_unconfirmed_since_restart_evses",
            "EVSEs taken back from the store after a restart whose station has not confirmed a profile since "
            "(a stale belief: counted at their maximum).",
        )
        sessions = GaugeMetricFamily("ocpp_lc_balancing_sessions", "Transactions the loop balances.")
        evses = GaugeMetricFamily(
            "ocpp_lc_balancing_evses",
            "EVSEs the loop balances, by the OCPP version their station speaks and whether it can be steered "
            "(a 1.6 station without SmartCharging cannot: counted at its maximum).",
            labels=["protocol", "steerable"],
        )
        by_kind: dict[tuple[str, str], int] = {}
        counts = {"noncompliant": 0, "sessions": 0, "overdrawing": 0, "unconfirmed": 0}
        for row in evse_rows(balancer):
            labels = [row["station_id"], str(row["evse_id"])]
            steerable = {True: "true", False: "false"}.get(row["steerable"], "unknown")
            kind = (row["protocol"] or "unknown", steerable)
            by_kind[kind] = by_kind.get(kind, 0) + 1
            counts["noncompliant"] += not row["compliant"]
            counts["overdrawing"] += row["overdrawing"]
            counts["unconfirmed"] += row["unconfirmed_since_restart"]
            if row["installed_amperes"] is not None:
                installed.add_metric(labels, row["installed_amperes"])
            if row["transaction_id"] is None:
                continue
            counts["sessions"] += 1
            if row["allocated_amperes"] is not None:
                allocated.add_metric(labels, row["allocated_amperes"])
            if row["measured_current_amperes"] is not None:
                measured.add_metric(labels, row["measured_current_amperes"])
        noncompliant.add_metric([], counts["noncompliant"])
        overdrawing.add_metric([], counts["overdrawing"])
        unconfirmed.add_metric([], counts["unconfirmed"])
        sessions.add_metric([], counts["sessions"])
        for (protocol, steerable), count in sorted(by_kind.items()):
            evses.add_metric([protocol, steerable], count)
        limit = GaugeMetricFamily(
            "ocpp_lc_balancing_grid_limit_amperes",
            "Per-phase limit on the grid connection in force (configuration, CSMS and EMS together).",
            labels=["phase"],
        )
        committed = GaugeMetricFamily(
            "ocpp_lc_balancing_committed_amperes",
            "Per grid phase, the most the stations may draw now under the limits they accepted (unknown or "
            "rejecting EVSEs at their maximum).",
            labels=["phase"],
        )
        draw = GaugeMetricFamily(
            "ocpp_lc_balancing_measured_draw_amperes",
            "Per grid phase, the measured draw of the sessions summed.",
            labels=["phase"],
        )
        headroom = GaugeMetricFamily(
            "ocpp_lc_balancing_headroom_amperes",
            "Per grid phase, the limit in force minus what is committed (negative: over the limit).",
            labels=["phase"],
        )
        bounds = phase_bounds_amperes(balancer)
        measured_phases = measured_phase_amperes(balancer)
        limits = grid_limit_amperes(balancer)
        for index, name in enumerate(("L1", "L2", "L3")):
            committed.add_metric([name], bounds[index])
            draw.add_metric([name], measured_phases[index])
            value = limits[index]
            if value is not None:
                limit.add_metric([name], value)
                headroom.add_metric([name], value - bounds[index])
        overcommitted = GaugeMetricFamily(
            "ocpp_lc_balancing_overcommitted",
            "1 while stations the controller cannot steer alone exceed a limit.",
        )
        overcommitted.add_metric([], 1.0 if balancer.allocation.overcommitted else 0.0)
        yield from (allocated, installed, measured, noncompliant, overdrawing, unconfirmed, sessions, evses)
        yield from (limit, committed, draw, headroom, overcommitted)
