"""EMS limit sources (K14): what limit is in force, when it goes stale, and that it outlives a restart."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.limits import LimitBounds, LimitInvalid, LimitSources
from router.store import Store

EPOCH = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
STORED_OK = {
    "unit": "A",
    "periods": [[0, 20.0]],
    "start": EPOCH.isoformat(),
    "received_at": EPOCH.isoformat(),
    "valid_until": (EPOCH + timedelta(hours=1)).isoformat(),
}


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = EPOCH

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class MemoryStore:
    """The KeyValue protocol over a dict (durability is the store's own tests' business)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def items(self) -> dict[str, Any]:
        return dict(self.data)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def sources(clock: Clock, store: Any = None, **kwargs: Any) -> LimitSources:
    bounds = kwargs.pop("bounds", LimitBounds(max_current_amperes=400, failsafe_current_amperes=16))
    return LimitSources(MemoryStore() if store is None else store, bounds, clock=clock, **kwargs)


def test_an_ems_limit_in_amperes_limits_every_phase_and_names_its_source() -> None:
    clock = Clock()
    limits = sources(clock, config_limits=SiteLimits.uniform(250.0))

    limits.set("pv", body(unit="A", limit=80))

    effective = limits.effective()
    assert effective.phase_current_amperes == (80.0, 80.0, 80.0)
    assert effective.phase_sources == ("ems:pv", "ems:pv", "ems:pv")
    assert effective.site_limits() == SiteLimits.uniform(80.0)
    assert not effective.failsafe_active


def test_the_lowest_of_config_csms_and_ems_wins_phase_by_phase() -> None:
    clock = Clock()
    csms = SiteLimits(phase_current_amperes=(100.0, 60.0, 100.0), power_watts=50_000.0)
    limits = sources(clock, config_limits=SiteLimits.uniform(250.0), csms_limits=lambda now: csms)

    limits.set("grid", body(unit="A", limit=90))
    limits.set("tariff", body(unit="W", limit=40_000))

    effective = limits.effective()
    assert effective.phase_current_amperes == (90.0, 60.0, 90.0)
    assert effective.phase_sources == ("ems:grid", "csms", "ems:grid")
    assert (effective.power_watts, effective.power_source) == (40_000.0, "ems:tariff")


def test_a_schedule_changes_the_limit_at_its_period_starts() -> None:
    clock = Clock()
    limits = sources(clock)
    periods = [{"start_offset_s": 0, "limit": 100}, {"start_offset_s": 600, "limit": 40}]

    limits.set("dso", body(unit="A", periods=periods, valid_for_s=3600))

    assert limits.effective().phase_current_amperes[0] == 100.0
    assert limits.next_change_after(clock.now) == EPOCH + timedelta(seconds=600)
    clock.advance(600)
    assert limits.effective().phase_current_amperes[0] == 40.0
    assert limits.next_change_after(clock.now) == EPOCH + timedelta(seconds=3600)


def test_the_next_change_is_the_earliest_of_the_ems_and_the_csms_change_points() -> None:
    """#11.5: ``next_change_after`` (what the balancing loop sleeps until) knows every limit source: the
    CSMS's site profile changing at +60 s comes before the EMS's next period at +600 s."""
    clock = Clock()
    csms_points = [EPOCH + timedelta(seconds=60), EPOCH + timedelta(seconds=1200)]

    def csms_next_change(now: datetime) -> datetime | None:
        return min((point for point in csms_points if point > now), default=None)

    limits = sources(clock, csms_next_change=csms_next_change)
    periods = [{"start_offset_s": 0, "limit": 100}, {"start_offset_s": 600, "limit": 40}]
    limits.set("dso", body(unit="A", periods=periods, valid_for_s=3600))

    after = limits.next_change_after
    assert after(EPOCH) == EPOCH + timedelta(seconds=60)
    assert after(EPOCH + timedelta(seconds=60)) == EPOCH + timedelta(seconds=600)  # strictly after now
    assert after(EPOCH + timedelta(seconds=600)) == EPOCH + timedelta(seconds=1200)
    assert after(EPOCH + timedelta(seconds=1200)) == EPOCH + timedelta(seconds=3600)
    assert after(EPOCH + timedelta(seconds=3600)) is None


def test_a_schedule_that_starts_later_imposes_nothing_before_its_start() -> None:
    clock = Clock()
    limits = sources(clock)
    start = (EPOCH + timedelta(seconds=300)).isoformat()

    limits.set("dso", body(unit="A", limit=50, start_schedule=start))

    assert limits.effective().phase_current_amperes == (None, None, None)
    clock.advance(300)
    assert limits.effective().phase_current_amperes == (50.0, 50.0, 50.0)


