"""Telling the CSMS about EMS limits (balancing/upstream.py, K14.FR.02/03) over real LimitSources.

The reporter's messages are caught by a fake ``send`` (in the appliance, the own identity's durable
outbox) and validated against the OCA schemas, and every limit in them is checked to carry at most
one decimal (ChargingSchedulePeriodType, which the schema does not check). The stores are plain dicts;
a "restart" builds new LimitSources and a new EmsReporter on the same stores. ``run()`` is driven on
trio's autojump clock, with the limits' wall clock following it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio

from balancing.limits import LimitBounds, LimitSources
from balancing.upstream import EmsReporter
from tests.support.schemas import validate_call

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
START_TEXT = "2026-03-02T08:00:00.000Z"
FAILSAFE_AMPERES = 6.0
TEST_DEADLINE_S = 10_000.0  # virtual seconds


class MemoryStore:
    """A LimitStore in a dict; values are copied in and out as a real store serialises them."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return copy.deepcopy(self.data.get(key, default))

    def put(self, key: str, value: Any) -> None:
        self.data[key] = copy.deepcopy(value)

    def delete(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def items(self) -> dict[str, Any]:
        return copy.deepcopy(self.data)


@dataclass
class Outbox:
    """The fake ``send``: every (action, payload) queued, with the virtual time it was queued at."""

    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)

    async def __call__(self, action: str, payload: dict[str, Any]) -> None:
        validate_call(action, payload)
        for schedule in payload.get("chargingSchedule", ()):
            for period in schedule["chargingSchedulePeriod"]:
                assert round(period["limit"], 1) == period["limit"], period  # at most one decimal
        self.sent.append((action, payload))
        self.times_s.append(trio.current_time())

    def take(self) -> list[tuple[str, dict[str, Any]]]:
        taken, self.sent = self.sent, []
        self.times_s = []
        return taken


@dataclass
class Site:
    """The two stores, the settings the device model would give, and a clock the test moves."""

    limits_store: MemoryStore = field(default_factory=MemoryStore)
    reported_store: MemoryStore = field(default_factory=MemoryStore)
    significance_percent: float = 10.0
    with_schedules: bool = False
    offset_s: float = 0.0
    failsafe_amperes: float = FAILSAFE_AMPERES
    outbox: Outbox = field(default_factory=Outbox)

    def manual_clock(self) -> datetime:
        return START + timedelta(seconds=self.offset_s)

    def build(self, clock: Callable[[], datetime] | None = None) -> tuple[LimitSources, EmsReporter]:
        """LimitSources and an EmsReporter over the stores (called again: a restart)."""
        limits = LimitSources(
            self.limits_store,
            LimitBounds(failsafe_current_amperes=self.failsafe_amperes),
            clock=clock or self.manual_clock,
        )
        reporter = EmsReporter(
            limits,
            self.reported_store,
            self.outbox,
            significance_percent=lambda: self.significance_percent,
            with_schedules=lambda: self.with_schedules,
        )
        return limits, reporter


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def in_force(reporter: EmsReporter, at: datetime) -> dict[str, float | None]:
    """Per source, the value the CSMS was last told holds at ``at``."""
    return {name: print_.value_at(at) for name, print_ in reporter.reported.sources.items()}


NOTIFY_EMS = ("NotifyChargingLimit", {"chargingLimit": {"chargingLimitSource": "EMS"}})
CLEARED_EMS = ("ClearedChargingLimit", {"chargingLimitSource": "EMS"})


def schedule(schedule_id: int, start: str, unit: str, *periods: tuple[int, float]) -> dict[str, Any]:
    """A chargingSchedule as the reporter writes it (A per phase on three phases)."""
    phases = {"numberPhases": 3} if unit == "A" else {}
    return {
        "id": schedule_id,
        "startSchedule": start,
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": offset, "limit": limit, **phases} for offset, limit in periods],
    }


async def test_first_limit_is_notified_with_source_ems() -> None:
    """K14.FR.02: the CSMS learns of an EMS limit through NotifyChargingLimit, source EMS (never CSO);
    without NotifyChargingLimitWithSchedules no schedule is attached."""
    site = Site()
    limits, reporter = site.build()
    await reporter.check()
    assert site.outbox.take() == []  # nothing imposed, nothing reported
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]
    assert in_force(reporter, START) == {"dso": 40.0}
    await reporter.check()
    assert site.outbox.take() == []  # told once


