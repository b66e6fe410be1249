"""Rollout: how a new allocation reaches the stations without the site leaving its limits on the way.

Theory of operation. The allocator says what every EVSE *should* be allowed; this module decides what to
send *now*, given what every EVSE *may* draw at this instant. For each EVSE the controller knows:

* ``accepted_amperes``: the last limit the station accepted for it (``None``: unknown, e.g. a call that
  timed out, which the station may or may not have applied);
* ``in_flight_amperes``: a limit sent and not yet answered (at most one per EVSE);
* ``confirmed``: false after a rejection, a timeout or a disconnect, until the station accepts again.

What an EVSE may draw, its *bound*, is the accepted limit, raised to a limit in flight (a station may
apply an increase before it answers, so an increase counts from the moment it is sent; a decrease counts
only once accepted), and raised to our TxDefaultProfile under a running TxProfile (``fallback_amperes``:
it governs the instant the transaction ends, before the controller hears of it).
An unconfirmed EVSE, or one whose limit is unknown, is bound at its maximum: a
station that rejects or does not answer is treated as drawing its maximum until it complies (issue 5).
The bound loads each grid phase the EVSE's session uses (an idle EVSE: every phase of its station, since
any EV may arrive) and, times that phase count, each power constraint on its path.

:func:`plan` returns, from the bounds and the targets:

1. **Decreases** for every confirmed EVSE whose target is below its accepted limit. They are exempt from
   the rate limit (safety first). Hysteresis drops a decrease smaller than ``hysteresis_amperes`` only
   while no constraint on that EVSE's path is over its capacity with the current bounds (a decrease to 0
   is always sent: an idle EVSE must not offer current to the next EV).
2. **Retries** to unconfirmed EVSEs, at most once per ``min_interval_s`` per station: they send the
   target, but no more than what the station last accepted (its minimum when that is unknown), so an
   acceptance only ever lowers the bound. They do not hold increases back: their EVSE is already
   counted at its maximum.
3. **Increases**, only while no decrease is planned or in flight (issue 5: decreases are sent and
   accepted before increases are sent). Each goes to a confirmed EVSE whose station has not changed for
   ``min_interval_s`` (a first current, from 0, is not held back by that), in (station id, EVSE id)
   order, and is clipped to the headroom that the *current* bounds leave on every constraint on its
   path; an increase that would leave an EVSE between 0 and its minimum, or that is smaller than the
   hysteresis, waits.

So whatever the stations answer and whenever, the sum of the bounds never grows past a limit because of
an increase, and the actual draw (at most the limit a station installed) never exceeds the sum of the
bounds. Limits are rounded down to ``resolution_amperes`` as a station applies them (K01.FR.51: A per
phase). Everything here is pure: time is the ``now_s`` the caller passes; the caller does the I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from .allocator import EPSILON_AMPERES, Allocation, EvseKey, Session, SiteLimits, node_capacities
from .site import GRID_NODE_ID, SiteConfig, StationConfig

StepKind = Literal["decrease", "retry", "increase", "renew"]
ConstraintKey = tuple[str, int]  # (node id, 0..2 for a grid phase, 3 for power as summed phase amperes)


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    """Hysteresis and rate limit of profile changes."""

    hysteresis_amperes: float = 1.0
    min_interval_s: float = 30.0  # per station, between profile changes other than decreases
    resolution_amperes: float = 0.1
    # What an idle EVSE is offered by its TxDefaultProfile where the sessions leave room (0: nothing).
    idle_current_amperes: float = 0.0


@dataclass(frozen=True, slots=True)
class EvseApplied:
    """What the controller knows of the limit installed at one EVSE; see the module docstring."""

    station_id: str
    evse_id: int
    accepted_amperes: float | None = 0.0
    in_flight_amperes: float | None = None
    confirmed: bool = True
    # The session's phase count (numberOfPhasesUsed; ``None``: unknown, all); only read while in_session.
    phases_used: int | None = None
    in_session: bool = False
    # While the limit is unknown after unanswered steps: the lowest it may have installed (None: no idea).
    lowest_possible_amperes: float | None = None
    # How many phases the installed profile lets the EV use (its numberPhases; None: unknown, all).
    accepted_phases: int | None = None
    in_flight_phases: int | None = None
    # Measured above what it may draw: counted at the larger of this and its maximum, and not trusted.
    overdraw_amperes: float | None = None
    # Taken back from the store after a restart and not confirmed by the station since (a stale belief).
    restored: bool = False
    # Our TxDefaultProfile under a running TxProfile: it governs again the moment the transaction ends, which
    # the station decides alone (K02.FR.05), so it counts in the bound beside the TxProfile (None: none known).
    fallback_amperes: float | None = None
    fallback_phases: int | None = None  # its numberPhases (None: every phase of the station)

    @property
    def trusted(self) -> bool:
        """Known, confirmed and obeyed: the EVSE draws at most what it accepted."""
        return self.confirmed and self.accepted_amperes is not None and self.overdraw_amperes is None

    @property
    def key(self) -> EvseKey:
        return (self.station_id, self.evse_id)


@dataclass(frozen=True, slots=True)
class Step:
    """One SetChargingProfile to send: ``current_amperes`` per phase on ``phases`` phases for one EVSE
    (``phases`` is the profile's numberPhases; ``None``: the station's own count)."""

    station_id: str
    evse_id: int
    current_amperes: float
    kind: StepKind
    phases: int | None = None

    @property
    def key(self) -> EvseKey:
        return (self.station_id, self.evse_id)


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send now; ``waiting`` lists EVSEs whose increase is held back, ``next_due_s`` when to look again."""

    decreases: tuple[Step, ...] = ()
    retries: tuple[Step, ...] = ()
    increases: tuple[Step, ...] = ()
    renewals: tuple[Step, ...] = ()
    waiting: tuple[EvseKey, ...] = ()
    next_due_s: float | None = None

    @property
    def steps(self) -> tuple[Step, ...]:
        """Everything to send now, decreases first."""
        return self.decreases + self.retries + self.increases + self.renewals


