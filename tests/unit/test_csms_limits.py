"""The CSMS's site-limit book: what the controller answers to K01/K08/K09/K10 on its own identity.

Every answer the book produces is checked against the OCA schema of its message, since each of them
goes to the CSMS as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from balancing.csms_limits import CsmsLimitBook, RequestMalformed, limit_steps
from balancing.schedules import CompositePeriod, PeriodLimit
from router.store import Store
from tests.support.schemas import validate_call, validate_result

GRID = PeriodLimit(250.0, "A", 3)
NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def site_profile(
    profile_id: int = 1,
    *,
    stack_level: int = 0,
    periods: list[tuple[int, float]] | None = None,
    start: datetime = NOW,
    unit: str = "A",
    purpose: str = "ChargingStationMaxProfile",
    kind: str = "Absolute",
    **extra: Any,
) -> dict[str, Any]:
    schedule: dict[str, Any] = {
        "id": profile_id,
        "chargingRateUnit": unit,
        "chargingSchedulePeriod": [{"startPeriod": s, "limit": limit} for s, limit in (periods or [(0, 100.0)])],
    }
    if kind != "Relative":
        schedule["startSchedule"] = stamp(start)
    schedule.update(extra.pop("schedule", {}))
    return {
        "id": profile_id,
        "stackLevel": stack_level,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": kind,
        "chargingSchedule": [schedule],
        **extra,
    }


def set_request(profile: dict[str, Any], evse_id: int = 0) -> dict[str, Any]:
    request = {"evseId": evse_id, "chargingProfile": profile}
    validate_call("SetChargingProfile", request)
    return request


class MemoryKeyValue:
    """A KeyValue in memory, for the tests that are not about persistence."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self.values[key] = value


def new_book(**options: Any) -> CsmsLimitBook:
    return CsmsLimitBook(MemoryKeyValue(), grid_limit=options.pop("grid_limit", GRID), **options)


def accept(book: CsmsLimitBook, profile: dict[str, Any], now: datetime = NOW) -> None:
    answer = book.set_profile(set_request(profile), now)
    validate_result("SetChargingProfile", answer)
    assert answer == {"status": "Accepted"}


def amperes(book: CsmsLimitBook, moment: datetime) -> float | None:
    found = book.limit_at(moment)
    return None if found is None else found.amperes(230.0)


# -- SetChargingProfile (K01) --------------------------------------------------------------------


def test_absolute_profile_with_periods_is_the_limit_over_time() -> None:
    book = new_book()
    accept(book, site_profile(periods=[(0, 100.0), (600, 80.0), (1800, 120.0)], schedule={"duration": 3600}))
    assert book.limit_at(NOW - timedelta(seconds=1)) is None  # K01.FR.30: nothing before startSchedule
    assert amperes(book, NOW) == 100.0
    assert amperes(book, NOW + timedelta(seconds=599)) == 100.0
    assert amperes(book, NOW + timedelta(seconds=600)) == 80.0
    assert amperes(book, NOW + timedelta(seconds=3599)) == 120.0
    assert book.limit_at(NOW + timedelta(seconds=3600)) is None  # K01.FR.11: past the duration


def test_watt_limit_becomes_per_phase_amperes_with_number_phases() -> None:
    book = new_book()
    accept(book, site_profile(unit="W", periods=[(0, 22_080.0)]))
    limit = book.limit_at(NOW)
    assert limit == PeriodLimit(22_080.0, "W", None)
    assert limit.amperes(230.0) == pytest.approx(32.0)  # K01.FR.49/50: 3 phases when absent
    book2 = new_book()
    profile = site_profile(unit="W", periods=[(0, 7_360.0)])
    profile["chargingSchedule"][0]["chargingSchedulePeriod"][0]["numberPhases"] = 1
    accept(book2, profile)
    one_phase = book2.limit_at(NOW)
    assert one_phase is not None and one_phase.amperes(230.0) == pytest.approx(32.0)


def _with_period_field(**fields: Any) -> dict[str, Any]:
    profile = site_profile()
    profile["chargingSchedule"][0]["chargingSchedulePeriod"][0].update(fields)
    return profile


