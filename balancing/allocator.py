"""The allocator: a pure function from (site, limits, sessions, now) to a per-EVSE current limit.

Theory of operation. Every node of the site tree (grid, circuits, stations that carry limits) yields
up to four linear constraints on the EVSEs below it: one per grid phase (the sum of the currents on
that phase stays within the node's per-phase limit) and one for power (the sum over all phases of the
currents stays within the node's power limit divided by the nominal voltage). An EVSE's per-phase
limit ``I`` loads each grid phase its EV uses (through the station's phase rotation) with ``I`` and the
power constraints with ``I`` times the number of phases it uses.

1. Sessions at stations that reject our profiles (``compliant=False``) are fixed loads at their
   EVSE maximum: we cannot steer them, so the rest of the site must make room for them.
2. Priority levels are served from highest to lowest (K03.FR.04: a higher chargingPriority is
   fulfilled as long as possible, even if others are suspended). Within a level:
   a. *Admission*: sessions are taken in turn order (below) and each is admitted if its minimum fits
      in what is left on every constraint on its path; one that does not fit gets 0 (an EVSE gets 0 or
      at least its minimum) and the next is tried, since a smaller or differently phased one may fit.
   b. *Water-filling*: the admitted sessions rise together from their minimums, ``I_i = clamp(L,
      min_i, cap_i)`` for a common level ``L``, until a constraint is full; the sessions under that
      constraint freeze there and the rest keep rising. This is max-min fairness: nobody gets more
      while somebody who shares a full constraint with them gets less.
3. An EV measured below its allocation for ``policy.underdraw_grace_s`` has its cap lowered to what it
   draws plus ``policy.underdraw_headroom_amperes`` (never below its minimum), so the rest goes to
   others; when it draws into that headroom the caller clears ``underdraw_since_s`` and the full share
   comes back at the next allocation.
4. Turn order, when minimums do not all fit: sessions served for less than ``policy.rotation_period_s``
   keep their turn, then those waiting the longest, then those served for the shortest time (so the one
   served longest is the one that yields). The session carries
   these timestamps, so the function stays pure and the caller's clock decides.
5. Idle EVSEs (``reserve_amperes``: no EV yet) are given their idle current, whole or not at all, from
   what the sessions of every level leave, in (station id, EVSE id) order: an EV that plugs in there can
   start at once, and the site has counted it.

The inputs are sorted by (station id, EVSE id) first and every sum runs in that order, so the result
does not depend on the order of the input. Amperes are returned unrounded; whoever writes a profile
rounds down.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .site import GRID_NODE_ID, AllocationPolicy, NodeLimits, SiteConfig, StationConfig

# Slack for floating-point sums: far below any resolution a station applies (0.1 A).
EPSILON_AMPERES = 1e-6

EvseKey = tuple[str, int]
Phases3 = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Limits on the grid node from outside the configuration (the CSMS, an EMS); ``None``: no limit."""

    phase_current_amperes: Phases3 | None = None
    power_watts: float | None = None

    def tighter(self, other: SiteLimits) -> SiteLimits:
        """The lower of two limits, field by field and phase by phase."""
        if self.phase_current_amperes is None:
            phases = other.phase_current_amperes
        elif other.phase_current_amperes is None:
            phases = self.phase_current_amperes
        else:
            a, b = self.phase_current_amperes, other.phase_current_amperes
            phases = (min(a[0], b[0]), min(a[1], b[1]), min(a[2], b[2]))
        if self.power_watts is None:
            power = other.power_watts
        elif other.power_watts is None:
            power = self.power_watts
        else:
            power = min(self.power_watts, other.power_watts)
        return SiteLimits(phase_current_amperes=phases, power_watts=power)

    @staticmethod
    def uniform(current_amperes: float | None = None, power_watts: float | None = None) -> SiteLimits:
        """A limit with the same current on every phase."""
        phases = None if current_amperes is None else (current_amperes,) * 3
        return SiteLimits(phase_current_amperes=phases, power_watts=power_watts)