@dataclass
class RolloutState:
    """The controller's record of every EVSE's installed limit; changed only through its methods.

    It belongs to one :class:`SiteConfig` (it caches each station's path through the tree): make a new
    one when the configuration changes.
    """

    evses: dict[EvseKey, EvseApplied] = field(default_factory=dict)
    last_change_s: dict[str, float] = field(default_factory=dict)
    # (station id, phases used or None, which constraints exist) -> that EVSE's weights; bounded by the
    # stations times 4 phase counts times the few shapes the limits take.
    _paths: dict[tuple[str, int, int], list[tuple[ConstraintKey, float]]] = field(default_factory=dict, repr=False)
    # Each shape gets a small number, looked up once per plan (#17): a key holding the frozenset itself made
    # every EVSE's lookup compare two sets of every constraint of the site (O(EVSEs x constraints) a plan).
    _shapes: dict[frozenset[ConstraintKey], int] = field(default_factory=dict, repr=False)
    _last_shape: tuple[frozenset[ConstraintKey], int] | None = field(default=None, repr=False)
    #: Bumped by every change that may raise what an EVSE is counted at (all but a step sent, which the
    #: plan counts itself, and an acceptance): a plan made before it may hold an increase that no longer fits.
    raised: int = 0

    def path(
        self,
        site: SiteConfig,
        applied: EvseApplied,
        capacity: Mapping[ConstraintKey, float],
        shape: frozenset[ConstraintKey],
    ) -> list[tuple[ConstraintKey, float]]:
        """The weights of one EVSE's bound on the constraints, as :func:`path_weights` (cached)."""
        station = site.station(applied.station_id)
        last = self._last_shape
        if last is None or last[0] is not shape:
            last = self._last_shape = (shape, self._shapes.setdefault(shape, len(self._shapes)))
        cache_key = (applied.station_id, counted_phases(station, applied), last[1])
        found = self._paths.get(cache_key)
        if found is None:
            found = self._paths[cache_key] = path_weights(site, station, grid_phases_of(station, applied), capacity)
        return found

    def add_evse(self, station_id: str, evse_id: int, accepted_amperes: float | None = 0.0) -> None:
        """Know an EVSE; ``accepted_amperes`` is what it is known to have installed (``None``: unknown)."""
        self.evses[(station_id, evse_id)] = EvseApplied(
            station_id, evse_id, accepted_amperes=accepted_amperes, confirmed=accepted_amperes is not None
        )
        self.raised += 1

    def session_started(self, key: EvseKey, phases_used: int | None) -> None:
        self.evses[key] = replace(self.evses[key], in_session=True, phases_used=phases_used)
        self.raised += 1

    def session_ended(self, key: EvseKey) -> None:
        self.evses[key] = replace(self.evses[key], in_session=False, phases_used=None)
        self.raised += 1

    def sent(self, step: Step, now_s: float) -> None:
        """A step was sent: an increase counts from now on; the station's rate-limit clock restarts
        (a renewal changes nothing the station draws, so it does not restart it)."""
        self.evses[step.key] = replace(
            self.evses[step.key], in_flight_amperes=step.current_amperes, in_flight_phases=step.phases
        )
        if step.kind != "renew":
            self.last_change_s[step.station_id] = now_s

    def accepted(self, step: Step) -> None:
        """The station accepted the step: it is installed and the EVSE is confirmed again."""
        self.evses[step.key] = replace(
            self.evses[step.key],
            accepted_amperes=step.current_amperes,
            in_flight_amperes=None,
            accepted_phases=step.phases,
            in_flight_phases=None,
            confirmed=True,
            lowest_possible_amperes=None,
            restored=False,
        )

    def rejected(self, step: Step) -> None:
        """The station rejected it: it keeps what it had, but is treated as drawing its maximum."""
        self.evses[step.key] = replace(
            self.evses[step.key], in_flight_amperes=None, in_flight_phases=None, confirmed=False
        )
        self.raised += 1

    def unanswered(self, step: Step) -> None:
        """No answer (timeout, link lost): whether it was applied is unknown, so the limit is unknown."""
        applied = self.evses[step.key]
        candidates = [step.current_amperes]
        if applied.accepted_amperes is not None:
            candidates.append(applied.accepted_amperes)
        elif applied.lowest_possible_amperes is not None:
            candidates.append(applied.lowest_possible_amperes)
        else:
            candidates = []  # it was unknown already, with no floor: still none
        self.evses[step.key] = replace(
            applied,
            accepted_amperes=None,
            in_flight_amperes=None,
            # Either profile may be in force: the one allowing more phases counts.
            accepted_phases=_more_phases(applied.accepted_phases, step.phases),
            in_flight_phases=None,
            confirmed=False,
            lowest_possible_amperes=min(candidates) if candidates else None,
        )
        self.raised += 1

    def installed(self, key: EvseKey, accepted_amperes: float | None, accepted_phases: int | None = None) -> None:
        """What the EVSE has installed changed without a step of ours (a transaction began or ended, the
        CSMS touched our profile): ``accepted_amperes``, or unknown (``None``: counted at its maximum)."""
        applied = self.evses[key]
        self.evses[key] = replace(
            applied,
            accepted_amperes=accepted_amperes,
            in_flight_amperes=None,
            accepted_phases=accepted_phases if accepted_amperes is not None else None,
            in_flight_phases=None,
            confirmed=accepted_amperes is not None,
            lowest_possible_amperes=None,
        )
        self.raised += 1

    def restore(self, station_id: str, evse_id: int, ceiling_amperes: float | None, phases: int | None) -> None:
        """Know an EVSE taken back from the store after a restart: what it may have installed is at most
        ``ceiling_amperes`` (so a retry never offers more), but it counts at its maximum until the station
        accepts a profile again (a stale belief: the controller may have died with a step in flight)."""
        self.evses[(station_id, evse_id)] = EvseApplied(
            station_id,
            evse_id,
            accepted_amperes=ceiling_amperes,
            accepted_phases=phases,
            confirmed=False,
            restored=True,
        )
        self.raised += 1

    def fallback(self, key: EvseKey, amperes: float | None, phases: int | None = None) -> None:
        """Our TxDefaultProfile under the EVSE's running TxProfile (``None``: none, or no transaction)."""
        applied = self.evses[key]
        if (applied.fallback_amperes, applied.fallback_phases) != (amperes, phases):
            self.evses[key] = replace(applied, fallback_amperes=amperes, fallback_phases=phases)
            self.raised += 1

    def overdraw(self, key: EvseKey, amperes: float | None) -> None:
        """The EVSE is measured drawing ``amperes``, above what it may (``None``: it complies again)."""
        self.evses[key] = replace(self.evses[key], overdraw_amperes=amperes)
        self.raised += 1

    def forget_station(self, station_id: str) -> None:
        """Drop a station's EVSEs (it has been gone long enough)."""
        for key in [key for key in self.evses if key[0] == station_id]:
            del self.evses[key]
        self.last_change_s.pop(station_id, None)

    def disconnected(self, station_id: str) -> None:
        """The station went away: untrusted until it accepts a profile again."""
        for key, applied in self.evses.items():
            if applied.station_id == station_id:
                self.evses[key] = replace(applied, confirmed=False)
        self.raised += 1

    def allocator_sessions(self, sessions: Iterable[Session]) -> list[Session]:
        """The sessions to allocate for: compliance from this record, plus untrusted idle EVSEs as fixed loads.

        An unconfirmed EVSE without a session is still bound at its maximum (an EV may plug in and draw
        what the station installed), so the allocator must leave room for it like for any fixed load.
        """
        result = []
        seen: set[EvseKey] = set()
        for session in sessions:
            applied = self.evses.get(session.key)
            trusted = applied is not None and applied.trusted
            drawing = None if applied is None else applied.overdraw_amperes
            if session.compliant is trusted and session.fixed_amperes == drawing:
                result.append(session)  # the common case; replace() costs ~5 us an EVSE (#17)
            else:
                result.append(replace(session, compliant=trusted, fixed_amperes=drawing))
            seen.add(session.key)
        for key, applied in sorted(self.evses.items()):
            if key not in seen and not applied.trusted:
                result.append(
                    Session(station_id=key[0], evse_id=key[1], compliant=False, fixed_amperes=applied.overdraw_amperes)
                )
        return result


