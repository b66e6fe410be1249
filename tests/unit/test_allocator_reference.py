"""The vectorised allocator gives today's results (issue #17, "same results as today's").

``tests/support/reference_allocator.py`` is the allocator as it was before #17 (one Python object per
EVSE). Both run on random sites, richer than the invariant tests' (EVSE overrides, outside caps, idle
reserves, stations that ignore us, drawing above their maximum, several stations per circuit), and must
agree EVSE by EVSE. Amperes are compared to 1e-6 A: the two add the same numbers in a different order
(prefix sums instead of one subtraction at a time), which moves the last bits of a float and nothing a
station could see (profiles are rounded down to 0.1 A, :func:`balancing.rollout.round_down`).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancing.allocator import Allocation, Session, SiteLimits, allocate
from balancing.rollout import round_down
from balancing.site import GRID_NODE_ID, SiteConfig
from tests.support import reference_allocator
from tests.unit.test_allocator import scenes as invariant_scenes

ROTATIONS = ["RST", "RTS", "SRT", "STR", "TRS", "TSR"]
NOW_S = 1000.0
TOLERANCE_AMPERES = 1e-6

amperes = st.one_of(st.sampled_from([0.0, 6.0, 10.0, 16.0, 32.0, 63.0]), st.floats(0, 250))
# Tight limits make minimums compete, where turn order and priorities decide.
tight = st.one_of(st.sampled_from([5.0, 6.0, 12.0, 16.0, 20.0, 30.0]), st.floats(0, 60))


@st.composite
def sites(draw: st.DrawFn) -> SiteConfig:
    circuits: list[dict[str, object]] = []
    for index in range(draw(st.integers(0, 5))):
        circuits.append(
            {
                "circuit_id": f"C{index}",
                "parent_id": draw(st.sampled_from([GRID_NODE_ID] + [f"C{i}" for i in range(index)])),
                "max_current_amperes": draw(st.one_of(st.none(), amperes)),
                "max_power_watts": draw(st.one_of(st.none(), st.floats(0, 120_000))),
            }
        )
    stations = []
    for index in range(draw(st.integers(1, 12))):
        low = draw(st.sampled_from([0.0, 6.0, 6.0, 8.0]))
        high = draw(st.one_of(st.sampled_from([16.0, 32.0]), st.floats(low, 63)))
        overrides = []
        if draw(st.booleans()) and draw(st.booleans()):
            override_low = draw(st.sampled_from([0.0, 6.0]))
            overrides.append(
                {
                    "evse_id": 2,
                    "min_current_amperes": override_low,
                    "max_current_amperes": draw(st.floats(override_low, 40)),
                }
            )
        stations.append(
            {
                "station_id": f"S{index}",
                "circuit_id": draw(st.sampled_from([GRID_NODE_ID] + [str(c["circuit_id"]) for c in circuits])),
                "phases": draw(st.sampled_from([1, 2, 3])),
                "phase_rotation": draw(st.sampled_from(ROTATIONS)),
                "evse_min_current_amperes": low,
                "evse_max_current_amperes": high,
                "max_current_amperes": draw(st.one_of(st.none(), st.floats(0, 80))),
                "max_power_watts": draw(st.one_of(st.none(), st.floats(0, 40_000))),
                "priority": draw(st.sampled_from([0, 0, 0, -1, 1])),
                "evses": overrides,
            }
        )
    return SiteConfig.model_validate(
        {
            "grid": {
                "max_current_amperes": draw(st.one_of(st.none(), amperes, tight, tight)),
                "max_power_watts": draw(st.one_of(st.none(), st.none(), st.floats(0, 200_000))),
            },
            "circuits": circuits,
            "stations": stations,
            "defaults": {"phases": draw(st.sampled_from([1, 3])), "circuit_id": GRID_NODE_ID},
            "policy": {"underdraw_grace_s": 60, "underdraw_headroom_amperes": 2, "rotation_period_s": 600},
        }
    )


@st.composite
def scenes(draw: st.DrawFn) -> tuple[SiteConfig, SiteLimits, list[Session]]:
    site = draw(sites())
    station_ids = [s.station_id for s in site.stations] + ["UNLISTED", "OTHER"]
    every_key = [(station_id, evse_id) for station_id in station_ids for evse_id in (1, 2, 3)]
    keys = draw(st.permutations(every_key))[: draw(st.integers(0, 30))]
    sessions = []
    for station_id, evse_id in sorted(keys):
        measured = draw(st.one_of(st.none(), st.floats(0, 40)))
        compliant = draw(st.booleans()) or draw(st.booleans())
        sessions.append(
            Session(
                station_id=station_id,
                evse_id=evse_id,
                priority=draw(st.sampled_from([0, 0, 0, 1, 2])),
                phases_used=draw(st.sampled_from([None, 1, 2, 3])),
                measured_current_amperes=measured,
                underdraw_since_s=None if measured is None else draw(st.sampled_from([None, 0.0, 990.0])),
                compliant=compliant,
                served_since_s=draw(st.sampled_from([None, 0.0, 500.0, 900.0])),
                waiting_since_s=draw(st.sampled_from([0.0, 100.0, 800.0])),
                max_current_amperes=draw(
                    st.one_of(st.none(), st.none(), st.sampled_from([0.0, 10.0]), st.floats(0, 40))
                ),
                fixed_amperes=None if compliant else draw(st.one_of(st.none(), st.floats(0, 70))),
                reserve_amperes=draw(st.sampled_from([None, None, None, None, 0.0, 6.0, 10.0])),
            )
        )
    limits = SiteLimits(
        phase_current_amperes=draw(st.one_of(st.none(), st.tuples(*[amperes] * 3))),
        power_watts=draw(st.one_of(st.none(), st.floats(0, 150_000))),
    )
    return site, limits, sessions


@st.composite
def contested_scenes(draw: st.DrawFn) -> tuple[SiteConfig, SiteLimits, list[Session]]:
    """Plain stations under one tight limit: minimums compete, so turn order and priority decide who gets 0."""
    count = draw(st.integers(2, 10))
    site = SiteConfig.model_validate(
        {
            "grid": {"max_current_amperes": draw(st.sampled_from([6.0, 12.0, 13.0, 20.0, 30.0, 40.0]))},
            "stations": [
                {
                    "station_id": f"S{i}",
                    "phases": draw(st.sampled_from([1, 3])),
                    "phase_rotation": draw(st.sampled_from(ROTATIONS)),
                }
                for i in range(count)
            ],
            "policy": {"rotation_period_s": 600},
        }
    )
    sessions = [
        Session(
            station_id=f"S{i}",
            evse_id=1,
            priority=draw(st.sampled_from([0, 0, 1])),
            served_since_s=draw(st.sampled_from([None, 0.0, 200.0, 500.0, 900.0])),
            waiting_since_s=draw(st.sampled_from([0.0, 100.0, 800.0])),
            measured_current_amperes=draw(st.sampled_from([None, None, 3.0])),
            underdraw_since_s=0.0,
        )
        for i in range(count)
    ]
    return site, SiteLimits(), sessions


def _assert_same(new: Allocation, old: Allocation) -> None:
    assert new.overcommitted == old.overcommitted
    assert list(new.evses) == list(old.evses)
    for key, expected in old.evses.items():
        got = new.evses[key]
        assert got.current_amperes == pytest.approx(expected.current_amperes, abs=TOLERANCE_AMPERES), key
        assert got.grid_phase_currents_amperes == pytest.approx(
            expected.grid_phase_currents_amperes, abs=TOLERANCE_AMPERES
        ), key
        assert (got.phase_count, got.fixed) == (expected.phase_count, expected.fixed), key
        assert new.current_amperes(*key) == got.current_amperes
    assert new.grid_phase_currents_amperes() == pytest.approx(old.grid_phase_currents_amperes(), abs=1e-5)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(scenes(), invariant_scenes(), contested_scenes()))
def test_vectorised_allocator_agrees_with_the_reference(scene: tuple[SiteConfig, SiteLimits, list[Session]]) -> None:
    """Also on the invariant tests' own random scenes (tests/unit/test_allocator.py)."""
    site, limits, sessions = scene
    new = allocate(site, limits, sessions, NOW_S)
    old = reference_allocator.allocate(site, limits, sessions, NOW_S)
    _assert_same(new, old)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes(), st.data())
