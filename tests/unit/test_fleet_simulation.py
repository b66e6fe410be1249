"""A fleet on trio's virtual clock never exceeds a limit while allocations roll out (issue 5, Done-when 3).

The fleet test runs 40 simulated stations (1- and 3-phase, every phase rotation, three sub-circuits, some
with two EVSEs and a station limit) against a controller task that does what the balancing loop will do:
on every event it allocates (:func:`balancing.allocator.allocate`) and applies the result through
:func:`balancing.rollout.plan`, sending decreases and awaiting their answers before increases. Each station
is its own task: it answers a SetChargingProfile after a random delay, and a few unreliable ones reject,
answer too late, or drop off the network. A station draws exactly what its installed limit allows (an EV
may draw less); a station that rejects keeps what it had (K01: a rejected profile changes nothing).

1,000 seeded random events (arrivals, departures, EMS limits raised, lowered, expiring to the failsafe and
released, stations starting and stopping to reject, disconnects and reconnects) drive it. Every time a draw
changes, and at every event, the sum of the actual draws is checked against every configured limit (grid,
sub-circuits, stations; per phase and power) — at every instant, strictly. An EMS limit that is *lowered*
cannot bind the stations before they have answered, so it is checked ``SETTLE_S`` (12 s: two call
timeouts) after the change; until then the limit in force before the change is never exceeded either.

Below the fleet, plain unit tests walk :func:`balancing.rollout.plan` step by step: decreases accepted
before increases, increases clipped to the headroom, the per-station rate limit (decreases exempt),
hysteresis, and stations that reject or do not answer treated at their maximum.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio
import trio.testing

from balancing.allocator import Allocation, EvseAllocation, EvseKey, Session, SiteLimits, allocate, turn_after
from balancing.rollout import RolloutPolicy, RolloutState, Step, plan
from balancing.site import GRID_NODE_ID, SiteConfig

SEED = 20251125
EVENTS = 1_000
CALL_TIMEOUT_S = 5.0
UNRELIABLE = 6  # stations S00..S05: reject sometimes, answer late sometimes, disconnect
# A lowered EMS limit binds the stations once they have answered: the call already in flight at that EVSE,
# then the decrease, each within one call timeout. (A rejection can need one more round in principle; this
# seeded run settles within one timeout, so two leave margin without hiding a slow rollout.)
SETTLE_S = 2 * (CALL_TIMEOUT_S + 1.0)
EMS_FLOOR_AMPERES = 120.0  # above what the unreliable stations can draw at their maximum (6 x 16 A)
EMS_FAILSAFE_AMPERES = 140.0
VOLTAGE = 230.0
ROTATIONS = ["RST", "RTS", "SRT", "STR", "TRS", "TSR"]
TOLERANCE_AMPERES = 1e-6
POLICY = RolloutPolicy(hysteresis_amperes=2.0, min_interval_s=30.0)


def fleet_site() -> SiteConfig:
    circuits = [
        {"circuit_id": "A", "max_current_amperes": 100.0},
        {"circuit_id": "B", "max_current_amperes": 80.0, "max_power_watts": 40_000.0},
        {"circuit_id": "B1", "parent_id": "B", "max_current_amperes": 40.0},
    ]
    stations = []
    for index in range(40):
        unreliable = index < UNRELIABLE
        station: dict[str, object] = {
            "station_id": f"S{index:02d}",
            "circuit_id": GRID_NODE_ID if unreliable else [GRID_NODE_ID, "A", "B", "B1"][index % 4],
            "phases": 1 if index % 3 == 0 else 3,
            "phase_rotation": ROTATIONS[index % 6],
            "evse_min_current_amperes": 6.0,
            "evse_max_current_amperes": 16.0 if unreliable else 32.0,
        }
        if not unreliable and index % 5 == 0:
            station["evses"] = [{"evse_id": 1}, {"evse_id": 2}]
            station["max_current_amperes"] = 40.0  # two EVSEs sharing one feed
        stations.append(station)
    return SiteConfig.model_validate(
        {
            "nominal_voltage_volts": VOLTAGE,
            "grid": {"max_current_amperes": 250.0, "max_power_watts": 150_000.0},
            "circuits": circuits,
            "stations": stations,
            "policy": {"rotation_period_s": 300.0},
        }
    )


def evse_ids(site: SiteConfig, station_id: str) -> list[int]:
    station = site.station(station_id)
    return [evse.evse_id for evse in station.evses] or [1]


# --- the physical fleet -------------------------------------------------------------------------------


@dataclass
class Ev:
    demand_amperes: float  # what the EV would take per phase if allowed (may be below the EVSE minimum)
    phases: int


@dataclass
class Call:
    step: Step
    answered: trio.Event = field(default_factory=trio.Event)
    accepted: bool = False


@dataclass
class SimStation:
    station_id: str
    unreliable: bool
    installed: dict[int, float]
    evs: dict[int, Ev] = field(default_factory=dict)
    connected: bool = True
    rejecting: bool = False


class Fleet:
    """The physical truth: installed limits, EVs and their draws; and the limits the site must keep."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self.stations = {
            station.station_id: SimStation(
                station.station_id,
                unreliable=int(station.station_id[1:]) < UNRELIABLE,
                installed=dict.fromkeys(evse_ids(site, station.station_id), 0.0),
            )
            for station in site.stations
        }
        self.ems: tuple[float, float | None] | None = None  # (amperes per phase, valid until)
        # (since, per-phase EMS amperes in force): enough history to know the highest limit in the window.
        self.ems_history: list[tuple[float, float]] = [(0.0, math.inf)]
        self.checks = 0
        self.peak_grid_amperes = 0.0
        self.stats = {"accepted": 0, "rejected": 0, "late": 0, "lost": 0}
        self.counts: dict[str, int] = {}
        self._wiring: dict[tuple[str, int], tuple[list[str], tuple[int, ...]]] = {}

    # Limits ---------------------------------------------------------------------------------------

    def ems_amperes(self, now_s: float) -> float:
        if self.ems is None:
            return math.inf
        amperes, valid_until_s = self.ems
        if valid_until_s is not None and now_s >= valid_until_s:
            return EMS_FAILSAFE_AMPERES
        return amperes

    def limits(self, now_s: float) -> SiteLimits:
        ems = self.ems_amperes(now_s)
        return SiteLimits() if math.isinf(ems) else SiteLimits.uniform(current_amperes=ems)

    def record_ems(self, now_s: float) -> None:
        self.ems_history.append((now_s, self.ems_amperes(now_s)))
        # Keep only what the settle window can still see: the entry in force at its start and later ones.
        while len(self.ems_history) > 1 and self.ems_history[1][0] <= now_s - SETTLE_S:
            self.ems_history.pop(0)

    def ems_checked_amperes(self, now_s: float) -> float:
        """The EMS limit to check now: a lowering binds once the rollout has had SETTLE_S to follow it."""
        return max(amperes for since, amperes in self.ems_history if since <= now_s)

    # Draws and the check ---------------------------------------------------------------------------

    def wiring(self, station_id: str, phases: int) -> tuple[list[str], tuple[int, ...]]:
        """The nodes a station hangs below and the grid phases an EV on ``phases`` phases loads there."""
        found = self._wiring.get((station_id, phases))
        if found is None:
            config = self.site.station(station_id)
            nodes = ["station:" + station_id, *self.site.circuit_path(config.circuit_id)]
            found = self._wiring[(station_id, phases)] = (nodes, config.grid_phases(phases))
        return found

    def draws(self) -> Iterable[tuple[list[str], tuple[int, ...], float]]:
        for station in self.stations.values():
            for evse_id, ev in station.evs.items():
                amperes = min(ev.demand_amperes, station.installed[evse_id])
                if amperes > 0:
                    yield (*self.wiring(station.station_id, ev.phases), amperes)

    def check(self, now_s: float) -> None:
        """Sum the actual draws per node, phase and power, and compare with every limit, written out here."""
        self.checks += 1
        per_phase: dict[str, list[float]] = {}
        for nodes, phases, amperes in self.draws():
            for node in nodes:
                sums = per_phase.setdefault(node, [0.0, 0.0, 0.0])
                for phase in phases:
                    sums[phase] += amperes
        ems = self.ems_checked_amperes(now_s)
        for node, sums in per_phase.items():
            if node.startswith("station:"):
                limits = self.site.station(node.removeprefix("station:"))
                current, power = limits.max_current_amperes, limits.max_power_watts
            else:
                node_limits = self.site.node_limits(node)
                current, power = node_limits.max_current_amperes, node_limits.max_power_watts
            for phase, amperes in enumerate(sums):
                assert current is None or amperes <= current + TOLERANCE_AMPERES, (
                    f"t={now_s:.2f}s {node} L{phase + 1} draws {amperes:.2f} A over its {current} A"
                )
                if node == GRID_NODE_ID:
                    assert amperes <= ems + TOLERANCE_AMPERES, (
                        f"t={now_s:.2f}s grid L{phase + 1} draws {amperes:.2f} A over the EMS limit {ems} A"
                    )
            assert power is None or sum(sums) * VOLTAGE <= power + 1e-3, (
                f"t={now_s:.2f}s {node} draws {sum(sums) * VOLTAGE:.0f} W over its {power} W"
            )
        self.peak_grid_amperes = max(self.peak_grid_amperes, *per_phase.get(GRID_NODE_ID, [0.0]))

    # The station side of a SetChargingProfile -------------------------------------------------------

    async def serve(self, station: SimStation, calls: trio.MemoryReceiveChannel[Call]) -> None:
        """One station: answers its calls one at a time (Part 4 §4.1.1), after a random delay."""
        # Its own random stream, so its behaviour does not depend on how trio interleaves the stations.
        rng = random.Random(f"{SEED}-{station.station_id}")
        async for call in calls:
            late = station.unreliable and rng.random() < 0.1
            delay_s = CALL_TIMEOUT_S + rng.uniform(0.5, 3.0) if late else rng.uniform(0.05, 2.0)
            await trio.sleep(delay_s)
            if not station.connected:
                self.stats["lost"] += 1
                continue  # the frame never arrived; the controller's call times out
            reject = station.rejecting or (station.unreliable and rng.random() < 0.2)
            if reject:
                self.stats["rejected"] += 1
            else:
                self.stats["accepted"] += 1
                self.stats["late"] += late
                evse_id = call.step.evse_id
                ev = station.evs.get(evse_id)
                before = station.installed[evse_id]
                station.installed[evse_id] = call.step.current_amperes
                if ev is not None and min(ev.demand_amperes, before) != min(
                    ev.demand_amperes, call.step.current_amperes
                ):
                    self.check(trio.current_time())  # a draw changed: this is an instant to check
            call.accepted = not reject
            call.answered.set()


