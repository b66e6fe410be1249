"""The allocator's invariants, as property tests over random trees, sessions and limits (issue 5, Done-when 1).

The checks recompute every node's load from the site model independently of the allocator's own
constraint bookkeeping: per grid phase and per node the sum stays within the limit; each EVSE gets 0
or between its minimum and maximum; no capacity stays unused while a session below its maximum could
take more; higher priority is served first; the result does not depend on the order of the input.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancing.allocator import Allocation, Session, SiteLimits, allocate
from balancing.fill import EPSILON_AMPERES
from balancing.site import GRID_NODE_ID, SiteConfig

TOLERANCE = 1e-5
ROTATIONS = ["RST", "RTS", "SRT", "STR", "TRS", "TSR"]


@st.composite
def sites(draw: st.DrawFn) -> SiteConfig:
    circuit_count = draw(st.integers(0, 4))
    circuits = []
    for index in range(circuit_count):
        parent = draw(st.sampled_from([GRID_NODE_ID] + [f"C{i}" for i in range(index)]))
        circuits.append(
            {
                "circuit_id": f"C{index}",
                "parent_id": parent,
                "max_current_amperes": draw(st.one_of(st.none(), st.floats(0, 120))),
                "max_power_watts": draw(st.one_of(st.none(), st.floats(0, 80_000))),
            }
        )
    stations = []
    for index in range(draw(st.integers(1, 8))):
        low = draw(st.sampled_from([0.0, 6.0, 8.0]))
        stations.append(
            {
                "station_id": f"S{index}",
                "circuit_id": draw(st.sampled_from([GRID_NODE_ID] + [c["circuit_id"] for c in circuits])),
                "phases": draw(st.sampled_from([1, 3])),
                "phase_rotation": draw(st.sampled_from(ROTATIONS)),
                "evse_min_current_amperes": low,
                "evse_max_current_amperes": draw(st.floats(low, 63)),
                "max_current_amperes": draw(st.one_of(st.none(), st.floats(0, 64))),
                "priority": draw(st.integers(0, 1)),
            }
        )
    return SiteConfig.model_validate(
        {
            "grid": {
                "max_current_amperes": draw(st.one_of(st.none(), st.floats(0, 200))),
                "max_power_watts": draw(st.one_of(st.none(), st.floats(0, 150_000))),
            },
            "circuits": circuits,
            "stations": stations,
            "policy": {"underdraw_grace_s": 60, "underdraw_headroom_amperes": 2, "rotation_period_s": 600},
        }
    )


@st.composite
def scenes(draw: st.DrawFn) -> tuple[SiteConfig, SiteLimits, list[Session]]:
    site = draw(sites())
    station_ids = [s.station_id for s in site.stations] + ["UNLISTED"]
    keys = draw(st.sets(st.tuples(st.sampled_from(station_ids), st.integers(1, 2)), max_size=12))
    sessions = []
    for station_id, evse_id in sorted(keys):
        measured = draw(st.one_of(st.none(), st.floats(0, 40)))
        sessions.append(
            Session(
                station_id=station_id,
                evse_id=evse_id,
                priority=draw(st.integers(0, 2)),
                phases_used=draw(st.sampled_from([None, 1, 2, 3])),
                measured_current_amperes=measured,
                underdraw_since_s=None if measured is None else draw(st.sampled_from([None, 0.0, 990.0])),
                compliant=draw(st.booleans()) or draw(st.booleans()),
                served_since_s=draw(st.sampled_from([None, 0.0, 500.0, 900.0])),
                waiting_since_s=draw(st.sampled_from([0.0, 100.0, 800.0])),
            )
        )
    limits = SiteLimits(
        phase_current_amperes=draw(st.one_of(st.none(), st.tuples(*[st.floats(0, 150)] * 3))),
        power_watts=draw(st.one_of(st.none(), st.floats(0, 100_000))),
    )
    return site, limits, sessions


def _constraints(site: SiteConfig, limits: SiteLimits) -> dict[tuple[str, str], float]:
    """Every (node, 'L1'|'L2'|'L3'|'sum') capacity, written out from the site model."""
    caps: dict[tuple[str, str], float] = {}
    nodes = [(GRID_NODE_ID, site.grid)] + [(c.circuit_id, c) for c in site.circuits]
    nodes += [("station:" + s.station_id, s) for s in site.stations]
    for node_id, node in nodes:
        per_phase = [node.max_current_amperes] * 3
        power = node.max_power_watts
        if node_id == GRID_NODE_ID:
            if limits.phase_current_amperes is not None:
                per_phase = [
                    p if p is not None and p < e else e
                    for p, e in zip(per_phase, limits.phase_current_amperes, strict=True)
                ]
            if limits.power_watts is not None:
                power = limits.power_watts if power is None else min(power, limits.power_watts)
        for phase, value in enumerate(per_phase):
            if value is not None:
                caps[(node_id, f"L{phase + 1}")] = value
        if power is not None:
            caps[(node_id, "sum")] = power / site.nominal_voltage_volts
    return caps


def _nodes_of(site: SiteConfig, station_id: str) -> list[str]:
    station = site.station(station_id)
    return ["station:" + station_id, *site.circuit_path(station.circuit_id)]


def _loads(site: SiteConfig, allocation: Allocation, only_steerable: bool = False) -> dict[tuple[str, str], float]:
    loads: dict[tuple[str, str], float] = defaultdict(float)
    for evse in allocation.evses.values():
        if only_steerable and evse.fixed:
            continue
        for node in _nodes_of(site, evse.station_id):
            for phase, amperes in enumerate(evse.grid_phase_currents_amperes):
                loads[(node, f"L{phase + 1}")] += amperes
                loads[(node, "sum")] += amperes
    return loads


def _fixed_loads(site: SiteConfig, allocation: Allocation) -> dict[tuple[str, str], float]:
    total = _loads(site, allocation)
    steerable = _loads(site, allocation, only_steerable=True)
    return {key: total[key] - steerable.get(key, 0.0) for key in total}


def _cap_of(site: SiteConfig, session: Session, now_s: float) -> float:
    low, high = site.station(session.station_id).evse_range_amperes(session.evse_id)
    policy = site.policy
    if (
        session.underdraw_since_s is not None
        and session.measured_current_amperes is not None
        and now_s - session.underdraw_since_s >= policy.underdraw_grace_s
    ):
        high = max(low, min(high, session.measured_current_amperes + policy.underdraw_headroom_amperes))
    return high


NOW_S = 1000.0


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_no_limit_is_exceeded_and_each_evse_gets_zero_or_its_range(
    scene: tuple[SiteConfig, SiteLimits, list[Session]],
) -> None:
    site, limits, sessions = scene
    allocation = allocate(site, limits, sessions, NOW_S)
    caps = _constraints(site, limits)
    loads = _loads(site, allocation)
    fixed = _fixed_loads(site, allocation)
    for key, cap in caps.items():
        # Stations that ignore our profiles count at their maximum; the rest must fit in what they leave.
        allowed = max(cap, fixed.get(key, 0.0))
        assert loads.get(key, 0.0) <= allowed + TOLERANCE, key
    # The flag agrees with the fixed loads outside the band between the allocator's own epsilon and this test's
    # tolerance (a fixed load 1e-5 A above a 0 W limit is over by the allocator's measure; the test must not
    # demand otherwise: hypothesis found that case).
    excess = max((fixed.get(key, 0.0) - cap for key, cap in caps.items()), default=-math.inf)
    if excess > TOLERANCE:
        assert allocation.overcommitted
    elif excess <= EPSILON_AMPERES:
        assert not allocation.overcommitted
    assert set(allocation.evses) == {s.key for s in sessions}
    for session in sessions:
        got = allocation.current_amperes(session.station_id, session.evse_id)
        low, high = site.station(session.station_id).evse_range_amperes(session.evse_id)
        if not session.compliant:
            assert got == high
        else:
            assert got == 0 or low - TOLERANCE <= got <= _cap_of(site, session, NOW_S) + TOLERANCE


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenes())
def test_no_capacity_stays_unused_while_a_session_could_take_it(
    scene: tuple[SiteConfig, SiteLimits, list[Session]],
) -> None:
    site, limits, sessions = scene
    allocation = allocate(site, limits, sessions, NOW_S)
    caps = _constraints(site, limits)
    loads = _loads(site, allocation)
    for session in sessions:
        if not session.compliant:
            continue
        got = allocation.current_amperes(session.station_id, session.evse_id)
        low, _ = site.station(session.station_id).evse_range_amperes(session.evse_id)
        cap = _cap_of(site, session, NOW_S)
        if got >= cap - TOLERANCE:
            continue
        # It could take more: then some limit on its path must be full (for one at 0: too full for its minimum).
        step = max(low, 1e-3) if got == 0 else 1e-3
        evse = allocation.evses[session.key]
        phases = [phase for phase in range(3) if evse.grid_phase_currents_amperes[phase] > 0] or [
            "RST".index(letter) for letter in site.station(session.station_id).phase_rotation[: evse.phase_count]
        ]
        blocked = False
        for node in _nodes_of(site, session.station_id):
            for phase in phases:
                key = (node, f"L{phase + 1}")
                if key in caps and loads.get(key, 0.0) + step > caps[key] + TOLERANCE:
                    blocked = True
            key = (node, "sum")
            if key in caps and loads.get(key, 0.0) + step * len(phases) > caps[key] + TOLERANCE:
                blocked = True
        assert blocked, f"{session.key} got {got} A below its cap {cap} A with room on every limit on its path"


@settings(max_examples=80, deadline=None)
@given(scenes(), st.randoms(use_true_random=False))
def test_result_does_not_depend_on_input_order(
    scene: tuple[SiteConfig, SiteLimits, list[Session]], random: object
) -> None:
    site, limits, sessions = scene
    shuffled = list(sessions)
    random.shuffle(shuffled)  # type: ignore[attr-defined]
    assert allocate(site, limits, sessions, NOW_S) == allocate(site, limits, shuffled, NOW_S)


@settings(max_examples=80, deadline=None)
@given(scenes())
def test_a_higher_priority_is_never_cut_to_serve_a_lower_one(
    scene: tuple[SiteConfig, SiteLimits, list[Session]],
) -> None:
    """K03.FR.04: dropping every lower-priority session leaves the top priority's allocations unchanged."""
    site, limits, sessions = scene
    steerable = [s for s in sessions if s.compliant]
    if not steerable:
        return
    level = lambda s: s.priority + site.station(s.station_id).priority  # noqa: E731
    top = max(level(s) for s in steerable)
    kept = [s for s in sessions if not s.compliant or level(s) == top]
    full = allocate(site, limits, sessions, NOW_S)
    alone = allocate(site, limits, kept, NOW_S)
    for session in kept:
        assert full.current_amperes(*session.key) == pytest.approx(alone.current_amperes(*session.key), abs=TOLERANCE)


