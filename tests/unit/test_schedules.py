"""Charging-schedule arithmetic against the spec's own examples (Part 2 §3.6, §3.6.1) and its rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from balancing.schedules import (
    ChargingProfile,
    PeriodLimit,
    _change_points,
    composite_limit_at,
    composite_schedule,
    limit_at,
    next_change_point,
    to_amperes,
    to_watts,
)

VOLTS = 230.0


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def profile(**fields: Any) -> ChargingProfile:
    return ChargingProfile.model_validate(fields)


# Part 2 §3.6: a daily TxDefaultProfile, 11 kW from 00:00, 6 kW from 08:00, 11 kW from 20:00.
DAILY = profile(
    id=100,
    stackLevel=0,
    chargingProfilePurpose="TxDefaultProfile",
    chargingProfileKind="Recurring",
    recurrencyKind="Daily",
    chargingSchedule=[
        {
            "id": 1,
            "duration": 86400,
            "startSchedule": "2013-01-01T00:00:00Z",
            "chargingRateUnit": "W",
            "chargingSchedulePeriod": [
                {"startPeriod": 0, "limit": 11000, "numberPhases": 3},
                {"startPeriod": 28800, "limit": 6000, "numberPhases": 3},
                {"startPeriod": 72000, "limit": 11000, "numberPhases": 3},
            ],
        }
    ],
)

# Part 2 §3.6.1: 2 kW daily 17:00-20:00 (stack 1), no limit on Sundays (stack 2, weekly),
# no limit on Christmas Day 2020 (stack 3, absolute, valid only in 2020). The spec's example gives
# duration 1080 for three hours; three hours is 10800 s, which is what the text means.
PEAK = profile(
    id=10,
    stackLevel=1,
    chargingProfilePurpose="TxDefaultProfile",
    chargingProfileKind="Recurring",
    recurrencyKind="Daily",
    chargingSchedule=[
        {
            "id": 1,
            "startSchedule": "2020-01-09T17:00:00Z",
            "duration": 10800,
            "chargingRateUnit": "W",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 2000}],
        }
    ],
)
SUNDAYS = profile(
    id=11,
    stackLevel=2,
    chargingProfilePurpose="TxDefaultProfile",
    chargingProfileKind="Recurring",
    recurrencyKind="Weekly",
    chargingSchedule=[
        {
            "id": 1,
            "startSchedule": "2020-01-05T00:00:00Z",
            "duration": 86400,
            "chargingRateUnit": "W",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 999999}],
        }
    ],
)
CHRISTMAS = profile(
    id=12,
    stackLevel=3,
    chargingProfilePurpose="TxDefaultProfile",
    chargingProfileKind="Absolute",
    validFrom="2020-01-01T00:00:00Z",
    validTo="2021-01-01T00:00:00Z",
    chargingSchedule=[
        {
            "id": 1,
            "startSchedule": "2020-12-25T00:00:00Z",
            "duration": 86400,
            "chargingRateUnit": "W",
            "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 999999}],
        }
    ],
)


@pytest.mark.parametrize(
    ("instant", "watts"),
    [
        ("2013-01-01T00:00:00", 11000),
        ("2013-01-01T07:59:59", 11000),
        ("2013-01-01T08:00:00", 6000),
        ("2013-01-01T19:59:59", 6000),
        ("2013-01-01T20:00:00", 11000),
        ("2019-06-17T12:00:00", 6000),  # years later: it recurs daily
        ("2019-06-17T23:00:00", 11000),
    ],
)
def test_daily_example_profile(instant: str, watts: float) -> None:
    found = limit_at(DAILY, at(instant))
    assert found == PeriodLimit(watts, "W", 3)


def test_daily_example_in_amperes_follows_k01_fr_50() -> None:
    found = limit_at(DAILY, at("2013-01-02T09:00:00"))
    assert found is not None
    assert found.amperes(VOLTS) == pytest.approx(6000 / (230 * 3))


def test_nothing_before_start_schedule() -> None:
    assert limit_at(DAILY, at("2012-12-31T23:59:59")) is None


@pytest.mark.parametrize(
    ("instant", "watts"),
    [
        ("2020-01-09T16:59:59", None),  # before 17:00: no profile has a period
        ("2020-01-09T17:00:00", 2000),  # a Thursday, peak hours
        ("2020-01-09T19:59:59", 2000),
        ("2020-01-09T20:00:00", None),  # past the duration (K01.FR.11)
        ("2020-01-12T18:00:00", 999999),  # a Sunday: stack 2 overrules stack 1
        ("2020-01-13T18:00:00", 2000),  # Monday again
        ("2020-12-25T18:00:00", 999999),  # Christmas 2020 (a Friday): stack 3
        ("2021-12-24T18:00:00", 2000),  # Christmas 2021 is a Saturday; stack 3 has expired (validTo)
        ("2021-12-25T18:00:00", 2000),
    ],
)
def test_stacked_example_profiles(instant: str, watts: float | None) -> None:
    found = composite_limit_at([PEAK, SUNDAYS, CHRISTMAS], at(instant), VOLTS)
    assert (None if found is None else found.limit) == watts


def test_valid_from_is_inclusive_and_valid_to_exclusive() -> None:
    assert limit_at(CHRISTMAS, at("2020-12-25T00:00:00")) is not None
    bounded = CHRISTMAS.model_copy(update={"valid_to": at("2020-12-25T12:00:00")})
    assert limit_at(bounded, at("2020-12-25T11:59:59")) is not None
    assert limit_at(bounded, at("2020-12-25T12:00:00")) is None


def site_max(
    stack: int, limit: float, unit: str = "A", start: str = "2024-01-01T00:00:00Z", **extra: Any
) -> ChargingProfile:
    return profile(
        id=stack + 1,
        stackLevel=stack,
        chargingProfilePurpose="ChargingStationMaxProfile",
        chargingProfileKind="Absolute",
        chargingSchedule=[
            {
                "startSchedule": start,
                "chargingRateUnit": unit,
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}],
            }
        ],
        **extra,
    )


def test_highest_stack_level_wins_even_when_higher() -> None:
    """K01.FR.17: within one purpose the highest stack level leads, whatever its value."""
    found = composite_limit_at([site_max(0, 40), site_max(3, 100)], at("2024-01-01T01:00:00"), VOLTS)
    assert found == PeriodLimit(100, "A", None)


def test_lowest_purpose_wins_across_units() -> None:
    """Part 2 §3.5: the composite is the lowest of the purposes, comparing W and A through the voltage."""
    tx_default = profile(
        id=9,
        stackLevel=0,
        chargingProfilePurpose="TxDefaultProfile",
        chargingProfileKind="Absolute",
        chargingSchedule=[
            {
                "startSchedule": "2024-01-01T00:00:00Z",
                "chargingRateUnit": "W",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 6900, "numberPhases": 3}],
            }
        ],
    )
    found = composite_limit_at([site_max(0, 16), tx_default], at("2024-01-01T01:00:00"), VOLTS)
    assert found is not None and found.unit == "A"
    assert found.limit == pytest.approx(10.0)


def test_tx_profile_overrules_tx_default() -> None:
    common = {"chargingProfileKind": "Absolute", "stackLevel": 0}
    schedule = {"startSchedule": "2024-01-01T00:00:00Z", "chargingRateUnit": "A"}
    default = profile(
        id=1,
        chargingProfilePurpose="TxDefaultProfile",
        **common,
        chargingSchedule=[{**schedule, "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 6}]}],
    )
    tx = profile(
        id=2,
        chargingProfilePurpose="TxProfile",
        transactionId="T1",
        **common,
        chargingSchedule=[{**schedule, "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 20}]}],
    )
    assert composite_limit_at([default, tx], at("2024-01-01T01:00:00"), VOLTS) == PeriodLimit(20, "A", None)


def test_composite_schedule_over_a_window() -> None:
    """K08: intervals of different lengths, merged where equal, and gaps where nothing applies."""
    base = profile(
        id=1,
        stackLevel=0,
        chargingProfilePurpose="ChargingStationMaxProfile",
        chargingProfileKind="Absolute",
        chargingSchedule=[
            {
                "startSchedule": "2024-01-01T00:00:00Z",
                "duration": 7200,
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 40}, {"startPeriod": 3600, "limit": 20}],
            }
        ],
    )
    override = site_max(1, 25, start="2024-01-01T00:30:00Z", validTo="2024-01-01T00:40:00Z")
    periods = composite_schedule([base, override], at("2024-01-01T00:00:00"), 3 * 3600, VOLTS, unit="W")
    assert [(p.start_s, None if p.limit is None else round(p.limit.limit)) for p in periods] == [
        (0, 40 * 230 * 3),
        (1800, 25 * 230 * 3),
        (2400, 40 * 230 * 3),
        (3600, 20 * 230 * 3),
        (7200, None),
    ]


def test_recurring_composite_repeats_daily() -> None:
    periods = composite_schedule([DAILY], at("2013-03-01T06:00:00"), 86400, VOLTS)
    assert [(p.start_s, p.limit.limit if p.limit else None) for p in periods] == [
        (0, 11000),
        (2 * 3600, 6000),
        (14 * 3600, 11000),
    ]


@pytest.mark.parametrize(
    "schedule_fix",
    [
        {"chargingSchedulePeriod": [{"startPeriod": 10, "limit": 1}]},  # K01.FR.31
        {"chargingSchedulePeriod": [{"startPeriod": 0, "limit": 1}, {"startPeriod": 0, "limit": 2}]},  # K01.FR.35
        {"chargingSchedulePeriod": [{"startPeriod": 0, "limit": -1}]},
        {"startSchedule": None},  # K01.FR.40
    ],
)
def test_malformed_profiles_are_refused(schedule_fix: dict[str, Any]) -> None:
    schedule = {
        "startSchedule": "2024-01-01T00:00:00Z",
        "chargingRateUnit": "A",
        "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 1}],
        **schedule_fix,
    }
    with pytest.raises(ValidationError):
        profile(
            id=1,
            stackLevel=0,
            chargingProfilePurpose="ChargingStationMaxProfile",
            chargingProfileKind="Absolute",
            chargingSchedule=[schedule],
        )


@given(
    st.floats(0, 1_000_000, allow_nan=False),
    st.sampled_from([None, 1, 2, 3]),
    st.floats(100, 400),
)
def test_watts_and_amperes_round_trip(watts: float, phases: int | None, volts: float) -> None:
    amperes = to_amperes(watts, "W", phases, volts)
    assert to_watts(amperes, "A", phases, volts) == pytest.approx(watts)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.floats(0, 100), st.integers(0, 7200)), min_size=1, max_size=4),
    st.integers(0, 4 * 3600),
)
def test_composite_never_exceeds_the_leading_profile(specs: list[tuple[int, float, int]], offset_s: int) -> None:
    """SC.01/K08.FR.04: the composite at any instant is the leading (highest stack) profile's limit."""
    profiles = [
        site_max(0, limit, start=(at("2024-01-01T00:00:00") + timedelta(seconds=delay)).isoformat()).model_copy(
            update={"id": index, "stack_level": stack * 10 + index}
        )
        for index, (stack, limit, delay) in enumerate(specs)
    ]
    instant = at("2024-01-01T00:00:00") + timedelta(seconds=offset_s)
    active = [p for p in profiles if limit_at(p, instant) is not None]
    found = composite_limit_at(profiles, instant, VOLTS)
    if not active:
        assert found is None
    else:
        leader = max(active, key=lambda p: p.stack_level)
        assert found is not None and found.limit == leader.schedule.charging_schedule_period[0].limit