# --- the controller ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """Something the controller hears: an observed event, or the outcome of one of its calls."""

    kind: str
    key: EvseKey | None = None
    station_id: str | None = None
    phases: int | None = None
    step: Step | None = None
    outcome: str | None = None


class Controller:
    """The loop the balancing package will run, with the station calls replaced by the simulated ones."""

    def __init__(self, fleet: Fleet, inboxes: dict[str, trio.MemorySendChannel[Call]]) -> None:
        self.fleet = fleet
        self.site = fleet.site
        self.inboxes = inboxes
        self.state = RolloutState()
        for station_id, station in fleet.stations.items():
            for evse_id in station.installed:
                self.state.add_evse(station_id, evse_id, accepted_amperes=0.0)
        self.sessions: dict[EvseKey, Session] = {}
        self.connected = {station_id: True for station_id in fleet.stations}
        self.sent: dict[str, int] = {"decrease": 0, "retry": 0, "increase": 0}
        self.decreases_in_flight: set[EvseKey] = set()
        self.increases_behind_a_decrease = 0
        self.allocation = Allocation(evses={})

    def note(self, notice: Notice, now_s: float) -> tuple[bool, bool]:
        """Take in one notice; say whether the allocation's inputs changed and whether to plan again.

        An accepted step from a trusted EVSE changes no input of the allocator, and frees room only for
        increases that wait, which go out once the last decrease is answered (the loop plans again then).
        """
        if notice.kind == "answer":
            assert notice.step is not None
            self.decreases_in_flight.discard(notice.step.key)
            was_trusted = self.state.evses[notice.step.key].confirmed
            if notice.outcome == "accepted":
                self.state.accepted(notice.step)
                # Increases wait until every decrease has been answered: planning before that finds nothing new.
                return not was_trusted, not was_trusted or not self.decreases_in_flight
            if notice.outcome == "rejected":
                self.state.rejected(notice.step)
            else:
                self.state.unanswered(notice.step)
            return True, True
        if notice.kind == "arrive":
            assert notice.key is not None
            self.sessions[notice.key] = Session(
                station_id=notice.key[0], evse_id=notice.key[1], phases_used=notice.phases, waiting_since_s=now_s
            )
            self.state.session_started(notice.key, notice.phases)
        elif notice.kind == "depart":
            assert notice.key is not None
            self.sessions.pop(notice.key, None)
            self.state.session_ended(notice.key)
        elif notice.kind == "disconnect":
            assert notice.station_id is not None
            self.connected[notice.station_id] = False
            self.state.disconnected(notice.station_id)
            # Its calls in flight will not be answered; it is bound at its maximum now, not by them.
            self.decreases_in_flight -= {key for key in self.decreases_in_flight if key[0] == notice.station_id}
        elif notice.kind == "reconnect":
            assert notice.station_id is not None
            self.connected[notice.station_id] = True
        return True, True

    def reallocate(self, now_s: float) -> Allocation:
        limits = self.fleet.limits(now_s)
        allocation = allocate(self.site, limits, self.state.allocator_sessions(self.sessions.values()), now_s)
        # Turn bookkeeping, as the live loop keeps it (allocator rule 4).
        for key, session in self.sessions.items():
            served_since, waiting_since = turn_after(
                allocation.current_amperes(*key) > 0, session.served_since_s, session.waiting_since_s, now_s
            )
            self.sessions[key] = dataclasses.replace(
                session, served_since_s=served_since, waiting_since_s=waiting_since
            )
        self.allocation = allocation
        return allocation

    async def call(self, call: Call, reply: trio.MemorySendChannel[Notice]) -> None:
        step = call.step
        outcome = "unanswered"
        async with reply:
            with trio.move_on_after(CALL_TIMEOUT_S):
                await call.answered.wait()
                outcome = "accepted" if call.accepted else "rejected"
            await reply.send(Notice("answer", step=step, outcome=outcome))

    async def run(
        self,
        notices: trio.MemoryReceiveChannel[Notice],
        reply: trio.MemorySendChannel[Notice],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            wake_at = math.inf
            allocation = self.allocation
            while True:
                changed, replan = False, True  # a wake-up at wake_at (rate limit over) always plans
                with trio.move_on_at(wake_at):
                    notice = await notices.receive()
                    changed, replan = self.note(notice, trio.current_time())
                    while True:  # take everything that arrived at this instant before planning
                        try:
                            notice = notices.receive_nowait()
                        except trio.WouldBlock:
                            break
                        more_changed, more_replan = self.note(notice, trio.current_time())
                        changed, replan = changed or more_changed, replan or more_replan
                now_s = trio.current_time()
                if changed:
                    allocation = self.reallocate(now_s)
                if not replan:
                    continue
                # Planned after answers too: an accepted decrease may be what an increase waited for.
                steps = plan(self.site, self.fleet.limits(now_s), allocation, self.state, now_s, POLICY)
                for step in steps.steps:
                    if not self.connected[step.station_id]:
                        continue  # nothing can reach it; it stays at its maximum until it answers again
                    self.state.sent(step, now_s)
                    self.sent[step.kind] += 1
                    if step.kind == "decrease":
                        self.decreases_in_flight.add(step.key)
                    elif step.kind == "increase" and self.decreases_in_flight:
                        self.increases_behind_a_decrease += 1
                    call = Call(step)
                    # Queued here, in plan order, so a station sees its calls in a reproducible order.
                    self.inboxes[step.station_id].send_nowait(call)
                    nursery.start_soon(self.call, call, reply.clone())
                wake_at = math.inf if steps.next_due_s is None else max(steps.next_due_s, now_s + 0.001)


# --- the driver ----------------------------------------------------------------------------------------


async def drive(fleet: Fleet, notify: trio.MemorySendChannel[Notice], rng: random.Random, events: int) -> None:
    """Apply ``events`` random events at random instants; EMS expiry happens on its own in between."""
    counts: dict[str, int] = {}
    for _ in range(events):
        gap_s = rng.expovariate(1 / 8.0)
        target_s = trio.current_time() + gap_s
        # An EMS limit that expires before the next event falls back to the failsafe at its instant.
        if fleet.ems is not None and fleet.ems[1] is not None and fleet.ems[1] < target_s:
            await trio.sleep_until(max(fleet.ems[1], trio.current_time()))
            fleet.record_ems(trio.current_time())
            fleet.ems = (EMS_FAILSAFE_AMPERES, None)  # it stays at the failsafe until the EMS speaks again
            await notify.send(Notice("limits"))
        await trio.sleep_until(target_s)
        now_s = trio.current_time()
        kind = await apply_random_event(fleet, notify, rng, now_s)
        counts[kind] = counts.get(kind, 0) + 1
        fleet.check(now_s)
    fleet.counts = counts


async def apply_random_event(
    fleet: Fleet, notify: trio.MemorySendChannel[Notice], rng: random.Random, now_s: float
) -> str:
    roll = rng.random()
    connected = [s for s in fleet.stations.values() if s.connected]
    idle = [(s, e) for s in connected for e in s.installed if e not in s.evs]
    busy = [(s, e) for s in connected for e in s.evs]
    if roll < 0.32 and idle:
        station, evse_id = rng.choice(idle)
        phases = 3 if rng.random() < 0.6 else 1
        station.evs[evse_id] = Ev(demand_amperes=rng.choice([4.0, 12.0, 32.0, 32.0, 32.0]), phases=phases)
        fleet.check(now_s)  # it draws what the EVSE already allows, before the controller hears of it
        await notify.send(Notice("arrive", key=(station.station_id, evse_id), phases=phases))
        return "arrival"
    if roll < 0.58 and busy:
        station, evse_id = rng.choice(busy)
        del station.evs[evse_id]
        fleet.check(now_s)
        await notify.send(Notice("depart", key=(station.station_id, evse_id)))
        return "departure"
    if roll < 0.78:
        choice = rng.random()
        if choice < 0.1:
            fleet.ems = None
            kind = "ems_release"
        else:
            amperes = rng.uniform(EMS_FLOOR_AMPERES, 260.0)
            valid_until_s = now_s + rng.uniform(20.0, 300.0) if choice < 0.4 else None
            previous = fleet.ems_amperes(now_s)
            fleet.ems = (amperes, valid_until_s)
            kind = "ems_lower" if amperes < previous else "ems_raise"
        fleet.record_ems(now_s)
        await notify.send(Notice("limits"))
        return kind
    unreliable = [s for s in fleet.stations.values() if s.unreliable]
    station = rng.choice(unreliable)
    if roll < 0.89:
        station.rejecting = not station.rejecting
        return "starts_rejecting" if station.rejecting else "stops_rejecting"
    station.connected = not station.connected
    await notify.send(Notice("disconnect" if not station.connected else "reconnect", station_id=station.station_id))
    return "disconnect" if not station.connected else "reconnect"


async def test_a_fleet_of_40_stations_never_exceeds_a_limit_through_1000_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rng = random.Random(SEED)
    site = fleet_site()
    fleet = Fleet(site)
    inboxes: dict[str, trio.MemorySendChannel[Call]] = {}
    notify, notices = trio.open_memory_channel[Notice](256)
    # Virtual seconds (about 8,000 are used): a rollout that deadlocks fails here instead of hanging.
    with trio.fail_after(86_400):
        async with trio.open_nursery() as nursery:
            for station_id, station in fleet.stations.items():
                send, receive = trio.open_memory_channel[Call](64)
                inboxes[station_id] = send
                nursery.start_soon(fleet.serve, station, receive)
            controller = Controller(fleet, inboxes)
            await nursery.start(controller.run, notices, notify.clone())
            await drive(fleet, notify, rng, EVENTS)
            # Let the last rollout finish, and look once more with the last EMS change settled.
            await trio.sleep(SETTLE_S)
            fleet.check(trio.current_time())
            nursery.cancel_scope.cancel()

    counts = fleet.counts
    # The run exercised what it claims to: every kind of event, and stations that said no or said nothing.
    for kind in ["arrival", "departure", "ems_lower", "ems_raise", "ems_release", "starts_rejecting", "disconnect"]:
        assert counts.get(kind, 0) >= 10, counts
    assert fleet.stats["rejected"] >= 20 and fleet.stats["late"] + fleet.stats["lost"] >= 5, fleet.stats
    assert fleet.checks > 3 * EVENTS
    # ...and it charged: the site used a good part of its capacity rather than staying safe by doing nothing.
    assert fleet.peak_grid_amperes > 150.0
    # Decreases before increases: no increase ever left while a decrease sent earlier was unanswered.
    assert controller.sent["decrease"] > 100 and controller.sent["increase"] > 100, controller.sent
    assert controller.increases_behind_a_decrease == 0


# --- rollout ordering, step by step -------------------------------------------------------------------
# A small site: a 32 A per phase grid and 3-phase stations with one EVSE each (6-32 A). Each test states
# what the stations have accepted, gives a target allocation, and checks what plan() says to send now,
# and after the stations answer.

SMALL_SITE = SiteConfig.model_validate(
    {
        "grid": {"max_current_amperes": 32.0},
        "stations": [{"station_id": name, "phases": 3} for name in ("A", "B", "C")],
    }
)
NO_LIMIT = SiteLimits()
UNIT_POLICY = RolloutPolicy(hysteresis_amperes=1.0, min_interval_s=10.0)


def targets(**amperes: float) -> Allocation:
    return Allocation(
        evses={
            (station, 1): EvseAllocation(station, 1, value, 3, (value, value, value))
            for station, value in amperes.items()
        }
    )


def state_with(**accepted: float) -> RolloutState:
    """Stations in session with what each has accepted (and no change for a long time)."""
    state = RolloutState()
    for station, value in accepted.items():
        state.add_evse(station, 1, accepted_amperes=value)
        state.session_started((station, 1), 3)
    return state


def send_all(state: RolloutState, steps: tuple[Step, ...], now_s: float) -> None:
    for step in steps:
        state.sent(step, now_s)


def test_a_decrease_is_accepted_before_the_increase_it_makes_room_for_is_sent() -> None:
    state = state_with(A=24.0, B=8.0)
    target = targets(A=8.0, B=24.0)

    first = plan(SMALL_SITE, NO_LIMIT, target, state, 100.0, UNIT_POLICY)
    assert [(s.station_id, s.current_amperes, s.kind) for s in first.steps] == [("A", 8.0, "decrease")]
    assert first.waiting == (("B", 1),)

    send_all(state, first.steps, 100.0)
    # A has not answered: it may still draw 24 A, so B must not get more yet.
    assert plan(SMALL_SITE, NO_LIMIT, target, state, 101.0, UNIT_POLICY).steps == ()

    state.accepted(first.decreases[0])
    after = plan(SMALL_SITE, NO_LIMIT, target, state, 102.0, UNIT_POLICY)
    assert [(s.station_id, s.current_amperes, s.kind) for s in after.steps] == [("B", 24.0, "increase")]


def test_no_increase_goes_out_while_any_decrease_is_pending_even_an_unrelated_one() -> None:
    # The site has room for B's increase already, but decreases go first, site-wide.
    site = SiteConfig.model_validate({"stations": [{"station_id": n} for n in ("A", "B")]})
    state = state_with(A=20.0, B=6.0)
    first = plan(site, NO_LIMIT, targets(A=10.0, B=20.0), state, 50.0, UNIT_POLICY)
    assert [s.kind for s in first.steps] == ["decrease"]
    send_all(state, first.steps, 50.0)
    state.accepted(first.decreases[0])
    assert [s.kind for s in plan(site, NO_LIMIT, targets(A=10.0, B=20.0), state, 51.0, UNIT_POLICY).steps] == [
        "increase"
    ]


def test_an_increase_is_clipped_to_the_headroom_the_current_bounds_leave() -> None:
    # C has no session but still has 10 A installed: an EV plugging in there could draw it at once.
    state = state_with(A=10.0, B=6.0)
    state.add_evse("C", 1, accepted_amperes=10.0)
    result = plan(SMALL_SITE, NO_LIMIT, targets(A=10.0, B=22.0), state, 100.0, UNIT_POLICY)
    # C's decrease to 0 goes first; B waits for it.
    assert [(s.station_id, s.current_amperes, s.kind) for s in result.steps] == [("C", 0.0, "decrease")]
    send_all(state, result.steps, 100.0)
    state.rejected(result.decreases[0])  # C keeps its 10 A and is now assumed at its 32 A maximum
    blocked = plan(SMALL_SITE, NO_LIMIT, targets(A=10.0, B=22.0), state, 101.0, UNIT_POLICY)
    assert blocked.increases == ()
    assert ("B", 1) in blocked.waiting


def test_two_increases_share_the_headroom_instead_of_both_taking_it() -> None:
    state = state_with(A=6.0, B=6.0)
    result = plan(SMALL_SITE, NO_LIMIT, targets(A=20.0, B=20.0), state, 100.0, UNIT_POLICY)
    values = {s.station_id: s.current_amperes for s in result.increases}
    assert values == {"A": 20.0, "B": 12.0}  # 20 + 12 = 32 A: B gets what is left and the rest later
    assert sum(values.values()) <= 32.0


def test_a_station_that_rejects_is_treated_at_its_maximum_until_it_accepts_again() -> None:
    state = state_with(A=16.0, B=6.0)
    target = targets(A=6.0, B=26.0)
    first = plan(SMALL_SITE, NO_LIMIT, target, state, 0.0, UNIT_POLICY)
    send_all(state, first.steps, 0.0)
    state.rejected(first.decreases[0])
    # A is untrusted: at 32 A the grid is full, so B gets nothing more; A is retried after the rate limit.
    now = plan(SMALL_SITE, NO_LIMIT, target, state, 1.0, UNIT_POLICY)
    assert now.steps == ()
    assert now.next_due_s == 10.0
    retry = plan(SMALL_SITE, NO_LIMIT, target, state, 10.0, UNIT_POLICY)
    assert [(s.station_id, s.kind) for s in retry.steps] == [("A", "retry")]
    assert retry.retries[0].current_amperes <= 16.0  # never more than it last accepted
    send_all(state, retry.steps, 10.0)
    state.accepted(retry.retries[0])
    follow = plan(SMALL_SITE, NO_LIMIT, target, state, 11.0, UNIT_POLICY)
    assert [(s.station_id, s.current_amperes) for s in follow.increases] == [("B", 26.0)]


def test_a_station_that_does_not_answer_is_assumed_at_its_maximum_and_offered_its_minimum() -> None:
    state = state_with(A=16.0, B=6.0)
    first = plan(SMALL_SITE, NO_LIMIT, targets(A=12.0, B=20.0), state, 0.0, UNIT_POLICY)
    send_all(state, first.steps, 0.0)
    state.unanswered(first.decreases[0])
    sessions = state.allocator_sessions([Session("A", 1), Session("B", 1)])
    assert [s.compliant for s in sessions] == [False, True]
    retry = plan(SMALL_SITE, NO_LIMIT, targets(A=32.0, B=0.0), state, 30.0, UNIT_POLICY)
    # What it installed is unknown: it is offered its minimum, never its full allocation.
    assert [(s.station_id, s.current_amperes, s.kind) for s in retry.retries] == [("A", 6.0, "retry")]


def test_an_untrusted_idle_evse_is_a_fixed_load_for_the_allocator() -> None:
    state = state_with(A=6.0)
    state.add_evse("C", 1, accepted_amperes=0.0)
    state.disconnected("C")
    sessions = state.allocator_sessions([Session("A", 1)])
    assert [(s.station_id, s.compliant) for s in sessions] == [("A", True), ("C", False)]


def test_increases_are_rate_limited_per_station_but_decreases_are_not() -> None:
    state = state_with(A=10.0, B=10.0)
    first = plan(SMALL_SITE, NO_LIMIT, targets(A=12.0, B=12.0), state, 0.0, UNIT_POLICY)
    assert {s.station_id for s in first.increases} == {"A", "B"}
    send_all(state, first.steps, 0.0)
    for step in first.steps:
        state.accepted(step)
    # Five seconds later A may go up again only after its ten seconds; B may go down at once.
    later = plan(SMALL_SITE, NO_LIMIT, targets(A=16.0, B=8.0), state, 5.0, UNIT_POLICY)
    assert [(s.station_id, s.kind) for s in later.steps] == [("B", "decrease")]
    send_all(state, later.steps, 5.0)
    state.accepted(later.decreases[0])
    held = plan(SMALL_SITE, NO_LIMIT, targets(A=16.0, B=8.0), state, 6.0, UNIT_POLICY)
    assert held.steps == () and held.waiting == (("A", 1),) and held.next_due_s == 10.0
    due = plan(SMALL_SITE, NO_LIMIT, targets(A=16.0, B=8.0), state, 10.0, UNIT_POLICY)
    assert [(s.station_id, s.current_amperes, s.kind) for s in due.steps] == [("A", 16.0, "increase")]


def test_small_changes_are_ignored_unless_the_site_is_over_its_limit() -> None:
    state = state_with(A=16.0, B=10.0)
    assert plan(SMALL_SITE, NO_LIMIT, targets(A=16.6, B=9.5), state, 100.0, UNIT_POLICY).steps == ()
    # The EMS lowers the grid to 25.5 A: 16 + 10 = 26 A is over it, so even the 0.5 A decrease goes out.
    lowered = SiteLimits.uniform(current_amperes=25.5)
    steps = plan(SMALL_SITE, lowered, targets(A=16.0, B=9.5), state, 100.0, UNIT_POLICY).steps
    assert [(s.station_id, s.current_amperes, s.kind) for s in steps] == [("B", 9.5, "decrease")]


def test_an_evse_whose_session_ended_is_set_to_zero_even_by_a_small_step() -> None:
    state = state_with(A=0.5)
    state.session_ended(("A", 1))
    steps = plan(SMALL_SITE, NO_LIMIT, targets(A=6.0), state, 100.0, UNIT_POLICY).steps
    assert [(s.station_id, s.current_amperes, s.kind) for s in steps] == [("A", 0.0, "decrease")]


def test_an_increase_that_would_start_below_the_minimum_waits() -> None:
    state = state_with(A=28.0, B=0.0)
    result = plan(SMALL_SITE, NO_LIMIT, targets(A=28.0, B=6.0), state, 100.0, UNIT_POLICY)
    assert result.increases == ()  # only 4 A left: an EVSE gets 0 or at least its 6 A minimum
    assert result.waiting == (("B", 1),)


def test_limits_are_rounded_down_to_what_a_station_applies() -> None:
    state = state_with(A=6.0)
    steps = plan(SMALL_SITE, NO_LIMIT, targets(A=17.86), state, 100.0, UNIT_POLICY).steps
    assert [s.current_amperes for s in steps] == [17.8]


def test_an_increase_in_flight_counts_before_it_is_answered() -> None:
    state = state_with(A=6.0, B=6.0)
    first = plan(SMALL_SITE, NO_LIMIT, targets(A=20.0, B=6.0), state, 100.0, UNIT_POLICY)
    assert [(s.station_id, s.current_amperes) for s in first.increases] == [("A", 20.0)]
    send_all(state, first.steps, 100.0)
    # A may apply its 20 A before it answers: B's increase gets only what is left beside it (32 - 20 = 12 A).
    second = plan(SMALL_SITE, NO_LIMIT, targets(A=20.0, B=20.0), state, 101.0, UNIT_POLICY)
    assert [(s.station_id, s.current_amperes) for s in second.increases] == [("B", 12.0)]
