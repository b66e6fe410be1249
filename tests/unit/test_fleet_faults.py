"""The real balancing loop keeps a faulty fleet within its limits and serves it (issue 11, Done-when 2).

K14.FR.01 / K03.FR.01–03: the controller keeps the group within its limits by imposing charging
limits; K01.FR.49 numberPhases; K01 profiles persist at the station; validTo bounds a profile's life.

What runs: :class:`balancing.loop.Balancer` itself, on trio's virtual clock, fed the way the router
feeds it, its state in a real :class:`router.store.Store` (namespace ``balancing``) in ``tmp_path``. It
is killed and rebuilt on the same store at random instants. The simulated stations are the physical
truth, modelled after OCPP 2.0.1 independently of the controller:

* A station answers one SetChargingProfile at a time (Part 4 §4.1.1): 0.05–1 s there, applied on
  arrival, 0.05–1 s back (healthy stations always answer, within 2 s: less than the 30 s lead).
* It keeps what it accepted (K01: profiles persist, across controller restarts too), per EVSE our
  TxProfile for the running transaction (K01.FR.04/09, K02.FR.05) over our TxDefaultProfile, each only
  until its validTo; past that it falls back to the next one, and at last to its own default (the EVSE's
  maximum). It honours numberPhases: an EV uses ``min(EV, station, numberPhases)`` phases and the
  station reports a change of the phases used at once (TransactionEvent Updated numberOfPhasesUsed).
* An EV draws ``min(its maximum, the limit in force)`` per phase; while its station *overdraws* it draws
  its own maximum (up to the EVSE's) whatever the profile says.
* Every 20 s each charging EVSE reports its draw (Current.Import per phase used): TransactionEvent
  Updated (MeterValuePeriodic) at even stations, MeterValues at odd ones.

Faults drawn at random (at most ``MAX_FAULTY`` stations at once, each for a bounded stretch, then at
least ``COOLDOWN_S`` healthy): rejecting every profile; ignoring them (no answer, not applied); flaky
(answers lost or later than the 5 s call timeout, the profile applied); offline (the link drops; a
frame on the wire may or may not arrive); overdrawing. Controller crashes at any instant (often
within 1.5 s of an event, so mid-rollout): the run() task is cancelled, every link drops, the frame each
station is receiving arrives (applied, no answer) or not, and 1–45 s later a new Balancer on the same
store starts and the stations reconnect within 10 s. EVs of 1 or 3 phases change phase use mid-session.
The CSMS adds future periods to the grid limit (down and up, at whole seconds, at least the lead ahead,
known through ``limits_at`` / ``next_limit_change``); a crash is drawn only where no change falls in
its outage plus reconnection plus the lead (a controller that is down cannot lower anything).

Why the property can hold exactly: the maxima of any ``MAX_FAULTY`` stations fit every configured
limit and every scheduled grid limit (at most 72 A a phase against a floor of 80 A), so once every
steerable EVSE is at 0 the site is within its limits whatever the faulty ones do.

Asserted, by the physical current as a piecewise-constant function of virtual time, at every event,
every profile a station applies, every validTo reached, every scheduled limit change and every meter
tick: the current on every phase (and power) of every node (grid under its scheduled limit, circuits,
stations with limits) is within its limit, except on the path of an overdrawing EVSE inside its window
(``OVERDRAW_WINDOW_S`` from the start of the overdraw, or from a restart that made the controller
forget it), and then only by what that overdraw adds: with it drawing what it accepted, the node is
within its limit. And no EVSE with a session at a healthy station waits longer than ``WAIT_LIMIT_S``
with 0 A installed while capacity exists for its minimum (see check_waiting). No profile
of ours lapses at a station (the controller renews in time: faults last far less than half the validity).
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.loop import Balancer, CallOutcome, LoopSettings
from balancing.overdraw import OverdrawPolicy
from balancing.rollout import RolloutPolicy
from balancing.site import GRID_NODE_ID, SiteConfig, StationConfig
from router.store import Store
from tests.support.schemas import validate_call, validate_result
from tests.unit.test_balancing_faults import loop_settings as fault_loop_settings
from tests.unit.test_balancing_loop import FakeStations, running, settle, status_notification
from tests.unit.test_balancing_loop import transaction_event as loop_transaction_event
from tests.unit.test_balancing_loop import wall_clock as loop_wall_clock
from tests.unit.test_fleet_balancer import ROTATIONS

SEEDS = range(20)
EVENTS = 500  # per seed: 1,000 take ~115 s for 20 seeds on this 2-core box (the loop's own cost)
MEAN_GAP_S = 3.0
VOLTAGE = 230.0
CALL_TIMEOUT_S = 5.0
HOP_MAX_S = 1.0
LEAD_S = 30.0
MIN_INTERVAL_S = 30.0
METER_INTERVAL_S = 20.0
GRACE_S = 40.0
MARGIN_AMPERES = 2.0
VALIDITY_S = 900.0
IDLE_AMPERES = 6.0
MAX_FAULTY = 2
COOLDOWN_S = 60.0
DOWN_MAX_S = 45.0
RECONNECT_MAX_S = 10.0
GRID_FLOOR_AMPERES = 80.0  # above the worst two faulty stations on one phase (S01's 40 A + S08's 32 A)
POWER_FLOOR_WATTS = 50_000.0  # above two 3-phase 32 A stations (44.2 kW)
#: The controller's reaction once it knows: a decrease under way at an EVSE (a call timeout at worst),
#: then the decrease itself and a second round should that one fail (two round trips).
REACT_S = CALL_TIMEOUT_S + 2 * (2 * HOP_MAX_S)
#: Overdraw: the first sample above comes within a meter interval, the clock runs ``GRACE_S`` (a multiple
#: of the interval, so detection is at a sample), then the others are lowered (REACT_S).
OVERDRAW_WINDOW_S = METER_INTERVAL_S + GRACE_S + REACT_S
#: Waiting (115 s): an EV drawing less than offered gives the rest back once the allocator has seen it do
#: so for ``UNDERDRAW_GRACE_S`` (plus a meter interval for the sample); a retry goes out at most once per
#: ``MIN_INTERVAL_S`` per station (a station just back, or one whose first answer was lost, needs up to
#: two); increases wait until every decrease under way is answered (a call timeout each, three rounds).
UNDERDRAW_GRACE_S = 20.0
UNDERDRAW_HEADROOM_AMPERES = 2.0
WAIT_LIMIT_S = UNDERDRAW_GRACE_S + METER_INTERVAL_S + 2 * MIN_INTERVAL_S + 3 * CALL_TIMEOUT_S
TOLERANCE_AMPERES = 1e-6
EPOCH = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
FAULTS = ("rejecting", "ignoring", "flaky", "offline", "overdraw")
FAULT_SPAN_S = {"rejecting": (20, 150), "ignoring": (10, 60), "flaky": (30, 150), "offline": (5, 120)}
FAULT_SPAN_S["overdraw"] = (60, 240)


def wall_at(now_s: float) -> datetime:
    return EPOCH + timedelta(seconds=now_s)


def seconds_of(wall: datetime) -> float:
    return (wall - EPOCH).total_seconds()


def faults_site() -> SiteConfig:
    """12 stations, 16 EVSEs: grid 150 A / 90 kW, circuit A 70 A, B 50 A / 25 kW with B1 48 A below it."""
    rows = [  # id, circuit, phases, EVSE max, extra
        ("S00", GRID_NODE_ID, 3, 32.0, {}),
        ("S01", GRID_NODE_ID, 1, 32.0, {"two": True, "max_current_amperes": 40.0}),
        ("S02", GRID_NODE_ID, 3, 16.0, {}),
        ("S03", GRID_NODE_ID, 1, 32.0, {}),
        ("S04", "A", 3, 32.0, {}),
        ("S05", "A", 3, 32.0, {"max_power_watts": 11_000.0}),
        ("S06", "A", 1, 32.0, {"two": True, "max_current_amperes": 32.0}),
        ("S07", "B", 3, 16.0, {}),
        ("S08", "B", 1, 32.0, {}),
        ("S09", "B1", 3, 16.0, {}),
        ("S10", "B1", 1, 32.0, {"two": True, "max_current_amperes": 32.0}),
        ("S11", GRID_NODE_ID, 3, 32.0, {}),
    ]
    stations = []
    for index, (station_id, circuit, phases, maximum, extra) in enumerate(rows):
        station: dict[str, Any] = {
            "station_id": station_id,
            "circuit_id": circuit,
            "phases": phases,
            "phase_rotation": ROTATIONS[index % 6],
            "evse_min_current_amperes": 6.0,
            "evse_max_current_amperes": maximum,
        }
        if extra.pop("two", False):
            station["evses"] = [{"evse_id": 1}, {"evse_id": 2, "max_current_amperes": 16.0}]
        stations.append(station | extra)
    return SiteConfig.model_validate(
        {
            "nominal_voltage_volts": VOLTAGE,
            "grid": {"max_current_amperes": 150.0, "max_power_watts": 90_000.0},
            "circuits": [
                {"circuit_id": "A", "max_current_amperes": 70.0},
                {"circuit_id": "B", "max_current_amperes": 50.0, "max_power_watts": 25_000.0},
                {"circuit_id": "B1", "parent_id": "B", "max_current_amperes": 48.0},
            ],
            "stations": stations,
            "policy": {
                "rotation_period_s": 300.0,
                "underdraw_grace_s": UNDERDRAW_GRACE_S,
                "underdraw_headroom_amperes": UNDERDRAW_HEADROOM_AMPERES,
            },
        }
    )


# --- the CSMS's scheduled site limit -----------------------------------------------------------------


class Schedule:
    """The grid limit as periods starting at whole seconds (a CSMS profile with future periods)."""

    def __init__(self) -> None:
        self.starts: list[float] = [0.0]
        self.limits: list[SiteLimits] = [SiteLimits()]

    def at(self, now_s: float) -> SiteLimits:
        return self.limits[bisect.bisect_right(self.starts, now_s) - 1]

    def limits_at(self, wall: datetime) -> SiteLimits:
        return self.at(seconds_of(wall))

    def next_change(self, wall: datetime) -> datetime | None:
        index = bisect.bisect_right(self.starts, seconds_of(wall))
        return wall_at(self.starts[index]) if index < len(self.starts) else None

    def lowest(self, start_s: float, end_s: float) -> SiteLimits:
        found = self.at(start_s)
        for at_s, limits in zip(self.starts, self.limits, strict=True):
            if start_s < at_s <= end_s:
                found = found.tighter(limits)
        return found

    def drops_in(self, start_s: float, end_s: float) -> list[float]:
        """The instants in ``[start_s, end_s]`` where the limit drops somewhere (a phase or power)."""
        return [
            self.starts[i]
            for i in range(1, len(self.starts))
            if start_s <= self.starts[i] <= end_s
            and any(a < b for a, b in zip(vector(self.limits[i]), vector(self.limits[i - 1]), strict=True))
        ]

    def add(self, at_s: float, limits: SiteLimits) -> None:
        index = bisect.bisect_right(self.starts, at_s)
        if self.starts[index - 1] == at_s:
            self.limits[index - 1] = limits
        else:
            self.starts.insert(index, at_s)
            self.limits.insert(index, limits)


def vector(limits: SiteLimits) -> tuple[float, float, float, float]:
    phases = limits.phase_current_amperes or (math.inf, math.inf, math.inf)
    return (*phases, math.inf if limits.power_watts is None else limits.power_watts / VOLTAGE)


# --- the physical stations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    limit_amperes: float
    phases: int | None
    valid_to_s: float
    transaction_id: str | None = None


@dataclass
class Ev:
    max_amperes: float
    phases: int


@dataclass
class SimEvse:
    evse_id: int
    max_amperes: float
    min_amperes: float
    default: Installed | None = None
    tx: Installed | None = None
    transaction_id: str | None = None
    ev: Ev | None = None
    reported_phases: int | None = None
    overdrawing: bool = False  # its EV draws its maximum whatever the profile says
    #: While overdrawing: since when it is above its limit by more than the margin (None: it is not).
    visible_since_s: float | None = None
    priority: int = 0
    trusted: bool = False  # the controller's view as the stations see it (for the waiting rule only)
    waiting_since_s: float | None = None

    def governing(self, now_s: float) -> Installed | None:
        tx = self.tx
        if tx is not None and tx.transaction_id == self.transaction_id and now_s < tx.valid_to_s:
            return tx
        default = self.default
        return default if default is not None and now_s < default.valid_to_s else None

    def limit_amperes(self, now_s: float) -> float:
        found = self.governing(now_s)
        return self.max_amperes if found is None else min(found.limit_amperes, self.max_amperes)

    def phases_used(self, station_phases: int, now_s: float) -> int:
        found = self.governing(now_s)
        allowed = 3 if found is None or found.phases is None else found.phases
        return 0 if self.ev is None else min(self.ev.phases, station_phases, allowed)

    def update_overdraw(self, now_s: float, *, down: bool = False, restarted: bool = False) -> None:
        """Open the window of an overdraw the controller can see: above the limit by more than the margin.
        While the controller is down nothing can be compensated (the window stays open, ``inf``); a new
        controller knows nothing of it: the window opens again once its stations are back."""
        above = self.overdrawing and self.draw_amperes(now_s) > self.limit_amperes(now_s) + MARGIN_AMPERES
        if not above:
            self.visible_since_s = None
        elif down:
            self.visible_since_s = math.inf
        elif restarted:
            self.visible_since_s = now_s + RECONNECT_MAX_S
        elif self.visible_since_s is None:
            self.visible_since_s = now_s

    def excused(self, now_s: float) -> bool:
        """Whether its overdraw is one the controller cannot have compensated yet: within the margin (the
        overdraw policy tolerates that much) or inside its window."""
        since = self.visible_since_s
        return self.overdrawing and (since is None or since == math.inf or now_s <= since + OVERDRAW_WINDOW_S)

    def draw_amperes(self, now_s: float, compliant: bool = False) -> float:
        """What its EV draws per phase (``compliant``: an excused overdraw at the limit instead)."""
        if self.ev is None:
            return 0.0
        if self.overdrawing and not (compliant and self.excused(now_s)):
            return min(self.ev.max_amperes, self.max_amperes)
        return min(self.ev.max_amperes, self.limit_amperes(now_s))


@dataclass(eq=False)
class Frame:
    payload: dict[str, Any]
    sent_at_s: float
    done: trio.Event = field(default_factory=trio.Event)
    answer: dict[str, Any] | None = None
    gone: bool = False  # the link dropped: no answer will come
    lost: bool = False  # ...and it never arrived
    arrives_at_s: float = math.inf

    def order(self) -> tuple[float, int, str]:
        return (self.sent_at_s, int(self.payload["evseId"]), str(self.payload["chargingProfile"]["id"]))


@dataclass(eq=False)
class SimStation:
    config: StationConfig
    evses: dict[int, SimEvse]
    nodes: list[str]
    rng: random.Random
    meter_in_tx: bool
    connected: bool = False
    fault: str | None = None
    healthy_from_s: float = 0.0
    queue: list[Frame] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)
    current: Frame | None = None
    seq_no: int = 0
    transactions: int = 0

    @property
    def station_id(self) -> str:
        return self.config.station_id

    def grid_phases(self, count: int) -> tuple[int, ...]:
        """Written out from the wiring (station Lk -> the k-th letter of its rotation), not the site model."""
        return self.wiring[count]

    def __post_init__(self) -> None:
        rotation = self.config.phase_rotation
        self.wiring = [tuple("RST".index(letter) for letter in rotation[:count]) for count in range(4)]


class Fleet:
    """Stations, schedule, the controller's incarnations, the Caller and the checks."""

    def __init__(self, site: SiteConfig, seed: int, state_dir: Path, nursery: trio.Nursery) -> None:
        self.site, self.seed, self.state_dir, self.nursery = site, seed, state_dir, nursery
        self.schedule = Schedule()
        self.stations: dict[str, SimStation] = {}
        parents = {c.circuit_id: c.parent_id for c in site.circuits}
        for index, config in enumerate(site.stations):
            path = [config.circuit_id]
            while path[-1] != GRID_NODE_ID:
                path.append(parents[path[-1]] or GRID_NODE_ID)
            ids = [evse.evse_id for evse in config.evses] or [1]
            self.stations[config.station_id] = SimStation(
                config,
                {i: SimEvse(i, config.evse_range_amperes(i)[1], config.evse_range_amperes(i)[0]) for i in ids},
                ["station:" + config.station_id, *path],
                random.Random(f"{seed}-{config.station_id}"),
                meter_in_tx=index % 2 == 0,
            )
        self.balancer: Balancer | None = None
        self.registry = CollectorRegistry()
        self.scope: trio.CancelScope | None = None
        self.closed = trio.Event()
        self.up_since_s = 0.0
        self.settings = LoopSettings(
            recompute_interval_s=30.0,
            rollout=RolloutPolicy(
                hysteresis_amperes=1.0,
                min_interval_s=MIN_INTERVAL_S,
                resolution_amperes=0.1,
                idle_current_amperes=IDLE_AMPERES,
            ),
            profile_validity_s=VALIDITY_S,
            decrease_lead_s=LEAD_S,
            overdraw=OverdrawPolicy(margin_amperes=MARGIN_AMPERES, grace_s=GRACE_S),
        )
        self.stats: dict[str, int] = {}
        self.checks = 0
        self.excused = 0
        self.max_excused_after_s = 0.0
        self.max_wait_s = 0.0
        self.wait_checks = 0
        self.peak_grid_amperes = 0.0
        self.overdraws_detected = 0.0
        self._validations: dict[str, int] = {}
        self._configured: dict[tuple[str, int], float] = {}

    def count(self, kind: str, amount: int = 1) -> None:
        self.stats[kind] = self.stats.get(kind, 0) + amount

    def validate(self, action: str, payload: dict[str, Any], *, result: bool = False) -> None:
        """Schema-check what both sides write: the first 50 of each kind and every 50th after (cost)."""
        label = action + (" result" if result else "")
        seen = self._validations[label] = self._validations.get(label, 0) + 1
        if seen <= 50 or seen % 50 == 0:
            (validate_result if result else validate_call)(action, payload)

    # --- the controller: start, crash -----------------------------------------------------------

    async def incarnation(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One life of the controller: a Balancer on the store, until its scope is cancelled (a crash)."""
        self.closed = trio.Event()
        try:
            with Store.open(self.state_dir) as store:
                registry = self.registry = CollectorRegistry()
                balancer = Balancer(
                    self.site,
                    self.schedule.limits_at,
                    self.call,
                    self.settings,
                    next_limit_change=self.schedule.next_change,
                    wall_clock=lambda: wall_at(trio.current_time()),
                    registry=registry,
                    state=store.namespace("balancing"),
                )
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(balancer.run)
                        self.balancer, self.scope, self.up_since_s = balancer, scope, trio.current_time()
                        task_status.started()
                        await trio.sleep_forever()
                detected = registry.get_sample_value("ocpp_lc_balancing_overdraws_total")
                self.overdraws_detected += detected or 0.0
        finally:
            self.closed.set()

    def finish(self) -> None:
        if self.balancer is not None:
            self.overdraws_detected += self.registry.get_sample_value("ocpp_lc_balancing_overdraws_total") or 0.0

    def crash(self) -> None:
        """Kill the controller now: its tasks are cancelled, every link drops (see :meth:`drop_link`)."""
        assert self.balancer is not None and self.scope is not None
        self.count("crash")
        self.count("crash_mid_rollout", any(s.current or s.queue for s in self.stations.values()))
        self.balancer, scope, self.scope = None, self.scope, None
        scope.cancel()
        now_s = trio.current_time()
        for station in self.stations.values():
            self.drop_link(station)
            for evse in station.evses.values():
                evse.trusted = False
                evse.update_overdraw(now_s, down=True)
        self.check(now_s)

    async def restart(self, after_s: float) -> None:
        await trio.sleep(after_s)
        await self.closed.wait()
        await self.nursery.start(self.incarnation)
        self.count("restart")
        now_s = trio.current_time()
        for station in self.stations.values():
            for evse in station.evses.values():
                evse.update_overdraw(now_s, restarted=True)  # the new controller knows nothing of it
            if station.fault != "offline":
                self.nursery.start_soon(self.reconnect_later, station, station.rng.uniform(0.5, RECONNECT_MAX_S))

    async def reconnect_later(self, station: SimStation, after_s: float) -> None:
        await trio.sleep(after_s)
        if self.balancer is not None and not station.connected and station.fault != "offline":
            self.connect(station)

    # --- links --------------------------------------------------------------------------------

    def connect(self, station: SimStation) -> None:
        balancer = self.balancer
        assert balancer is not None
        station.connected = True
        balancer.station_connected(station.station_id)
        for evse in station.evses.values():
            status = "Available" if evse.ev is None else "Occupied"
            payload = {
                "timestamp": wall_at(trio.current_time()).isoformat(),
                "connectorStatus": status,
                "evseId": evse.evse_id,
                "connectorId": 1,
            }
            self.send(station, "StatusNotification", payload)
        self.report_phases(station, trio.current_time())  # what changed while it was away (queued events)

    def drop_link(self, station: SimStation) -> None:
        """The link drops: calls waiting in the controller's queue are gone; the frame on the wire arrives
        (applied, never answered) or not, at random."""
        if station.connected and self.balancer is not None:
            self.balancer.station_disconnected(station.station_id)
        station.connected = False
        for frame in station.queue:
            frame.gone = frame.lost = True
            frame.done.set()
        station.queue.clear()
        frame = station.current
        if frame is not None:
            on_the_wire = not frame.gone and trio.current_time() < frame.arrives_at_s
            frame.gone = True
            frame.lost = frame.lost or station.rng.random() < 0.5
            frame.done.set()
            if on_the_wire:
                self.count("cut_frame_lost" if frame.lost else "cut_frame_arrives")

    def send(self, station: SimStation, action: str, payload: dict[str, Any]) -> None:
        self.validate(action, payload)
        if self.balancer is not None and station.connected:
            self.balancer.station_call(station.station_id, action, payload)

    def transaction_event(self, station: SimStation, evse: SimEvse, event_type: str, **extra: Any) -> dict[str, Any]:
        assert evse.transaction_id is not None
        station.seq_no += 1
        reason = {"Started": "CablePluggedIn", "Ended": "EVDeparted"}.get(event_type, "ChargingStateChanged")
        payload: dict[str, Any] = {
            "eventType": event_type,
            "timestamp": wall_at(trio.current_time()).isoformat(),
            "triggerReason": extra.pop("trigger", reason),
            "seqNo": station.seq_no,
            "transactionInfo": {
                "transactionId": evse.transaction_id,
                "chargingState": "Idle" if event_type == "Ended" else "Charging",
            },
            "evse": {"id": evse.evse_id, "connectorId": 1},
            **extra,
        }
        self.send(station, "TransactionEvent", payload)
        return payload

    def report_phases(self, station: SimStation, now_s: float) -> None:
        """A station reports a change of the phases its EVs use at once (numberOfPhasesUsed)."""
        for evse in station.evses.values():
            used = evse.phases_used(station.config.phases, now_s)
            if evse.ev is not None and used != evse.reported_phases and station.connected and self.balancer:
                evse.reported_phases = used
                self.transaction_event(station, evse, "Updated", numberOfPhasesUsed=used)
                self.count("phases_reported")

    async def meter(self, station: SimStation) -> None:
        await trio.sleep(station.rng.uniform(0.0, METER_INTERVAL_S))
        while True:
            now_s = trio.current_time()
            for evse in station.evses.values():
                if evse.ev is None or not station.connected or self.balancer is None:
                    continue
                draw = evse.draw_amperes(now_s)
                samples = [
                    {"value": draw, "measurand": "Current.Import", "phase": f"L{k + 1}", "unitOfMeasure": {"unit": "A"}}
                    for k in range(evse.phases_used(station.config.phases, now_s))
                ]
                meter = [{"timestamp": wall_at(now_s).isoformat(), "sampledValue": samples}]
                if station.meter_in_tx:
                    self.transaction_event(station, evse, "Updated", trigger="MeterValuePeriodic", meterValue=meter)
                else:
                    self.send(station, "MeterValues", {"evseId": evse.evse_id, "meterValue": meter})
            await trio.sleep(METER_INTERVAL_S)  # a sample changes no current: nothing to check

    # --- the Caller and the stations answering ---------------------------------------------------

    async def call(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        assert action == "SetChargingProfile"
        self.validate(action, payload)
        station = self.stations[station_id]
        if not station.connected:
            return CallOutcome("gone", detail="not connected")
        frame = Frame(payload, trio.current_time())
        station.queue.append(frame)
        station.arrived.set()
        with trio.move_on_after(CALL_TIMEOUT_S):
            await frame.done.wait()
        if frame in station.queue:
            station.queue.remove(frame)  # its turn did not come in time: never sent
        evse = station.evses[int(payload["evseId"])]
        if not frame.done.is_set():
            self.count("timeout")
            evse.trusted = False
            return CallOutcome("timeout", detail="no answer in time")
        if frame.gone or frame.answer is None:
            evse.trusted = False
            return CallOutcome("gone", detail="link closed")
        self.validate(action, frame.answer, result=True)
        evse.trusted = frame.answer["status"] == "Accepted"
        return CallOutcome("answered", frame.answer)

    async def serve(self, station: SimStation) -> None:
        rng = station.rng
        while True:
            if not station.queue:
                station.arrived = trio.Event()
                await station.arrived.wait()
                continue
            frame = min(station.queue, key=Frame.order)
            station.queue.remove(frame)
            station.current = frame
            fault = station.fault
            lost_answer = fault == "flaky" and rng.random() < 0.3
            late = fault == "flaky" and rng.random() < 0.3
            frame.arrives_at_s = trio.current_time() + rng.uniform(0.05, HOP_MAX_S)
            await trio.sleep_until(frame.arrives_at_s)
            if frame.lost or station.fault == "ignoring":
                self.count("lost_in_transit" if frame.lost else "ignored")
                station.current = None
                continue
            answer = self.apply(station, frame)
            if frame.gone or lost_answer:
                self.count("applied_unanswered")
                station.current = None
                continue
            back_s = CALL_TIMEOUT_S + rng.uniform(0.5, 3.0) if late else rng.uniform(0.05, HOP_MAX_S)
            await trio.sleep(back_s)
            station.current = None
            if not frame.gone:
                self.count("late", late)
                frame.answer = answer
                frame.done.set()

    def apply(self, station: SimStation, frame: Frame) -> dict[str, Any]:
        profile = frame.payload["chargingProfile"]
        (schedule,) = profile["chargingSchedule"]
        (period,) = schedule["chargingSchedulePeriod"]
        assert schedule["chargingRateUnit"] == "A" and profile["chargingProfileKind"] == "Relative"
        evse = station.evses[int(frame.payload["evseId"])]
        if station.fault == "rejecting":
            self.count("rejected")
            return {"status": "Rejected"}
        purpose = profile["chargingProfilePurpose"]
        if purpose == "TxProfile" and profile.get("transactionId") != evse.transaction_id:
            self.count("stale_tx")  # K01.FR.09
            return {"status": "Rejected", "statusInfo": {"reasonCode": "TxNotFound"}}
        valid_to_s = seconds_of(datetime.fromisoformat(profile["validTo"].replace("Z", "+00:00")))
        now_s = trio.current_time()
        assert valid_to_s > frame.sent_at_s + VALIDITY_S - 1, "a profile of ours with a short validity"
        installed = Installed(
            float(period["limit"]), period.get("numberPhases"), valid_to_s, profile.get("transactionId")
        )
        if purpose == "TxProfile":
            evse.tx = installed
        else:
            evse.default = installed
        self.count("accepted")
        self.nursery.start_soon(self.lapse_at, station, evse, installed)
        evse.update_overdraw(now_s, down=self.balancer is None)
        self.report_phases(station, now_s)
        self.check(now_s)
        return {"status": "Accepted"}

    async def check_at(self, at_s: float) -> None:
        await trio.sleep_until(at_s)
        self.check(at_s)

    async def lapse_at(self, station: SimStation, evse: SimEvse, installed: Installed) -> None:
        """At its validTo the station stops applying a profile: if it still mattered, that is a lapse."""
        await trio.sleep_until(installed.valid_to_s)
        now_s = trio.current_time()
        if evse.default is installed or (evse.tx is installed and evse.transaction_id == installed.transaction_id):
            self.count("lapsed")
        evse.update_overdraw(now_s, down=self.balancer is None)
        self.report_phases(station, now_s)
        self.check(now_s)

    # --- the checks ---------------------------------------------------------------------------------

    def capacity(self, node: str, index: int, grid: tuple[float, float, float, float]) -> float:
        value = self._configured.get((node, index))
        if value is None:
            limits: Any = self.site.station(node[8:]) if node.startswith("station:") else self.site.node_limits(node)
            if index < 3:
                value = math.inf if limits.max_current_amperes is None else limits.max_current_amperes
            else:
                value = math.inf if limits.max_power_watts is None else limits.max_power_watts / VOLTAGE
            self._configured[(node, index)] = value
        return min(value, grid[index]) if node == GRID_NODE_ID else value

    def sums(self, now_s: float, compliant: bool = False) -> dict[str, list[float]]:
        """Physical amperes per node and grid phase (``compliant``: overdrawing EVSEs at their limit)."""
        found: dict[str, list[float]] = {}
        for station in self.stations.values():
            for evse in station.evses.values():
                amperes = evse.draw_amperes(now_s, compliant)
                if amperes <= 0:
                    continue
                phases = station.grid_phases(evse.phases_used(station.config.phases, now_s))
                for node in station.nodes:
                    per_phase = found.setdefault(node, [0.0, 0.0, 0.0])
                    for phase in phases:
                        per_phase[phase] += amperes
        return found

    def check(self, now_s: float) -> None:
        self.checks += 1
        grid = vector(self.schedule.at(now_s))
        sums = self.sums(now_s)
        compliant: dict[str, list[float]] | None = None
        for node, per_phase in sums.items():
            for index in range(4):
                drawn = per_phase[index] if index < 3 else sum(per_phase)
                limit = self.capacity(node, index, grid)
                if drawn <= limit + TOLERANCE_AMPERES:
                    continue
                windows = [
                    (station.station_id, evse.evse_id, evse.visible_since_s)
                    for station in self.stations.values()
                    if node in station.nodes
                    for evse in station.evses.values()
                    if evse.excused(now_s)
                ]
                compliant = compliant or self.sums(now_s, compliant=True)
                fair = compliant.get(node, [0.0] * 3)
                fair_drawn = fair[index] if index < 3 else sum(fair)
                what = f"L{index + 1}" if index < 3 else "power"
                assert windows and fair_drawn <= limit + TOLERANCE_AMPERES, (
                    f"seed {self.seed} t={now_s:.3f}s {node} {what} draws {drawn:.2f} A over its limit "
                    f"{limit:.2f} A (without overdraw {fair_drawn:.2f} A; overdraw windows {windows}); "
                    f"{self.describe(node, now_s)}"
                )
                self.excused += 1
                for _, _, since in windows:
                    if since is not None and since != math.inf:
                        self.max_excused_after_s = max(self.max_excused_after_s, now_s - since)
        self.peak_grid_amperes = max(self.peak_grid_amperes, *sums.get(GRID_NODE_ID, [0.0]))
        self.check_waiting(now_s)

    def describe(self, node: str, now_s: float) -> str:
        parts = []
        for station in self.stations.values():
            if node in station.nodes:
                for evse in station.evses.values():
                    if evse.ev is not None:
                        parts.append(
                            f"{station.station_id}/{evse.evse_id} fault={station.fault} draws "
                            f"{evse.draw_amperes(now_s):.1f} A x{evse.phases_used(station.config.phases, now_s)}"
                            f" (limit {evse.limit_amperes(now_s):.1f}, governing {evse.governing(now_s)})"
                        )
        return "; ".join(parts)

    @staticmethod
    def add_load(
        load: dict[tuple[str, int], float], station: SimStation, phases: tuple[int, ...], amperes: float
    ) -> None:
        for node in station.nodes:
            for phase in phases:
                load[(node, phase)] = load.get((node, phase), 0.0) + amperes
            load[(node, 3)] = load.get((node, 3), 0.0) + amperes * len(phases)

    @staticmethod
    def demand_amperes(evse: SimEvse) -> float:
        assert evse.ev is not None
        return max(evse.min_amperes, min(evse.max_amperes, evse.ev.max_amperes + UNDERDRAW_HEADROOM_AMPERES))

    def check_waiting(self, now_s: float) -> None:
        """No session at a healthy station waits for current beyond WAIT_LIMIT_S while its minimum fits."""
        if self.balancer is None:
            for station in self.stations.values():
                for evse in station.evses.values():
                    evse.waiting_since_s = None
            return
        grid = vector(self.schedule.lowest(now_s, now_s + LEAD_S))
        waiting = [
            (station, evse)
            for station in self.stations.values()
            if station.connected and station.fault is None
            for evse in station.evses.values()
            if evse.ev is not None and evse.trusted and evse.limit_amperes(now_s) == 0
        ]
        waiting_ids = {id(evse) for _, evse in waiting}
        for station in self.stations.values():
            for evse in station.evses.values():
                if id(evse) not in waiting_ids:
                    evse.waiting_since_s = None
        if not waiting:
            return
        # Capacity exists for its minimum when it fits beside every other session at what that one would
        # take (its EV's own maximum plus the underdraw headroom, once the allocator has seen it draw less:
        # K03.FR.04 serves a higher chargingPriority up to that, whatever the lower ones get) and every EVSE
        # the controller cannot trust at its maximum.
        load: dict[tuple[str, int], float] = {}
        for station in self.stations.values():
            phases = station.grid_phases(station.config.phases)
            for evse in station.evses.values():
                if not evse.trusted or station.fault is not None or evse.overdrawing:
                    self.add_load(load, station, phases, evse.max_amperes)
                elif id(evse) in waiting_ids:
                    self.add_load(load, station, phases, evse.min_amperes)  # every waiting one at its minimum
                elif evse.ev is not None:
                    self.add_load(load, station, phases, self.demand_amperes(evse))
        for station, evse in waiting:
            phases = station.grid_phases(station.config.phases)
            fits = all(
                load.get((node, index), 0.0) <= self.capacity(node, index, grid) + TOLERANCE_AMPERES
                for node in station.nodes
                for index in (*phases, 3)
            )
            if not fits:
                evse.waiting_since_s = None
                continue
            self.wait_checks += 1
            if evse.waiting_since_s is None:
                evse.waiting_since_s = now_s
                # The condition changes only where check() runs; a check at the deadline makes it exact.
                self.nursery.start_soon(self.check_at, now_s + WAIT_LIMIT_S + 1e-3)
            waited_s = now_s - evse.waiting_since_s
            self.max_wait_s = max(self.max_wait_s, waited_s)
            assert waited_s <= WAIT_LIMIT_S, (
                f"seed {self.seed} t={now_s:.3f}s {station.station_id}/{evse.evse_id} has waited "
                f"{waited_s:.1f} s at 0 A though its minimum fits"
            )


# --- the driver ---------------------------------------------------------------------------------------


class Driver:
    """``EVENTS`` random events at random instants (mean gap ``MEAN_GAP_S``), from one seeded stream."""

    def __init__(self, fleet: Fleet, seed: int) -> None:
        self.fleet = fleet
        self.rng = random.Random(seed)
        self.crash_pending = False
        self.done = False  # the events are over: no more crashes (the settling at the end is checked)

    async def run(self, events: int) -> None:
        fleet = self.fleet
        for _ in range(events):
            await trio.sleep(self.rng.expovariate(1 / MEAN_GAP_S))
            fleet.count(self.event(trio.current_time()))
            fleet.check(trio.current_time())

    def faulty(self) -> list[SimStation]:
        return [s for s in self.fleet.stations.values() if s.fault is not None]

    def event(self, now_s: float) -> str:
        fleet, rng = self.fleet, self.rng
        roll = rng.random()
        up = fleet.balancer is not None
        connected = [s for s in fleet.stations.values() if s.connected]
        idle = [(s, e) for s in connected for e in s.evses.values() if e.ev is None]
        busy = [(s, e) for s in connected for e in s.evses.values() if e.ev is not None]
        if roll < 0.25:
            return self.arrival(rng.choice(idle)) if idle else "no_idle_evse"
        if roll < 0.43:
            return self.departure(*rng.choice(busy)) if busy else "no_session"
        if roll < 0.53:
            if not busy:
                return "no_session"
            station, evse = rng.choice(busy)
            assert evse.ev is not None
            evse.ev.phases = 4 - evse.ev.phases  # 1 <-> 3
            fleet.report_phases(station, now_s)
            return "ev_phase_change"
        if roll < 0.62:
            return self.schedule_change(now_s) if up else "csms_unreachable"
        if roll < 0.76:
            return self.fault_starts(now_s) if up else "no_fault_while_down"
        if roll < 0.83:
            if not up or self.crash_pending:
                return "crash_not_drawn"
            self.crash_pending = True
            fleet.nursery.start_soon(self.crash_soon, rng.uniform(0.0, 1.5), rng.uniform(1.0, DOWN_MAX_S))
            return "crash_drawn"
        if not busy:
            return "no_session"
        station, evse = rng.choice(busy)  # an Updated without news (the loop must not be disturbed)
        fleet.transaction_event(station, evse, "Updated", numberOfPhasesUsed=evse.reported_phases or 1)
        return "tx_updated"

    async def crash_soon(self, after_s: float, down_s: float) -> None:
        """Crash after ``after_s`` (often while the profiles the last event caused are on their way), or
        just after the scheduled drops that would fall into the outage: a controller that is down cannot
        lower anything, so no drop may come before it is back, its stations reconnected, and a lead."""
        fleet = self.fleet
        await trio.sleep(after_s)
        for _ in range(10):
            now_s = trio.current_time()
            outage_s = down_s + RECONNECT_MAX_S + LEAD_S + 10.0
            drops = fleet.schedule.drops_in(now_s, now_s + outage_s)
            if not drops:
                break
            fleet.count("crash_deferred")
            await trio.sleep_until(drops[-1] + 0.5)
        self.crash_pending = False
        if fleet.balancer is not None and not drops and not self.done:
            fleet.crash()
            await fleet.restart(down_s)

    def arrival(self, found: tuple[SimStation, SimEvse]) -> str:
        fleet, rng = self.fleet, self.rng
        station, evse = found
        now_s = trio.current_time()
        station.transactions += 1
        evse.priority = 0
        evse.ev = Ev(max_amperes=rng.choice([10.0, 16.0, 32.0, 32.0]), phases=3 if rng.random() < 0.6 else 1)
        evse.transaction_id = f"{station.station_id}-{evse.evse_id}-{station.transactions}"
        fleet.check(now_s)  # it draws what the TxDefaultProfile allows before the controller hears of it
        used = evse.phases_used(station.config.phases, now_s)
        evse.reported_phases = used if rng.random() < 0.9 else None
        extra = {} if evse.reported_phases is None else {"numberOfPhasesUsed": used}
        request = fleet.transaction_event(station, evse, "Started", **extra)
        if rng.random() < 0.3 and fleet.balancer is not None:
            evse.priority = rng.randint(-9, 9)
            answer = {"idTokenInfo": {"status": "Accepted"}, "chargingPriority": evse.priority}
            fleet.balancer.csms_answer(station.station_id, "TransactionEvent", answer, request)
            return "arrival_with_priority"
        return "arrival"

    def departure(self, station: SimStation, evse: SimEvse) -> str:
        self.fleet.transaction_event(station, evse, "Ended")
        evse.ev = None
        evse.transaction_id = None
        evse.reported_phases = None
        evse.overdrawing = False
        evse.visible_since_s = None
        return "departure"

    def schedule_change(self, now_s: float) -> str:
        """The CSMS adds a period to the site limit, at least the lead ahead (also of a restart)."""
        fleet, rng = self.fleet, self.rng
        earliest = max(now_s, fleet.up_since_s + RECONNECT_MAX_S) + LEAD_S + 5.0
        at_s = float(math.ceil(earliest + rng.uniform(0.0, 240.0)))
        choice = rng.random()
        if choice < 0.15:
            limits, kind = SiteLimits(), "schedule_release"
        elif choice < 0.35:
            phases = tuple(rng.uniform(GRID_FLOOR_AMPERES, 150.0) for _ in range(3))
            limits, kind = SiteLimits(phase_current_amperes=phases), "schedule_per_phase"  # type: ignore[arg-type]
        elif choice < 0.5:
            limits, kind = SiteLimits(power_watts=rng.uniform(POWER_FLOOR_WATTS, 90_000.0)), "schedule_power"
        else:
            limits, kind = SiteLimits.uniform(current_amperes=rng.uniform(GRID_FLOOR_AMPERES, 150.0)), "schedule"
        fleet.schedule.add(at_s, limits)
        fleet.nursery.start_soon(self.check_at, at_s)
        assert fleet.balancer is not None
        fleet.balancer.wake()  # the router wakes the loop when the CSMS sets a limit
        return kind

    async def check_at(self, at_s: float) -> None:
        await trio.sleep_until(at_s)
        self.fleet.count("schedule_instants")
        self.fleet.check(at_s)

    def fault_starts(self, now_s: float) -> str:
        fleet, rng = self.fleet, self.rng
        if len(self.faulty()) >= MAX_FAULTY:
            return "fault_budget_full"
        kind = rng.choice(FAULTS)
        candidates = [
            s
            for s in fleet.stations.values()
            if s.fault is None and s.connected and now_s >= s.healthy_from_s + COOLDOWN_S
        ]
        overdrawing: list[SimEvse] = []
        if kind == "overdraw":
            # One EV well above what its EVSE accepted, at a station whose own limits its maximum fits.
            overdrawing = [
                e
                for s in candidates
                if s.config.max_power_watts is None
                for e in s.evses.values()
                if e.ev and e.draw_amperes(now_s) + MARGIN_AMPERES + 1 < min(e.ev.max_amperes, e.max_amperes)
            ]
            candidates = [s for s in candidates if any(e in s.evses.values() for e in overdrawing)]
        if not candidates:
            return "fault_no_candidate"
        station = rng.choice(candidates)
        station.fault = kind
        low, high = FAULT_SPAN_S[kind]
        if kind == "offline":
            fleet.drop_link(station)
        if kind == "overdraw":
            evse = rng.choice([e for e in overdrawing if e in station.evses.values()])
            evse.overdrawing = True
            evse.update_overdraw(now_s)
        fleet.nursery.start_soon(self.fault_ends, station, rng.uniform(low, high))
        fleet.check(now_s)
        return "fault_" + kind

    async def fault_ends(self, station: SimStation, after_s: float) -> None:
        await trio.sleep(after_s)
        fleet = self.fleet
        kind, station.fault = station.fault, None
        station.healthy_from_s = trio.current_time()
        for evse in station.evses.values():
            evse.overdrawing = False
            evse.visible_since_s = None
        if kind == "offline" and fleet.balancer is not None:
            fleet.connect(station)
        fleet.check(trio.current_time())


async def run_seed(seed: int, state_dir: Path, events: int = EVENTS) -> Fleet:
    # Virtual seconds (about 3,500 are used): a loop that deadlocks fails here instead of hanging.
    with trio.fail_after(86_400):
        async with trio.open_nursery() as nursery:
            fleet = Fleet(faults_site(), seed, state_dir, nursery)
            for station in fleet.stations.values():
                nursery.start_soon(fleet.serve, station)
                nursery.start_soon(fleet.meter, station)
            await nursery.start(fleet.incarnation)
            for station in fleet.stations.values():
                fleet.connect(station)
            await trio.sleep(60.0)  # boot: the controller installs its TxDefaultProfiles
            driver = Driver(fleet, seed)
            await driver.run(events)
            driver.done = True
            await trio.sleep(WAIT_LIMIT_S + 10.0)  # whatever was drawn last settles, still checked
            fleet.check(trio.current_time())
            fleet.finish()
            nursery.cancel_scope.cancel()
    return fleet


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_faulty_fleet_stays_within_its_limits_and_is_served(
    seed: int, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # The properties are asserted inside the run, at every instant they could break (module docstring).
    fleet = await run_seed(seed, tmp_path)
    stats = fleet.stats
    print(
        f"seed {seed}: {dict(sorted(stats.items()))} excused={fleet.excused} "
        f"longest_excused={fleet.max_excused_after_s:.1f} wait_checks={fleet.wait_checks} "
        f"max_wait={fleet.max_wait_s:.1f} overdraws_detected={fleet.overdraws_detected:.0f}"
    )
    assert stats.get("lapsed", 0) == 0, "a profile of ours lapsed at a station: not renewed in time"
    assert stats["crash"] >= 3 and stats["restart"] == stats["crash"]
    assert stats["accepted"] > EVENTS and stats["rejected"] + stats["ignored"] + stats["timeout"] > 0
    assert fleet.checks > 2 * EVENTS
    assert fleet.peak_grid_amperes > 60.0  # it charged, rather than staying safe by doing nothing


# --- what the simulation found ----------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True, reason="balancing defect: our TxDefaultProfile under a running TxProfile is not counted"
)
async def test_a_transaction_ending_leaves_no_default_above_what_the_station_may_draw(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Found by the fleet run (seeds 1 and 14 at 1,000 events: S06 at t = 3038 s, S00 at t = 844 s); the
    minimal case. CS1 (32 A station limit, two EVSEs, idle current 6 A): both idle get a TxDefaultProfile of
    6 A. TX-2 starts on EVSE 2, then TX-1 on EVSE 1 with chargingPriority 1, which takes the station's 32 A:
    EVSE 2's TxProfile goes to 0 A, but our TxDefaultProfile of 6 A stays under it (and is even renewed as
    it is). When TX-2 ends, the station applies that TxDefaultProfile at once (K01: a TxProfile ends with its
    transaction): 32 + 6 = 38 A may be drawn at a 32 A station until the decrease the loop sends only then
    is answered; an EV plugging in meanwhile draws it (what the fleet run saw). Expected: the default under
    a running transaction never allows more than the station could bear when it comes back into force."""
    site = SiteConfig.model_validate(
        {"stations": [{"station_id": "CS1", "max_current_amperes": 32.0, "evses": [{"evse_id": 1}, {"evse_id": 2}]}]}
    )
    fake = FakeStations(limit_amperes=100.0)
    settings = fault_loop_settings(idle_current_amperes=6.0, min_interval_s=0)
    balancer = Balancer(site, fake.limits_at, fake, settings, wall_clock=loop_wall_clock)
    async with running(balancer):
        balancer.station_connected("CS1")
        for evse_id in (1, 2):
            balancer.station_call("CS1", "StatusNotification", status_notification(evse_id))
        await settle()
        assert fake.installed[("CS1", 2)] == {"TxDefaultProfile": 6.0}
        balancer.station_call("CS1", "TransactionEvent", loop_transaction_event("Started", "TX-2", 2))
        await settle()
        started = loop_transaction_event("Started", "TX-1", 1)
        balancer.station_call("CS1", "TransactionEvent", started)
        balancer.csms_answer(
            "CS1", "TransactionEvent", {"idTokenInfo": {"status": "Accepted"}, "chargingPriority": 1}, started
        )
        await settle()
        assert fake.effective(("CS1", 1)) == 32.0 and fake.effective(("CS1", 2)) == 0.0
        # TX-2 ends: the station drops its TxProfile and applies what is left (K02.FR.05).
        fake.end_transaction(("CS1", 2))
        balancer.station_call("CS1", "TransactionEvent", loop_transaction_event("Ended", "TX-2", 2, seq_no=1))
        in_force = (fake.effective(("CS1", 1)) or 0.0) + (fake.effective(("CS1", 2)) or 0.0)
        assert in_force <= 32.0, f"CS1 may draw {in_force} A at once, over its 32 A limit"
