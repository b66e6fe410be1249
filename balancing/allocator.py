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

The inputs are sorted by (station id, EVSE id) first and ties in turn order fall back to that order, so
the result does not depend on the order of the input. Amperes are returned unrounded; whoever writes a
profile rounds down.

How it runs (issue #17: a depot of 10,000 EVSEs in about 20 ms). The site's constraints are compiled
once per configuration (:mod:`balancing.site_index`); a session costs a read of each field (a field
that is ``None`` for every session is skipped) and a few array slots, its place in (station id, EVSE
id) order is checked (or found) on numbered stations in numpy rather than by sorting the sessions, and
the rules run over whole arrays (:mod:`balancing.fill`): admission in rounds of prefix sums,
water-filling by levels computed for every constraint at once. The result is :class:`AllocatedEvses`,
which builds an :class:`EvseAllocation` only for an EVSE someone looks at. The per-EVSE Python version
this replaces is kept in ``tests/support/reference_allocator.py``, and a property test holds both to
the same answers (to 1e-6 A: sums run in another order).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter

import numpy as np

from .fill import EPSILON_AMPERES, BoolArray, FloatArray, IntArray, admit, water_fill
from .site import AllocationPolicy, NodeLimits, SiteConfig
from .site_index import SiteIndex, site_index

__all__ = ["EPSILON_AMPERES", "Allocation", "EvseAllocation", "Session", "SiteLimits", "allocate"]

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
        if isinstance(self.evses, AllocatedEvses):
            return self.evses.current_amperes((station_id, evse_id))
        found = self.evses.get((station_id, evse_id))
        return 0.0 if found is None else found.current_amperes

    def grid_phase_currents_amperes(self) -> Phases3:
        """The most the site draws on each grid phase if every EVSE draws its limit."""
        if isinstance(self.evses, AllocatedEvses) and len(self.evses):
            return self.evses.grid_phase_currents_amperes()
        totals = [0.0, 0.0, 0.0]
        for key in sorted(self.evses):
            for phase, amperes in enumerate(self.evses[key].grid_phase_currents_amperes):
                totals[phase] += amperes
        return (totals[0], totals[1], totals[2])


class AllocatedEvses(Mapping[EvseKey, EvseAllocation]):
    """:attr:`Allocation.evses` as the allocator returns it: arrays, with an :class:`EvseAllocation` made
    only for the EVSEs someone looks at (10,000 of them cost more to build than to allocate)."""

    __slots__ = ("_allocated", "_count", "_fixed", "_keys", "_mask", "_position")

    def __init__(
        self, keys: list[EvseKey], allocated: FloatArray, count: IntArray, mask: BoolArray, fixed: BoolArray
    ) -> None:
        self._keys = keys  # sorted by (station id, EVSE id)
        self._allocated = allocated
        self._count = count
        self._mask = mask
        self._fixed = fixed
        self._position: dict[EvseKey, int] | None = None

    def _find(self, key: object) -> int | None:
        if self._position is None:
            self._position = dict(zip(self._keys, range(len(self._keys)), strict=True))
        return self._position.get(key)  # type: ignore[call-overload, no-any-return]

    def __getitem__(self, key: EvseKey) -> EvseAllocation:
        position = self._find(key)
        if position is None:
            raise KeyError(key)
        amperes = float(self._allocated[position])
        mask = self._mask[position] if amperes > 0 else (False, False, False)
        return EvseAllocation(
            station_id=key[0],
            evse_id=key[1],
            current_amperes=amperes,
            phase_count=int(self._count[position]),
            grid_phase_currents_amperes=(
                amperes if mask[0] else 0.0,
                amperes if mask[1] else 0.0,
                amperes if mask[2] else 0.0,
            ),
            fixed=bool(self._fixed[position]),
        )

    def __contains__(self, key: object) -> bool:
        return self._find(key) is not None

    def __iter__(self) -> Iterator[EvseKey]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def current_amperes(self, key: EvseKey) -> float:
        """The per-phase limit of one EVSE (0 if it has no session), without building its record."""
        position = self._find(key)
        return 0.0 if position is None else float(self._allocated[position])

    def grid_phase_currents_amperes(self) -> Phases3:
        """Per grid phase, the sum over EVSEs in (station id, EVSE id) order (``cumsum`` adds in order)."""
        loads = np.where(self._mask & (self._allocated > 0)[:, None], self._allocated[:, None], 0.0)
        totals = np.cumsum(loads, axis=0)[-1]
        return (float(totals[0]), float(totals[1]), float(totals[2]))


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


_BY_KEY = attrgetter("station_id", "evse_id")


def _floats(column: list[float | None], order: IntArray | None) -> FloatArray:
    """A float column read in input order, put in ``order``; ``None`` is NaN (``np.fromiter`` converts it
    as ``float`` arrays do)."""
    values = np.fromiter(column, dtype=np.float64, count=len(column))
    return values if order is None else values[order]


def _optional(column: list[float | None], order: IntArray | None) -> FloatArray | None:
    """:func:`_floats`, or ``None`` if every value is ``None`` (most optional fields, for almost every EVSE)."""
    return None if column.count(None) == len(column) else _floats(column, order)


def allocate(site: SiteConfig, limits: SiteLimits, sessions: Iterable[Session], now_s: float) -> Allocation:
    """Share the site's capacity among the sessions; see the module docstring for the rules.

    Raises ValueError if two sessions name the same EVSE. Safe to call from any thread: the compiled
    site it shares with other calls is used under its lock (a large site's rounds run it in a forked
    child process, :mod:`balancing.scheduling`).
    """
    with site_index(site).lock:
        return _allocate(site, limits, sessions, now_s)


def _in_order(index: SiteIndex, sessions: list[Session]) -> tuple[IntArray | None, list[str], list[int], IntArray]:
    """Where each session goes in (station id, EVSE id) order: the input positions in that order (``None``
    if the input is in it already), then the station ids, EVSE ids and station numbers in that order.

    Raises ValueError on two sessions for one EVSE. When every station is known, the order is checked (and
    found, if need be) on the station numbers' ranks by id, in numpy, without sorting Python objects; the
    columns are then read in input order, which is the order the caller made the sessions in memory. A
    station seen for the first time is numbered only after the check, in id order, as before.
    """
    station_ids = [session.station_id for session in sessions]
    known = index.known_station_numbers(station_ids)
    if known is None:
        keys = list(map(_BY_KEY, sessions))
        positions = sorted(range(len(keys)), key=keys.__getitem__)
        keys = [keys[position] for position in positions]
        for before, after in itertools.pairwise(keys):
            if before == after:
                raise ValueError(f"two sessions on station {after[0]!r} EVSE {after[1]}")
        station_ids = [station_id for station_id, _ in keys]
        number = np.array(index.station_numbers(station_ids), dtype=np.intp)
        return np.array(positions, dtype=np.intp), station_ids, [evse_id for _, evse_id in keys], number
    number = np.array(known, dtype=np.intp)
    evse_ids = [session.evse_id for session in sessions]
    rank = index.station_ranks()[number]
    evse = np.fromiter(evse_ids, dtype=np.int64, count=len(evse_ids))
    if _increasing(rank, evse):
        return None, station_ids, evse_ids, number
    order = np.lexsort((evse, rank))
    rank, evse = rank[order], evse[order]
    if not _increasing(rank, evse):
        same = np.flatnonzero((rank[1:] == rank[:-1]) & (evse[1:] == evse[:-1]))
        twice = sessions[order[same[0] + 1]]
        raise ValueError(f"two sessions on station {twice.station_id!r} EVSE {twice.evse_id}")
    positions = order.tolist()
    station_ids = [station_ids[position] for position in positions]
    evse_ids = [evse_ids[position] for position in positions]
    return order, station_ids, evse_ids, number[order]


def _increasing(rank: IntArray, evse: IntArray) -> bool:
    """Whether (rank, EVSE id) strictly increases: sorted, and no EVSE twice."""
    return bool(((rank[1:] > rank[:-1]) | ((rank[1:] == rank[:-1]) & (evse[1:] > evse[:-1]))).all())


def _allocate(site: SiteConfig, limits: SiteLimits, sessions: Iterable[Session], now_s: float) -> Allocation:
    listed = sessions if isinstance(sessions, list) else list(sessions)
    if not listed:
        return Allocation(evses={}, overcommitted=False, computed_at_s=now_s)
    index = site_index(site)
    by_key, station_ids, evse_ids, number = _in_order(index, listed)
    keys = list(zip(station_ids, evse_ids, strict=True))
    station_priority, station_phases, station_low, station_high, overrides = index.station_arrays()
    policy = site.policy

    # Each EVSE's range: the station's, an EVSE override, a cap from outside, idle or underdrawing (rules 3, 5).
    low = station_low[number]
    high = station_high[number]
    for position in np.flatnonzero(overrides[number]).tolist():
        station = index.columns.stations[number[position]]
        low[position], high[position] = station.evse_range_amperes(evse_ids[position])
    cap = _optional([session.max_current_amperes for session in listed], by_key)
    if cap is not None:
        capped = ~np.isnan(cap)
        high[capped] = np.maximum(0.0, np.minimum(high[capped], cap[capped]))
        low[capped] = np.minimum(low[capped], high[capped])
    compliant_column = [session.compliant for session in listed]
    if compliant_column.count(True) == len(compliant_column):
        compliant = np.ones(len(compliant_column), dtype=np.bool_)
    else:
        compliant = np.array(compliant_column, dtype=np.bool_)
        compliant = compliant if by_key is None else compliant[by_key]
    reserve_amperes = _optional([session.reserve_amperes for session in listed], by_key)
    if reserve_amperes is None:
        idle = np.zeros(len(compliant), dtype=np.bool_)
    else:
        idle = compliant & ~np.isnan(reserve_amperes)
        high[idle] = low[idle] = np.maximum(0.0, np.minimum(high[idle], reserve_amperes[idle]))
    measured_amperes = _optional([session.measured_current_amperes for session in listed], by_key)
    underdraw_since = _optional([session.underdraw_since_s for session in listed], by_key)
    if measured_amperes is not None and underdraw_since is not None:
        with np.errstate(invalid="ignore"):
            under = (
                compliant & ~idle & ~np.isnan(measured_amperes) & (now_s - underdraw_since >= policy.underdraw_grace_s)
            )
        high[under] = np.maximum(
            low[under], np.minimum(high[under], measured_amperes[under] + policy.underdraw_headroom_amperes)
        )

    # Each EVSE's constraints: one row per (station, phase count), compiled once per site.
    used = _optional([session.phases_used for session in listed], by_key)
    phases_of_station = station_phases[number]
    if used is None:
        count = phases_of_station
    else:
        count = np.where(np.isnan(used), phases_of_station, np.clip(np.nan_to_num(used), 1, phases_of_station))
    row = 3 * number + count.astype(np.intp) - 1
    grid = node_capacities(site, site.grid, limits)
    table = index.rows((grid[0] is not None, grid[1] is not None, grid[2] is not None, grid[3] is not None))
    row_index, row_weight, row_mask = table.arrays()
    slack = np.maximum(0.0, index.capacities(grid))

    # Rule 1: fixed loads first.
    allocated = np.zeros(len(keys))
    fixed = ~compliant
    if fixed.any():
        drawing = _floats([session.fixed_amperes for session in listed], by_key)
        allocated[fixed] = np.where(np.isnan(drawing), high, np.maximum(high, np.nan_to_num(drawing)))[fixed]
        constraint, weight = row_index[row[fixed]], row_weight[row[fixed]]
        entries = weight > 0
        slack -= np.bincount(
            constraint[entries], weights=(weight * allocated[fixed][:, None])[entries], minlength=len(slack)
        )
    overcommitted = bool((slack < -EPSILON_AMPERES).any())
    if overcommitted:
        # Clamp so the steerable sessions see "no room" rather than arithmetic on negative slack.
        np.maximum(slack, 0.0, out=slack)

    # Rules 2 and 4: levels from the highest, each in turn order (ties: station id, EVSE id).
    priority = np.fromiter([session.priority for session in listed], dtype=np.int64, count=len(listed))
    level = (priority if by_key is None else priority[by_key]) + station_priority[number]
    served_since = _optional([session.served_since_s for session in listed], by_key)
    since = _floats([session.waiting_since_s for session in listed], by_key)
    if served_since is None:  # nobody has a turn: all waiting
        rank = np.ones(len(since), dtype=np.intp)
    else:
        has_turn = ~np.isnan(served_since)
        with np.errstate(invalid="ignore"):
            keeps_turn = has_turn & (now_s - served_since < policy.rotation_period_s)
        rank = np.where(keeps_turn, 0, np.where(has_turn, 2, 1))
        since = np.where(keeps_turn, served_since, np.where(has_turn, -served_since, since))
    steerable = np.flatnonzero(compliant & ~idle & (high > 0))
    order = steerable[np.lexsort((since[steerable], rank[steerable], -level[steerable]))]
    if len(order):
        ordered_level = level[order]
        bounds = np.flatnonzero(ordered_level[1:] != ordered_level[:-1]) + 1
        for members in np.split(order, bounds):
            admitted = admit(members, low, row, row_index, row_weight, slack)
            allocated[admitted] = low[admitted]
            water_fill(admitted, low, high, row, row_index, row_weight, slack, allocated)
    waiting_idle = np.flatnonzero(idle & (high > 0))  # rule 5: whole or nothing, after every session
    granted = admit(waiting_idle, high, row, row_index, row_weight, slack)
    allocated[granted] = high[granted]

    evses = AllocatedEvses(keys, allocated, count.astype(np.intp), row_mask[row], fixed)
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