REFUSALS = [
    ("evse 1", site_profile(), 1, "UnknownEvse"),  # K01.FR.28
    ("TxProfile", site_profile(purpose="TxProfile", transactionId="T1"), 0, "InvalidProfile"),  # K01.FR.16
    ("TxDefaultProfile", site_profile(purpose="TxDefaultProfile"), 0, "UnsupportedParam"),
    ("external", site_profile(purpose="ChargingStationExternalConstraints"), 0, "InvalidProfile"),  # K01.FR.22
    ("relative", site_profile(kind="Relative"), 0, "InvalidProfile"),  # K01.FR.38
    ("stack level", site_profile(stack_level=9), 0, "InvalidStackLevel"),
    ("negative stack level", site_profile(stack_level=-1), 0, "InvalidStackLevel"),
    ("negative limit", site_profile(periods=[(0, -1.0)]), 0, "InvalidSchedule"),
    ("first period late", site_profile(periods=[(60, 10.0)]), 0, "InvalidSchedule"),  # K01.FR.31
    ("out of order", site_profile(periods=[(0, 10.0), (600, 8.0), (300, 9.0)]), 0, "InvalidSchedule"),  # FR.35
    ("too many periods", site_profile(periods=[(60 * n, 10.0) for n in range(25)]), 0, "InvalidSchedule"),
    ("phaseToUse", _with_period_field(numberPhases=1, phaseToUse=2), 0, "UnsupportedParam"),  # K01.FR.48
    ("validTo first", site_profile(validFrom=stamp(NOW), validTo=stamp(NOW)), 0, "InvalidProfile"),
]


