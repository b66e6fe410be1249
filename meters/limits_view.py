"""The limit in force at each node of the site, with where it comes from, meters included.

``GET /api/v1/limits`` (and ``ocpp-lc status``) report under ``nodes`` one entry per node that is
limited: the grid connection, and every circuit with a limit or a meter. Per phase (and for power) it
gives the lowest of what applies there and its source, so that an operator or an EMS vendor sees which
limit holds the EVs back:

* ``config`` (``[site.grid]`` / ``[[site.circuits]]``), and on the grid ``csms``, ``ems:<source>`` or
  ``failsafe:<source>``, as :class:`balancing.limits.EffectiveLimit` has them (the same precedence);
* ``meter:<name>``: what the node's meter leaves for the EVs (the node's configured limit less the
  non-EV load and the safety margin; its fallback while the meter fails). On a circuit the balancing
  loop holds all phases to the headroom of the most loaded one (rounded down to 0.1 A), so that is what
  is shown there.

Ties keep the earlier source in that order. The node's meter, if any, comes along with its metered and
non-EV load. Pure: the caller hands in the effective outside limit and the meter service's state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from balancing.limits import PHASE_NAMES, EffectiveLimit
from balancing.site import GRID_NODE_ID, SiteConfig

if TYPE_CHECKING:
    from .service import MeterService, MeterTask

Candidate = tuple[float | None, str]


def _lowest(candidates: list[Candidate]) -> tuple[float | None, str | None]:
    value: float | None = None
    source: str | None = None
    for offered, name in candidates:
        if offered is not None and (value is None or offered < value):
            value, source = offered, name
    return value, source


def _meter_row(task: MeterTask) -> dict[str, Any]:
    state = task.state
    return {
        "meter": task.settings.name,
        "fallback": state.fallback,
        "metered_amperes": None if state.metered_amperes is None else list(state.metered_amperes),
        "other_load_amperes": None
        if state.other_load_amperes is None or state.fallback
        else [round(value, 3) for value in state.other_load_amperes],
        "headroom_amperes": [round(value, 3) for value in state.headroom_amperes],
        "power_headroom_watts": None if state.power_headroom_watts is None else round(state.power_headroom_watts, 1),
    }


def node_limits(site: SiteConfig, effective: EffectiveLimit, meters: MeterService | None) -> list[dict[str, Any]]:
    """The ``nodes`` part of ``GET /api/v1/limits``; see the module docstring."""
    tasks = {task.settings.node: task for task in meters.tasks} if meters is not None else {}
    nodes: list[str] = [GRID_NODE_ID]
    for circuit in site.circuits:
        limited = circuit.max_current_amperes is not None or circuit.max_power_watts is not None
        if limited or circuit.circuit_id in tasks:
            nodes.append(circuit.circuit_id)
    rows = []
    for node in nodes:
        configured = site.node_limits(node)
        task = tasks.get(node)
        meter_source = None if task is None else f"meter:{task.settings.name}"
        phases: dict[str, dict[str, Any]] = {}
        for index, name in enumerate(PHASE_NAMES):
            if node == GRID_NODE_ID:
                outside = effective.phase_current_amperes[index]
                source = effective.phase_sources[index]
                candidates: list[Candidate] = [(outside, source or "config")]
            else:
                candidates = [(configured.max_current_amperes, "config")]
            if task is not None and meter_source is not None:
                headroom = task.state.headroom_amperes
                metered = headroom[index] if node == GRID_NODE_ID else math.floor(min(headroom) * 10 + 1e-9) / 10
                candidates.append((metered, meter_source))
            value, source = _lowest(candidates)
            phases[name] = {"limit_amperes": None if value is None else round(value, 3), "source": source}
        if node == GRID_NODE_ID:
            power_candidates: list[Candidate] = [(effective.power_watts, effective.power_source or "config")]
        else:
            power_candidates = [(configured.max_power_watts, "config")]
        if task is not None and meter_source is not None:
            power_candidates.append((task.state.power_headroom_watts, meter_source))
        power, power_source = _lowest(power_candidates)
        binding = sorted({str(row["source"]) for row in phases.values() if row["source"] is not None})
        rows.append(
            {
                "node": node,
                "phases": phases,
                "power": {"limit_watts": None if power is None else round(power, 1), "source": power_source},
                "binding_sources": binding,
                "meter": None if task is None else _meter_row(task),
            }
        )
    return rows