def round_down(amperes: float, resolution_amperes: float) -> float:
    """Round a limit down to what a station applies, so rounding never adds current."""
    if amperes <= 0:
        return 0.0
    steps = math.floor(amperes / resolution_amperes + 1e-9)
    # round() drops the binary noise of steps x 0.1 (3 x 0.1 = 0.30000000000000004) that would add current;
    # should the result still be a hair above the input, the step below is taken (never the raw input,
    # which may carry any number of decimals).
    value = round(steps * resolution_amperes, 9)
    while value > amperes and steps > 0:
        steps -= 1
        value = round(steps * resolution_amperes, 9)
    return max(0.0, value)


def _more_phases(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def session_phases(station: StationConfig, applied: EvseApplied) -> int:
    """How many phases an EVSE's own profile lets it load: the most of what its EV uses (all while unknown),
    what its installed profile allows (numberPhases; all while unknown) and what a profile in flight allows.

    An idle EVSE has no EV to go by: any EV may arrive, and a station that accepted a numberPhases has
    said it will use no more (K01.FR.43), so a trusted idle EVSE loads the phases of its installed
    profile; an untrusted one every phase of its station."""
    if applied.in_session:
        used = station.phases if applied.phases_used is None else applied.phases_used
    else:
        trusted_phases = applied.accepted_phases if applied.trusted else None
        used = station.phases if trusted_phases is None else trusted_phases
    allowed = station.phases if applied.accepted_phases is None else applied.accepted_phases
    flight = applied.in_flight_phases if applied.in_flight_amperes is not None else None
    return max(1, min(station.phases, max(used, allowed, flight or 0)))


def counted_phases(station: StationConfig, applied: EvseApplied) -> int:
    """How many phases an EVSE may load: :func:`session_phases`, widened to those of our TxDefaultProfile
    under its running TxProfile (which governs the instant the transaction ends)."""
    phases = session_phases(station, applied)
    if applied.fallback_amperes is not None and applied.fallback_amperes > 0:
        fallback = station.phases if applied.fallback_phases is None else applied.fallback_phases
        phases = max(phases, min(station.phases, fallback))
    return phases


def grid_phases_of(station: StationConfig, applied: EvseApplied) -> tuple[int, ...]:
    """Grid phases an EVSE may load (see :func:`counted_phases`)."""
    return station.grid_phases(counted_phases(station, applied))


def bound_amperes(station: StationConfig, applied: EvseApplied) -> float:
    """The most an EVSE may draw per phase right now (see the module docstring)."""
    maximum = station.evse_range_amperes(applied.evse_id)[1]
    if applied.overdraw_amperes is not None:
        return max(maximum, applied.overdraw_amperes)
    if not applied.confirmed or applied.accepted_amperes is None:
        return maximum
    bound = applied.accepted_amperes
    if applied.in_flight_amperes is not None:
        bound = max(bound, applied.in_flight_amperes)
    if applied.fallback_amperes is not None:
        bound = max(bound, applied.fallback_amperes)
    return bound


def target_phases(station: StationConfig, allocation: Allocation, key: EvseKey, in_session: bool) -> int | None:
    """The numberPhases a profile for this EVSE carries: the phases its allocation budgets (K01.FR.49: a
    station assumes 3 without it), ``None`` where that is every phase of a 3-phase station."""
    found = allocation.evses.get(key) if in_session else None
    count = station.phases if found is None else found.phase_count
    return None if count >= 3 else count


def capacities(site: SiteConfig, limits: SiteLimits) -> dict[ConstraintKey, float]:
    """Every constraint of the site as summed per-phase amperes: node phases 0..2 and power (index 3)."""
    result: dict[ConstraintKey, float] = {}
    nodes = [(GRID_NODE_ID, site.grid)] + [(c.circuit_id, c) for c in site.circuits]
    nodes += [("station:" + s.station_id, s) for s in site.stations]
    for node_id, node in nodes:
        extra = limits if node_id == GRID_NODE_ID else None
        for index, value in enumerate(node_capacities(site, node, extra)):
            if value is not None:
                result[(node_id, index)] = value
    return result


def path_weights(
    site: SiteConfig, station: StationConfig, grid_phases: tuple[int, ...], capacity: Mapping[ConstraintKey, float]
) -> list[tuple[ConstraintKey, float]]:
    """The constraints one ampere per phase on this EVSE loads, with its weight on each."""
    nodes = ["station:" + station.station_id, *site.circuit_path(station.circuit_id)]
    result: list[tuple[ConstraintKey, float]] = []
    for node_id in nodes:
        for phase in grid_phases:
            if (node_id, phase) in capacity:
                result.append(((node_id, phase), 1.0))
        if (node_id, 3) in capacity:
            result.append(((node_id, 3), float(len(grid_phases))))
    return result


def plan(
    site: SiteConfig,
    limits: SiteLimits,
    allocation: Allocation,
    state: RolloutState,
    now_s: float,
    policy: RolloutPolicy | None = None,
    renew_due: Collection[EvseKey] = (),
) -> Plan:
    """What to send now to move the installed limits toward ``allocation``; see the module docstring.

    An EVSE without a session gets what the allocation reserves for it (its idle current, or 0); one
    whose limit is unknown is retried with at most ``policy.idle_current_amperes``. EVSEs in
    ``renew_due`` whose profile must be renewed before it lapses get it again, unchanged, when nothing
    else is under way for them.
    """
    policy = policy or RolloutPolicy()
    capacity = capacities(site, limits)
    load = dict.fromkeys(capacity, 0.0)
    shape = frozenset(capacity)
    paths: dict[EvseKey, list[tuple[ConstraintKey, float]]] = {}
    targets: dict[EvseKey, float] = {}
    phases: dict[EvseKey, int | None] = {}
    stations: dict[EvseKey, StationConfig] = {}
    for key in sorted(state.evses):
        applied = state.evses[key]
        station = stations[key] = site.station(applied.station_id)
        paths[key] = state.path(site, applied, capacity, shape)
        idle_amperes = min(policy.idle_current_amperes, station.evse_range_amperes(applied.evse_id)[1])
        if applied.in_session:
            target = allocation.current_amperes(*key)
        elif applied.trusted:
            # Idle: what the allocation reserves for it, never more than the idle current.
            target = min(allocation.current_amperes(*key), idle_amperes)
        else:
            # Unknown and idle: the allocation counts it as a fixed load, not a share; offer the idle current.
            target = idle_amperes
        targets[key] = round_down(target, policy.resolution_amperes)
        phases[key] = target_phases(station, allocation, key, applied.in_session)
        bound = bound_amperes(station, applied)
        for constraint, weight in paths[key]:
            load[constraint] += weight * bound
    over = {c for c, value in load.items() if value > capacity[c] + EPSILON_AMPERES}

    def due_at(station_id: str) -> float:
        last = state.last_change_s.get(station_id)
        return -math.inf if last is None else last + policy.min_interval_s

    def narrower(key: EvseKey, a: int | None, b: int | None) -> bool:
        """Whether numberPhases ``a`` allows fewer phases than ``b`` at this EVSE's station."""
        count = stations[key].phases
        return (count if a is None else a) < (count if b is None else b)

    decreases: list[Step] = []
    retries: list[Step] = []
    next_due: list[float] = []
    decrease_in_flight = False
    for key, applied in sorted(state.evses.items()):
        if applied.in_flight_amperes is not None:
            accepted = applied.accepted_amperes
            if (
                applied.confirmed
                and accepted is not None
                and (
                    applied.in_flight_amperes < accepted
                    or narrower(key, applied.in_flight_phases, applied.accepted_phases)
                )
            ):
                decrease_in_flight = True
            continue
        target = targets[key]
        if applied.overdraw_amperes is not None and applied.confirmed and applied.accepted_amperes is not None:
            # It accepted its limit and draws above it all the same: sending it again changes nothing
            # (it stays counted at its draw until a meter value shows it within its limit).
            continue
        if not applied.trusted:
            if due_at(applied.station_id) > now_s:
                next_due.append(due_at(applied.station_id))
                continue
            # Never more than it last accepted: an acceptance can only lower the bound from its maximum.
            known = applied.accepted_amperes
            if known is not None:
                ceiling = known
            else:
                # Unknown: never above the lowest value it may have installed, so an acceptance cannot
                # raise its draw; with no floor known and no room on its path, only 0 A is safe.
                minimum = stations[key].evse_range_amperes(applied.evse_id)[0]
                lowest = applied.lowest_possible_amperes
                if lowest is not None:
                    ceiling = min(minimum, lowest)
                elif any(constraint in over for constraint, _ in paths[key]):
                    ceiling = 0.0
                else:
                    ceiling = minimum
            value = 0.0 if target == 0 else min(target, ceiling)
            retries.append(Step(applied.station_id, applied.evse_id, value, "retry", phases[key]))
            continue
        accepted = applied.accepted_amperes
        assert accepted is not None  # trusted
        fewer_phases = narrower(key, phases[key], applied.accepted_phases)
        if target < accepted - EPSILON_AMPERES:
            small = accepted - target < policy.hysteresis_amperes
            if (
                small
                and target > 0
                and not fewer_phases
                and not any(constraint in over for constraint, _ in paths[key])
            ):
                continue
            decreases.append(Step(applied.station_id, applied.evse_id, target, "decrease", phases[key]))
        elif fewer_phases:
            # Same current on fewer phases (the EV went from 3 to 1): enforce it (K01.FR.49).
            decreases.append(Step(applied.station_id, applied.evse_id, accepted, "decrease", phases[key]))
    retries = _retries_within_capacity(retries, state, stations, paths, load, capacity)

    increases: list[Step] = []
    waiting: list[EvseKey] = []
    if not decreases and not decrease_in_flight:
        for key in sorted(state.evses):
            applied = state.evses[key]
            accepted = applied.accepted_amperes
            if applied.in_flight_amperes is not None or not applied.trusted or accepted is None:
                continue
            target = targets[key]
            # More phases than installed (the EV went from 1 to 3): already counted on them (counted_phases).
            wider = narrower(key, applied.accepted_phases, phases[key])
            if target - accepted < policy.hysteresis_amperes and not wider:
                continue
            # A session's first current (from 0) is not a change that can flap: it is not held back.
            if accepted > 0 and due_at(applied.station_id) > now_s:
                next_due.append(due_at(applied.station_id))
                waiting.append(key)
                continue
            room = min(
                ((capacity[c] - load[c]) / weight for c, weight in paths[key] if weight > 0),
                default=math.inf,
            )
            value = round_down(min(target, accepted + max(0.0, room)), policy.resolution_amperes)
            minimum = stations[key].evse_range_amperes(applied.evse_id)[0]
            if value - accepted < policy.hysteresis_amperes or (accepted == 0 and value < minimum):
                if not wider:
                    waiting.append(key)
                    continue
                value = accepted
            for constraint, weight in paths[key]:
                load[constraint] += weight * (value - accepted)
            increases.append(Step(applied.station_id, applied.evse_id, value, "increase", phases[key]))
    else:
        waiting = [
            key
            for key, applied in sorted(state.evses.items())
            if applied.trusted
            and applied.accepted_amperes is not None
            and applied.in_flight_amperes is None
            and targets[key] - applied.accepted_amperes >= policy.hysteresis_amperes
        ]
    busy = {step.key for step in (*decreases, *retries, *increases)}
    renewals = tuple(
        Step(key[0], key[1], held.accepted_amperes, "renew", held.accepted_phases)
        for key in sorted(renew_due)
        if key not in busy
        and (held := state.evses.get(key)) is not None
        and held.trusted
        and held.accepted_amperes is not None
        and held.in_flight_amperes is None
    )
    return Plan(
        decreases=tuple(decreases),
        retries=tuple(retries),
        increases=tuple(increases),
        renewals=renewals,
        waiting=tuple(waiting),
        next_due_s=min(next_due, default=None),
    )


def _retries_within_capacity(
    retries: list[Step],
    state: RolloutState,
    stations: Mapping[EvseKey, StationConfig],
    paths: Mapping[EvseKey, list[tuple[ConstraintKey, float]]],
    load: Mapping[ConstraintKey, float],
    capacity: Mapping[ConstraintKey, float],
) -> list[Step]:
    """Retries at what the EVSEs last accepted, unless a constraint on the path would still be over its
    capacity with every retry accepted: those ask for 0 instead (what they get once trusted comes as an
    increase). After a restart every EVSE is retried at what it had, and together they fit; an unreliable
    station retried while the site is over its limit would otherwise be one more round trip above it (it
    is retried only every ``min_interval_s``)."""
    relieved = dict(load)
    for step in retries:
        applied = state.evses[step.key]
        lowered = bound_amperes(stations[step.key], applied) - step.current_amperes
        for constraint, weight in paths[step.key]:
            relieved[constraint] -= weight * lowered
    still_over = {c for c, value in relieved.items() if value > capacity[c] + EPSILON_AMPERES}
    return [
        replace(step, current_amperes=0.0)
        if step.current_amperes > 0 and any(c in still_over for c, _ in paths[step.key])
        else step
        for step in retries
    ]