# -- the next change point (what the balancing loop sleeps until, #11.5) ----------------------------


@pytest.mark.parametrize(
    ("subject", "now", "expected"),
    [
        (DAILY, "2013-01-01T00:00:00", "2013-01-01T08:00:00"),  # the next period start
        (DAILY, "2013-01-01T21:00:00", "2013-01-02T00:00:00"),  # the next occurrence (and the duration's end)
        (DAILY, "2012-12-31T12:00:00", "2013-01-01T00:00:00"),  # before startSchedule: its start
        (PEAK, "2020-01-09T18:00:00", "2020-01-09T20:00:00"),  # the end of duration (K01.FR.11)
        (PEAK, "2020-01-09T20:00:00", "2020-01-10T17:00:00"),  # strictly after now
        (SUNDAYS, "2020-01-07T10:00:00", "2020-01-12T00:00:00"),  # Weekly: five days ahead
        (CHRISTMAS, "2019-06-01T00:00:00", "2020-01-01T00:00:00"),  # validFrom
        (CHRISTMAS, "2020-06-01T00:00:00", "2020-12-25T00:00:00"),
        (CHRISTMAS, "2020-12-26T00:00:00", "2021-01-01T00:00:00"),  # validTo
        (CHRISTMAS, "2021-01-01T00:00:00", None),  # never again
    ],
)
def test_next_change_point(subject: ChargingProfile, now: str, expected: str | None) -> None:
    assert next_change_point(subject, at(now)) == (None if expected is None else at(expected))


