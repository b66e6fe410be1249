"""Charging-schedule arithmetic: what limit an OCPP ChargingProfile imposes at an instant, and over a window.

Theory of operation. A profile is valid from ``validFrom`` (inclusive, K01.FR.36) to ``validTo``
(exclusive, K01.FR.37). Its schedule starts at ``startSchedule`` (Absolute: once, nothing before it,
K01.FR.30; Recurring: again every day or week from there; Relative: at a start the caller supplies,
e.g. when the transaction's power path closed). A period runs until the next one starts or the
schedule's ``duration`` ends (K01.FR.11/12); after that the profile imposes nothing. Within one purpose
the valid profile with the highest stack level that has a period at that instant leads (K01.FR.17); the
composite is the lowest of the leading limits of the purposes, a TxProfile replacing the TxDefaultProfile
(Part 2 §3.5, K08.FR.04), and the lowest numberPhases (errata 2025-01, §3.7).

Limits in W become per-phase amperes as ``W / (voltage × phases)`` (K01.FR.50, nominal voltage, the
period's numberPhases, 3 when absent); limits in A are per phase (K01.FR.51).

The models read OCPP's JSON (camelCase) directly: ``ChargingProfile.model_validate(payload)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

RateUnit = Literal["A", "W"]
Purpose = Literal["ChargingStationMaxProfile", "TxDefaultProfile", "TxProfile", "ChargingStationExternalConstraints"]
DEFAULT_PHASES = 3
_RECURRENCE_S = {"Daily": 86_400, "Weekly": 7 * 86_400}


class _OcppModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True)


class ChargingSchedulePeriod(_OcppModel):
    start_period: Annotated[int, Field(ge=0)]
    limit: Annotated[float, Field(ge=0, allow_inf_nan=False)]
    number_phases: Annotated[int, Field(ge=1, le=3)] | None = None
    phase_to_use: Annotated[int, Field(ge=1, le=3)] | None = None


class ChargingSchedule(_OcppModel):
    id: int = 0
    start_schedule: AwareDatetime | None = None
    duration: Annotated[int, Field(ge=0)] | None = None
    charging_rate_unit: RateUnit
    charging_schedule_period: Annotated[tuple[ChargingSchedulePeriod, ...], Field(min_length=1)]
    min_charging_rate: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> ChargingSchedule:
        starts = [period.start_period for period in self.charging_schedule_period]
        if starts[0] != 0:
            raise ValueError("the first chargingSchedulePeriod must start at 0 (K01.FR.31)")
        if any(b <= a for a, b in itertools.pairwise(starts)):
            raise ValueError("chargingSchedulePeriod must be in increasing startPeriod order (K01.FR.35)")
        return self


class ChargingProfile(_OcppModel):
    id: int
    stack_level: Annotated[int, Field(ge=0)]
    charging_profile_purpose: Purpose
    charging_profile_kind: Literal["Absolute", "Recurring", "Relative"]
    recurrency_kind: Literal["Daily", "Weekly"] | None = None
    valid_from: AwareDatetime | None = None
    valid_to: AwareDatetime | None = None
    transaction_id: str | None = None
    # 2.0.1 carries a list (more than one only for ISO 15118 offers, K01.FR.34); the first one governs.
    charging_schedule: Annotated[tuple[ChargingSchedule, ...], Field(min_length=1, max_length=3)]

    @model_validator(mode="after")
    def _kind(self) -> ChargingProfile:
        start = self.charging_schedule[0].start_schedule
        if self.charging_profile_kind in ("Absolute", "Recurring") and start is None:
            raise ValueError("Absolute and Recurring profiles need startSchedule (K01.FR.40)")
        if self.charging_profile_kind == "Recurring" and self.recurrency_kind is None:
            raise ValueError("a Recurring profile needs recurrencyKind")
        return self

    @property
    def schedule(self) -> ChargingSchedule:
        return self.charging_schedule[0]


@dataclass(frozen=True, slots=True)
class PeriodLimit:
    """One limit in force: its value in ``unit``, and the phases it assumes."""

    limit: float
    unit: RateUnit
    number_phases: int | None = None

    def amperes(self, voltage_volts: float) -> float:
        """Per-phase amperes (K01.FR.50/51)."""
        return to_amperes(self.limit, self.unit, self.number_phases, voltage_volts)

    def watts(self, voltage_volts: float) -> float:
        """Total watts over the phases."""
        return to_watts(self.limit, self.unit, self.number_phases, voltage_volts)


def round_limit_down(limit: float) -> float:
    """A limit as OCPP carries it, with at most one decimal (ChargingSchedulePeriodType ``limit``), rounded
    down so that what the controller writes never allows more than the exact value (the 1e-9 absorbs
    binary noise such as 8.1 * 10 = 80.99999999999999)."""
    return math.floor(limit * 10 + 1e-9) / 10


def to_amperes(limit: float, unit: RateUnit, number_phases: int | None, voltage_volts: float) -> float:
    """A limit as per-phase amperes: W ÷ (voltage × phases) (K01.FR.50); A is already per phase."""
    if unit == "A":
        return limit
    return limit / (voltage_volts * (number_phases or DEFAULT_PHASES))


def to_watts(limit: float, unit: RateUnit, number_phases: int | None, voltage_volts: float) -> float:
    """A limit as total watts: per-phase A × voltage × phases; W is already total."""
    if unit == "W":
        return limit
    return limit * voltage_volts * (number_phases or DEFAULT_PHASES)


def _schedule_origin(profile: ChargingProfile, at: datetime, relative_start: datetime | None) -> datetime | None:
    """When the occurrence of the schedule that covers ``at`` started (``None``: none has started)."""
    schedule = profile.schedule
    if profile.charging_profile_kind == "Relative":
        return relative_start if relative_start is not None and at >= relative_start else None
    start = schedule.start_schedule
    assert start is not None  # checked by the model
    if at < start:
        return None
    if profile.charging_profile_kind == "Absolute":
        return start
    period_s = _RECURRENCE_S[profile.recurrency_kind or "Daily"]
    cycles = int((at - start).total_seconds() // period_s)
    return start + timedelta(seconds=cycles * period_s)


def is_valid_at(profile: ChargingProfile, at: datetime) -> bool:
    """validFrom <= at < validTo (K01.FR.36/37); unset bounds are open (K01.FR.10)."""
    if profile.valid_from is not None and at < profile.valid_from:
        return False
    return not (profile.valid_to is not None and at >= profile.valid_to)


def limit_at(profile: ChargingProfile, at: datetime, relative_start: datetime | None = None) -> PeriodLimit | None:
    """The limit ``profile`` imposes at ``at``, or ``None`` if it imposes nothing then."""
    if not is_valid_at(profile, at):
        return None
    origin = _schedule_origin(profile, at, relative_start)
    if origin is None:
        return None
    elapsed_s = (at - origin).total_seconds()
    schedule = profile.schedule
    if schedule.duration is not None and elapsed_s >= schedule.duration:
        return None  # past the duration: K01.FR.11 (and K01.FR.13 for a recurring one)
    chosen: ChargingSchedulePeriod | None = None
    for period in schedule.charging_schedule_period:
        if period.start_period <= elapsed_s:
            chosen = period
        else:
            break
    assert chosen is not None  # the first period starts at 0
    return PeriodLimit(chosen.limit, schedule.charging_rate_unit, chosen.number_phases)


def leading_limit(
    profiles: Iterable[ChargingProfile], at: datetime, relative_start: datetime | None = None
) -> PeriodLimit | None:
    """Among profiles of one purpose, the limit of the highest stack level that has one at ``at``."""
    best: tuple[int, int, PeriodLimit] | None = None
    for profile in profiles:
        found = limit_at(profile, at, relative_start)
        # Same stack level and purpose must not overlap (K01.FR.06); should they, the lower id wins so
        # the answer does not depend on the order profiles arrived in.
        if found is not None and (best is None or (profile.stack_level, -profile.id) > best[:2]):
            best = (profile.stack_level, -profile.id, found)
    return None if best is None else best[2]


def composite_limit_at(
    profiles: Iterable[ChargingProfile], at: datetime, voltage_volts: float, relative_start: datetime | None = None
) -> PeriodLimit | None:
    """The composite limit at ``at``: the lowest of the purposes' leading limits (Part 2 §3.5).

    The result is in amperes if any leading limit is in amperes, else in watts; numberPhases is the
    lowest of the leading ones.
    """
    by_purpose: dict[str, list[ChargingProfile]] = {}
    for profile in profiles:
        by_purpose.setdefault(profile.charging_profile_purpose, []).append(profile)
    leading: list[PeriodLimit] = []
    tx = leading_limit(by_purpose.get("TxProfile", ()), at, relative_start)
    for purpose, members in by_purpose.items():
        if purpose == "TxDefaultProfile" and tx is not None:
            continue  # a TxProfile overrules the TxDefaultProfile
        found = tx if purpose == "TxProfile" else leading_limit(members, at, relative_start)
        if found is not None:
            leading.append(found)
    if not leading:
        return None
    phases = [limit.number_phases for limit in leading if limit.number_phases is not None]
    number_phases = min(phases) if phases else None
    if all(limit.unit == "W" for limit in leading):
        return PeriodLimit(min(limit.limit for limit in leading), "W", number_phases)
    amperes = min(limit.amperes(voltage_volts) for limit in leading)
    return PeriodLimit(amperes, "A", number_phases)


def _origins(
    profile: ChargingProfile, start: datetime, end: datetime | None, relative_start: datetime | None
) -> list[datetime]:
    """The instants ``profile``'s schedule counts its periods from: the transaction's start (Relative),
    startSchedule (Absolute), or each occurrence of a Recurring one from the one in progress at ``start``
    on, up to ``end`` (``None``: that one and the next, after which every later one starts later still)."""
    schedule = profile.schedule
    if profile.charging_profile_kind == "Relative":
        return [] if relative_start is None else [relative_start]
    assert schedule.start_schedule is not None
    if profile.charging_profile_kind == "Absolute":
        return [schedule.start_schedule]
    period_s = _RECURRENCE_S[profile.recurrency_kind or "Daily"]
    cycle = max(0, math.floor((start - schedule.start_schedule).total_seconds() / period_s))
    if end is None:
        return [schedule.start_schedule + timedelta(seconds=(cycle + extra) * period_s) for extra in (0, 1)]
    origins = []
    while (origin := schedule.start_schedule + timedelta(seconds=cycle * period_s)) < end:
        origins.append(origin)
        cycle += 1
    return origins


def _change_points(
    profile: ChargingProfile, start: datetime, end: datetime, relative_start: datetime | None
) -> set[datetime]:
    """Instants in [start, end) where ``profile``'s limit may change."""
    points = {instant for instant in (profile.valid_from, profile.valid_to) if instant is not None}
    schedule = profile.schedule
    offsets = [period.start_period for period in schedule.charging_schedule_period]
    if schedule.duration is not None:
        offsets.append(schedule.duration)
    for origin in _origins(profile, start, end, relative_start):
        points.update(origin + timedelta(seconds=offset) for offset in offsets)
    return {point for point in points if start < point < end}


