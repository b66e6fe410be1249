"""Balancing at depot scale (issue #17): what keeps a balancing round off the relay's back.

* A large site's round is computed in a forked child (balancing.forked_round) and installs what a round on
  the loop installs; a child that fails costs that round on the loop, and after three failures in a row
  rounds stay there.
* What changed while the child computed is not overruled by its plan: an increase planned before a limit
  dropped, or before another EVSE became counted at more, is not sent; the next round plans again.
* A burst of transaction events that arrives while a round is computed costs one more round, not one per
  event (coalescing).
* A rollout plan does not compare the site's whole constraint set once per EVSE (it did: a plan cost
  EVSEs x constraints, 180 ms of the event loop at 1,000 EVSEs; see tests/bench/balancing_relay.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from balancing import forked, rollout
from balancing.allocator import Allocation, SiteLimits
from balancing.forked_round import PackedRound, bounds_rose
from balancing.loop import Balancer
from balancing.rollout import RolloutState, plan
from balancing.scheduling import GATHER_S, MAX_CHILD_FAILURES, RoundRunner
from balancing.site import SiteConfig
from tests.unit.test_balancing_loop import (
    FakeStations,
    make_balancer,
    running,
    settle,
    status_notification,
    transaction_event,
)

T = TypeVar("T")
needs_fork = pytest.mark.skipif(not forked.AVAILABLE, reason="needs fork (Linux)")
pytestmark = needs_fork  # every round here is computed in a forked child, as on a large site


class GatedRunner(RoundRunner):
    """Computes every round as a forked child does, from the state as it is when the round starts, but
    hands round ``n``'s answer back only once the test opens ``gates[n]``: it stands for a child that takes
    a while, without depending on the machine's speed (and keeps the virtual clock usable). A round starts
    at its wake-up unless ``gather_s`` is given, so the test decides what falls inside it."""

    def __init__(self, gather_s: float = 0.0) -> None:
        super().__init__(threshold_evses=0, gather_s=gather_s)
        self.gates = [trio.Event() for _ in range(3)]
        self.started = 0
        self.answers: list[Any] = []
        #: While set to an Event that is not set, every child's second answer (its foresight) waits for it.
        self.foresight_gate: trio.Event | None = None

    def forks(self, evses: int) -> bool:
        self.forked += 1
        return True

    async def compute(self, function: Callable[[], T], afterwards: forked.Afterwards | None = None) -> T | None:
        gate = self.gates[min(self.started, len(self.gates) - 1)]
        self.started += 1
        # The state at the fork, and the parent's left as it is.
        answer, *later = computed_in_a_fork(function, None if afterwards is None else afterwards.compute)
        self.answers.append(answer)
        await gate.wait()
        if afterwards is not None:
            afterwards.nursery.start_soon(deliver_soon, afterwards.deliver, later[0], self.foresight_gate)
        return answer

    def open_all(self) -> None:
        for gate in self.gates:
            gate.set()


def computed_in_a_fork(function: Callable[[], Any], then: Callable[[], Any] | None = None) -> list[Any]:
    """``function()`` (and ``then()`` after it) in a forked child, as the controller computes them, waited
    for with the loop blocked (the virtual clock does not move meanwhile)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        forked._child(function, write_fd, 30.0, 0, then)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    values = []
    while data:
        size = int.from_bytes(data[:8], "big")
        outcome, value = pickle.loads(data[8 : 8 + size])
        assert outcome == "ok", value
        values.append(value)
        data = data[8 + size :]
    return values


async def deliver_soon(deliver: Callable[[Any], None], value: Any, gate: trio.Event | None = None) -> None:
    """The child's second answer, a checkpoint after its first (as it arrives from a real child), or once
    ``gate`` is set."""
    await trio.lowlevel.checkpoint()
    if gate is not None:
        await gate.wait()
    deliver(value)


def served_by(answer: PackedRound) -> int:
    """How many EVSEs a child's answer gives current (its allocation comes back as arrays)."""
    _, (allocated, *_), _, _ = pickle.loads(answer.allocation)
    return int((allocated > 0).sum())