async def test_a_stale_limit_falls_back_to_the_failsafe(autojump_clock: trio.testing.MockClock) -> None:
    # The wall clock follows trio's virtual clock, so the validity runs out in virtual seconds.
    def clock() -> datetime:
        return EPOCH + timedelta(seconds=trio.current_time())

    limits = LimitSources(MemoryStore(), LimitBounds(failsafe_current_amperes=16, default_validity_s=900), clock=clock)
    limits.set("pv", body(unit="A", limit=80))  # default validity: 900 s

    await trio.sleep(899)
    assert limits.effective().phase_current_amperes == (80.0, 80.0, 80.0)
    await trio.sleep(1)
    effective = limits.effective()
    assert effective.phase_current_amperes == (16.0, 16.0, 16.0)
    assert effective.phase_sources == ("failsafe:pv",) * 3
    assert effective.stale_sources == ("pv",)
    status = limits.status()
    assert status["failsafe_active"] is True
    assert status["sources"][0]["stale"] is True
    assert status["sources"][0]["age_s"] == 900.0
    # Setting it again ends the fallback.
    limits.set("pv", body(unit="A", limit=70, valid_for_s=60))
    assert limits.effective().phase_sources == ("ems:pv",) * 3


def test_a_stale_limit_higher_than_the_failsafe_still_ends_at_the_failsafe() -> None:
    clock = Clock()
    limits = sources(clock)
    limits.set("pv", body(unit="A", limit=10, valid_until=(EPOCH + timedelta(seconds=5)).isoformat()))

    clock.advance(5)

    # The EMS said 10 A, but it went silent: the failsafe replaces its value, whichever is lower.
    assert limits.effective().phase_current_amperes == (16.0, 16.0, 16.0)


def test_release_removes_the_source_and_its_failsafe() -> None:
    clock = Clock()
    limits = sources(clock)
    limits.set("pv", body(unit="A", limit=80, valid_for_s=10))
    clock.advance(20)
    assert limits.effective().failsafe_active

    assert limits.release("pv") is True

    assert limits.effective().phase_current_amperes == (None, None, None)
    assert not limits.effective().failsafe_active
    assert limits.release("pv") is False


def test_every_accepted_change_bumps_the_version_and_calls_back() -> None:
    clock = Clock()
    calls: list[int] = []
    limits: LimitSources = sources(clock, on_change=lambda: calls.append(limits.version))

    limits.set("pv", body(unit="A", limit=80))
    with pytest.raises(LimitInvalid):
        limits.set("pv", body(unit="A", limit=-1))
    limits.release("pv")
    limits.release("pv")

    assert limits.version == 2
    assert calls == [1, 2]


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"{not json", "body"),
    (b"[80]", "body"),
    (body(unit="A", limit=-1), "limit"),
    (b'{"unit": "A", "limit": NaN}', "limit"),
    (b'{"unit": "A", "limit": Infinity}', "limit"),
    (b'{"unit": "A", "limit": 1e400}', "limit"),
    (body(unit="A", limit="80"), "limit"),
    (body(unit="A", limit=401), "limit"),
    (body(unit="W", limit=400 * 3 * 230 + 1), "limit"),
    (body(unit="kW", limit=10), "unit"),
    (body(limit=10), "unit"),
    (body(unit="A"), "limit"),
    (body(unit="A", limit=10, periods=[{"start_offset_s": 0, "limit": 5}]), "limit"),
    (body(unit="A", limit=10, amps=3), "amps"),
    (body(unit="A", periods=[{"start_offset_s": 60, "limit": 5}]), "periods.0.start_offset_s"),
    (
        body(unit="A", periods=[{"start_offset_s": 0, "limit": 5}, {"start_offset_s": 0, "limit": 6}]),
        "periods.1.start_offset_s",
    ),
    (body(unit="A", periods=[{"start_offset_s": 0, "limit": -5}]), "periods.0.limit"),
    (body(unit="A", periods=[]), "periods"),
    (body(unit="A", limit=10, valid_until="2025-12-31T00:00:00Z"), "valid_until"),
    (body(unit="A", limit=10, valid_until="2026-01-01T12:00:00"), "valid_until"),
    (body(unit="A", limit=10, valid_for_s=0), "valid_for_s"),
    (body(unit="A", limit=10, valid_for_s=60, start_schedule="2026-01-01T12:05:00Z"), "start_schedule"),
    (body(unit="A", limit=10, valid_for_s=8 * 86_400), "valid_for_s"),
]


@pytest.mark.parametrize(("raw", "field"), BAD_BODIES)
def test_a_bad_request_names_the_field_and_leaves_the_limit_in_force(raw: bytes, field: str) -> None:
    clock = Clock()
    store = MemoryStore()
    limits = sources(clock, store=store)
    limits.set("pv", body(unit="A", limit=80))
    before = (limits.effective(), dict(store.data), limits.version)

    with pytest.raises(LimitInvalid) as caught:
        limits.set("pv", raw)

    assert field in caught.value.problems, caught.value.problems
    assert caught.value.problems[field]
    assert (limits.effective(), dict(store.data), limits.version) == before