async def test_change_within_significance_is_not_reported() -> None:
    """K14.FR.02: only a change by more than LimitChangeSignificance percent of what the CSMS was told is
    reported; small steps that add up past it are reported once they do."""
    site = Site(significance_percent=10.0)
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    await reporter.check()
    site.outbox.take()
    # An EMS refreshing the same value (a new validity), then small moves, each within 10 % of the 40 A told.
    for value in (40.0, 42.0, 44.0, 36.0):
        site.offset_s += 60
        limits.set("dso", body(unit="A", limit=value, valid_for_s=3600))
        await reporter.check()
        assert site.outbox.take() == [], value
    limits.set("dso", body(unit="A", limit=44.5, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]
    assert in_force(reporter, site.manual_clock()) == {"dso": 44.5}
    # A source appearing beside it is news, whatever its size.
    limits.set("pv", body(unit="W", limit=20_000.0, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]
    assert in_force(reporter, site.manual_clock()) == {"dso": 44.5, "pv": 20_000.0}


async def test_with_schedules_every_source_is_attached() -> None:
    """K12.FR.03 for the controller: with NotifyChargingLimitWithSchedules, the report carries one
    chargingSchedule per EMS source in force (not only the lowest one), with its periods (A per phase on
    three phases, W over all), so the CSMS, which knows them only as "EMS", has the whole picture."""
    site = Site(with_schedules=True)
    limits, reporter = site.build()
    periods = [{"start_offset_s": 0, "limit": 40.0}, {"start_offset_s": 900, "limit": 20.0}]
    limits.set("tariff", body(unit="A", periods=periods, valid_for_s=3600))
    limits.set("dso", body(unit="A", limit=30.0, valid_for_s=3600))  # lower now, higher after 900 s
    limits.set("pv", body(unit="W", limit=11_000.0, valid_for_s=1800))
    await reporter.check()
    ((action, payload),) = site.outbox.take()
    assert action == "NotifyChargingLimit"
    assert payload["chargingLimit"] == {"chargingLimitSource": "EMS"}
    assert payload["chargingSchedule"] == [
        schedule(1, START_TEXT, "A", (0, 30.0)),
        schedule(2, START_TEXT, "W", (0, 11_000.0)),
        schedule(3, START_TEXT, "A", (0, 40.0), (900, 20.0)),
    ]
    # One of them changes: the CSMS again gets all three, so the latest report is the whole truth.
    limits.set("pv", body(unit="W", limit=7_000.0, valid_for_s=1800))
    await reporter.check()
    ((action, payload),) = site.outbox.take()
    assert [entry["chargingSchedulePeriod"][0]["limit"] for entry in payload["chargingSchedule"]] == [
        30.0,
        7_000.0,
        40.0,
    ]


async def test_a_changed_future_period_is_reported_when_received() -> None:
    """K14.FR.02: a schedule whose later period changes is a new limit, reported when the EMS sends it,
    not when that period begins; a change within LimitChangeSignificance there is not reported."""
    site = Site(with_schedules=True, significance_percent=10.0)
    limits, reporter = site.build()
    start = START_TEXT.replace(".000Z", "+00:00")
    periods = [{"start_offset_s": 0, "limit": 40.0}, {"start_offset_s": 900, "limit": 20.0}]
    limits.set("tariff", body(unit="A", periods=periods, start_schedule=start, valid_for_s=3600))
    await reporter.check()
    site.outbox.take()
    periods[1]["limit"] = 21.0  # within 10 % of the 20 A told
    limits.set("tariff", body(unit="A", periods=periods, start_schedule=start, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == []
    periods[1]["limit"] = 10.0
    limits.set("tariff", body(unit="A", periods=periods, start_schedule=start, valid_for_s=3600))
    await reporter.check()
    ((action, payload),) = site.outbox.take()
    assert action == "NotifyChargingLimit"
    assert payload["chargingSchedule"] == [schedule(1, START_TEXT, "A", (0, 40.0), (900, 10.0))]
    assert in_force(reporter, START + timedelta(seconds=900)) == {"tariff": 10.0}


async def test_a_period_moving_on_is_not_news() -> None:
    """The schedule reaching its next period is what the CSMS was already told: no report then."""
    site = Site(with_schedules=True)
    limits, reporter = site.build()
    periods = [{"start_offset_s": 0, "limit": 40.0}, {"start_offset_s": 600, "limit": 20.0}]
    limits.set("tariff", body(unit="A", periods=periods, valid_for_s=3600))
    await reporter.check()
    site.outbox.take()
    site.offset_s = 600.0
    await reporter.check()
    assert site.outbox.take() == []


async def test_release_sends_cleared_charging_limit_once() -> None:
    """K14.FR.03: once the last EMS limit is released, ClearedChargingLimit (source EMS), once."""
    site = Site()
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]
    limits.release("dso")
    await reporter.check()
    assert site.outbox.take() == [CLEARED_EMS]
    assert reporter.reported.sources == {}
    await reporter.check()
    assert site.outbox.take() == []


async def test_releasing_one_of_two_sources_clears_it_and_says_what_still_holds() -> None:
    """K14.FR.03 per source: releasing one EMS source is reported with ClearedChargingLimit even while
    another remains, followed by a NotifyChargingLimit of what remains, so the CSMS never believes that
    no EMS limit applies."""
    site = Site(with_schedules=True)
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    limits.set("pv", body(unit="A", limit=50.0, valid_for_s=3600))
    await reporter.check()
    site.outbox.take()
    limits.release("pv")  # the higher one: the limit in force does not move, but pv's limit is gone
    await reporter.check()
    assert site.outbox.take() == [
        CLEARED_EMS,
        (
            "NotifyChargingLimit",
            {
                "chargingLimit": {"chargingLimitSource": "EMS"},
                "chargingSchedule": [schedule(1, START_TEXT, "A", (0, 40.0))],
            },
        ),
    ]
    assert set(reporter.reported.sources) == {"dso"}
    await reporter.check()
    assert site.outbox.take() == []


async def test_restart_neither_repeats_nor_forgets() -> None:
    """What was reported survives a restart: a rebuilt reporter does not repeat the report, and a release
    that happened while it was down is still reported as ClearedChargingLimit."""
    site = Site()
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]

    limits, reporter = site.build()  # restart
    await reporter.check()
    assert site.outbox.take() == []

    limits.release("dso")  # released, then down before the reporter got to it
    limits, reporter = site.build()  # restart
    await reporter.check()
    assert site.outbox.take() == [CLEARED_EMS]
    limits, reporter = site.build()  # and once more: said once
    await reporter.check()
    assert site.outbox.take() == []


class FailingOnce(MemoryStore):
    """A store whose next ``put`` fails, as a crash between queueing and recording would look."""

    fail_next = False

    def put(self, key: str, value: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise OSError("power cut")
        super().put(key, value)


async def test_a_crash_between_queueing_and_recording_repeats_the_report() -> None:
    """Queued first, recorded after: if the record is not written, the next check says it again (a repeat
    the CSMS can bear), never nothing."""
    site = Site(reported_store=FailingOnce())
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    await reporter.check()
    site.outbox.take()
    limits.release("dso")
    site.reported_store.fail_next = True  # type: ignore[attr-defined]
    with pytest.raises(OSError):
        await reporter.check()
    assert site.outbox.take() == [CLEARED_EMS]
    limits, reporter = site.build()  # restart
    await reporter.check()
    assert site.outbox.take() == [CLEARED_EMS]
    await reporter.check()
    assert site.outbox.take() == []


@pytest.mark.parametrize(("sources_now", "expected"), [(True, [NOTIFY_EMS]), (False, [CLEARED_EMS])])
async def test_a_record_in_the_old_per_unit_format_is_taken_over(
    sources_now: bool, expected: list[tuple[str, dict[str, Any]]]
) -> None:
    """Upgrading from the per-unit record ({"A": 40.0}): it says something was reported but not what, so
    the sources are reported anew (once), or cleared if none remain; then the record is per source."""
    site = Site()
    site.reported_store.data["reported"] = {"A": 40.0}
    limits, reporter = site.build()
    if sources_now:
        limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == expected
    assert site.reported_store.data["reported"]["format"] == 2
    await reporter.check()
    assert site.outbox.take() == []


async def test_stale_limit_is_reported_at_the_failsafe() -> None:
    """An EMS limit whose validity ran out holds the site at the failsafe current: that is what the CSMS is
    told (with one open-ended failsafe period from the moment it went stale, when schedules are wanted)."""
    site = Site(with_schedules=True)
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=600))
    await reporter.check()
    site.outbox.take()
    site.offset_s = 630.0
    await reporter.check()
    ((action, payload),) = site.outbox.take()
    assert action == "NotifyChargingLimit"
    assert payload["chargingSchedule"] == [schedule(1, "2026-03-02T08:10:00.000Z", "A", (0, FAILSAFE_AMPERES))]
    assert in_force(reporter, site.manual_clock()) == {"dso": FAILSAFE_AMPERES}


async def test_a_damaged_stored_limit_is_reported_at_the_failsafe() -> None:
    """#11.10 seen by the CSMS: a source whose stored limit is unreadable holds the failsafe, as reported."""
    site = Site(with_schedules=True)
    site.limits_store.data["dso"] = {"unit": "A", "periods": None}
    _, reporter = site.build()
    await reporter.check()
    ((action, payload),) = site.outbox.take()
    assert action == "NotifyChargingLimit"
    assert payload["chargingSchedule"] == [schedule(1, START_TEXT, "A", (0, FAILSAFE_AMPERES))]
    _, reporter = site.build()  # found damaged again after a restart: nothing new to say
    site.offset_s = 60
    await reporter.check()
    assert site.outbox.take() == []


async def test_limits_are_reported_rounded_down_to_one_decimal() -> None:
    """#11.9: a chargingSchedulePeriod limit has at most one decimal; EMS values with more (and a failsafe
    with more) are rounded down, never up, so the CSMS is never told the site may draw more."""
    site = Site(with_schedules=True, failsafe_amperes=6.25)
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=16.66, valid_for_s=600))
    limits.set("pv", body(unit="W", limit=11_000.55, valid_for_s=3600))
    await reporter.check()
    ((_, payload),) = site.outbox.take()
    assert [entry["chargingSchedulePeriod"][0]["limit"] for entry in payload["chargingSchedule"]] == [16.6, 11_000.5]
    site.offset_s = 600.0
    await reporter.check()
    ((_, payload),) = site.outbox.take()
    assert payload["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 6.2


async def test_run_wakes_when_a_validity_ends_and_on_changes(autojump_clock: trio.abc.Clock) -> None:
    """run() reports at start, by itself when the EMS limit's validity ends (the failsafe; no EMS call in
    between), not when the schedule merely moves on, and on every set/release it is woken for."""
    site = Site()

    def trio_clock() -> datetime:
        return START + timedelta(seconds=trio.current_time())

    limits, reporter = site.build(trio_clock)
    periods = [{"start_offset_s": 0, "limit": 40.0}, {"start_offset_s": 600, "limit": 20.0}]
    limits.set("tariff", body(unit="A", periods=periods, valid_for_s=1800))
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            await trio.sleep(1000)
            assert site.outbox.sent == [NOTIFY_EMS]  # told at 0 s, schedule and all; 600 s is no news
            assert site.outbox.times_s == [0.0]
            site.outbox.take()
            await trio.sleep(1000)  # the validity ran out at 1800 s: the failsafe
            assert site.outbox.sent == [NOTIFY_EMS]
            assert 1800.0 <= site.outbox.times_s[0] <= 1800.01
            assert in_force(reporter, trio_clock()) == {"tariff": FAILSAFE_AMPERES}
            site.outbox.take()
            limits.release("tariff")
            reporter.wake()
            await trio.sleep(1)
            assert site.outbox.sent == [CLEARED_EMS]
            assert site.outbox.times_s == [2000.0]
            nursery.cancel_scope.cancel()


async def test_a_future_schedule_is_reported_when_received(autojump_clock: trio.abc.Clock) -> None:
    """A limit whose schedule starts later is reported as it is received, with its start, so the CSMS can
    plan for it; its start is no news."""
    site = Site(with_schedules=True)

    def trio_clock() -> datetime:
        return START + timedelta(seconds=trio.current_time())

    limits, reporter = site.build(trio_clock)
    start = (START + timedelta(seconds=300)).isoformat()
    limits.set("tariff", body(unit="W", limit=22_000.0, start_schedule=start, valid_for_s=3600))
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            await trio.sleep(600)
            ((action, payload),) = site.outbox.sent
            assert action == "NotifyChargingLimit"
            assert payload["chargingSchedule"] == [schedule(1, "2026-03-02T08:05:00.000Z", "W", (0, 22_000.0))]
            assert site.outbox.times_s == [0.0]
            nursery.cancel_scope.cancel()
