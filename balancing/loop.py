"""The balancing loop: observe the site, allocate, and roll the allocation out as charging profiles.

Theory of operation. :class:`Balancer` keeps what the allocator needs, fed by the router's
observations (it imports nothing of the router: they arrive through its ``station_*`` / ``csms_*``
methods, and profiles leave through the :class:`Caller` handed in):

* **EVSEs** become known when a station names them (StatusNotification, MeterValues, TransactionEvent),
  whether or not the site model lists them (one it does not list takes its station's values). Every
  known EVSE of a connected station gets one of our profiles: a TxDefaultProfile while it has no
  transaction (the configured idle current where the sessions leave room for it, else 0), a TxProfile
  for the transaction once one runs (K01.FR.03: TxProfile carries the transactionId). Ids are
  ``profile_id_base + 2 × evseId`` (TxProfile) and ``+ 1`` (TxDefaultProfile), at the configured stack
  level, both of which the CSMS's own profiles must not use; never ChargingStationExternalConstraints
  (K03.FR.08, K14.FR.06). Every profile carries ``validTo`` (``profile_validity_s`` ahead) and is
  renewed once half of that has passed, so a station whose controller is gone falls back to its own
  defaults; and ``numberPhases`` where the EVSE is budgeted on fewer than 3 phases (K01.FR.49).
* **Sessions** run from TransactionEvent Started (or the first event of an unknown transaction) to
  Ended; chargingPriority comes from the CSMS's TransactionEventResponse (K03.FR.04–06), the phase
  count from numberOfPhasesUsed, the measured draw from meter values: an EV drawing well below what it
  is offered gives the rest to others (:mod:`balancing.allocator`); one drawing above what it may
  draw is counted at its draw and not trusted (:mod:`balancing.overdraw`).
* **The CSMS's own profiles** at stations cap or govern ours (:mod:`balancing.station_profiles`).
* **Beliefs are never too low.** What an EVSE may draw is the highest limit it could have installed
  (:mod:`balancing.rollout`); a step is written to the store before it is sent, and after a restart
  every EVSE counts at its maximum until the station accepts a profile again (:mod:`balancing.records`).

Every wake-up (an event above, a limit change, an answer, the periodic tick, the next scheduled limit
change, a profile due for renewal) runs :meth:`Balancer.reallocate`: the allocator (pure) computes
targets against the lowest limit of the next ``decrease_lead_s`` (so a scheduled drop is in force at the
stations when it comes), :func:`rollout.plan` decides what may be sent now (decreases first and accepted
before any increase goes out), and each step goes out as SetChargingProfile in its own task.
``link.call`` already keeps one call of ours outstanding per station (Part 4 §4.1.1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry

from . import report
from .allocator import Allocation, SiteLimits, allocate
from .clearing import Cleared, clear_station, our_profile_ids
from .forked_round import forked_round
from .loop_types import (
    MAX_EVSE_ID,
    BalancerState,
    Caller,
    CallOutcome,
    LoopSettings,
    log,
)
from .observe import charging_priority, evse_of, measurement, transaction_facts
from .persistence import Persistence
from .records import EvseRecord, Purpose, StationRecord
from .renewal import ProfileRenewal
from .rollout import EvseApplied, Plan, RolloutState, plan
from .scheduling import RoundAnswer, RoundRunner
from .sending import ProfileSending
from .sessions import SessionTracking, evse_id_usable
from .settling import Settling
from .site import SiteConfig
from .station_profiles import CsmsProfiles

#: Change points looked at ahead of one reallocation (a schedule with more inside the lead is odd).
MAX_LOOKAHEAD_POINTS = 64

__all__ = ["MAX_EVSE_ID", "Balancer", "BalancerState", "CallOutcome", "Caller", "LoopSettings", "Purpose"]


class Balancer(SessionTracking, ProfileRenewal, ProfileSending, Persistence):
    """The live balancing loop; see the module docstring."""

    def __init__(
        self,
        site: SiteConfig,
        limits_at: Callable[[datetime], SiteLimits],
        caller: Caller,
        settings: LoopSettings | None = None,
        *,
        next_limit_change: Callable[[datetime], datetime | None] = lambda now: None,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        registry: CollectorRegistry | None = None,
        state: BalancerState | None = None,
        is_connected: Callable[[str], bool] | None = None,
    ) -> None:
        self.site = site
        self.settings = settings or LoopSettings()
        self._limits_at = limits_at
        self._next_limit_change = next_limit_change
        self._caller = caller
        self._wall = wall_clock
        self._stations: dict[str, StationRecord] = {}
        self.rollout = RolloutState()
        self.allocation = Allocation(evses={})
        self.limits = SiteLimits()
        self._wake = trio.Event()
        self._next_due_s: float | None = None
        #: After a forked round, the next renewal as its child found it (None: none), see :meth:`_deadline`.
        self.renewal_hint: datetime | None = None
        self.renewal_hinted = False
        self.metrics = report.BalancingMetrics(registry if registry is not None else CollectorRegistry())
        if registry is not None:
            registry.register(report.BalancingCollector(self))
        self._csms = CsmsProfiles(self.settings, self.rollout, self.metrics.csms_conflicts, self.metrics.ignored)
        #: Set after every reallocation (tests and benchmarks wait on it).
        self.reallocated = trio.Event()
        self.last_duration_s = 0.0
        #: Of the last round computed in a child: how long it kept the event loop (benchmarks read it).
        self.last_on_loop_s = 0.0
        #: Runs a large site's rounds in a forked child (#17, :mod:`balancing.scheduling`).
        self.round_runner = RoundRunner()
        #: After a forked round whose next round its child foresaw to be empty (:mod:`balancing.settling`).
        self.settling = Settling()
        self._state = state
        self._stopping = False
        #: Set by :meth:`release`: the controller's profiles are being (or were) cleared; nothing is sent.
        self.released = False
        # The router's registry, when there is one: a connect or disconnect event the observer dropped
        # must not leave a station unsent-to (or never forgotten) for good.
        self._is_connected = is_connected
        self._dirty: set[str] = set()
        if state is not None:
            self._restore(state)

    # --- observation (called from the router's observer task; never blocks) ---------------------

    def wake(self) -> None:
        """Recompute soon: something the allocation depends on changed."""
        self.settling.changed()
        self._wake.set()

    def _answered(self, key: tuple[str, int], accepted: bool) -> None:
        """A step of ours was answered: look again (an accepted decrease may make room for an increase)."""
        self.settling.step_answered(key, accepted)
        self._wake.set()

    def stop(self) -> None:
        """Send nothing more (the appliance is shutting down: the stations are being closed)."""
        self._stopping = True

    def station_connected(self, station_id: str, protocol: str | None = None) -> None:
        station = self._stations.get(station_id)
        if station is None or station.forgotten:
            station = self._stations[station_id] = StationRecord()
        station.protocol = protocol or station.protocol
        station.connections += 1
        station.disconnected_at_s = None
        self.wake()

    def station_asked_steerable(self, station_id: str) -> None:
        """The station is being asked whether it can be steered (a 1.6 one, GetConfiguration): until it has
        said so once, it is counted at its maximum and sent nothing, so no profile planned meanwhile can
        reach a station that turns out to lack SmartCharging."""
        station = self._station(station_id)
        if not station.steerability_known and station.steerable is not None:
            station.steerable = None
            self.wake()

    def station_steerable(self, station_id: str, steerable: bool, why: str = "", *, known: bool = True) -> None:
        """Whether the station can be steered with charging profiles at all (a 1.6 station says so in its
        SupportedFeatureProfiles): one that cannot is counted at its maximum and never sent to. ``known``
        false: no answer, it is tried like any station, and asked again when it reconnects."""
        station = self._station(station_id)
        station.steerability_known = station.steerability_known or known
        if station.steerable != steerable:
            station.steerable = steerable
            if not steerable:
                log.warning("[%s] cannot be steered (%s): its EVSEs count at their maximum", station_id, why)
            self.wake()

    def station_disconnected(self, station_id: str) -> None:
        station = self._stations.get(station_id)
        if station is None or station.connections == 0:
            return
        station.connections -= 1
        if station.connections == 0:
            # Its profiles stay installed, but whatever happens there now is unknown: counted at maximum.
            station.disconnected_at_s = trio.current_time()
            self.rollout.disconnected(station_id)
            self.wake()

    def station_call(self, station_id: str, action: str | None, payload: Any) -> None:
        """A CALL a station sent (relayed to the CSMS)."""
        if action == "TransactionEvent":
            self._on_transaction_event(station_id, payload)
        elif action == "MeterValues":
            evse_id = evse_of(payload)
            if evse_id is None or not evse_id_usable(evse_id):
                return  # evseId 0 is the main meter: not an EVSE's draw
            record = self._evse(station_id, evse_id)
            found = measurement(payload.get("meterValue"))
            if found is not None:
                self._measured(record, found)
        elif action == "StatusNotification":
            evse_id = evse_of(payload)
            if evse_id is None or not evse_id_usable(evse_id):
                self.metrics.ignored.labels(action).inc()
                return
            self._evse(station_id, evse_id)

    def csms_answer(self, station_id: str, action: str | None, payload: Any, request: Any) -> None:
        """A CALLRESULT of the CSMS to a station's call (``request`` is that call's payload)."""
        if action != "TransactionEvent":
            return
        facts = transaction_facts(request)
        priority = charging_priority(payload)
        if facts is None or priority is None:
            return
        station = self._stations.get(station_id)
        evse_id = None if station is None else station.transactions.get(facts.transaction_id)
        if station is None or evse_id is None:
            return
        record = station.evses[evse_id]
        if record.priority != priority:
            # K03.FR.05/06: the CSMS's priority holds for the rest of the transaction.
            record.priority = priority
            self._dirty.add(station_id)
            self.wake()

    def station_answer(self, station_id: str, action: str | None, payload: Any, request: Any) -> None:
        """A CALLRESULT of a station to a CSMS call (``request`` is the CSMS's call payload)."""
        if action not in ("SetChargingProfile", "ClearChargingProfile"):
            return
        if not isinstance(payload, Mapping) or payload.get("status") != "Accepted" or not isinstance(request, Mapping):
            return
        station = self._station(station_id)
        self._dirty.add(station_id)  # the CSMS's profiles there are part of what survives a restart
        if action == "SetChargingProfile":
            if self._csms.on_set(station_id, station, request):
                self.wake()
        else:
            self._csms.on_clear(station_id, station, request)
            self.wake()

    # --- the loop ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reallocate on every wake-up and tick, and send what the plan says, until cancelled."""
        now_s = trio.current_time()
        for station in self._stations.values():
            if not station.connected and station.disconnected_at_s is None:
                station.disconnected_at_s = now_s  # restored: forgotten if it never comes back
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                with trio.move_on_at(self._deadline()):
                    await self._wake.wait()
                if self._wake.is_set() and self.settling.waiting():
                    # Maybe only answers the last round's child foresaw: then that round is computed already.
                    with trio.move_on_at(self._deadline()):
                        await self.settling.delivered()
                    if self.settling.waiting() and self.settling.foreseen_in():
                        self._wake = trio.Event()
                        self._settle_foreseen()
                        continue
                if self.round_runner.forks(len(self.rollout.evses)):
                    # A large site: computed off the loop (#17), once the burst that woke us is in.
                    await trio.sleep(self.round_runner.gather_s)
                    self._wake = trio.Event()
                    await forked_round(self, nursery)
                else:
                    self._wake = trio.Event()
                    self.reallocate(nursery)
                # Let the tasks just started send before looking again (answers wake us).
                await trio.lowlevel.checkpoint()

    def _settle_foreseen(self) -> None:
        """Once every step of the last forked round is accepted: its foreseen next round's timers."""
        foreseen = self.settling.settled()
        if foreseen is not None:
            self._count_defaults_under_transactions(
                [record for key in foreseen.recounted if (record := self._record(key)) is not None]
            )
            self._next_due_s, self.renewal_hint = foreseen.next_due_s, foreseen.next_renewal
            self.renewal_hinted = True
            self.metrics.child_rounds.labels("foreseen").inc()

    def _deadline(self) -> float:
        now_s = trio.current_time()
        deadline = now_s + self.settings.recompute_interval_s
        if self._next_due_s is not None:
            deadline = min(deadline, self._next_due_s)
        wall = self._wall()
        upcoming = self._next_wake_for_limits(wall)
        if upcoming is not None:
            deadline = min(deadline, now_s + max(0.0, (upcoming - wall).total_seconds()) + 0.001)
        if not self.renewal_hinted:
            renewal = self._next_renewal(wall)
        else:
            # After a forked round: the child's look at every EVSE (at the fork). A profile accepted since
            # then may be due before it, so the hint holds for a quarter of the validity at most: looked at
            # again by then, it is renewed with a quarter of its validity to spare at the latest.
            renewal = self.renewal_hint
            deadline = min(deadline, now_s + self.settings.profile_validity_s / 4)
        if renewal is not None:
            deadline = min(deadline, now_s + max(0.0, (renewal - wall).total_seconds()) + 0.001)
        return deadline

    def _next_wake_for_limits(self, wall: datetime) -> datetime | None:
        """When the limit over the lead window changes: a change point entering it, or leaving it."""
        lead = timedelta(seconds=self.settings.decrease_lead_s)
        at = wall
        for _ in range(MAX_LOOKAHEAD_POINTS):
            upcoming = self._next_limit_change(at)
            if upcoming is None:
                return None
            if upcoming - lead > wall:
                return upcoming - lead  # it enters the window then (later ones later still)
            if upcoming > wall:
                return upcoming  # inside the window already: the limit before it leaves the window then
            at = upcoming
        return None

    def _limits_ahead(self, wall: datetime) -> SiteLimits:
        """The lowest limit from now to ``decrease_lead_s`` ahead (every change point in between sampled)."""
        limits = self._limits_at(wall)
        end = wall + timedelta(seconds=self.settings.decrease_lead_s)
        at = wall
        for _ in range(MAX_LOOKAHEAD_POINTS):
            upcoming = self._next_limit_change(at)
            if upcoming is None or upcoming > end or upcoming <= at:
                break
            limits = limits.tighter(self._limits_at(upcoming))
            at = upcoming
        return limits

    def reallocate(self, nursery: trio.Nursery) -> None:
        """Allocate now and start sending what the rollout plan allows (the whole round on the loop)."""
        if self._stopping or self.released:
            return
        started = time.perf_counter()
        now_s, wall = trio.current_time(), self._wall()
        governed = self._prepare_round(now_s, wall)
        answer = self.compute_round(now_s, wall, self.limits)
        self._take_answer(answer.allocation, answer.turns, answer.plan.next_due_s)
        self.renewal_hinted = False
        valid_to = wall + timedelta(seconds=self.settings.profile_validity_s)
        for step in answer.plan.steps:
            self._send_step(nursery, step, governed, now_s, valid_to)
        self._end_round(nursery, answer.plan, wall, valid_to, started)

    def _prepare_round(self, now_s: float, wall: datetime) -> set[tuple[str, int]]:
        """What a round changes before it computes: the EVSEs (:meth:`_prepare_evses`), the limits ahead;
        returns the EVSEs a CSMS profile governs or that cannot be steered (nothing is sent there)."""
        self._prepare_evses(now_s, wall)
        return self._limits_and_governed(wall)

    def _prepare_evses(self, now_s: float, wall: datetime) -> tuple[list[str], list[tuple[str, int]]]:
        """Stations gone long enough forgotten, lapsed profiles unknown, our defaults under transactions
        counted; returns the stations forgotten and the EVSEs that lapsed."""
        forgotten = self._forget_gone(now_s)
        lapsed = self._lapse(wall)
        self._count_defaults_under_transactions()
        return forgotten, lapsed

    def _limits_and_governed(self, wall: datetime) -> set[tuple[str, int]]:
        self.limits = self._limits_ahead(wall)
        return self._csms.governed(self._stations.values(), wall) | self._unsteerable()

    def compute_round(self, now_s: float, wall: datetime, limits: SiteLimits, *, prepare: bool = False) -> RoundAnswer:
        """The round's allocation, turns and plan, from the state as it is. Changes nothing unless
        ``prepare`` (in a forked child, :mod:`balancing.forked_round`: :meth:`_prepare_evses` on the child's
        copy first, and the answer says what it changed, for the parent to do the same)."""
        prepared: dict[tuple[str, int], EvseApplied] | None = None
        forgotten: list[str] = []
        lapsed: list[tuple[str, int]] = []
        if prepare:
            before = dict(self.rollout.evses)
            forgotten, lapsed = self._prepare_evses(now_s, wall)
            prepared = {key: applied for key, applied in self.rollout.evses.items() if before.get(key) is not applied}
        sessions = self.rollout.allocator_sessions([self._session(record, wall) for record in self._records()])
        allocation = allocate(self.site, limits, sessions, now_s)
        renew_due = {record.key for record in self._records() if self._renewal_due(record, wall)}
        cached = len(self.rollout._paths)
        steps = plan(self.site, limits, allocation, self.rollout, now_s, self.settings.rollout, renew_due)
        grown = len(self.rollout._paths) != cached
        renewals: tuple[str, ...] | None = None
        next_renewal = None
        if prepare:
            busy = {step.station_id for step in steps.steps}
            renewals = tuple(sorted({record.station_id for record, *_ in self._default_renewals(wall, busy)}))
            next_renewal = self._next_renewal(wall)
        return RoundAnswer(
            allocation,
            self._turns(allocation, now_s),
            steps,
            (self.rollout._paths, self.rollout._shapes) if grown else None,
            prepared,
            tuple(forgotten),
            tuple(lapsed),
            renewals,
            next_renewal,
        )

    def _take_answer(
        self,
        allocation: Allocation,
        turns: Iterable[tuple[str, int, int, float | None, float]],
        next_due_s: float | None,
    ) -> None:
        self.allocation = allocation
        self._apply_turns(turns)
        self._next_due_s = next_due_s

    def _end_round(
        self,
        nursery: trio.Nursery,
        steps: Plan,
        wall: datetime,
        valid_to: datetime,
        started: float,
        renewal_stations: Iterable[str] | None = None,
    ) -> None:
        """Renew the defaults under transactions (at every station, or at ``renewal_stations``), write what
        changed, and tell whoever waits on a round."""

        def calm() -> bool:
            return not steps.decreases and not self._decrease_in_flight()

        busy = {step.station_id for step in steps.steps}
        self._renew_defaults_under_transactions(nursery, wall, valid_to, busy, calm, renewal_stations)
        self._flush()
        self.last_duration_s = time.perf_counter() - started
        self.metrics.reallocations.inc()
        self.metrics.reallocation_seconds.observe(self.last_duration_s)
        self.reallocated.set()
        self.reallocated = trio.Event()

    def _unsteerable(self) -> set[tuple[str, int]]:
        """EVSEs of stations that cannot be steered: counted at their maximum (unknown), never sent to."""
        result = set()
        for station in self._stations.values():
            if station.steerable or station.forgotten:
                continue
            for record in station.evses.values():
                result.add(record.key)
                applied = self.rollout.evses.get(record.key)
                if applied is not None and (applied.confirmed or applied.in_flight_amperes is not None):
                    self.rollout.installed(record.key, None)
        return result

    def _connected(self, station_id: str, station: StationRecord) -> bool:
        if self._is_connected is not None:
            return self._is_connected(station_id)
        return station.connected

    # --- releasing the site --------------------------------------------------------------------------

    async def release(self) -> list[Cleared]:
        """Stop balancing and clear every profile of ours on every connected station (before the controller
        is removed from the site); stations not connected keep theirs until their validity ends."""
        self.released = True
        results: list[Cleared] = []
        async with trio.open_nursery() as nursery:
            for station_id, station in sorted(self._stations.items()):
                if station.evses and self._connected(station_id, station):
                    nursery.start_soon(self._release_station, station_id, sorted(station.evses), results)
        return sorted(results, key=lambda result: result.station_id)

    async def _release_station(self, station_id: str, evse_ids: list[int], results: list[Cleared]) -> None:
        result = await clear_station(self._call, station_id, our_profile_ids(self.settings.profile_id_base, evse_ids))
        results.append(result)
        if result.complete and self._state is not None:
            self._stations.pop(station_id, None)
            self.rollout.forget_station(station_id)
            self._state.delete(station_id)

    # --- bookkeeping -------------------------------------------------------------------------------

    def _records(self) -> Iterator[EvseRecord]:
        for station in self._stations.values():
            if not station.forgotten:
                yield from station.evses.values()

    def _record(self, key: tuple[str, int]) -> EvseRecord | None:
        """The record of one EVSE, if it is known and its station not forgotten."""
        station = self._stations.get(key[0])
        return None if station is None or station.forgotten else station.evses.get(key[1])

    def _station(self, station_id: str) -> StationRecord:
        """The record of a station, made on first mention; one not connected then may be forgotten later."""
        station = self._stations.get(station_id)
        if station is None or station.forgotten:
            station = self._stations[station_id] = StationRecord()
            if not self._connected(station_id, station):
                station.disconnected_at_s = trio.current_time()
        return station

    def _evse(self, station_id: str, evse_id: int) -> EvseRecord:
        station = self._station(station_id)
        record = station.evses.get(evse_id)
        if record is None:
            record = station.evses[evse_id] = EvseRecord(station_id, evse_id, waiting_since_s=trio.current_time())
            # Whatever it has installed is unknown until it accepts one of ours: counted at its maximum.
            self.rollout.add_evse(station_id, evse_id, accepted_amperes=None)
            log.info("[%s] EVSE %d joins the balancing", station_id, evse_id)
            self._dirty.add(station_id)
            self.wake()
        return record

    def _forget_gone(self, now_s: float, station_ids: Iterable[str] | None = None) -> list[str]:
        """Forget the stations gone for ``forget_disconnected_after_s`` (of all, or of ``station_ids``)."""
        hold_s = self.settings.forget_disconnected_after_s
        forgotten = []
        for station_id in list(self._stations) if station_ids is None else station_ids:
            station = self._stations.get(station_id)
            if station is None or station.forgotten:
                continue
            if self._is_connected is not None and self._is_connected(station_id):
                station.disconnected_at_s = None
            # A station with a transaction open may charge offline under what it accepted: never forgotten.
            busy = any(record.transaction_id is not None for record in station.evses.values())
            if not busy and station.disconnected_at_s is not None and now_s - station.disconnected_at_s >= hold_s:
                gone_s = now_s - station.disconnected_at_s
                log.info("[%s] disconnected for %.0f s: no longer balanced", station_id, gone_s)
                # Kept in the store as forgotten: should balancing be switched off, its profiles are
                # still cleared when it comes back (balancing.clearing).
                station.forgotten = True
                self.rollout.forget_station(station_id)
                self._dirty.add(station_id)
                forgotten.append(station_id)
        return forgotten

    # --- reading -----------------------------------------------------------------------------------

    def evse_rows(self) -> list[dict[str, Any]]:
        """One row per known EVSE: session, allocation, installed limit and measured draw."""
        return report.evse_rows(self)

    def status(self) -> dict[str, Any]:
        """The balancing part of ``GET /api/v1/status`` and of ``GET /api/v1/allocations``."""
        return report.status(self)

    def phase_bounds_amperes(self) -> tuple[float, float, float]:
        """The most the site may draw per grid phase now, from what every EVSE may draw (its bound)."""
        return report.phase_bounds_amperes(self)

    def measured_phase_amperes(self) -> tuple[float, float, float]:
        """The measured draw per grid phase, summed over the sessions (highest phase current each)."""
        return report.measured_phase_amperes(self)

    def grid_limit_amperes(self) -> tuple[float | None, float | None, float | None]:
        """The per-phase limit on the grid node now: configuration and outside limits together."""
        return report.grid_limit_amperes(self)

    def records(self) -> Iterator[EvseRecord]:
        """Every EVSE the loop balances (for reading only)."""
        return self._records()

    def connected(self, station_id: str) -> bool:
        station = self._stations.get(station_id)
        return station is not None and self._connected(station_id, station)

    def station_record(self, station_id: str) -> StationRecord | None:
        """What the loop knows of one station (for reading only)."""
        return self._stations.get(station_id)

    def measured_amperes(self, record: EvseRecord) -> float | None:
        return self._measured_amperes(record)
