"""The document on ``<prefix>/status``: the limit in force, and per node what is committed and drawn.

Built from the same readings as ``GET /api/v1/status`` (the limit sources and the balancing loop's
report), trimmed to what a home-automation system shows, and without anything that changes by
itself every second (ages), so that an unchanged site gives an unchanged document. All currents are
per phase in amperes, ``[L1, L2, L3]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from balancing.limits import PHASE_NAMES, LimitSources
from balancing.rollout import bound_amperes, grid_phases_of
from balancing.site import GRID_NODE_ID

if TYPE_CHECKING:
    from balancing.loop import Balancer

#: The fields of each EVSE row the status topic carries.
EVSE_FIELDS = (
    "station_id",
    "evse_id",
    "connected",
    "transaction_id",
    "charging_state",
    "allocated_amperes",
    "installed_amperes",
    "measured_current_amperes",
)


def site_status(limits: LimitSources, balancer: Balancer | None) -> dict[str, Any]:
    """The status document (without its ``at``, which the publisher adds)."""
    effective = limits.effective()
    at = effective.at
    document: dict[str, Any] = {
        "limit": {
            "phases": {
                name: {"limit_amperes": value, "source": source}
                for name, value, source in zip(
                    PHASE_NAMES, effective.phase_current_amperes, effective.phase_sources, strict=True
                )
            },
            "power": {"limit_watts": effective.power_watts, "source": effective.power_source},
            "failsafe_active": effective.failsafe_active,
        },
        "ems_sources": [
            {
                "source": limit.source,
                "unit": limit.unit,
                "limit_now": None if limit.is_stale(at) else limit.scheduled_at(at),
                "valid_until": limit.valid_until.isoformat(),
                "stale": limit.is_stale(at),
            }
            for limit in limits.sources()
        ],
        "balancing": balancer is not None,
        "nodes": [],
        "evses": [],
    }
    if balancer is None:
        return document
    report = balancer.status()
    document["nodes"] = [
        {
            "node": GRID_NODE_ID,
            "limit_amperes": [report["phases"][name]["limit_amperes"] for name in PHASE_NAMES],
            "committed_amperes": [report["phases"][name]["committed_amperes"] for name in PHASE_NAMES],
            "measured_amperes": [report["phases"][name]["measured_amperes"] for name in PHASE_NAMES],
        },
        *_circuits(balancer),
    ]
    document["evses"] = [{key: row[key] for key in EVSE_FIELDS} for row in report["evses"]]
    return document


def _circuits(balancer: Balancer) -> list[dict[str, Any]]:
    """Each circuit's limit (lowered by its meter, if it has one) and what is committed and drawn beneath it."""
    site = balancer.site
    rows = []
    for circuit in site.circuits:
        committed = [0.0, 0.0, 0.0]
        for _, applied in sorted(balancer.rollout.evses.items()):
            station = site.station(applied.station_id)
            if circuit.circuit_id in site.circuit_path(station.circuit_id):
                for phase in grid_phases_of(station, applied):
                    committed[phase] += bound_amperes(station, applied)
        measured = [0.0, 0.0, 0.0]
        for record in balancer.records():
            value = balancer.measured_amperes(record)
            station = site.station(record.station_id)
            if value is None or record.transaction_id is None:
                continue
            if circuit.circuit_id in site.circuit_path(station.circuit_id):
                for phase in station.grid_phases(record.phases_used):
                    measured[phase] += value
        limit = circuit.max_current_amperes
        rows.append(
            {
                "node": circuit.circuit_id,
                "limit_amperes": [limit, limit, limit],
                "committed_amperes": [round(value, 3) for value in committed],
                "measured_amperes": [round(value, 3) for value in measured],
            }
        )
    return rows