def test_equal_sessions_get_equal_shares() -> None:
    site = SiteConfig.model_validate({"grid": {"max_current_amperes": 50}})
    allocation = allocate(site, SiteLimits(), [Session(f"CS{i}", 1) for i in range(5)], 0.0)
    assert [evse.current_amperes for evse in allocation.evses.values()] == pytest.approx([10.0] * 5)


def test_external_limit_tightens_the_grid_per_phase() -> None:
    """A 1-phase EV on L2 is bounded by the external limit on L2, not by the looser L1 and L3."""
    site = SiteConfig.model_validate(
        {
            "grid": {"max_current_amperes": 63},
            "stations": [{"station_id": "CS01", "phases": 1, "phase_rotation": "SRT"}],
        }
    )
    allocation = allocate(site, SiteLimits(phase_current_amperes=(63.0, 10.0, 63.0)), [Session("CS01", 1)], 0.0)
    assert allocation.evses[("CS01", 1)].grid_phase_currents_amperes == (0.0, 10.0, 0.0)


def test_minimum_that_does_not_fit_gives_zero_not_a_trickle() -> None:
    site = SiteConfig.model_validate({"grid": {"max_current_amperes": 5}})
    allocation = allocate(site, SiteLimits(), [Session("CS01", 1)], 0.0)
    assert allocation.current_amperes("CS01", 1) == 0.0