@dataclass(frozen=True, slots=True)
class Session:
    """What the allocator knows of one EVSE with an EV: observed state plus the caller's bookkeeping.

    ``priority`` is the transaction's chargingPriority (K03.FR.05/06: from the CSMS's response, else 0).
    ``phases_used`` is TransactionEvent's numberOfPhasesUsed (``None``: unknown, assume all).
    ``measured_current_amperes`` is the highest per-phase current measured; ``underdraw_since_s`` is when
    it fell below the allocation (``None`` while it draws what it is offered). ``compliant=False`` marks
    a station that rejected or ignored our profile. ``served_since_s`` is when its current turn with a
    non-zero allocation started (``None`` if it has none), ``waiting_since_s`` when it last started
    waiting (its arrival, or when it lost its turn).
    """

    station_id: str
    evse_id: int
    transaction_id: str | None = None
    priority: int = 0
    phases_used: int | None = None
    measured_current_amperes: float | None = None
    underdraw_since_s: float | None = None
    compliant: bool = True
    served_since_s: float | None = None
    waiting_since_s: float = 0.0
    #: A cap from outside the site model (the CSMS's own TxProfile/TxDefaultProfile at the station):
    #: the EVSE gets at most this, and its minimum drops to it if it is lower.
    max_current_amperes: float | None = None
    #: A non-compliant EVSE measured drawing above its maximum is counted at this instead.
    fixed_amperes: float | None = None
    #: An idle EVSE (no EV): it is given this much, or 0, from what every session leaves (rule 5).
    reserve_amperes: float | None = None

    @property
    def key(self) -> EvseKey:
        return (self.station_id, self.evse_id)


@dataclass(frozen=True, slots=True)
class EvseAllocation:
    """The limit for one EVSE: ``current_amperes`` per phase, on the grid phases listed as non-zero."""

    station_id: str
    evse_id: int
    current_amperes: float
    phase_count: int
    grid_phase_currents_amperes: Phases3
    fixed: bool = False  # a non-compliant station assumed to draw its maximum

    @property
    def key(self) -> EvseKey:
        return (self.station_id, self.evse_id)


@dataclass(frozen=True, slots=True)
class Allocation:
    """The allocator's answer. ``overcommitted`` is true when fixed loads alone exceed a limit."""

    evses: Mapping[EvseKey, EvseAllocation]
    overcommitted: bool = False
    computed_at_s: float = 0.0

    def current_amperes(self, station_id: str, evse_id: int) -> float:
        """The per-phase limit for one EVSE (0 if it has no session)."""
        found = self.evses.get((station_id, evse_id))
        return 0.0 if found is None else found.current_amperes

    def grid_phase_currents_amperes(self) -> Phases3:
        """The most the site draws on each grid phase if every EVSE draws its limit."""
        totals = [0.0, 0.0, 0.0]
        for key in sorted(self.evses):
            for phase, amperes in enumerate(self.evses[key].grid_phase_currents_amperes):
                totals[phase] += amperes
        return (totals[0], totals[1], totals[2])


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


def underdraw_since(
    measured_amperes: float, offered_amperes: float, since_s: float | None, now_s: float, policy: AllocationPolicy
) -> float | None:
    """Rule 3's clock, kept by the caller: since when an EV has drawn below what it is offered (``None``: it
    does not). Below by more than half the headroom counts; once it draws into the headroom the clock
    stops, and the allocator gives its full share back."""
    if measured_amperes < offered_amperes - policy.underdraw_headroom_amperes / 2:
        return since_s if since_s is not None else now_s
    return None


def turn_after(
    served: bool, served_since_s: float | None, waiting_since_s: float, now_s: float
) -> tuple[float | None, float]:
    """Rule 4's clocks, kept by the caller: (served since, waiting since) once an allocation gave a session
    current (``served``) or none."""
    if served and served_since_s is None:
        return now_s, waiting_since_s
    if not served and served_since_s is not None:
        return None, now_s
    return served_since_s, waiting_since_s


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