_PROFILE_SPECS = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["Absolute", "Daily", "Weekly"]),
        "starts": st.lists(st.integers(1, 90_000), max_size=4, unique=True),
        "duration": st.none() | st.integers(0, 200_000),
        "valid_from": st.none() | st.integers(-200_000, 800_000),
        "valid_for": st.none() | st.integers(1, 800_000),
    }
)


@settings(max_examples=200, deadline=None)
@given(_PROFILE_SPECS, st.integers(-300_000, 1_500_000))
def test_next_change_point_is_the_first_instant_the_limit_can_change(spec: dict[str, Any], offset_s: int) -> None:
    """Property: the limit is the same from ``now`` up to the answer (checked at every instant where it could
    change, per _change_points), and differs or could differ at the answer; None only if it never changes."""
    origin = at("2024-01-01T00:00:00")
    periods = [{"startPeriod": start, "limit": index + 1} for index, start in enumerate([0, *sorted(spec["starts"])])]
    fields: dict[str, Any] = {
        "id": 1,
        "stackLevel": 0,
        "chargingProfilePurpose": "ChargingStationMaxProfile",
        "chargingProfileKind": "Absolute" if spec["kind"] == "Absolute" else "Recurring",
        "chargingSchedule": [
            {"id": 1, "startSchedule": origin.isoformat(), "chargingRateUnit": "A", "chargingSchedulePeriod": periods}
        ],
    }
    if spec["kind"] != "Absolute":
        fields["recurrencyKind"] = spec["kind"]
    if spec["duration"] is not None:
        fields["chargingSchedule"][0]["duration"] = spec["duration"]
    if spec["valid_from"] is not None:
        fields["validFrom"] = (origin + timedelta(seconds=spec["valid_from"])).isoformat()
        if spec["valid_for"] is not None:
            fields["validTo"] = (origin + timedelta(seconds=spec["valid_from"] + spec["valid_for"])).isoformat()
    subject = profile(**fields)
    now = origin + timedelta(seconds=offset_s)
    horizon = now + timedelta(days=15)
    found = next_change_point(subject, now)
    candidates = sorted(_change_points(subject, now, horizon, None))
    before = candidates if found is None else [point for point in candidates if point < found]
    held = limit_at(subject, now)
    assert all(limit_at(subject, point) == held for point in before)
    if found is not None:
        assert found > now
        assert found in candidates or found >= horizon
