"""Balancing at depot scale (issue #17): what keeps a reallocation off the relay's back.

* A burst of transaction events that arrives while an allocation runs off the event loop costs one
  more allocation, not one per event (coalescing).
* A large site's allocation runs in a worker thread, and the loop applies its result.
* A rollout plan does not compare the site's whole constraint set once per EVSE (it did: a plan cost
  EVSEs x constraints, 180 ms of the event loop at 1,000 EVSEs; see tests/bench/balancing_relay.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from balancing import rollout
from balancing.allocator import Allocation, Session, SiteLimits
from balancing.loop import Balancer
from balancing.rollout import RolloutState, plan
from balancing.scheduling import AllocationRunner
from balancing.site import SiteConfig
from tests.unit.test_balancing_loop import (
    FakeStations,
    make_balancer,
    running,
    settle,
    status_notification,
    transaction_event,
)


class GatedRunner(AllocationRunner):
    """Allocates as the real runner does, but allocation ``n`` waits until the test opens ``gates[n]``: it
    stands for an allocation that takes a while in its thread, without depending on the machine's speed."""

    def __init__(self) -> None:
        super().__init__(threshold_sessions=10**9)  # after the gate, on the loop: settle() can see it finish
        self.gates = [trio.Event() for _ in range(3)]
        self.started = 0

    async def allocate(
        self, site: SiteConfig, limits: SiteLimits, sessions: Sequence[Session], now_s: float
    ) -> Allocation:
        gate = self.gates[min(self.started, len(self.gates) - 1)]
        self.started += 1
        await gate.wait()
        return await super().allocate(site, limits, sessions, now_s)

    def open_all(self) -> None:
        for gate in self.gates:
            gate.set()


def reallocations(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("ocpp_lc_balancing_reallocations_total") or 0.0


async def test_a_burst_during_an_allocation_costs_one_more_allocation(autojump_clock: trio.abc.Clock) -> None:
    fake = FakeStations(limit_amperes=400.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        for index in range(50):
            balancer.station_connected(f"CS{index}")
            balancer.station_call(f"CS{index}", "StatusNotification", status_notification(1))
        await settle()
        gated = balancer.allocation_runner = GatedRunner()
        before = reallocations(registry)
        balancer.wake()
        await settle()
        assert gated.started == 1  # an allocation is under way (waiting at the gate)
        for index in range(50):  # 100 events, one per checkpoint, as the router's observer delivers them
            balancer.station_call(f"CS{index}", "TransactionEvent", transaction_event("Started", f"TX-{index}"))
            await trio.lowlevel.checkpoint()
            balancer.station_call(f"CS{index}", "MeterValues", {"evseId": 1, "meterValue": []})
            await trio.lowlevel.checkpoint()
        gated.gates[0].set()
        await settle()
        # The first allocation was applied; the whole burst waits for one more, and for no third.
        assert gated.started == 2
        assert reallocations(registry) - before == 1
        gated.open_all()
        await settle()
        assert all(fake.effective((f"CS{index}", 1)) == 8.0 for index in range(50))  # 400 A / 50, all served


async def test_a_large_site_is_allocated_in_a_worker_thread() -> None:
    fake = FakeStations(limit_amperes=10_000.0)
    balancer: Balancer = make_balancer(fake)
    balancer.allocation_runner = AllocationRunner(threshold_sessions=100)
    with trio.fail_after(60):
        async with running(balancer):
            for index in range(150):
                balancer.station_connected(f"CS{index}")
                balancer.station_call(f"CS{index}", "StatusNotification", status_notification(1))
                balancer.station_call(f"CS{index}", "TransactionEvent", transaction_event("Started", f"TX-{index}"))
            while not all(fake.effective((f"CS{index}", 1)) == 32.0 for index in range(150)):
                await balancer.reallocated.wait()
    assert balancer.allocation_runner.threaded >= 1
    assert balancer.allocation.current_amperes("CS149", 1) == 32.0


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
