"""Golden balancing scenarios: every file in tests/scenarios/balancing/ is one case (after EVerest's json_tests).

A file holds a site configuration, a timeline of events (arrivals, departures, meter values, EMS and
CSMS limits, stations rejecting profiles) and the allocations expected at given times. The test replays
the timeline through :class:`balancing.simulation.Simulation`, recomputing after every event as the
loop would, and at each expectation checks the per-EVSE limits and that no limit in force is exceeded.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from balancing.allocator import Allocation, SiteLimits
from balancing.simulation import Simulation
from balancing.site import SiteConfig

SCENARIOS = sorted((Path(__file__).parent.parent / "scenarios" / "balancing").glob("*.json"))
TOLERANCE_AMPERES = 0.01


def test_there_are_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 12


def _grid_phase_limits(simulation: Simulation, now_s: float) -> list[float]:
    limits = simulation.limits_at(now_s).limits
    site = simulation.site
    per_phase = [site.grid.max_current_amperes or float("inf")] * 3
    if limits.phase_current_amperes is not None:
        per_phase = [min(a, b) for a, b in zip(per_phase, limits.phase_current_amperes, strict=True)]
    return per_phase


def _check_expectation(simulation: Simulation, allocation: Allocation, expect: dict[str, Any], name: str) -> None:
    at_s = expect["at_s"]
    for evse, wanted in expect.get("allocations", {}).items():
        station_id, evse_id = evse.split("/")
        got = allocation.current_amperes(station_id, int(evse_id))
        assert got == pytest.approx(wanted, abs=TOLERANCE_AMPERES), f"{name} at {at_s} s: {evse} got {got} A"
    totals = allocation.grid_phase_currents_amperes()
    if "grid_phase_amperes" in expect:
        assert list(totals) == pytest.approx(expect["grid_phase_amperes"], abs=TOLERANCE_AMPERES), name
    if "ems_stale" in expect:
        assert simulation.limits_at(at_s).ems_stale is expect["ems_stale"], name
    if not allocation.overcommitted:
        for phase, (total, limit) in enumerate(zip(totals, _grid_phase_limits(simulation, at_s), strict=True)):
            assert total <= limit + 1e-6, f"{name} at {at_s} s: grid phase L{phase + 1} {total} A > {limit} A"
        power_limit = simulation.limits_at(at_s).limits.power_watts
        if power_limit is not None:
            assert sum(totals) * simulation.site.nominal_voltage_volts <= power_limit + 1e-3, name


@pytest.mark.parametrize("path", SCENARIOS, ids=[path.stem for path in SCENARIOS])
def test_scenario(path: Path) -> None:
    scenario = json.loads(path.read_text())
    site = SiteConfig.model_validate(scenario["site"])
    failsafe = scenario.get("ems_failsafe")
    simulation = Simulation(
        site,
        datetime.fromisoformat(scenario.get("start", "2024-01-01T00:00:00+00:00")),
        None if failsafe is None else SiteLimits.uniform(failsafe.get("current_amperes"), failsafe.get("power_watts")),
    )
    # Events at an instant come before the expectations at that instant; the file order breaks ties.
    timeline = [(event["at_s"], 0, index, event) for index, event in enumerate(scenario["events"])]
    timeline += [(expect["at_s"], 1, index, expect) for index, expect in enumerate(scenario["expect"])]
    assert scenario["expect"], f"{path.name} expects nothing"
    for at_s, kind, _index, item in sorted(timeline, key=lambda entry: entry[:3]):
        if kind == 0:
            simulation.apply(item, at_s)
        allocation = simulation.allocate(at_s)
        if kind == 1:
            _check_expectation(simulation, allocation, item, path.stem)
