"""The balancing loop: observe the site, allocate, and roll the allocation out as charging profiles.

Theory of operation. :class:`Balancer` keeps what the allocator needs, fed by the router's
observations (it imports nothing of the router: they arrive through its ``station_*`` / ``csms_*``
methods, and profiles leave through the :class:`Caller` handed in):

* **EVSEs** become known when a station names them (StatusNotification, MeterValues, TransactionEvent).
  Every known EVSE of a connected station gets one of our profiles: a TxDefaultProfile while it has no
  transaction (limit 0 while idle, so an arriving EV does not find current the allocation has not given
  it), a TxProfile for the transaction once one runs (K01.FR.03: TxProfile carries the transactionId).
  Ids are ``profile_id_base + 2 × evseId`` (TxProfile) and ``+ 1`` (TxDefaultProfile), at the
  configured stack level, both of which the CSMS's own profiles must not use; never
  ChargingStationExternalConstraints (K03.FR.08, K14.FR.06).
* **Sessions** run from TransactionEvent Started (or the first event of an unknown transaction) to
  Ended; chargingPriority comes from the CSMS's TransactionEventResponse (K03.FR.04–06), the phase
  count from numberOfPhasesUsed, the measured draw from meter values (an EV drawing well below what it
  is offered for a while gives the rest to others, :mod:`balancing.allocator`).
* **The CSMS's own profiles** for a station (TxProfile, TxDefaultProfile), once the station accepted
  them, cap our limit for that EVSE: ours sits at a higher stack level and so replaces theirs at the
  station, and therefore must only ever restrict further. A ClearChargingProfile of the CSMS that may
  have removed ours makes that EVSE's limit unknown until it accepts ours again.

Every wake-up (an event above, a limit change, an answer, the periodic tick, the next scheduled limit
change) runs :meth:`Balancer.reallocate`: the allocator (pure) computes targets, :func:`rollout.plan`
decides what may be sent now (decreases first and accepted before any increase goes out; a rejecting
or silent station counted at its maximum), and each step goes out as SetChargingProfile in its own
task. ``link.call`` already keeps one call of ours outstanding per station (Part 4 §4.1.1).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError

from .allocator import Allocation, EvseKey, Session, SiteLimits, allocate, turn_after, underdraw_since
from .observe import Measurement, charging_priority, evse_of, measurement, transaction_facts
from .rollout import RolloutPolicy, RolloutState, Step, bound_amperes, plan
from .schedules import ChargingProfile, leading_limit, limit_at
from .site import GRID_NODE_ID, SiteConfig

log = logging.getLogger("ocpp_lc.balancing")

Purpose = Literal["TxProfile", "TxDefaultProfile"]
#: Highest EVSE id the profile id scheme leaves room for (the site model's bound too).
MAX_EVSE_ID = 1000
#: chargingSchedule ids are a separate number space; ours mirror the profile id.
PROFILE_ID_SPAN = 2 * MAX_EVSE_ID + 2


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How a call to a station ended: ``answered`` (payload is the CALLRESULT), ``error`` (a
    CALLERROR), ``timeout``, or ``gone`` (the station's link closed or never was)."""

    status: Literal["answered", "error", "timeout", "gone"]
    payload: Mapping[str, Any] | None = None
    detail: str = ""


class BalancerState(Protocol):
    """Where the loop keeps what it knows of each station across restarts (a store namespace)."""

    def put_many(self, items: Mapping[str, Any]) -> None: ...

    def delete(self, key: str) -> bool: ...

    def items(self) -> dict[str, Any]: ...


class Caller(Protocol):
    """Sends one CALL of the controller's own to a station (the router's LC-call API)."""

    async def __call__(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome: ...


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """The loop's knobs (``[balancing]`` in the configuration)."""

    stack_level: int = 8
    profile_id_base: int = 900_000
    recompute_interval_s: float = 10.0
    #: A station gone for this long is forgotten (its EVSEs stop counting at their maximum).
    forget_disconnected_after_s: float = 3600.0
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)

    def profile_id(self, evse_id: int, purpose: Purpose) -> int:
        return self.profile_id_base + 2 * evse_id + (1 if purpose == "TxDefaultProfile" else 0)

    def is_ours(self, profile_id: int) -> bool:
        return self.profile_id_base <= profile_id < self.profile_id_base + PROFILE_ID_SPAN


