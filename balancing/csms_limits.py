"""The CSMS's site limit: the ChargingStationMaxProfiles the CSMS sets on the controller's own identity.

Theory of operation. Under its own identity the controller is a charging station without EVSEs
(K03): the CSMS limits the whole site by setting a ChargingStationMaxProfile on evseId 0. The
:class:`CsmsLimitBook` is the synchronous, I/O-free keeper of those profiles. It answers the four
requests of the K use cases that concern them, each as a plain function of the request payload:

* SetChargingProfile (K01): accepted only for evseId 0 and purpose ChargingStationMaxProfile, kind
  Absolute or Recurring. Everything else is Rejected with a reasonCode saying why (there is no EVSE
  to put a TxProfile or TxDefaultProfile on, K01.FR.16/28; ExternalConstraints is not the CSMS's to
  set, K01.FR.22; Relative is not allowed for this purpose, K01.FR.38; a unit the controller was not
  configured for, K01.FR.26). A known id is replaced (K01.FR.05). A profile with the same stack level
  and an overlapping validity as another one (which K01.FR.06 forbids the CSMS to send) *replaces*
  that one, as OCPP 1.6 did, rather than being refused: a CSMS that re-sends a site limit with a new
  id then gets what it evidently meant.
* ClearChargingProfile (K10): by id (Accepted / Unknown, K10.FR.01/03) or by criteria combined with
  a logical AND (K10.FR.04).
* GetChargingProfiles (K09): Accepted or NoProfiles, and the ReportChargingProfiles parts to send
  afterwards (same requestId, tbc on all but the last, K09.FR.01/02).
* GetCompositeSchedule (K08) with evseId 0: the site's composite limit from the moment of receipt
  for the requested duration (K08.FR.02/03): the lowest, at every instant, of the CSMS's profiles,
  of the other limit sources handed in (the EMS, configuration) and of the grid connection.

For the limit engine, :meth:`CsmsLimitBook.limit_at` gives the CSMS's limit in force at an instant
and :meth:`CsmsLimitBook.next_change_after` the next instant at which it may change by itself.

The book survives a restart (K01.FR.27): the accepted profiles are kept, as received, in one key of
the :class:`KeyValue` handed in, so each change is a single durable write.

Malformed requests (a wrong type, a missing field) raise :class:`RequestMalformed` with the OCPP-J
error code the caller answers with; what is well-formed but not acceptable is answered Rejected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from balancing.allocator import SiteLimits
from balancing.schedules import (
    ChargingProfile,
    CompositePeriod,
    PeriodLimit,
    RateUnit,
    composite_schedule,
    leading_limit,
    next_change_point,
    round_limit_down,
)

log = logging.getLogger("ocpp_lc.balancing.csms_limits")

#: The purpose the CSMS uses for a site limit on the controller (K03).
SITE_PURPOSE: Final = "ChargingStationMaxProfile"
#: The key under which the book keeps its profiles.
PROFILES_KEY: Final = "profiles"
#: The limit source reported for the CSMS's profiles (ChargingLimitSourceEnumType).
CSMS_SOURCE: Final = "CSO"


class KeyValue(Protocol):
    """Durable keys (the router's store namespace fits); balancing declares what it needs itself."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...


class RequestMalformed(Exception):
    """The request is not a well-formed OCPP message: answer with CALLERROR ``code``."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


#: Other limit sources for the composite: (window start, duration in s) -> their step function over it.
OtherLimits = Callable[[datetime, int], Sequence[CompositePeriod]]


# -- request shapes (only what the book reads; unknown fields such as customData are ignored) -----


class _Request(BaseModel):
    # Strict: "0" is not an evseId (the schema says integer); the profile itself is read by its own model.
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True, strict=True)


class _SetChargingProfile(_Request):
    evse_id: int = Field(alias="evseId")
    charging_profile: dict[str, Any] = Field(alias="chargingProfile")


class _GetCompositeSchedule(_Request):
    duration: int
    evse_id: int = Field(alias="evseId")
    charging_rate_unit: Literal["A", "W"] | None = Field(default=None, alias="chargingRateUnit")


class _ProfileCriterion(_Request):
    charging_profile_purpose: str | None = Field(default=None, alias="chargingProfilePurpose")
    stack_level: int | None = Field(default=None, alias="stackLevel")
    charging_profile_id: Annotated[list[int], Field(min_length=1)] | None = Field(
        default=None, alias="chargingProfileId"
    )
    charging_limit_source: Annotated[list[str], Field(min_length=1, max_length=4)] | None = Field(
        default=None, alias="chargingLimitSource"
    )


class _GetChargingProfiles(_Request):
    request_id: int = Field(alias="requestId")
    evse_id: int | None = Field(default=None, alias="evseId")
    charging_profile: _ProfileCriterion = Field(alias="chargingProfile")


class _ClearCriteria(_Request):
    evse_id: int | None = Field(default=None, alias="evseId")
    charging_profile_purpose: str | None = Field(default=None, alias="chargingProfilePurpose")
    stack_level: int | None = Field(default=None, alias="stackLevel")


class _ClearChargingProfile(_Request):
    charging_profile_id: int | None = Field(default=None, alias="chargingProfileId")
    charging_profile_criteria: _ClearCriteria | None = Field(default=None, alias="chargingProfileCriteria")


M = TypeVar("M", bound=BaseModel)

# Pydantic error types that mean "this is not the message's shape" (a CALLERROR), by RPC error code.
_OCCURRENCE = frozenset({"missing", "too_short", "too_long"})


def _malformed(error: ValidationError) -> RequestMalformed | None:
    """The CALLERROR for a shape problem, or None if the first problem is a value the schema allows."""
    first = error.errors(include_url=False)[0]
    kind = first["type"]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    if kind in _OCCURRENCE:
        return RequestMalformed("OccurrenceConstraintViolation", f"{where}: {first['msg']}")
    if kind == "literal_error":
        return RequestMalformed("PropertyConstraintViolation", f"{where}: {first['msg']}")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return RequestMalformed("TypeConstraintViolation", f"{where}: {first['msg']}")
    return None


def _parse(model: type[M], payload: Mapping[str, Any]) -> M:
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise _malformed(error) or RequestMalformed("FormatViolation", str(error.errors()[0]["msg"])) from None


def _rejected(reason_code: str, detail: str) -> dict[str, Any]:
    # additionalInfo is at most 512 characters (StatusInfoType).
    return {"status": "Rejected", "statusInfo": {"reasonCode": reason_code, "additionalInfo": detail[:512]}}


def _overlap(a: ChargingProfile, b: ChargingProfile) -> bool:
    """Whether the validity periods [validFrom, validTo) of two profiles overlap (open ends unbounded)."""
    a_from = a.valid_from or datetime.min.replace(tzinfo=UTC)
    b_from = b.valid_from or datetime.min.replace(tzinfo=UTC)
    a_to = a.valid_to or datetime.max.replace(tzinfo=UTC)
    b_to = b.valid_to or datetime.max.replace(tzinfo=UTC)
    return a_from < b_to and b_from < a_to


class CsmsLimitBook:
    """The CSMS's ChargingStationMaxProfiles on the controller (see the module docstring).

    ``grid_limit`` is the limit of the grid connection, reported wherever nothing stricter applies;
    ``other_limits`` adds the other sources (EMS, configuration) to GetCompositeSchedule's answer.
    ``rate_units``, ``max_stack_level`` and ``max_periods`` mirror the SmartChargingCtrlr variables
    RateUnit, ProfileStackLevel and PeriodsPerSchedule; ``max_profiles`` bounds the book.
    """

    def __init__(
        self,
        store: KeyValue,
        *,
        grid_limit: PeriodLimit,
        voltage_volts: float = 230.0,
        rate_units: Sequence[RateUnit] = ("A", "W"),
        max_stack_level: int = 8,
        max_periods: int = 24,
        max_profiles: int = 16,
        report_items_per_message: int = 4,
        other_limits: OtherLimits | None = None,
    ) -> None:
        self._store = store
        self.grid_limit = grid_limit
        self.voltage_volts = voltage_volts
        self.rate_units = tuple(rate_units)
        self.max_stack_level = max_stack_level
        self.max_periods = max_periods
        self.max_profiles = max_profiles
        self.report_items_per_message = max(1, report_items_per_message)
        self.other_limits = other_limits
        self._listeners: list[Callable[[], None]] = []
        self._raw: dict[int, dict[str, Any]] = {}
        self._profiles: dict[int, ChargingProfile] = {}
        self._load()

    # -- what the limit engine uses -------------------------------------------------------------

    @property
    def profiles(self) -> list[ChargingProfile]:
        """The accepted profiles, by id."""
        return [self._profiles[key] for key in sorted(self._profiles)]

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (synchronously, no arguments) after every change of the book."""
        self._listeners.append(listener)

    def limit_at(self, now: datetime) -> PeriodLimit | None:
        """The CSMS's site limit in force at ``now`` (per-phase A, or W with numberPhases); None: no limit."""
        return leading_limit(self._profiles.values(), now)

    def next_change_after(self, now: datetime) -> datetime | None:
        """The first instant strictly after ``now`` at which a profile's limit may change; None: never.

        Validity bounds, period starts, duration ends and recurrences, of every profile (see
        :func:`balancing.schedules.next_change_point`): exact, with no horizon, and cheap enough for the
        balancing loop to ask on every pass.
        """
        upcoming = [instant for profile in self._profiles.values() if (instant := next_change_point(profile, now))]
        return min(upcoming, default=None)

    def site_limits_at(self, now: datetime) -> SiteLimits | None:
        """:meth:`limit_at` as the limit engine's SiteLimits: A on every phase (K01.FR.51), or total W."""
        limit = self.limit_at(now)
        if limit is None:
            return None
        if limit.unit == "W":
            return SiteLimits(power_watts=limit.limit)
        # numberPhases limits how many phases one EV may use; on the grid connection every phase may
        # carry the per-phase limit, so it is applied to all three.
        return SiteLimits(phase_current_amperes=(limit.limit, limit.limit, limit.limit))

    # -- SetChargingProfile (K01) ---------------------------------------------------------------

    def set_profile(self, payload: Mapping[str, Any], now: datetime) -> dict[str, Any]:
        """Answer a SetChargingProfileRequest; an accepted profile is stored before this returns."""
        request = _parse(_SetChargingProfile, payload)
        raw = request.charging_profile
        try:
            profile = ChargingProfile.model_validate(raw)
        except ValidationError as error:
            malformed = _malformed(error)
            if malformed is not None:
                raise malformed from None
            first = error.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"])
            if where.startswith("stackLevel"):
                reason = "InvalidStackLevel"
            elif where.startswith("chargingSchedule"):
                reason = "InvalidSchedule"  # a negative limit, periods out of order (K01.FR.31/35)
            else:
                reason = "InvalidProfile"  # e.g. Absolute without startSchedule (K01.FR.40)
            return _rejected(reason, f"{where}: {first['msg']}".strip(": "))
        refusal = self._refusal(request.evse_id, profile)
        if refusal is not None:
            return refusal
        replaced = [
            other.id
            for other in self._profiles.values()
            if other.id != profile.id and other.stack_level == profile.stack_level and _overlap(other, profile)
        ]
        # Profiles no longer valid can never apply again: make room for new ones (bounded book).
        expired = [
            other.id for other in self._profiles.values() if other.valid_to is not None and other.valid_to <= now
        ]
        remaining = set(self._profiles) - set(replaced) - set(expired) - {profile.id}
        if len(remaining) >= self.max_profiles:
            return _rejected("InvalidValue", f"the controller keeps at most {self.max_profiles} site profiles")
        for gone in (*replaced, *expired):
            self._raw.pop(gone, None)
            self._profiles.pop(gone, None)
        self._raw[profile.id] = dict(raw)
        self._profiles[profile.id] = profile
        self._save()
        if replaced:
            log.info("CSMS site profile %d replaces %s (same stack level)", profile.id, replaced)
        return {"status": "Accepted"}

    def _refusal(self, evse_id: int, profile: ChargingProfile) -> dict[str, Any] | None:
        purpose = profile.charging_profile_purpose
        if evse_id != 0:
            return _rejected("UnknownEvse", f"the Local Controller has no EVSE {evse_id}, only evseId 0")  # K01.FR.28
        if purpose == "TxProfile":
            return _rejected("InvalidProfile", "a TxProfile needs an EVSE with a transaction (K01.FR.16)")
        if purpose == "TxDefaultProfile":
            return _rejected("UnsupportedParam", "the Local Controller has no EVSEs to apply a TxDefaultProfile to")
        if purpose != SITE_PURPOSE:
            return _rejected("InvalidProfile", f"{purpose} is not set by the CSMS (K01.FR.22)")
        if profile.charging_profile_kind == "Relative":
            return _rejected("InvalidProfile", "a ChargingStationMaxProfile cannot be Relative (K01.FR.38)")
        if profile.stack_level > self.max_stack_level:
            return _rejected("InvalidStackLevel", f"stackLevel above ProfileStackLevel ({self.max_stack_level})")
        if len(profile.charging_schedule) != 1:
            return _rejected("InvalidSchedule", "exactly one chargingSchedule (K01.FR.34)")
        schedule = profile.schedule
        if schedule.charging_rate_unit not in self.rate_units:
            return _rejected("UnsupportedRateUnit", f"chargingRateUnit {schedule.charging_rate_unit}")  # K01.FR.26
        if len(schedule.charging_schedule_period) > self.max_periods:
            return _rejected("InvalidSchedule", f"more than PeriodsPerSchedule ({self.max_periods}) periods")
        if any(period.phase_to_use is not None for period in schedule.charging_schedule_period):
            return _rejected("UnsupportedParam", "phaseToUse: the site's phases cannot be switched (K01.FR.48)")
        if profile.valid_from and profile.valid_to and profile.valid_to <= profile.valid_from:
            return _rejected("InvalidProfile", "validTo is not after validFrom")
        return None

    # -- ClearChargingProfile (K10) -------------------------------------------------------------

    def clear(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Answer a ClearChargingProfileRequest: Accepted if any profile was cleared, else Unknown."""
        request = _parse(_ClearChargingProfile, payload)
        if request.charging_profile_id is not None:  # K10.FR.03: the id alone decides
            matched = [request.charging_profile_id] if request.charging_profile_id in self._profiles else []
        else:
            criteria = request.charging_profile_criteria or _ClearCriteria()
            matched = [
                profile.id
                for profile in self._profiles.values()
                if criteria.evse_id in (None, 0)
                and criteria.charging_profile_purpose in (None, profile.charging_profile_purpose)
                and criteria.stack_level in (None, profile.stack_level)
            ]
        if not matched:
            return {"status": "Unknown"}  # K10.FR.01
        for gone in matched:
            self._raw.pop(gone, None)
            self._profiles.pop(gone, None)
        self._save()
        return {"status": "Accepted"}

    # -- GetChargingProfiles (K09) --------------------------------------------------------------

    def report(self, payload: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Answer a GetChargingProfilesRequest: the response, and the ReportChargingProfiles parts to send."""
        request = _parse(_GetChargingProfiles, payload)
        criterion = request.charging_profile
        matched: list[dict[str, Any]] = []
        if request.evse_id in (None, 0):  # K09.FR.05/06; the controller has no other EVSE (K09.FR.04)
            for profile in self.profiles:
                if (
                    (criterion.charging_profile_id is None or profile.id in criterion.charging_profile_id)
                    and criterion.stack_level in (None, profile.stack_level)
                    and criterion.charging_profile_purpose in (None, profile.charging_profile_purpose)
                    and (criterion.charging_limit_source is None or CSMS_SOURCE in criterion.charging_limit_source)
                ):
                    matched.append(self._raw[profile.id])
        if not matched:
            return {"status": "NoProfiles"}, []
        size = self.report_items_per_message
        chunks = [matched[index : index + size] for index in range(0, len(matched), size)]
        parts = []
        for index, chunk in enumerate(chunks):
            part: dict[str, Any] = {
                "requestId": request.request_id,  # K09.FR.01
                "chargingLimitSource": CSMS_SOURCE,
                "evseId": 0,
                "chargingProfile": list(chunk),
            }
            if index < len(chunks) - 1:
                part["tbc"] = True  # K09.FR.02
            parts.append(part)
        return {"status": "Accepted"}, parts

    # -- GetCompositeSchedule (K08) -------------------------------------------------------------

    def composite(self, payload: Mapping[str, Any], now: datetime) -> dict[str, Any]:
        """Answer a GetCompositeScheduleRequest for evseId 0: the site's composite limit from ``now``."""
        request = _parse(_GetCompositeSchedule, payload)
        if request.evse_id != 0:
            return _rejected("UnknownEvse", f"the Local Controller has no EVSE {request.evse_id}")  # K08.FR.05
        unit = request.charging_rate_unit
        if unit is not None and unit not in self.rate_units:
            return _rejected("UnsupportedRateUnit", f"chargingRateUnit {unit}")  # K08.FR.07
        if request.duration < 1:
            return _rejected("InvalidValue", "duration must be at least 1 s")
        # startPeriod counts whole seconds: start on the next whole second, so that the answer never
        # describes a moment before the request arrived (a profile starting this very second is in it).
        start = now.astimezone(UTC)
        if start.microsecond:
            start = start.replace(microsecond=0) + timedelta(seconds=1)
        if unit is None:
            leading = self.limit_at(start)
            unit = leading.unit if leading is not None else self.grid_limit.unit
        periods = self.composite_periods(start, request.duration, unit)
        schedule_periods: list[dict[str, Any]] = []
        for period in periods:
            assert period.limit is not None  # the grid limit fills every gap
            start_period = math.ceil(period.start_s)
            if start_period >= request.duration:
                continue
            entry: dict[str, Any] = {"startPeriod": start_period, "limit": round_limit_down(period.limit.limit)}
            if period.limit.number_phases is not None:
                entry["numberPhases"] = period.limit.number_phases
            if schedule_periods and schedule_periods[-1]["startPeriod"] == start_period:
                schedule_periods[-1] = entry  # two changes within one second: the later one holds
            elif schedule_periods and {**schedule_periods[-1], "startPeriod": start_period} == entry:
                continue  # equal once rounded
            else:
                schedule_periods.append(entry)
        return {
            "status": "Accepted",
            "schedule": {
                "evseId": 0,
                "duration": request.duration,
                "scheduleStart": start.isoformat().replace("+00:00", "Z"),
                "chargingRateUnit": unit,
                "chargingSchedulePeriod": schedule_periods,
            },
        }

    def composite_periods(self, start: datetime, duration_s: int, unit: RateUnit) -> list[CompositePeriod]:
        """The composite over ``[start, start + duration_s)`` in ``unit``: the lowest of every source."""
        sources = [composite_schedule(self.profiles, start, duration_s, self.voltage_volts, unit)]
        if self.other_limits is not None:
            sources.append(list(self.other_limits(start, duration_s)))
        points = sorted({period.start_s for source in sources for period in source} | {0.0})
        merged: list[CompositePeriod] = []
        for point in points:
            limits = [limit for source in sources if (limit := _step_at(source, point)) is not None]
            limits.append(self.grid_limit)
            lowest = self._lowest(limits, unit)
            if merged and merged[-1].limit == lowest:
                continue
            merged.append(CompositePeriod(point, lowest))
        return merged

    def _lowest(self, limits: Sequence[PeriodLimit], unit: RateUnit) -> PeriodLimit:
        volts = self.voltage_volts
        values = [limit.amperes(volts) if unit == "A" else limit.watts(volts) for limit in limits]
        phases = [limit.number_phases for limit in limits if limit.number_phases is not None]
        return PeriodLimit(min(values), unit, min(phases) if phases else None)

    # -- persistence ----------------------------------------------------------------------------

    def _load(self) -> None:
        stored = self._store.get(PROFILES_KEY, [])
        for raw in stored if isinstance(stored, list) else []:
            try:
                profile = ChargingProfile.model_validate(raw)
            except (ValidationError, TypeError):
                # Stored by us after validation, so only damage or an older format gets here; one bad
                # entry must not lose the others (nor stop the appliance).
                log.error("CSMS site profile in the store is unreadable (%.200r); ignored", raw)
                continue
            self._raw[profile.id] = dict(raw)
            self._profiles[profile.id] = profile

    def _save(self) -> None:
        self._store.put(PROFILES_KEY, [self._raw[key] for key in sorted(self._raw)])
        for listener in self._listeners:
            listener()


class EffectiveLike(Protocol):
    """What :func:`limit_steps` reads of an effective limit (``balancing.limits.EffectiveLimit`` fits)."""

    @property
    def phase_current_amperes(self) -> tuple[float | None, float | None, float | None]: ...

    @property
    def power_watts(self) -> float | None: ...


#: Safety net: a source that changed every second would otherwise make a composite answer unbounded.
MAX_STEPS: Final = 1000


def limit_steps(
    effective: Callable[[datetime], EffectiveLike],
    next_change_after: Callable[[datetime], datetime | None],
    voltage_volts: float = 230.0,
) -> OtherLimits:
    """Other limit sources (e.g. ``LimitSources.effective`` / ``.next_change_after``) as :data:`OtherLimits`.

    Each step is the lowest per-phase current of the source at that instant, its power limit counted
    as per-phase amperes over three phases (K01.FR.50), so the composite can take the lowest of all.
    """

    def steps(start: datetime, duration_s: int) -> list[CompositePeriod]:
        end = start + timedelta(seconds=duration_s)
        found: list[CompositePeriod] = []
        at: datetime | None = start
        while at is not None and at < end and len(found) < MAX_STEPS:
            limit = effective(at)
            candidates = [value for value in limit.phase_current_amperes if value is not None and math.isfinite(value)]
            if limit.power_watts is not None:
                candidates.append(limit.power_watts / (voltage_volts * 3))
            value = PeriodLimit(min(candidates), "A", None) if candidates else None
            if not found or found[-1].limit != value:
                found.append(CompositePeriod((at - start).total_seconds(), value))
            at = next_change_after(at)
        return found

    return steps


def _step_at(periods: Sequence[CompositePeriod], offset_s: float) -> PeriodLimit | None:
    """The value of a step function (periods in increasing start order) at ``offset_s``."""
    found: PeriodLimit | None = None
    for period in periods:
        if period.start_s <= offset_s:
            found = period.limit
        else:
            break
    return found


__all__ = [
    "CSMS_SOURCE",
    "SITE_PURPOSE",
    "CsmsLimitBook",
    "EffectiveLike",
    "KeyValue",
    "OtherLimits",
    "RequestMalformed",
    "limit_steps",
]
