"""A peer repeating bad input is counted every time but logged on a budget (router.log_budget), so it
cannot flood the log; an operator still sees the first refusals at once and how many followed."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from balancing.allocator import SiteLimits
from balancing.limits import LimitBounds, LimitSources
from mqtt.ems import EmsTopics
from router.log_budget import LogBudget
from router.store import Store


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def test_a_key_gets_its_burst_per_window_and_then_hears_how_many_were_held_back() -> None:
    clock = Clock()
    budget = LogBudget(burst=3, window_s=60.0, clock=clock)
    assert [budget.allow("pv") for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    assert budget.allow("grid") == (True, 0)  # another key has its own budget
    clock.now_s += 59.0
    assert budget.allow("pv") == (False, 0)
    clock.now_s += 1.0  # the window has turned: the first line says how many were not logged
    assert budget.allow("pv") == (True, 3)
    assert budget.allow("pv") == (True, 0)


def test_keys_are_bounded_so_varying_the_key_cannot_grow_memory() -> None:
    budget = LogBudget(burst=1, max_keys=4, clock=Clock())
    for index in range(1000):
        assert budget.allow(f"source-{index}") == (True, 0)
    assert len(budget._windows) == 4


def test_an_ems_repeating_nonsense_is_logged_ten_times_a_minute_and_its_limit_is_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    caplog.set_level(logging.WARNING, "ocpp_lc.mqtt")
    with Store.open(tmp_path) as store:
        limits = LimitSources(
            store.namespace("ems_limits"),
            LimitBounds(max_current_amperes=100.0, failsafe_current_amperes=6.0),
            config_limits=SiteLimits.uniform(63.0, None),
        )
        topics = EmsTopics(limits, "site1", digests=store.namespace("mqtt_retained"), log_budget=LogBudget(clock=clock))
        assert topics.handle("site1/ems/pv/limit", b'{"unit": "A", "limit": 25}', retained=False).outcome == "applied"
        in_force = (limits.effective().phase_current_amperes, limits.effective().phase_sources)
        assert in_force == ((25.0,) * 3, ("ems:pv",) * 3)
        outcomes = [topics.handle("site1/ems/pv/limit", b"twenty amperes", retained=False).outcome for _ in range(100)]
        outcomes += [topics.handle("site1/ems/pv/limit", b'{"unit": "A", "limit": -3}', retained=False).outcome]
        assert outcomes == ["not_json"] * 100 + ["invalid"]  # each one answered (and counted by the service)
        assert (limits.effective().phase_current_amperes, limits.effective().phase_sources) == in_force
        refusals = [record.getMessage() for record in caplog.records]
        assert len(refusals) == 10 and all("refused: not JSON" in line for line in refusals)
        caplog.clear()
        clock.now_s += 60.0
        topics.handle("site1/ems/pv/limit", b"still not JSON", retained=False)
        (line,) = [record.getMessage() for record in caplog.records]
        assert "not JSON" in line and "91 more refusals were not logged in the last 60 s" in line