@dataclass
class _Evse:
    station_id: str
    evse_id: int
    default_amperes: float | None = None  # our TxDefaultProfile as the station accepted it (None: unknown)
    transaction_id: str | None = None
    started_at: datetime | None = None
    charging_state: str | None = None
    priority: int = 0
    phases_used: int | None = None
    measured: Measurement | None = None
    underdraw_since_s: float | None = None
    served_since_s: float | None = None
    waiting_since_s: float = 0.0
    generation: int = 0  # grows when a transaction starts or ends: answers from before are stale
    tx_profile_accepted: bool = False  # a TxProfile of ours for the current transaction was accepted

    @property
    def key(self) -> EvseKey:
        return (self.station_id, self.evse_id)


@dataclass
class _Station:
    connections: int = 0
    disconnected_at_s: float | None = None
    evses: dict[int, _Evse] = field(default_factory=dict)
    transactions: dict[str, int] = field(default_factory=dict)  # transactionId -> evseId
    csms_profiles: dict[int, tuple[int, ChargingProfile]] = field(default_factory=dict)  # id -> (evse, profile)

    @property
    def connected(self) -> bool:
        return self.connections > 0


class BalancingMetrics:
    """Counters and histograms of the loop; per-station gauges come from :class:`_Collector` per scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.profiles = Counter(
            "ocpp_lc_balancing_profiles",
            "Charging profiles of the controller's own sent to stations, by kind (decrease, retry, increase) "
            "and outcome (sent, accepted, rejected, error, timeout, gone).",
            ["kind", "outcome"],
            registry=registry,
        )
        self.reallocations = Counter(
            "ocpp_lc_balancing_reallocations", "Allocations computed by the balancing loop.", registry=registry
        )
        self.reallocation_seconds = Histogram(
            "ocpp_lc_balancing_reallocation_seconds",
            "Time to compute one allocation and its rollout plan.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )
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


class Balancer:
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
        self._stations: dict[str, _Station] = {}
        self.rollout = RolloutState()
        self.allocation = Allocation(evses={})
        self.limits = SiteLimits()
        self._wake = trio.Event()
        self._next_due_s: float | None = None
        self.metrics = BalancingMetrics(registry if registry is not None else CollectorRegistry())
        if registry is not None:
            registry.register(_Collector(self))
        #: Set after every reallocation (tests and benchmarks wait on it).
        self.reallocated = trio.Event()
        self.last_duration_s = 0.0
        self._state = state
        self._stopping = False
        # The router's registry, when there is one: a connect or disconnect event the observer dropped
        # must not leave a station unsent-to (or never forgotten) for good.
        self._is_connected = is_connected
        self._dirty: set[str] = set()
        if state is not None:
            self._restore(state)

    # --- observation (called from the router's observer task; never blocks) ---------------------

    def wake(self) -> None:
        """Recompute soon: something the allocation depends on changed."""
        self._wake.set()

    def stop(self) -> None:
        """Send nothing more (the appliance is shutting down: the stations are being closed)."""
        self._stopping = True

    def station_connected(self, station_id: str) -> None:
        station = self._stations.setdefault(station_id, _Station())
        station.connections += 1
        station.disconnected_at_s = None
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
            if evse_id is None or not self._evse_plausible(station_id, evse_id):
                return  # evseId 0 is the main meter: not an EVSE's draw
            record = self._evse(station_id, evse_id)
            found = measurement(payload.get("meterValue"))
            if found is not None:
                self._measured(record, found)
        elif action == "StatusNotification":
            evse_id = evse_of(payload)
            if evse_id is None or not self._evse_plausible(station_id, evse_id):
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
        if action == "SetChargingProfile":
            self._on_csms_profile(station_id, station, request)
        else:
            self._on_csms_clear(station_id, station, request)

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
                self._wake = trio.Event()
                self.reallocate(nursery)
                # Let the tasks just started send before looking again (answers wake us).
                await trio.lowlevel.checkpoint()

    def _deadline(self) -> float:
        now_s = trio.current_time()
        deadline = now_s + self.settings.recompute_interval_s
        if self._next_due_s is not None:
            deadline = min(deadline, self._next_due_s)
        wall = self._wall()
        upcoming = self._next_limit_change(wall)
        if upcoming is not None:
            deadline = min(deadline, now_s + max(0.0, (upcoming - wall).total_seconds()) + 0.001)
        return deadline

    def reallocate(self, nursery: trio.Nursery) -> None:
        """Allocate now and start sending the steps the rollout plan allows."""
        if self._stopping:
            return
        started = time.perf_counter()
        now_s = trio.current_time()
        wall = self._wall()
        self._forget_gone(now_s)
        self.limits = self._limits_at(wall)
        governed = self._csms_governed(wall)
        sessions = [self._session(record, wall) for record in self._records() if record.transaction_id is not None]
        self.allocation = allocate(self.site, self.limits, self.rollout.allocator_sessions(sessions), now_s)
        self._update_turns(now_s)
        steps = plan(self.site, self.limits, self.allocation, self.rollout, now_s, self.settings.rollout)
        self._next_due_s = steps.next_due_s
        for step in steps.steps:
            station = self._stations.get(step.station_id)
            if station is None or not self._connected(step.station_id, station):
                continue  # nothing to send to; it stays counted at its maximum until it is back
            if step.key in governed:
                continue  # a CSMS profile outranks ours there: sending changes nothing
            record = station.evses[step.evse_id]
            purpose: Purpose = "TxProfile" if record.transaction_id is not None else "TxDefaultProfile"
            payload = self.profile_payload(record, purpose, step.current_amperes)
            self.rollout.sent(step, now_s)
            self.metrics.profiles.labels(step.kind, "sent").inc()
            nursery.start_soon(self._send, step, purpose, payload, record.generation)
        self._flush()
        self.last_duration_s = time.perf_counter() - started
        self.metrics.reallocations.inc()
        self.metrics.reallocation_seconds.observe(self.last_duration_s)
        self.reallocated.set()
        self.reallocated = trio.Event()

    def profile_payload(self, record: _Evse, purpose: Purpose, amperes: float) -> dict[str, Any]:
        """The SetChargingProfileRequest that installs ``amperes`` per phase on one EVSE."""
        profile_id = self.settings.profile_id(record.evse_id, purpose)
        profile: dict[str, Any] = {
            "id": profile_id,
            "stackLevel": self.settings.stack_level,
            "chargingProfilePurpose": purpose,
            # Relative with one open-ended period: in force from now (or the transaction's start) on.
            "chargingProfileKind": "Relative",
            "chargingSchedule": [
                {
                    "id": profile_id,
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": amperes}],
                }
            ],
        }
        if purpose == "TxProfile":
            profile["transactionId"] = record.transaction_id
        return {"evseId": record.evse_id, "chargingProfile": profile}

    async def _send(self, step: Step, purpose: Purpose, payload: dict[str, Any], generation: int) -> None:
        try:
            outcome = await self._caller(step.station_id, "SetChargingProfile", payload)
        except Exception as error:  # defence in depth: one station's failure must not stop the loop
            log.exception("[%s] sending a profile failed unexpectedly", step.station_id)
            outcome = CallOutcome("gone", detail=type(error).__name__)
        accepted = outcome.status == "answered" and (outcome.payload or {}).get("status") == "Accepted"
        label = "accepted" if accepted else "rejected" if outcome.status == "answered" else outcome.status
        self.metrics.profiles.labels(step.kind, label).inc()
        station = self._stations.get(step.station_id)
        record = None if station is None else station.evses.get(step.evse_id)
        # A TxProfile for a transaction that ended meanwhile is rightly refused (K01.FR.09): not a fault.
        overtaken = record is None or record.generation != generation
        if not accepted and not self._stopping and not overtaken:
            status_info = (outcome.payload or {}).get("statusInfo") if outcome.status == "answered" else None
            log.warning(
                "[%s] %s of %.1f A on EVSE %d: %s%s; counted at its maximum until it accepts one",
                step.station_id,
                purpose,
                step.current_amperes,
                step.evse_id,
                label,
                f" ({outcome.detail or status_info})" if outcome.detail or status_info else "",
            )
        self._settle(step, purpose, record, generation, accepted, outcome.status)
        self.wake()

    def _settle(
        self, step: Step, purpose: Purpose, record: _Evse | None, generation: int, accepted: bool, status: str
    ) -> None:
        if record is None or step.key not in self.rollout.evses:
            return  # forgotten meanwhile
        self._dirty.add(step.station_id)
        if accepted and purpose == "TxDefaultProfile":
            record.default_amperes = step.current_amperes
        if record.generation != generation:
            # A transaction started or ended while this was under way. No TxProfile of ours exists for
            # the transaction there is now (one would carry the new generation), so our
            # TxDefaultProfile governs the EVSE, idle or not: known if the station accepted one.
            self.rollout.installed(step.key, record.default_amperes)
            return
        if accepted:
            self.rollout.accepted(step)
            if purpose == "TxProfile":
                record.tx_profile_accepted = True
        elif status == "answered" or status == "error":
            self.rollout.rejected(step)
        else:
            self.rollout.unanswered(step)

    def _connected(self, station_id: str, station: _Station) -> bool:
        if self._is_connected is not None:
            return self._is_connected(station_id)
        return station.connected

    # --- bookkeeping -------------------------------------------------------------------------------

    def _records(self) -> Iterator[_Evse]:
        for station in self._stations.values():
            yield from station.evses.values()

    def _evse_plausible(self, station_id: str, evse_id: int) -> bool:
        """False for an EVSE id the site model lists the station without (it would count at maximum)."""
        listed = self.site.station(station_id).evses
        return not listed or any(evse.evse_id == evse_id for evse in listed)

    def _station(self, station_id: str) -> _Station:
        """The record of a station, made on first mention; one not connected then may be forgotten later."""
        station = self._stations.get(station_id)
        if station is None:
            station = self._stations[station_id] = _Station()
            if not self._connected(station_id, station):
                station.disconnected_at_s = trio.current_time()
        return station

    def _evse(self, station_id: str, evse_id: int) -> _Evse:
        station = self._station(station_id)
        record = station.evses.get(evse_id)
        if record is None:
            record = station.evses[evse_id] = _Evse(station_id, evse_id, waiting_since_s=trio.current_time())
            # Whatever it has installed is unknown until it accepts one of ours: counted at its maximum.
            self.rollout.add_evse(station_id, evse_id, accepted_amperes=None)
            log.info("[%s] EVSE %d joins the balancing", station_id, evse_id)
            self._dirty.add(station_id)
            self.wake()
        return record

    def _on_transaction_event(self, station_id: str, payload: Any) -> None:
        facts = transaction_facts(payload)
        if facts is None:
            self.metrics.ignored.labels("TransactionEvent").inc()
            return
        station = self._station(station_id)
        known = station.transactions.get(facts.transaction_id)
        evse_id = known if known is not None else facts.evse_id
        if known is not None and facts.evse_id is not None and facts.evse_id != known:
            # The transaction moved to another EVSE (or the station says so): end it where it was.
            old = station.evses.get(known)
            if old is not None and old.transaction_id == facts.transaction_id:
                self._end_session(old)
            evse_id = facts.evse_id
        if evse_id is not None and not self._evse_plausible(station_id, evse_id):
            evse_id = None
        if evse_id is None:
            self.metrics.ignored.labels("TransactionEvent").inc()
            return  # a later event of a transaction whose start we never saw, without its EVSE
        record = self._evse(station_id, evse_id)
        now_s = trio.current_time()
        if facts.event_type == "Ended":
            if record.transaction_id == facts.transaction_id:
                self._end_session(record)
            station.transactions.pop(facts.transaction_id, None)
            return
        if record.transaction_id != facts.transaction_id:
            if record.transaction_id is not None:
                self._end_session(record)  # a new transaction on the EVSE: the old one is over
            station.transactions[facts.transaction_id] = evse_id
            record.transaction_id = facts.transaction_id
            record.started_at = self._wall()
            record.priority = 0
            record.waiting_since_s = now_s
            record.served_since_s = None
            record.generation += 1
            record.tx_profile_accepted = False
            # Our TxDefaultProfile governs the new transaction until our TxProfile replaces it.
            self.rollout.session_started(record.key, facts.phases_used)
            self.rollout.installed(record.key, record.default_amperes)
            log.info("[%s] transaction %s on EVSE %d joins the balancing", station_id, facts.transaction_id, evse_id)
            self._dirty.add(station_id)
            self.wake()
        if facts.phases_used is not None and facts.phases_used != record.phases_used:
            record.phases_used = facts.phases_used
            self._dirty.add(station_id)
            self.rollout.session_started(record.key, facts.phases_used)
            self.wake()
        record.charging_state = facts.charging_state or record.charging_state
        if facts.measurement is not None:
            self._measured(record, facts.measurement)

    def _end_session(self, record: _Evse) -> None:
        station = self._stations[record.station_id]
        record.tx_profile_accepted = False
        for profile_id, (_, profile) in list(station.csms_profiles.items()):
            # A TxProfile ends with its transaction (K01): the CSMS's too.
            if profile.charging_profile_purpose == "TxProfile" and profile.transaction_id == record.transaction_id:
                del station.csms_profiles[profile_id]
        if record.transaction_id is not None:
            station.transactions.pop(record.transaction_id, None)
        record.transaction_id = None
        record.started_at = None
        record.charging_state = None
        record.priority = 0
        record.phases_used = None
        record.measured = None
        record.underdraw_since_s = None
        record.served_since_s = None
        record.generation += 1
        self._dirty.add(record.station_id)
        self.rollout.session_ended(record.key)
        # The TxProfile ended with the transaction; our TxDefaultProfile governs the EVSE again.
        self.rollout.installed(record.key, record.default_amperes)
        self.wake()

    def _measured(self, record: _Evse, found: Measurement) -> None:
        record.measured = found
        if record.transaction_id is None:
            return
        current = self._measured_amperes(record)
        if current is None:
            return
        offered = self.allocation.current_amperes(*record.key)
        applied = self.rollout.evses.get(record.key)
        if applied is not None and applied.confirmed and applied.accepted_amperes is not None:
            offered = min(offered, applied.accepted_amperes)
        was = record.underdraw_since_s
        record.underdraw_since_s = underdraw_since(current, offered, was, trio.current_time(), self.site.policy)
        if was is not None and record.underdraw_since_s is None:
            self.wake()  # it ramps up: give its share back now

    def _measured_amperes(self, record: _Evse) -> float | None:
        found = record.measured
        if found is None:
            return None
        if found.current_amperes is not None:
            return found.current_amperes
        if found.power_watts is None:
            return None
        station = self.site.station(record.station_id)
        phases = len(station.grid_phases(record.phases_used))
        return found.power_watts / (self.site.nominal_voltage_volts * phases)

    def _session(self, record: _Evse, wall: datetime) -> Session:
        return Session(
            station_id=record.station_id,
            evse_id=record.evse_id,
            transaction_id=record.transaction_id,
            priority=record.priority,
            phases_used=record.phases_used,
            measured_current_amperes=self._measured_amperes(record),
            underdraw_since_s=record.underdraw_since_s,
            served_since_s=record.served_since_s,
            waiting_since_s=record.waiting_since_s,
            max_current_amperes=self._csms_cap(record, wall),
        )

    def _update_turns(self, now_s: float) -> None:
        for record in self._records():
            if record.transaction_id is None:
                continue
            record.served_since_s, record.waiting_since_s = turn_after(
                self.allocation.current_amperes(*record.key) > 0, record.served_since_s, record.waiting_since_s, now_s
            )

    def _forget_gone(self, now_s: float) -> None:
        hold_s = self.settings.forget_disconnected_after_s
        for station_id, station in list(self._stations.items()):
            if self._is_connected is not None and self._is_connected(station_id):
                station.disconnected_at_s = None
            # A station with a transaction open may charge offline under what it accepted: never forgotten.
            busy = any(record.transaction_id is not None for record in station.evses.values())
            if not busy and station.disconnected_at_s is not None and now_s - station.disconnected_at_s >= hold_s:
                gone_s = now_s - station.disconnected_at_s
                log.info("[%s] disconnected for %.0f s: no longer balanced", station_id, gone_s)
                del self._stations[station_id]
                self.rollout.forget_station(station_id)
                self._dirty.add(station_id)

    # --- persistence ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what changed since the last flush, in one transaction (never per answer: fsyncs add up)."""
        if self._state is None or not self._dirty:
            return
        items: dict[str, Any] = {}
        for station_id in sorted(self._dirty):
            station = self._stations.get(station_id)
            if station is None:
                self._state.delete(station_id)
                continue
            evses = {}
            for evse_id, record in station.evses.items():
                applied = self.rollout.evses.get(record.key)
                installed = None
                if applied is not None and applied.confirmed and applied.in_flight_amperes is None:
                    installed = applied.accepted_amperes
                evses[str(evse_id)] = {
                    "default": record.default_amperes,
                    "tx": record.transaction_id,
                    "started": None if record.started_at is None else record.started_at.isoformat(),
                    "priority": record.priority,
                    "phases": record.phases_used,
                    "installed": installed,
                }
            items[station_id] = {"evses": evses}
        self._dirty.clear()
        if items:
            self._state.put_many(items)

    def _restore(self, state: BalancerState) -> None:
        """Take back what was known before a restart: the EVSEs, their transactions and installed limits."""
        for station_id, stored in sorted(state.items().items()):
            try:
                station = _Station()
                for key, item in stored["evses"].items():
                    evse_id = int(key)
                    started = item.get("started")
                    started_at = datetime.fromisoformat(started) if isinstance(started, str) else None
                    if started_at is not None and started_at.tzinfo is None:
                        raise ValueError("a transaction start without a time zone")
                    record = _Evse(
                        station_id,
                        evse_id,
                        default_amperes=_optional_float(item.get("default")),
                        transaction_id=item.get("tx") if isinstance(item.get("tx"), str) else None,
                        started_at=started_at,
                        priority=int(item.get("priority") or 0),
                        phases_used=item.get("phases") if item.get("phases") in (1, 2, 3) else None,
                    )
                    station.evses[evse_id] = record
                    if record.transaction_id is not None:
                        station.transactions[record.transaction_id] = evse_id
                    self.rollout.add_evse(station_id, evse_id, _optional_float(item.get("installed")))
                    if record.transaction_id is not None:
                        self.rollout.session_started(record.key, record.phases_used)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                log.error("[%s] balancing state in the store is unreadable (%s): learned again", station_id, error)
                self.rollout.forget_station(station_id)
                continue
            self._stations[station_id] = station

    # --- the CSMS's own profiles at stations -----------------------------------------------------

    def _on_csms_profile(self, station_id: str, station: _Station, request: Mapping[str, Any]) -> None:
        evse_id = request.get("evseId")
        try:
            profile = ChargingProfile.model_validate(request.get("chargingProfile"))
        except ValidationError:
            self.metrics.ignored.labels("SetChargingProfile").inc()
            return
        if not isinstance(evse_id, int) or isinstance(evse_id, bool):
            return
        if self.settings.is_ours(profile.id) or profile.stack_level == self.settings.stack_level:
            self._conflict(station_id, station, evse_id, f"SetChargingProfile id {profile.id}")
        elif profile.stack_level > self.settings.stack_level:
            self.metrics.csms_conflicts.inc()
            log.warning(
                "[%s] the CSMS's %s at stack level %d outranks the controller's (%d): that EVSE counts at the "
                "CSMS's limit or its maximum and is not steered",
                station_id,
                profile.charging_profile_purpose,
                profile.stack_level,
                self.settings.stack_level,
            )
        if profile.charging_profile_purpose in ("TxProfile", "TxDefaultProfile"):
            station.csms_profiles[profile.id] = (evse_id, profile)
            self.wake()

    def _on_csms_clear(self, station_id: str, station: _Station, request: Mapping[str, Any]) -> None:
        profile_id = request.get("chargingProfileId")
        criteria = request.get("chargingProfileCriteria")
        criteria = criteria if isinstance(criteria, Mapping) else {}
        evse_id = criteria.get("evseId")
        purpose = criteria.get("chargingProfilePurpose")
        stack_level = criteria.get("stackLevel")
        if isinstance(profile_id, int):
            station.csms_profiles.pop(profile_id, None)
            may_touch_ours = self.settings.is_ours(profile_id)
        else:
            for known_id, (known_evse, profile) in list(station.csms_profiles.items()):
                if (
                    (evse_id is None or evse_id == known_evse)
                    and (purpose is None or purpose == profile.charging_profile_purpose)
                    and (stack_level is None or stack_level == profile.stack_level)
                ):
                    del station.csms_profiles[known_id]
            may_touch_ours = purpose in (None, "TxProfile", "TxDefaultProfile") and stack_level in (
                None,
                self.settings.stack_level,
            )
        if may_touch_ours:
            self._conflict(station_id, station, evse_id if isinstance(evse_id, int) else None, "ClearChargingProfile")
        self.wake()

    def _conflict(self, station_id: str, station: _Station, evse_id: int | None, what: str) -> None:
        """The CSMS may have replaced or removed our profiles: they are unknown until accepted again."""
        self.metrics.csms_conflicts.inc()
        log.warning(
            "[%s] the CSMS's %s touches the controller's profiles (ids from %d, stack level %d): re-installing them",
            station_id,
            what,
            self.settings.profile_id_base,
            self.settings.stack_level,
        )
        self._dirty.add(station_id)
        for record in station.evses.values():
            if evse_id in (None, 0, record.evse_id):
                record.default_amperes = None
                self.rollout.installed(record.key, None)

    def _csms_cap(self, record: _Evse, wall: datetime) -> float | None:
        station = self._stations.get(record.station_id)
        if station is None or not station.csms_profiles:
            return None
        tx = [
            profile
            for _, profile in station.csms_profiles.values()
            if profile.charging_profile_purpose == "TxProfile" and profile.transaction_id == record.transaction_id
        ]
        found = leading_limit(tx, wall, record.started_at)
        if found is None:
            # One pool: an EVSE's own TxDefaultProfile and one for every EVSE (0) compete by stack level.
            defaults = [
                profile
                for evse, profile in station.csms_profiles.values()
                if evse in (record.evse_id, 0) and profile.charging_profile_purpose == "TxDefaultProfile"
            ]
            found = leading_limit(defaults, wall, record.started_at)
        if found is None:
            return None
        # As the station converts it (K01.FR.50: W over numberPhases, 3 when absent).
        return found.amperes(self.site.nominal_voltage_volts)

    def _csms_governed(self, wall: datetime) -> set[EvseKey]:
        """EVSEs where a CSMS profile, not ours, sets the limit: counted at it (or their maximum), not sent to.

        A CSMS TxProfile for the transaction outranks any TxDefaultProfile, so it governs until a TxProfile
        of ours is accepted, and for good if its stack level is above ours (K01.FR.17); a CSMS
        TxDefaultProfile above our stack level governs an EVSE without a TxProfile of ours.
        """
        result: set[EvseKey] = set()
        ours = self.settings.stack_level
        for station in self._stations.values():
            if not station.csms_profiles:
                continue
            for record in station.evses.values():
                for evse, profile in station.csms_profiles.values():
                    purpose = profile.charging_profile_purpose
                    if purpose == "TxProfile":
                        mine = record.transaction_id is not None and profile.transaction_id == record.transaction_id
                        governs = mine and (profile.stack_level > ours or not record.tx_profile_accepted)
                    else:
                        governs = (
                            evse in (0, record.evse_id)
                            and profile.stack_level > ours
                            and not record.tx_profile_accepted
                        )
                    if governs and limit_at(profile, wall, record.started_at) is not None:
                        result.add(record.key)
                        applied = self.rollout.evses.get(record.key)
                        if applied is not None and (applied.confirmed or applied.in_flight_amperes is not None):
                            self.rollout.installed(record.key, None)
                        break
        return result

    # --- reading -----------------------------------------------------------------------------------

    def evse_rows(self) -> list[dict[str, Any]]:
        """One row per known EVSE: session, allocation, installed limit and measured draw."""
        rows = []
        for record in sorted(self._records(), key=lambda r: r.key):
            station = self._stations[record.station_id]
            applied = self.rollout.evses.get(record.key)
            allocated = self.allocation.evses.get(record.key)
            installed = None
            trusted = False
            if applied is not None:
                trusted = applied.confirmed and applied.accepted_amperes is not None
                installed = applied.accepted_amperes if trusted else None
            measured = self._measured_amperes(record)
            rows.append(
                {
                    "station_id": record.station_id,
                    "evse_id": record.evse_id,
                    "connected": self._connected(record.station_id, station),
                    "transaction_id": record.transaction_id,
                    "charging_state": record.charging_state,
                    "priority": record.priority,
                    "phases_used": record.phases_used,
                    "allocated_amperes": None if allocated is None else round(allocated.current_amperes, 3),
                    "installed_amperes": installed,
                    "profile_in_flight": applied is not None and applied.in_flight_amperes is not None,
                    "compliant": trusted,
                    "measured_current_amperes": None if measured is None else round(measured, 3),
                    "measured_power_watts": None if record.measured is None else record.measured.power_watts,
                }
            )
        return rows

    def phase_bounds_amperes(self) -> tuple[float, float, float]:
        """The most the site may draw per grid phase now, from what every EVSE may draw (its bound)."""
        totals = [0.0, 0.0, 0.0]
        for _, applied in sorted(self.rollout.evses.items()):
            station = self.site.station(applied.station_id)
            bound = bound_amperes(station, applied)
            phases = station.grid_phases(applied.phases_used if applied.in_session else None)
            for phase in phases:
                totals[phase] += bound
        return (totals[0], totals[1], totals[2])

    def measured_phase_amperes(self) -> tuple[float, float, float]:
        """The measured draw per grid phase, summed over the sessions (highest phase current each)."""
        totals = [0.0, 0.0, 0.0]
        for record in self._records():
            measured = self._measured_amperes(record)
            if measured is None or record.transaction_id is None:
                continue
            for phase in self.site.station(record.station_id).grid_phases(record.phases_used):
                totals[phase] += measured
        return (totals[0], totals[1], totals[2])

    def grid_limit_amperes(self) -> tuple[float | None, float | None, float | None]:
        """The per-phase limit on the grid node now: configuration and outside limits together."""
        configured = self.site.node_limits(GRID_NODE_ID).max_current_amperes
        outside = self.limits.phase_current_amperes
        result: list[float | None] = []
        for phase in range(3):
            values = [v for v in (configured, None if outside is None else outside[phase]) if v is not None]
            value = min(values) if values else None
            result.append(None if value is None or math.isinf(value) else value)
        return (result[0], result[1], result[2])

    def status(self) -> dict[str, Any]:
        """The balancing part of ``GET /api/v1/status`` and of ``GET /api/v1/allocations``."""
        limit = self.grid_limit_amperes()
        bounds = self.phase_bounds_amperes()
        measured = self.measured_phase_amperes()
        phases = {}
        for index, name in enumerate(("L1", "L2", "L3")):
            value = limit[index]
            phases[name] = {
                "limit_amperes": value,
                "committed_amperes": round(bounds[index], 3),
                "measured_amperes": round(measured[index], 3),
                "headroom_amperes": None if value is None else round(value - bounds[index], 3),
            }
        rows = self.evse_rows()
        return {
            "phases": phases,
            "overcommitted": self.allocation.overcommitted,
            "sessions": sum(1 for row in rows if row["transaction_id"] is not None),
            "evses": rows,
            "reallocation_seconds": round(self.last_duration_s, 6),
        }


def _optional_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class _Collector(Collector):
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
            "EVSEs whose limit is unknown or rejected, counted at their maximum.",
        )
        sessions = GaugeMetricFamily("ocpp_lc_balancing_sessions", "Transactions the loop balances.")
        count_noncompliant = 0
        count_sessions = 0
        for row in balancer.evse_rows():
            labels = [row["station_id"], str(row["evse_id"])]
            if not row["compliant"]:
                count_noncompliant += 1
            if row["installed_amperes"] is not None:
                installed.add_metric(labels, row["installed_amperes"])
            if row["transaction_id"] is None:
                continue
            count_sessions += 1
            if row["allocated_amperes"] is not None:
                allocated.add_metric(labels, row["allocated_amperes"])
            if row["measured_current_amperes"] is not None:
                measured.add_metric(labels, row["measured_current_amperes"])
        noncompliant.add_metric([], count_noncompliant)
        sessions.add_metric([], count_sessions)
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
        bounds = balancer.phase_bounds_amperes()
        measured_phases = balancer.measured_phase_amperes()
        limits = balancer.grid_limit_amperes()
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
        yield from (allocated, installed, measured, noncompliant, sessions, limit, committed, draw, headroom)
        yield overcommitted