def test_every_problem_of_a_request_is_reported_at_once() -> None:
    limits = sources(Clock())

    with pytest.raises(LimitInvalid) as caught:
        limits.set("bad name!", body(unit="A", limit=10, valid_until="2020-01-01T00:00:00Z", valid_for_s=5))

    assert set(caught.value.problems) == {"source", "valid_until"}


def test_the_number_of_sources_is_bounded() -> None:
    limits = sources(Clock(), bounds=LimitBounds(max_sources=2))
    limits.set("a", body(unit="A", limit=10))
    limits.set("b", body(unit="A", limit=10))

    with pytest.raises(LimitInvalid) as caught:
        limits.set("c", body(unit="A", limit=10))

    assert "source" in caught.value.problems
    limits.set("a", body(unit="A", limit=20))  # replacing one is fine
    assert [limit.source for limit in limits.sources()] == ["a", "b"]


def test_limits_survive_reopening_the_store(tmp_path: Path) -> None:
    clock = Clock()
    periods = [{"start_offset_s": 0, "limit": 100}, {"start_offset_s": 600, "limit": 40}]
    with Store.open(tmp_path) as store:
        limits = sources(clock, store=store.namespace("ems_limits"))
        limits.set("dso", body(unit="A", periods=periods, valid_for_s=3600))
        limits.set("tariff", body(unit="W", limit=30_000))
        limits.set("gone", body(unit="A", limit=5))
        limits.release("gone")
        before = limits.status()

    with Store.open(tmp_path) as store:
        again = sources(clock, store=store.namespace("ems_limits"))
        assert again.status() == before
        clock.advance(600)
        assert again.effective().phase_current_amperes == (40.0, 40.0, 40.0)


@pytest.mark.parametrize(
    "damage",
    [
        {"unit": "furlongs"},
        "not a table",
        {**STORED_OK, "periods": [[0, float("nan")]]},
        {**STORED_OK, "start": "2026-01-01T12:00:00"},  # no time zone
        {**STORED_OK, "periods": [[600, 10.0], [0, 20.0]]},
    ],
)
def test_a_damaged_stored_limit_holds_the_failsafe_until_the_ems_speaks(
    caplog: pytest.LogCaptureFixture, damage: Any
) -> None:
    """#11.10: an EMS limit the store cannot give back is not dropped (the site would then run on the grid
    limit alone): it is stale, holding the failsafe current, until the EMS sets or releases it; the
    operator sees it in the log, in a counter and as ``damaged`` in GET /api/v1/limits."""
    store = MemoryStore()
    store.data["broken"] = damage
    store.data["pv"] = sources(Clock()).set("pv", body(unit="A", limit=80)).to_stored()
    registry = CollectorRegistry()
    clock = Clock()

    with caplog.at_level(logging.ERROR, logger="ocpp_lc.balancing.limits"):
        limits = sources(clock, store=store, registry=registry)

    assert "'broken'" in caplog.text and "failsafe" in caplog.text
    assert registry.get_sample_value("ocpp_lc_ems_limits_damaged_total") == 1.0
    effective = limits.effective()
    assert effective.phase_current_amperes == (16.0, 16.0, 16.0)  # the failsafe, below pv's 80 A
    assert effective.phase_sources == ("failsafe:broken",) * 3
    status = limits.status()
    assert status["failsafe_active"] is True
    broken = next(source for source in status["sources"] if source["source"] == "broken")
    assert broken | {"age_s": 0.0} == {
        "source": "broken",
        "unit": "A",
        "limit_now": None,
        "periods": [],
        "start_schedule": None,
        "received_at": None,
        "valid_until": EPOCH.isoformat(),
        "age_s": 0.0,
        "stale": True,
        "damaged": True,
    }
    assert limits.next_change_after(clock.now) is not None  # pv's validity; the damaged one never ends alone
    clock.advance(60)
    assert limits.effective().phase_sources == ("failsafe:broken",) * 3  # still, a minute on

    limits.set("broken", body(unit="A", limit=50))  # the EMS speaks again
    assert limits.effective().phase_current_amperes == (50.0, 50.0, 50.0)
    assert limits.status()["sources"][0]["damaged"] is False
    again = sources(clock, store=store)  # and it is healthy after a restart
    assert again.effective().phase_sources == ("ems:broken",) * 3


def test_a_damaged_stored_limit_can_be_released() -> None:
    store = MemoryStore()
    store.data["broken"] = {"unit": "A"}
    limits = sources(Clock(), store=store)
    assert limits.release("broken") is True
    assert limits.effective().phase_current_amperes == (None, None, None)
    assert store.data == {}