def reallocations(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("ocpp_lc_balancing_reallocations_total") or 0.0


def tx_profiles(fake: FakeStations) -> list[float]:
    return [call.limit_amperes for call in fake.calls if call.transaction_id is not None]


def served(fake: FakeStations, count: int) -> bool:
    """Every session has its share of 3000 A installed (20 A; within the 1 A hysteresis below it, which a
    share installed while some EVSE still counted at its maximum may keep), and the site is within its limit."""
    installed = [fake.effective((f"CS{index}", 1)) for index in range(count)]
    return all(value is not None and 19.0 <= value <= 20.0 for value in installed) and fake.total_drawable() <= 3000


def connect_idle(balancer: Balancer, count: int) -> None:
    for index in range(count):
        balancer.station_connected(f"CS{index}")
        balancer.station_call(f"CS{index}", "StatusNotification", status_notification(1))


def start_transactions(balancer: Balancer, count: int) -> None:
    for index in range(count):
        balancer.station_call(f"CS{index}", "TransactionEvent", transaction_event("Started", f"TX-{index}"))


async def start_sessions(balancer: Balancer, count: int) -> None:
    connect_idle(balancer, count)
    await settle()
    start_transactions(balancer, count)


async def shares_planned_behind_the_gate(balancer: Balancer, gated: GatedRunner, count: int = 50) -> None:
    """``count`` idle EVSEs get their defaults, then a transaction starts on each: the round that plans
    their shares has computed, and its answer waits at the gate."""
    connect_idle(balancer, count)
    await settle()
    gated.gates = [trio.Event() for _ in range(3)]
    gated.started = 0
    start_transactions(balancer, count)
    await settle()
    assert gated.started == 1


async def test_a_burst_during_a_round_costs_one_more_round(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeStations(limit_amperes=400.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        for index in range(50):
            balancer.station_connected(f"CS{index}")
            balancer.station_call(f"CS{index}", "StatusNotification", status_notification(1))
        await settle()
        gated = balancer.round_runner = GatedRunner()
        before = reallocations(registry)
        balancer.wake()
        await settle()
        assert gated.started == 1  # a round is under way (its answer waits at the gate)
        for index in range(50):  # 100 events, one per checkpoint, as the router's observer delivers them
            balancer.station_call(f"CS{index}", "TransactionEvent", transaction_event("Started", f"TX-{index}"))
            await trio.lowlevel.checkpoint()
            balancer.station_call(f"CS{index}", "MeterValues", {"evseId": 1, "meterValue": []})
            await trio.lowlevel.checkpoint()
        gated.gates[0].set()
        await settle()
        # The first round was applied; the whole burst waits for one more, and for no third.
        assert gated.started == 2
        assert reallocations(registry) - before == 1
        gated.open_all()
        await settle()
        assert all(fake.effective((f"CS{index}", 1)) == 8.0 for index in range(50))  # 400 A / 50, all served


async def test_a_burst_on_a_large_site_is_gathered_into_one_round(autojump_clock: trio.abc.Clock) -> None:
    """Each forked round stops the loop for its fork (a copy of the page tables, ~2 ms at 1,000 EVSEs), so
    a large site gathers what arrives for GATHER_S after a wake-up: the burst's first event does not start
    a round that the other 99 would need another for."""
    fake = FakeStations(limit_amperes=400.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        connect_idle(balancer, 50)
        await settle()
        rounds = []
        for gather_s in (0.0, GATHER_S):
            gated = balancer.round_runner = GatedRunner(gather_s)
            gated.open_all()
            for index in range(50):  # one per checkpoint, as the router's observer delivers them
                started = transaction_event("Started", f"TX-{index}-{gather_s}")
                balancer.station_call(f"CS{index}", "TransactionEvent", started)
                await trio.lowlevel.checkpoint()
            await trio.sleep(1.0)
            if gather_s:
                # One round saw them all: each has its share at once (rounds that saw parts of the burst
                # may leave the last few waiting behind the hysteresis of the others' decreases).
                assert all(fake.effective((f"CS{index}", 1)) == 8.0 for index in range(50))  # 400 A / 50
            # The sessions each round allocated for: without gathering, the first event's round sees it alone.
            rounds.append([served_by(answer) for answer in gated.answers])
            for index in range(50):
                fake.end_transaction((f"CS{index}", 1))  # the station drops the TxProfile with it
                balancer.station_call(
                    f"CS{index}", "TransactionEvent", transaction_event("Ended", f"TX-{index}-{gather_s}", seq_no=1)
                )
            await trio.sleep(1.0)
        without, gathered = rounds
        assert without[0] < 50 and gathered[0] == 50
        assert len(gathered) < len(without)


def foreseen(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("ocpp_lc_balancing_child_rounds_total", {"outcome": "foreseen"}) or 0.0


def installed(fake: FakeStations, indexes: range) -> list[float | None]:
    return [fake.effective((f"CS{index}", 1)) for index in indexes]


def gated_balancer(fake: FakeStations, registry: CollectorRegistry | None = None) -> tuple[Balancer, GatedRunner]:
    """A balancer whose every round is computed in a fork (gates open)."""
    balancer = make_balancer(fake, registry=registry)
    gated = balancer.round_runner = GatedRunner()
    gated.open_all()
    return balancer, gated


async def fifty_served(balancer: Balancer, fake: FakeStations) -> None:
    """Fifty sessions, each with its 8 A of the site's 400 A installed."""
    await start_sessions(balancer, 50)
    await trio.sleep(1.0)
    assert installed(fake, range(50)) == [8.0] * 50


async def test_the_round_the_answers_wake_is_foreseen_empty_and_no_child_is_forked_for_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Every answer to a profile wakes the loop (an accepted decrease may make room for an increase), and on
    a large site every round is a fork that stops the relay. When the limit drops, the round whose 50
    decreases are accepted would find nothing more to send: the child that computed the decreases
    foresaw it, so no child is forked for it. The timers go on as before."""
    fake = FakeStations(limit_amperes=400.0)
    registry = CollectorRegistry()
    balancer, gated = gated_balancer(fake, registry)
    async with running(balancer):
        await fifty_served(balancer, fake)
        forked_before, foreseen_before = gated.started, foreseen(registry)
        fake.limit_amperes = 350.0  # K14: the EMS lowers the site's limit
        balancer.wake()
        await trio.sleep(1.0)  # well before the next periodic round (10 s)
        assert installed(fake, range(50)) == [7.0] * 50
        assert fake.total_drawable() <= 350.0
        assert gated.started - forked_before == 1  # the decreases' round; none for their 50 answers
        assert foreseen(registry) - foreseen_before == 1
        await trio.sleep(10.0)
        assert gated.started - forked_before == 2  # the periodic round still comes


async def test_an_increase_that_waits_for_decreases_goes_out_once_they_are_accepted(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Ten transactions start beside fifty served sessions: their shares wait until the fifty decreases
    are accepted (K-rules: a decrease is in force before an increase goes out). The child foresees a round
    with increases to send, so the answers wake one at once, as before."""
    fake = FakeStations(limit_amperes=400.0)
    registry = CollectorRegistry()
    balancer, gated = gated_balancer(fake, registry)
    async with running(balancer):
        connect_idle(balancer, 60)
        await settle()
        start_transactions(balancer, 50)
        await trio.sleep(1.0)
        assert installed(fake, range(50)) == [8.0] * 50
        forked_before, foreseen_before = gated.started, foreseen(registry)
        for index in range(50, 60):
            balancer.station_call(f"CS{index}", "TransactionEvent", transaction_event("Started", f"TX-{index}"))
        await trio.sleep(1.0)
        assert installed(fake, range(60)) == [6.6] * 60  # 400 A / 60, rounded down to 0.1 A
        # The decreases' round, then the increases' (whose answers, in turn, wake nothing).
        assert gated.started - forked_before == 2
        assert foreseen(registry) - foreseen_before == 1
        assert fake.violations == []


async def test_a_limit_that_drops_while_the_child_computes_makes_the_answers_wake_a_real_round(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The child foresees the round after its own steps only. The limit drops again while it computes the
    first drop's decreases: that is news to it, so the round their answers wake is computed, and the site
    is within the second limit at once (not at the next periodic round, 10 s later)."""
    fake = FakeStations(limit_amperes=400.0, raise_on_violation=False)
    registry = CollectorRegistry()
    balancer, gated = gated_balancer(fake, registry)
    async with running(balancer):
        await fifty_served(balancer, fake)
        gated.gates = [trio.Event() for _ in range(3)]
        gated.started = 0
        foreseen_before = foreseen(registry)
        fake.limit_amperes = 350.0
        balancer.wake()
        await settle()
        assert gated.started == 1  # the first drop's round has computed; its answer waits at the gate
        fake.limit_amperes = 300.0  # K14: the EMS lowers it again
        balancer.wake()
        gated.open_all()
        await trio.sleep(1.0)
        assert installed(fake, range(50)) == [6.0] * 50
        assert fake.total_drawable() <= 300.0
        assert gated.started == 2  # the first drop's round, then the second's
        assert foreseen(registry) - foreseen_before == 1  # the second's answers wake nothing more


async def test_the_loop_waiting_for_a_foresight_still_answers_a_new_limit_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The decreases' answers are in, and the child's foresight is late (a busy machine): a limit that drops
    meanwhile is a real round at once, not after the foresight."""
    fake = FakeStations(limit_amperes=400.0, raise_on_violation=False)
    balancer, gated = gated_balancer(fake)
    async with running(balancer):
        await fifty_served(balancer, fake)
        gated.foresight_gate = trio.Event()  # never set: no foresight comes from here on
        fake.limit_amperes = 350.0
        balancer.wake()
        await trio.sleep(1.0)
        assert installed(fake, range(50)) == [7.0] * 50  # the decreases are in; the loop awaits the foresight
        fake.limit_amperes = 300.0  # K14: the EMS lowers it again
        balancer.wake()
        await trio.sleep(1.0)
        assert installed(fake, range(50)) == [6.0] * 50
        assert fake.total_drawable() <= 300.0


async def test_a_large_site_renews_its_profiles_before_they_lapse(autojump_clock: trio.abc.Clock) -> None:
    """Between two forked rounds the loop no longer walks every EVSE for the next renewal: the child finds
    it (and that answer is trusted for a quarter of the validity at most). Where nothing else wakes the
    loop, every profile of ours is still renewed at half its validity, again and again."""
    fake = FakeStations(limit_amperes=400.0)
    balancer = make_balancer(fake)
    validity_s = 600.0
    balancer.settings = dataclasses.replace(
        balancer.settings, recompute_interval_s=3600.0, profile_validity_s=validity_s
    )
    gated = balancer.round_runner = GatedRunner()
    gated.open_all()
    async with running(balancer):
        await start_sessions(balancer, 50)
        await trio.sleep(3 * validity_s)
        now_s = trio.current_time()
        for index in range(50):
            sent = [call.sent_at_s for call in fake.calls if call.key == (f"CS{index}", 1)]
            gaps = [later - earlier for earlier, later in itertools.pairwise(sent)] + [now_s - sent[-1]]
            assert max(gaps) <= validity_s / 2 + 1.0  # renewed at half its validity, not a quarter later
        assert balancer.renewal_hinted and gated.started > 5


async def test_an_increase_planned_before_the_limit_dropped_is_not_sent(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeStations(limit_amperes=400.0, raise_on_violation=False)
    balancer = make_balancer(fake)
    gated = balancer.round_runner = GatedRunner()
    gated.open_all()
    async with running(balancer):
        await shares_planned_behind_the_gate(balancer, gated)  # 8 A each against 400 A
        fake.limit_amperes = 100.0  # K14: the EMS lowers the site's limit meanwhile
        gated.open_all()
        await settle()
    assert tx_profiles(fake), "the sessions were served"
    # Within 100 A (16 sessions at 6.2 A, the others wait their turn): never the 8 A each planned against 400 A.
    assert max(tx_profiles(fake)) < 8.0
    assert sum(tx_profiles(fake)) <= 100.0


async def test_an_increase_planned_before_another_evse_appeared_is_not_sent(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeStations(limit_amperes=400.0, raise_on_violation=False)
    balancer = make_balancer(fake)
    gated = balancer.round_runner = GatedRunner()
    gated.open_all()
    async with running(balancer):
        await shares_planned_behind_the_gate(balancer, gated)
        # A station the plan never saw: what it has installed is unknown, so it counts at its maximum.
        balancer.station_connected("CS-NEW")
        balancer.station_call("CS-NEW", "StatusNotification", status_notification(1))
        gated.open_all()
        await settle()
    shares = tx_profiles(fake)
    assert shares
    assert max(shares) < 8.0  # the new EVSE's 32 A came off the sessions' 8 A before any was sent
    assert fake.violations == []


async def test_a_step_for_an_evse_that_changed_meanwhile_is_not_sent(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeStations(limit_amperes=400.0)
    balancer = make_balancer(fake)
    gated = balancer.round_runner = GatedRunner()
    gated.open_all()
    async with running(balancer):
        await shares_planned_behind_the_gate(balancer, gated)  # 8 A planned for CS0's transaction
        balancer.station_call("CS0", "TransactionEvent", transaction_event("Ended", "TX-0"))
        gated.open_all()
        await settle()
    # The transaction is over: its 8 A must not become CS0's TxDefaultProfile (an idle EVSE gets 0 A here).
    assert [call.limit_amperes for call in fake.to("CS0") if call.purpose == "TxDefaultProfile"] == [0.0]
    assert [call for call in fake.to("CS0") if call.purpose == "TxProfile"] == []
    assert balancer.allocation.current_amperes("CS1", 1) == pytest.approx(400.0 / 49, abs=0.1)  # planned again


@needs_fork
async def test_a_round_computed_in_a_child_installs_what_a_round_on_the_loop_does() -> None:
    results = []
    for runner in (RoundRunner(threshold_evses=100), RoundRunner(threshold_evses=10**9)):
        fake = FakeStations(limit_amperes=3000.0)
        registry = CollectorRegistry()
        balancer = make_balancer(fake, registry=registry)
        balancer.round_runner = runner
        with trio.fail_after(60):
            async with running(balancer):
                await start_sessions(balancer, 150)
                while not served(fake, 150):
                    await balancer.reallocated.wait()
        results.append([balancer.allocation.current_amperes(f"CS{index}", 1) for index in range(150)])
        computed = registry.get_sample_value("ocpp_lc_balancing_child_rounds_total", {"outcome": "computed"})
        assert (computed or 0) >= (1 if runner.threshold_evses == 100 else 0)
        assert runner.forked >= 1 if runner.threshold_evses == 100 else runner.forked == 0
    assert results[0] == results[1] == [20.0] * 150  # 3000 A / 150


@needs_fork
async def test_what_the_child_prepared_is_done_to_the_parent_too() -> None:
    """The child forgets the stations gone long enough and counts our defaults under transactions on its
    copy; the parent must end up with the same (else it would keep balancing a station that is gone)."""
    fake = FakeStations(limit_amperes=3000.0)
    balancer = make_balancer(fake, forget_after_s=0.0)
    balancer.round_runner = RoundRunner(threshold_evses=100)
    with trio.fail_after(60):
        async with running(balancer):
            await start_sessions(balancer, 150)
            balancer.station_connected("GONE")
            balancer.station_call("GONE", "StatusNotification", status_notification(1))
            while not served(fake, 150):
                await balancer.reallocated.wait()
            forked_before = balancer.round_runner.forked
            balancer.station_disconnected("GONE")
            while balancer.round_runner.forked == forked_before or ("GONE", 1) in balancer.rollout.evses:
                await balancer.reallocated.wait()
    record = balancer.station_record("GONE")
    assert record is not None and record.forgotten
    assert ("GONE", 1) not in balancer.rollout.evses
    assert all(key[0] != "GONE" for key in balancer.allocation.evses)


@needs_fork
async def test_a_failing_child_costs_the_round_on_the_loop_and_three_stop_the_forking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeStations(limit_amperes=3000.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    runner = balancer.round_runner = RoundRunner(threshold_evses=100, timeout_s=0.0)  # ends every child at once
    with trio.fail_after(60):
        async with running(balancer):
            await start_sessions(balancer, 150)
            while not served(fake, 150):
                await balancer.reallocated.wait()
    assert runner.failures == MAX_CHILD_FAILURES
    assert registry.get_sample_value("ocpp_lc_balancing_child_rounds_total", {"outcome": "failed"}) == 3
    assert not runner.forks(150)  # from now on every round is on the loop (and the site was balanced)
    assert "computed on the event loop from now on" in caplog.text


def test_bounds_rose_sees_a_new_evse_a_higher_bound_and_more_phases_but_not_a_lower_bound() -> None:
    site = SiteConfig.model_validate({"stations": [{"station_id": "CS1", "phases": 3}]})
    state = RolloutState()
    state.add_evse("CS1", 1)
    state.installed(("CS1", 1), 10.0, 1)  # numberPhases 1
    state.session_started(("CS1", 1), 1)
    before = dict(state.evses)
    assert not bounds_rose(site, before, state.evses)
    state.installed(("CS1", 1), 6.0, 1)  # lower: the plan's increases still fit
    assert not bounds_rose(site, before, state.evses)
    state.installed(("CS1", 1), 16.0)
    assert bounds_rose(site, before, state.evses)
    state.installed(("CS1", 1), 10.0, None)  # the same current, on every phase
    assert bounds_rose(site, before, state.evses)
    state.installed(("CS1", 1), 10.0, 1)
    state.add_evse("CS1", 2, accepted_amperes=None)
    assert bounds_rose(site, before, state.evses)


class CountingSet(frozenset[tuple[str, int]]):
    comparisons = 0

    def __eq__(self, other: object) -> bool:
        CountingSet.comparisons += 1
        return frozenset.__eq__(self, other)

    __hash__ = frozenset.__hash__


def test_a_plan_compares_the_constraint_set_once_not_once_per_evse(monkeypatch: pytest.MonkeyPatch) -> None:
    site = SiteConfig.model_validate(
        {"grid": {"max_current_amperes": 500}, "stations": [{"station_id": f"CS{i}"} for i in range(200)]}
    )
    state = RolloutState()
    for index in range(200):
        state.add_evse(f"CS{index}", 1)
    monkeypatch.setattr(rollout, "frozenset", CountingSet, raising=False)
    allocation = Allocation(evses={})
    plan(site, SiteLimits(), allocation, state, 0.0)
    CountingSet.comparisons = 0
    plan(site, SiteLimits(), allocation, state, 1.0)  # a new, equal set of constraints
    assert CountingSet.comparisons <= 2