def next_change_point(
    profile: ChargingProfile, now: datetime, relative_start: datetime | None = None
) -> datetime | None:
    """The first instant strictly after ``now`` at which ``profile``'s limit may change; None: never again.

    The candidates are those of :func:`_change_points` that lie within the validity (its bounds
    included): validFrom and validTo, period starts, the end of ``duration``, and for a Recurring profile
    the occurrence in progress and the next one (every later occurrence starts after that one). No
    horizon is needed, and the cost is one pass over the periods.
    """
    if profile.valid_to is not None and now >= profile.valid_to:
        return None
    if profile.valid_from is not None and now < profile.valid_from:
        return profile.valid_from  # nothing is imposed before it, so nothing changes before it
    schedule = profile.schedule
    offsets = sorted({period.start_period for period in schedule.charging_schedule_period} | {schedule.duration or 0})
    candidates = [] if profile.valid_to is None else [profile.valid_to]
    for origin in _origins(profile, now, None, relative_start):
        later = (point for offset in offsets if (point := origin + timedelta(seconds=offset)) > now)
        first = next(later, None)
        if first is not None:
            candidates.append(first)
    return min(candidates, default=None)


@dataclass(frozen=True, slots=True)
class CompositePeriod:
    """One interval of a composite schedule; ``limit`` is ``None`` where no profile imposes anything."""

    start_s: float  # seconds from the window's start, as GetCompositeSchedule's startPeriod
    limit: PeriodLimit | None


def composite_schedule(
    profiles: Sequence[ChargingProfile],
    start: datetime,
    duration_s: int,
    voltage_volts: float,
    unit: RateUnit | None = None,
    relative_start: datetime | None = None,
) -> list[CompositePeriod]:
    """The composite over ``[start, start + duration_s)`` as periods (K08.FR.02), adjacent equal ones merged.

    With ``unit`` given, every limit is converted to it (numberPhases of the period, else 3).
    """
    end = start + timedelta(seconds=duration_s)
    points = {start}
    for profile in profiles:
        points |= _change_points(profile, start, end, relative_start)
    periods: list[CompositePeriod] = []
    for point in sorted(points):
        limit = composite_limit_at(profiles, point, voltage_volts, relative_start)
        if limit is not None and unit is not None and limit.unit != unit:
            value = limit.amperes(voltage_volts) if unit == "A" else limit.watts(voltage_volts)
            limit = PeriodLimit(value, unit, limit.number_phases)
        if periods and periods[-1].limit == limit:
            continue
        periods.append(CompositePeriod((point - start).total_seconds(), limit))
    return periods