@pytest.mark.parametrize(("profile", "evse_id", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_what_the_controller_cannot_take_is_rejected_with_a_reason(
    profile: dict[str, Any], evse_id: int, reason: str
) -> None:
    book = new_book()
    answer = book.set_profile(set_request(profile, evse_id), NOW)
    validate_result("SetChargingProfile", answer)
    assert answer["status"] == "Rejected"
    assert answer["statusInfo"]["reasonCode"] == reason
    assert book.profiles == [] and book.limit_at(NOW) is None


def test_a_rate_unit_the_controller_is_not_configured_for_is_rejected() -> None:
    book = new_book(rate_units=("A",))
    answer = book.set_profile(set_request(site_profile(unit="W")), NOW)
    assert answer["status"] == "Rejected" and answer["statusInfo"]["reasonCode"] == "UnsupportedRateUnit"  # FR.26


@pytest.mark.parametrize(
    ("request_payload", "code"),
    [
        ({"evseId": "zero", "chargingProfile": site_profile()}, "TypeConstraintViolation"),
        ({"evseId": "0", "chargingProfile": site_profile()}, "TypeConstraintViolation"),
        ({"evseId": 0}, "OccurrenceConstraintViolation"),
        ({"evseId": 0, "chargingProfile": {**site_profile(), "chargingSchedule": []}}, "OccurrenceConstraintViolation"),
        ({"evseId": 0, "chargingProfile": {**site_profile(), "stackLevel": "high"}}, "TypeConstraintViolation"),
        ({"evseId": 0, "chargingProfile": site_profile(purpose="Nonsense")}, "PropertyConstraintViolation"),
    ],
)
def test_malformed_requests_name_the_rpc_error(request_payload: dict[str, Any], code: str) -> None:
    with pytest.raises(RequestMalformed) as raised:
        new_book().set_profile(request_payload, NOW)
    assert raised.value.code == code


def test_stack_levels_higher_wins_while_valid_and_same_level_is_replaced() -> None:
    book = new_book()
    accept(book, site_profile(1, stack_level=0, periods=[(0, 100.0)]))
    accept(
        book,
        site_profile(
            2, stack_level=1, periods=[(0, 60.0)], validFrom=stamp(NOW), validTo=stamp(NOW + timedelta(hours=1))
        ),
    )
    assert amperes(book, NOW + timedelta(minutes=30)) == 60.0  # K01.FR.17
    assert amperes(book, NOW + timedelta(hours=1)) == 100.0  # K01.FR.37: validTo is exclusive
    # The same id again replaces the profile (K01.FR.05) ...
    accept(book, site_profile(1, stack_level=0, periods=[(0, 90.0)]))
    assert amperes(book, NOW + timedelta(hours=2)) == 90.0
    # ... and a new id on the same stack level with an overlapping validity replaces the old one.
    accept(book, site_profile(3, stack_level=0, periods=[(0, 70.0)]))
    assert [p.id for p in book.profiles] == [2, 3]
    assert amperes(book, NOW + timedelta(hours=2)) == 70.0


def test_same_stack_level_with_disjoint_validity_is_kept_side_by_side() -> None:
    book = new_book()
    morning = {"validFrom": stamp(NOW), "validTo": stamp(NOW + timedelta(hours=1))}
    later = {"validFrom": stamp(NOW + timedelta(hours=1)), "validTo": stamp(NOW + timedelta(hours=2))}
    accept(book, site_profile(1, periods=[(0, 50.0)], **morning))
    accept(book, site_profile(2, periods=[(0, 150.0)], **later))
    assert [p.id for p in book.profiles] == [1, 2]
    assert amperes(book, NOW + timedelta(minutes=59)) == 50.0
    assert amperes(book, NOW + timedelta(minutes=61)) == 150.0


def test_recurring_daily_night_limit_repeats_every_day() -> None:
    book = new_book()
    midnight = datetime(2026, 11, 1, tzinfo=UTC)
    accept(
        book,
        site_profile(
            kind="Recurring",
            recurrencyKind="Daily",
            start=midnight,
            periods=[(0, 200.0), (7 * 3600, 80.0), (22 * 3600, 200.0)],
        ),
    )
    for day in (0, 1, 24, 60):
        base = midnight + timedelta(days=day)
        assert amperes(book, base + timedelta(hours=3)) == 200.0
        assert amperes(book, base + timedelta(hours=7)) == 80.0
        assert amperes(book, base + timedelta(hours=21, minutes=59)) == 80.0
        assert amperes(book, base + timedelta(hours=22)) == 200.0


def test_recurring_weekly_weekend_limit() -> None:
    book = new_book()
    monday = datetime(2026, 11, 23, tzinfo=UTC)  # a Monday
    accept(
        book,
        site_profile(kind="Recurring", recurrencyKind="Weekly", start=monday, periods=[(0, 60.0), (5 * 86_400, 200.0)]),
    )
    assert amperes(book, monday + timedelta(days=2)) == 60.0  # Wednesday
    assert amperes(book, monday + timedelta(days=5, hours=1)) == 200.0  # Saturday
    assert amperes(book, monday + timedelta(days=7, hours=1)) == 60.0  # next Monday
    assert amperes(book, monday + timedelta(days=20)) == 200.0  # the Saturday two weeks on


def test_next_change_after_covers_every_profile_and_every_kind_of_change_point() -> None:
    """#11.5: the balancing loop wakes at the book's change points. Across profiles, the earliest one
    strictly after ``now``: period starts, a duration's end, validFrom/validTo, a Weekly recurrence days
    ahead; None once no profile can change any more."""
    book = new_book()
    monday = datetime(2026, 11, 23, tzinfo=UTC)
    accept(book, site_profile(1, kind="Recurring", recurrencyKind="Weekly", start=monday, periods=[(0, 60.0)]))
    assert book.next_change_after(monday + timedelta(days=1)) == monday + timedelta(days=7)
    accept(
        book,
        site_profile(
            2,
            stack_level=1,
            start=monday + timedelta(days=2),
            periods=[(0, 40.0), (600, 30.0)],
            schedule={"duration": 3600},
            validTo=stamp(monday + timedelta(days=3)),
        ),
    )
    after = book.next_change_after
    assert after(monday + timedelta(days=1)) == monday + timedelta(days=2)  # profile 2 starts
    assert after(monday + timedelta(days=2)) == monday + timedelta(days=2, seconds=600)  # its next period
    assert after(monday + timedelta(days=2, seconds=600)) == monday + timedelta(days=2, seconds=3600)  # duration
    assert after(monday + timedelta(days=2, hours=1)) == monday + timedelta(days=3)  # validTo
    assert after(monday + timedelta(days=3)) == monday + timedelta(days=7)  # back to the weekly one
    _clear(book, {"chargingProfileId": 1})
    assert after(monday + timedelta(days=3)) is None


# -- ClearChargingProfile (K10) ------------------------------------------------------------------


def _clear(book: CsmsLimitBook, request: dict[str, Any]) -> str:
    validate_call("ClearChargingProfile", request)
    answer = book.clear(request)
    validate_result("ClearChargingProfile", answer)
    return str(answer["status"])


def test_clear_by_id_then_unknown() -> None:
    book = new_book()
    accept(book, site_profile(7))
    assert _clear(book, {"chargingProfileId": 7}) == "Accepted"  # K10.FR.03
    assert book.limit_at(NOW) is None
    assert _clear(book, {"chargingProfileId": 7}) == "Unknown"  # K10.FR.01


def test_clear_by_criteria_matches_all_given_fields() -> None:
    book = new_book()
    accept(book, site_profile(1, stack_level=0, periods=[(0, 100.0)]))
    accept(book, site_profile(2, stack_level=1, periods=[(0, 50.0)]))
    assert _clear(book, {"chargingProfileCriteria": {"evseId": 1}}) == "Unknown"  # no EVSE 1 here
    assert _clear(book, {"chargingProfileCriteria": {"chargingProfilePurpose": "TxProfile"}}) == "Unknown"
    assert _clear(book, {"chargingProfileCriteria": {"stackLevel": 1, "evseId": 0}}) == "Accepted"  # K10.FR.04
    assert amperes(book, NOW) == 100.0
    assert _clear(book, {"chargingProfileCriteria": {"chargingProfilePurpose": "ChargingStationMaxProfile"}}) == (
        "Accepted"
    )
    assert book.profiles == []


# -- GetChargingProfiles (K09) -------------------------------------------------------------------


def _report(book: CsmsLimitBook, request: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    validate_call("GetChargingProfiles", request)
    answer, parts = book.report(request)
    validate_result("GetChargingProfiles", answer)
    for part in parts:
        validate_call("ReportChargingProfiles", part)
    return str(answer["status"]), parts


def test_report_parts_carry_request_id_and_tbc() -> None:
    book = new_book(report_items_per_message=2)
    assert _report(book, {"requestId": 5, "chargingProfile": {}}) == ("NoProfiles", [])
    for n in range(1, 6):
        accept(book, site_profile(n, stack_level=n, periods=[(0, 100.0 - n)]))
    status, parts = _report(book, {"requestId": 5, "chargingProfile": {"chargingLimitSource": ["CSO"]}})
    assert status == "Accepted"
    assert [p["requestId"] for p in parts] == [5, 5, 5]  # K09.FR.01
    assert [p.get("tbc", False) for p in parts] == [True, True, False]  # K09.FR.02
    assert [c["id"] for p in parts for c in p["chargingProfile"]] == [1, 2, 3, 4, 5]
    assert all(p["evseId"] == 0 and p["chargingLimitSource"] == "CSO" for p in parts)
    # The profiles are reported as the CSMS sent them.
    assert parts[0]["chargingProfile"][0] == site_profile(1, stack_level=1, periods=[(0, 99.0)])


def test_report_filters() -> None:
    book = new_book()
    accept(book, site_profile(1, stack_level=0))
    accept(book, site_profile(2, stack_level=3))
    by_id = _report(book, {"requestId": 1, "chargingProfile": {"chargingProfileId": [2, 9]}})[1]
    assert [c["id"] for p in by_id for c in p["chargingProfile"]] == [2]
    by_level = _report(book, {"requestId": 2, "chargingProfile": {"stackLevel": 0}})[1]
    assert [c["id"] for p in by_level for c in p["chargingProfile"]] == [1]
    assert _report(book, {"requestId": 3, "chargingProfile": {"chargingLimitSource": ["EMS"]}})[0] == "NoProfiles"
    assert _report(book, {"requestId": 4, "evseId": 2, "chargingProfile": {}})[0] == "NoProfiles"  # K09.FR.04
    purpose = {"chargingProfilePurpose": "TxDefaultProfile"}
    assert _report(book, {"requestId": 5, "chargingProfile": purpose})[0] == "NoProfiles"


# -- GetCompositeSchedule (K08) ------------------------------------------------------------------


def _composite(book: CsmsLimitBook, request: dict[str, Any], now: datetime = NOW) -> dict[str, Any]:
    validate_call("GetCompositeSchedule", request)
    answer = book.composite(request, now)
    validate_result("GetCompositeSchedule", answer)
    return answer


def _periods(answer: dict[str, Any]) -> list[tuple[int, float]]:
    return [(p["startPeriod"], p["limit"]) for p in answer["schedule"]["chargingSchedulePeriod"]]


def test_composite_of_stacked_profiles_as_in_tc_k_40() -> None:
    # TC_K_40_CS (as the 2025-04 erratum rewrites it, in amperes): two profiles with the same
    # startSchedule, stack 0 (6, 8, 10 A over 400 s) and stack 1 (7, 9 A over 150 s); asked x = 10 s later.
    book = new_book()
    start = NOW - timedelta(seconds=10)
    accept(
        book,
        site_profile(1, stack_level=0, start=start, periods=[(0, 6), (100, 8), (200, 10)], schedule={"duration": 400}),
    )
    accept(book, site_profile(2, stack_level=1, start=start, periods=[(0, 7), (100, 9)], schedule={"duration": 150}))
    answer = _composite(
        book, {"evseId": 0, "duration": 350, "chargingRateUnit": "A"}, NOW + timedelta(milliseconds=400)
    )
    assert answer["status"] == "Accepted"
    schedule = answer["schedule"]
    assert schedule["evseId"] == 0 and schedule["duration"] == 350 and schedule["chargingRateUnit"] == "A"
    # Asked 10.4 s after startSchedule: the answer starts on the next whole second, so x = 11 s.
    assert schedule["scheduleStart"] == stamp(NOW + timedelta(seconds=1))
    assert _periods(answer) == [(0, 7), (89, 9), (139, 8), (189, 10)]
    # Once stack 0 has ended (400 s after its start) the grid connection is the limit.
    assert _periods(_composite(book, {"evseId": 0, "duration": 600, "chargingRateUnit": "A"}))[-1] == (390, 250)


def test_composite_without_profiles_is_the_grid_connection_as_in_tc_k_39() -> None:
    answer = _composite(new_book(), {"evseId": 0, "duration": 300})
    assert answer["status"] == "Accepted"
    assert answer["schedule"]["chargingSchedulePeriod"] == [{"startPeriod": 0, "limit": 250.0, "numberPhases": 3}]


def test_composite_in_watts_and_with_other_sources() -> None:
    def ems(start: datetime, duration_s: int) -> list[CompositePeriod]:
        # An EMS limit of 40 A from 60 s to 120 s into the window, nothing else.
        return [CompositePeriod(0, None), CompositePeriod(60, PeriodLimit(40.0, "A")), CompositePeriod(120, None)]

    book = new_book(other_limits=ems)
    accept(book, site_profile(periods=[(0, 100.0)]))
    amps = _composite(book, {"evseId": 0, "duration": 300, "chargingRateUnit": "A"})
    assert _periods(amps) == [(0, 100.0), (60, 40.0), (120, 100.0)]
    watts = _composite(book, {"evseId": 0, "duration": 300, "chargingRateUnit": "W"})
    assert _periods(watts) == [(0, 69_000.0), (60, 27_600.0), (120, 69_000.0)]  # × 230 V × 3 phases


def test_composite_limits_are_rounded_down_to_one_decimal() -> None:
    """#11.9: every limit in the answer has at most one decimal (ChargingSchedulePeriodType) and is
    rounded down, never up: 11 kW on three phases is 15.94 A → 15.9; an EMS's 16.66 A → 16.6."""

    def ems(start: datetime, duration_s: int) -> list[CompositePeriod]:
        return [CompositePeriod(0, None), CompositePeriod(60, PeriodLimit(16.66, "A"))]

    book = new_book(other_limits=ems)
    accept(book, site_profile(unit="W", periods=[(0, 11_000.0), (120, 12_345.67)]))
    amps = _composite(book, {"evseId": 0, "duration": 300, "chargingRateUnit": "A"})
    assert _periods(amps) == [(0, 15.9), (120, 16.6)]  # 15.94 and 16.66 are both 15.9 at 60 s, once rounded
    watts = _composite(book, {"evseId": 0, "duration": 300, "chargingRateUnit": "W"})
    # 16.66 A × 230 V × 3 = 11 495.4 W, below the profile's 12 345.67 W from 120 s.
    assert _periods(watts) == [(0, 11_000.0), (120, 11_495.4)]


@pytest.mark.parametrize(
    ("request_payload", "reason", "options"),
    [
        ({"evseId": 1, "duration": 60}, "UnknownEvse", {}),  # K08.FR.05
        ({"evseId": 0, "duration": 60, "chargingRateUnit": "W"}, "UnsupportedRateUnit", {"rate_units": ("A",)}),
        ({"evseId": 0, "duration": 0}, "InvalidValue", {}),
    ],
)
def test_composite_refusals(request_payload: dict[str, Any], reason: str, options: dict[str, Any]) -> None:
    answer = _composite(new_book(**options), request_payload)
    assert answer["status"] == "Rejected" and answer["statusInfo"]["reasonCode"] == reason


# -- persistence (K01.FR.27) and listeners -------------------------------------------------------


def test_profiles_survive_a_restart(tmp_path: Path) -> None:
    changes: list[int] = []
    with Store.open(tmp_path) as store:
        book = CsmsLimitBook(store.namespace("csms_limits"), grid_limit=GRID)
        book.on_change(lambda: changes.append(len(book.profiles)))
        accept(book, site_profile(1, periods=[(0, 100.0), (600, 80.0)]))
        accept(book, site_profile(2, stack_level=2, kind="Recurring", recurrencyKind="Daily", periods=[(0, 50.0)]))
        assert _clear(book, {"chargingProfileId": 2}) == "Accepted"
        accept(book, site_profile(3, stack_level=1, periods=[(0, 90.0)], schedule={"duration": 300}))
    assert changes == [1, 2, 1, 2]
    with Store.open(tmp_path) as store:
        again = CsmsLimitBook(store.namespace("csms_limits"), grid_limit=GRID)
        assert [p.id for p in again.profiles] == [1, 3]
        assert amperes(again, NOW) == 90.0
        assert amperes(again, NOW + timedelta(seconds=700)) == 80.0
        parts = again.report({"requestId": 1, "chargingProfile": {}})[1]
        assert [c["id"] for p in parts for c in p["chargingProfile"]] == [1, 3]


def test_the_book_is_bounded() -> None:
    book = new_book(max_profiles=2)
    day = timedelta(days=1)
    accept(book, site_profile(1, validTo=stamp(NOW + day)))
    accept(book, site_profile(2, stack_level=1))
    answer = book.set_profile(set_request(site_profile(3, stack_level=2)), NOW)
    assert answer["status"] == "Rejected"
    # Once profile 1 has expired it makes room.
    accept(book, site_profile(3, stack_level=2), NOW + 2 * day)
    assert [p.id for p in book.profiles] == [2, 3]


# -- what the limit engine reads -----------------------------------------------------------------


def test_site_limits_for_the_limit_engine() -> None:
    book = new_book()
    assert book.site_limits_at(NOW) is None
    accept(book, site_profile(1, periods=[(0, 63.0)], schedule={"duration": 60}))
    accept(book, site_profile(2, stack_level=1, unit="W", periods=[(0, 40_000.0)], start=NOW + timedelta(minutes=1)))
    now_limits = book.site_limits_at(NOW)
    assert now_limits is not None and now_limits.phase_current_amperes == (63.0, 63.0, 63.0)
    later = book.site_limits_at(NOW + timedelta(minutes=2))
    assert later is not None and later.power_watts == 40_000.0 and later.phase_current_amperes is None


@dataclass(frozen=True)
class Effective:
    phase_current_amperes: tuple[float | None, float | None, float | None]
    power_watts: float | None


def test_other_sources_steps_from_an_effective_limit() -> None:
    # An EMS-like source: 40 A on L1 for the first two minutes, then 23.46 kW (34 A over three phases), then nothing.
    def effective(at: datetime) -> Effective:
        if at < NOW + timedelta(minutes=2):
            return Effective((40.0, None, 60.0), None)
        if at < NOW + timedelta(minutes=5):
            return Effective((None, None, None), 23_460.0)
        return Effective((None, None, None), None)

    def next_change_after(at: datetime) -> datetime | None:
        upcoming = [t for t in (NOW + timedelta(minutes=2), NOW + timedelta(minutes=5)) if t > at]
        return min(upcoming, default=None)

    book = new_book(other_limits=limit_steps(effective, next_change_after))
    accept(book, site_profile(periods=[(0, 100.0)]))
    answer = _composite(book, {"evseId": 0, "duration": 600, "chargingRateUnit": "A"})
    # The lowest phase counts (a site limit holds on every phase); then the power limit; then the CSMS's.
    assert _periods(answer) == [(0, 40.0), (120, 34.0), (300, 100.0)]


def test_malformed_requests_of_the_other_messages() -> None:
    book = new_book()
    with pytest.raises(RequestMalformed) as raised:
        book.composite({"evseId": 0}, NOW)
    assert raised.value.code == "OccurrenceConstraintViolation"
    with pytest.raises(RequestMalformed) as raised:
        book.clear({"chargingProfileId": "7"})
    assert raised.value.code == "TypeConstraintViolation"
    with pytest.raises(RequestMalformed) as raised:
        book.report({"requestId": 1, "chargingProfile": {"chargingProfileId": []}})
    assert raised.value.code == "OccurrenceConstraintViolation"
