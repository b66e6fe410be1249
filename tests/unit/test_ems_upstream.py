"""Telling the CSMS about EMS limits (balancing/upstream.py, K14.FR.02/03) over real LimitSources.

The reporter's messages are caught by a fake ``send`` (in the appliance, the own identity's durable
outbox) and validated against the OCA schemas. The stores are plain dicts; a "restart" builds new
LimitSources and a new EmsReporter on the same stores. ``run()`` is driven on trio's autojump clock,
with the limits' wall clock following it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

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
    outbox: Outbox = field(default_factory=Outbox)

    def manual_clock(self) -> datetime:
        return START + timedelta(seconds=self.offset_s)

    def build(self, clock: Callable[[], datetime] | None = None) -> tuple[LimitSources, EmsReporter]:
        """LimitSources and an EmsReporter over the stores (called again: a restart)."""
        limits = LimitSources(
            self.limits_store, LimitBounds(failsafe_current_amperes=FAILSAFE_AMPERES), clock=clock or self.manual_clock
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


NOTIFY_EMS = ("NotifyChargingLimit", {"chargingLimit": {"chargingLimitSource": "EMS"}})
CLEARED_EMS = ("ClearedChargingLimit", {"chargingLimitSource": "EMS"})


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
    assert reporter.reported == {"A": 40.0}
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
    for value in (
        40.0,
        42.0,
        44.0,
        36.0,
    ):  # an EMS refreshing the same value, then small moves  # each within 10 % of the 40 A reported
        limits.set("dso", body(unit="A", limit=value, valid_for_s=3600))
        await reporter.check()
        assert site.outbox.take() == [], value
    limits.set("dso", body(unit="A", limit=44.5, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]
    assert reporter.reported == {"A": 44.5}
    # A watt limit appearing beside it is news, whatever its size.
    limits.set("pv", body(unit="W", limit=20_000.0, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]
    assert reporter.reported == {"A": 44.5, "W": 20_000.0}


async def test_with_schedules_the_ems_periods_are_attached() -> None:
    """NotifyChargingLimitWithSchedules true: the report carries a chargingSchedule per unit with the
    EMS's periods (A per phase on 3 phases, W over all), valid per the OCA schema."""
    site = Site(with_schedules=True)
    limits, reporter = site.build()
    periods = [{"start_offset_s": 0, "limit": 40.0}, {"start_offset_s": 900, "limit": 20.0}]
    limits.set("tariff", body(unit="A", periods=periods, valid_for_s=3600))
    limits.set("pv", body(unit="W", limit=11_000.0, valid_for_s=1800))
    await reporter.check()
    ((action, payload),) = site.outbox.take()
    assert action == "NotifyChargingLimit"
    assert payload["chargingLimit"] == {"chargingLimitSource": "EMS"}
    assert payload["chargingSchedule"] == [
        {
            "id": 1,
            "startSchedule": START_TEXT,
            "duration": 3600,
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [
                {"startPeriod": 0, "limit": 40.0, "numberPhases": 3},
                {"startPeriod": 900, "limit": 20.0, "numberPhases": 3},
            ],
        },
        {
            "id": 2,
            "startSchedule": START_TEXT,
            "duration": 1800,
            "chargingRateUnit": "W",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 11_000.0}],
        },
    ]


async def test_release_sends_cleared_charging_limit_once() -> None:
    """K14.FR.03: once no EMS limit is imposed any more, ClearedChargingLimit (source EMS), once."""
    site = Site()
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=3600))
    limits.set("pv", body(unit="A", limit=50.0, valid_for_s=3600))
    await reporter.check()
    assert site.outbox.take() == [NOTIFY_EMS]
    limits.release("pv")  # the lower one still holds: nothing changed for the CSMS
    await reporter.check()
    assert site.outbox.take() == []
    limits.release("dso")
    await reporter.check()
    assert site.outbox.take() == [CLEARED_EMS]
    assert reporter.reported == {}
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


async def test_stale_limit_is_reported_at_the_failsafe() -> None:
    """An EMS limit whose validity ran out holds the site at the failsafe current: that is what the CSMS is
    told (with one open-ended failsafe period when schedules are wanted)."""
    site = Site(with_schedules=True)
    limits, reporter = site.build()
    limits.set("dso", body(unit="A", limit=40.0, valid_for_s=600))
    await reporter.check()
    site.outbox.take()
    site.offset_s = 600.0
    await reporter.check()
    ((action, payload),) = site.outbox.take()
    assert action == "NotifyChargingLimit"
    assert payload["chargingSchedule"] == [
        {
            "id": 1,
            "startSchedule": "2026-03-02T08:10:00.000Z",
            "chargingRateUnit": "A",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": FAILSAFE_AMPERES, "numberPhases": 3}],
        }
    ]
    assert reporter.reported == {"A": FAILSAFE_AMPERES}


async def test_run_wakes_at_the_next_period_and_on_changes(autojump_clock: trio.abc.Clock) -> None:
    """run() reports at start, at the instant the EMS schedule moves to its next period and when its
    validity ends (no EMS call in between), and on every set/release it is woken for."""
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
            assert site.outbox.sent == [NOTIFY_EMS, NOTIFY_EMS]
            assert site.outbox.times_s[0] == 0.0
            assert 600.0 <= site.outbox.times_s[1] <= 600.01
            assert reporter.reported == {"A": 20.0}
            site.outbox.take()
            await trio.sleep(1000)  # the validity ran out at 1800 s: the failsafe
            assert site.outbox.sent == [NOTIFY_EMS]
            assert 1800.0 <= site.outbox.times_s[0] <= 1800.01
            assert reporter.reported == {"A": FAILSAFE_AMPERES}
            site.outbox.take()
            limits.release("tariff")
            reporter.wake()
            await trio.sleep(1)
            assert site.outbox.sent == [CLEARED_EMS]
            assert site.outbox.times_s == [2000.0]
            nursery.cancel_scope.cancel()


async def test_run_reports_a_future_schedule_when_it_starts(autojump_clock: trio.abc.Clock) -> None:
    """A limit whose schedule starts later imposes nothing yet: nothing is reported until its start, when
    run() wakes by itself and reports it."""
    site = Site()

    def trio_clock() -> datetime:
        return START + timedelta(seconds=trio.current_time())

    limits, reporter = site.build(trio_clock)
    start = (START + timedelta(seconds=300)).isoformat()
    limits.set("tariff", body(unit="W", limit=22_000.0, start_schedule=start, valid_for_s=3600))
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(reporter.run)
            await trio.sleep(299)
            assert site.outbox.sent == []
            await trio.sleep(2)
            assert site.outbox.sent == [NOTIFY_EMS]
            assert 300.0 <= site.outbox.times_s[0] <= 300.01
            assert reporter.reported == {"W": 22_000.0}
            nursery.cancel_scope.cancel()