def test_agreement_survives_a_compiled_site_reused_across_calls(
    scene: tuple[SiteConfig, SiteLimits, list[Session]], data: st.DataObject
) -> None:
    """The compiled site is cached with the configuration: a second call with other sessions and limits
    (other unlisted stations, other grid limit kinds) must not see the first call's leftovers."""
    site, limits, sessions = scene
    allocate(site, limits, sessions, NOW_S)
    again = data.draw(scenes())
    _, other_limits, other_sessions = again
    other_sessions = [s for s in other_sessions if s.station_id in {st.station_id for st in site.stations}] + [
        Session("LATE", 1)
    ]
    new = allocate(site, other_limits, other_sessions, NOW_S)
    _assert_same(new, reference_allocator.allocate(site, other_limits, other_sessions, NOW_S))


def test_the_benchmark_site_agrees_with_the_reference_at_the_resolution() -> None:
    """The benchmark's 1,000-EVSE site (tight circuits, mixed phases, priorities, underdrawing EVs): every
    EVSE's limit as a station applies it (rounded down to 0.1 A) is the same as today's."""
    from tests.bench.allocation import build

    site, sessions = build(1_000)
    new = allocate(site, SiteLimits(), sessions, 1000.0)
    old = reference_allocator.allocate(site, SiteLimits(), sessions, 1000.0)
    _assert_same(new, old)
    for key, expected in old.evses.items():
        assert round_down(new.current_amperes(*key), 0.1) == round_down(expected.current_amperes, 0.1), key
