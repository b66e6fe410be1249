"""Today's allocator (as of issue #17), kept as the reference the vectorised one is checked against.

This is ``balancing/allocator.py`` before #17, unchanged but for its imports: the data types (``Session``,
``SiteLimits``, ``Allocation``, ``EvseAllocation``) are shared with the new one, the algorithm is the old
Python one, one ``_Demand`` object per EVSE. ``tests/unit/test_allocator_reference.py`` runs both on random
sites and requires the same result. Do not optimise it: its value is that it is the old code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from balancing.allocator import EPSILON_AMPERES, Allocation, EvseAllocation, EvseKey, Session, SiteLimits
from balancing.site import GRID_NODE_ID, NodeLimits, SiteConfig, StationConfig


@dataclass(slots=True)
class _Demand:
    session: Session
    station: StationConfig
    grid_phases: tuple[int, ...]
    low: float
    high: float
    constraints: list[tuple[int, float]] = field(default_factory=list)
    allocated: float = 0.0


class _Constraints:
    """Capacity and remaining slack per (node, phase-or-power) constraint; built lazily per node."""

    def __init__(self, site: SiteConfig, limits: SiteLimits) -> None:
        self._site = site
        self._limits = limits
        self._by_node: dict[str, list[int | None]] = {}
        self.slack: list[float] = []

    def for_node(self, node_id: str, limits: NodeLimits, extra: SiteLimits | None = None) -> list[int | None]:
        found = self._by_node.get(node_id)
        if found is not None:
            return found
        indexes: list[int | None] = []
        for capacity in node_capacities(self._site, limits, extra):
            if capacity is None:
                indexes.append(None)
            else:
                indexes.append(len(self.slack))
                self.slack.append(max(0.0, capacity))
        self._by_node[node_id] = indexes
        return indexes

    def of(self, station: StationConfig, grid_phases: tuple[int, ...]) -> list[tuple[int, float]]:
        nodes: list[tuple[str, NodeLimits, SiteLimits | None]] = [("station:" + station.station_id, station, None)]
        for node_id in self._site.circuit_path(station.circuit_id):
            extra = self._limits if node_id == GRID_NODE_ID else None
            nodes.append(("circuit:" + node_id, self._site.node_limits(node_id), extra))
        result: list[tuple[int, float]] = []
        for node_id, node_limits, extra in nodes:
            indexes = self.for_node(node_id, node_limits, extra)
            for phase in grid_phases:
                index = indexes[phase]
                if index is not None:
                    result.append((index, 1.0))
            power_index = indexes[3]
            if power_index is not None:
                result.append((power_index, float(len(grid_phases))))
        return result


def node_capacities(
    site: SiteConfig, limits: NodeLimits, extra: SiteLimits | None = None
) -> tuple[float | None, float | None, float | None, float | None]:
    """A node's capacity on grid phases 0..2 and for power (index 3, as summed phase amperes at the nominal
    voltage), with ``extra`` (outside limits, for the grid node) folded in; ``None``: no limit of that kind."""
    per_phase: list[float | None] = [limits.max_current_amperes] * 3
    power = limits.max_power_watts
    if extra is not None:
        if extra.phase_current_amperes is not None:
            per_phase = [_lower(per_phase[p], extra.phase_current_amperes[p]) for p in range(3)]
        power = _lower(power, extra.power_watts)
    return (per_phase[0], per_phase[1], per_phase[2], None if power is None else power / site.nominal_voltage_volts)


def _lower(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def allocate(site: SiteConfig, limits: SiteLimits, sessions: Iterable[Session], now_s: float) -> Allocation:
    """Share the site's capacity among the sessions; see the module docstring for the rules.

    Raises ValueError if two sessions name the same EVSE.
    """
    ordered = sorted(sessions, key=lambda session: session.key)
    for before, after in itertools.pairwise(ordered):
        if before.key == after.key:
            raise ValueError(f"two sessions on station {after.station_id!r} EVSE {after.evse_id}")
    constraints = _Constraints(site, limits)
    policy = site.policy
    demands: list[_Demand] = []
    for session in ordered:
        station = site.station(session.station_id)
        low, high = station.evse_range_amperes(session.evse_id)
        if session.max_current_amperes is not None:
            high = max(0.0, min(high, session.max_current_amperes))
            low = min(low, high)
        grid_phases = station.grid_phases(session.phases_used)
        if session.reserve_amperes is not None and session.compliant:
            low = high = max(0.0, min(high, session.reserve_amperes))
        elif session.compliant and _underdrawing(session, now_s, policy.underdraw_grace_s):
            assert session.measured_current_amperes is not None
            high = max(low, min(high, session.measured_current_amperes + policy.underdraw_headroom_amperes))
        demand = _Demand(session, station, grid_phases, low, high)
        demand.constraints = constraints.of(station, grid_phases)
        demands.append(demand)

    slack = constraints.slack
    overcommitted = False
    for demand in demands:
        if not demand.session.compliant:
            fixed = demand.session.fixed_amperes
            demand.allocated = demand.high if fixed is None else max(demand.high, fixed)
            for index, weight in demand.constraints:
                slack[index] -= weight * demand.allocated
                if slack[index] < -EPSILON_AMPERES:
                    overcommitted = True
    if overcommitted:
        # Clamp so the steerable sessions see "no room" rather than arithmetic on negative slack.
        for index, value in enumerate(slack):
            slack[index] = max(0.0, value)

    levels: dict[int, list[_Demand]] = {}
    idle: list[_Demand] = []
    for demand in demands:
        if demand.session.compliant and demand.session.reserve_amperes is not None:
            idle.append(demand)
        elif demand.session.compliant:
            levels.setdefault(demand.session.priority + demand.station.priority, []).append(demand)
    for level in sorted(levels, reverse=True):
        members = sorted(levels[level], key=lambda demand: _turn_key(demand, now_s, policy.rotation_period_s))
        admitted = []
        for demand in members:
            if demand.high <= 0:
                continue
            if all(slack[index] + EPSILON_AMPERES >= weight * demand.low for index, weight in demand.constraints):
                demand.allocated = demand.low
                for index, weight in demand.constraints:
                    slack[index] = max(0.0, slack[index] - weight * demand.low)
                admitted.append(demand)
        _water_fill(admitted, slack)
    for demand in idle:  # rule 5: whole or nothing, after every session
        if demand.high > 0 and all(
            slack[index] + EPSILON_AMPERES >= weight * demand.high for index, weight in demand.constraints
        ):
            demand.allocated = demand.high
            for index, weight in demand.constraints:
                slack[index] = max(0.0, slack[index] - weight * demand.high)

    evses: dict[EvseKey, EvseAllocation] = {}
    for demand in demands:
        per_phase = [0.0, 0.0, 0.0]
        if demand.allocated > 0:
            for phase in demand.grid_phases:
                per_phase[phase] = demand.allocated
        session = demand.session
        evses[session.key] = EvseAllocation(
            station_id=session.station_id,
            evse_id=session.evse_id,
            current_amperes=demand.allocated,
            phase_count=len(demand.grid_phases),
            grid_phase_currents_amperes=(per_phase[0], per_phase[1], per_phase[2]),
            fixed=not session.compliant,
        )
    return Allocation(evses=evses, overcommitted=overcommitted, computed_at_s=now_s)


def _underdrawing(session: Session, now_s: float, grace_s: float) -> bool:
    return (
        session.underdraw_since_s is not None
        and session.measured_current_amperes is not None
        and now_s - session.underdraw_since_s >= grace_s
    )


def _turn_key(demand: _Demand, now_s: float, rotation_period_s: float) -> tuple[int, float, str, int]:
    session = demand.session
    if session.served_since_s is not None and now_s - session.served_since_s < rotation_period_s:
        rank, since = 0, session.served_since_s  # its turn is not over: keep it (no flapping)
    elif session.served_since_s is None:
        rank, since = 1, session.waiting_since_s  # waiting: the longest-waiting goes first
    else:
        # Served a full period: yields to those waiting, the one served longest first.
        rank, since = 2, -session.served_since_s
    return (rank, since, session.station_id, session.evse_id)


def _water_fill(admitted: list[_Demand], slack: list[float]) -> None:
    """Raise the admitted demands together above their minimums until constraints fill (max-min fair).

    ``slack`` already has every admitted minimum taken off; it is updated in place.
    """
    active = {id(demand): demand for demand in admitted if demand.high > demand.low}
    members: dict[int, list[_Demand]] = {}
    for demand in active.values():
        for index, _weight in demand.constraints:
            members.setdefault(index, []).append(demand)
    weight_of: dict[tuple[int, int], float] = {
        (id(demand), index): weight for demand in active.values() for index, weight in demand.constraints
    }
    level_of: dict[int, float] = {}
    dirty = set(members)
    while active:
        for index in dirty:
            level_of[index] = _fill_level(
                [(d.low, d.high, weight_of[(id(d), index)]) for d in members[index] if id(d) in active],
                slack[index],
            )
        dirty = set()
        candidates = [level for index, level in level_of.items() if members[index]]
        level = min(candidates, default=math.inf)
        frozen: list[_Demand] = []
        if math.isinf(level):
            frozen = list(active.values())
        else:
            tight = [index for index, value in level_of.items() if value <= level + 1e-12 and members[index]]
            seen: set[int] = set()
            for index in tight:
                for demand in members[index]:
                    if id(demand) in active and id(demand) not in seen:
                        seen.add(id(demand))
                        frozen.append(demand)
            frozen.extend(d for d in active.values() if d.high <= level and id(d) not in seen)
        for demand in frozen:
            target = demand.high if math.isinf(level) else min(demand.high, max(demand.low, level))
            extra = target - demand.low
            demand.allocated = target
            del active[id(demand)]
            for index, weight in demand.constraints:
                slack[index] = max(0.0, slack[index] - weight * extra)
                dirty.add(index)
        for index in dirty:
            members[index] = [d for d in members[index] if id(d) in active]
            if not members[index]:
                level_of.pop(index, None)
        dirty = {index for index in dirty if members[index]}


def _fill_level(entries: list[tuple[float, float, float]], slack: float) -> float:
    """The highest ``L`` with ``sum(w * (clamp(L, low, high) - low)) <= slack`` (``inf`` if all fit)."""
    if not entries:
        return math.inf
    if sum(weight * (high - low) for low, high, weight in entries) <= slack:
        return math.inf
    events: list[tuple[float, float]] = []
    for low, high, weight in entries:
        events.append((low, weight))
        events.append((high, -weight))
    events.sort()
    previous = events[0][0]
    filled = 0.0
    slope = 0.0
    for point, change in events:
        reached = filled + slope * (point - previous)
        if reached >= slack and slope > 0:
            return previous + (slack - filled) / slope
        filled, previous = reached, point
        slope += change
    return previous  # unreachable when the total exceeds the slack; kept for safety