def test_duplicate_evse_is_refused() -> None:
    site = SiteConfig()
    with pytest.raises(ValueError, match="two sessions"):
        allocate(site, SiteLimits(), [Session("CS01", 1), Session("CS01", 1, priority=2)], 0.0)


def test_unlisted_station_uses_defaults() -> None:
    site = SiteConfig.model_validate({"defaults": {"max_current_amperes": 16, "phases": 1}})
    allocation = allocate(site, SiteLimits(), [Session("NEW", 1)], 0.0)
    assert allocation.evses[("NEW", 1)].current_amperes == 16.0
    assert allocation.evses[("NEW", 1)].grid_phase_currents_amperes == (16.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"circuits": [{"circuit_id": "a", "parent_id": "b"}, {"circuit_id": "b", "parent_id": "a"}]}, "loop"),
        ({"circuits": [{"circuit_id": "a", "parent_id": "nowhere"}]}, "not a circuit"),
        ({"stations": [{"station_id": "x", "circuit_id": "nowhere"}]}, "not a circuit"),
        ({"stations": [{"station_id": "x"}, {"station_id": "x"}]}, "only once"),
        (
            {"stations": [{"station_id": "x", "evse_min_current_amperes": 20, "evse_max_current_amperes": 10}]},
            "exceeds",
        ),
        ({"grid": {"max_current_amperes": math.inf}}, "finite"),
        ({"grid": {"max_current_amps": 10}}, "Extra inputs"),
    ],
)
def test_site_config_refuses_nonsense(config: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        SiteConfig.model_validate(config)
