"""Site limits from outside the configuration: EMS sources, and the effective limit at an instant.

Theory of operation. An energy-management system (EMS, K14) sets a limit on the grid connection per
named *source* ("pv", "tariff", "dso"): either a constant, or a schedule of periods (offsets in seconds
from ``start_schedule``, each running until the next one starts), in per-phase amperes (``A``, each of
L1, L2, L3, as OCPP's chargingRateUnit A, K01.FR.51) or in watts over all phases (``W``). Every limit
carries a validity (``valid_until``, or ``valid_for_s`` from receipt, or the configured default): an
EMS that stops talking must not pin the site to an old value for ever. Once its validity has passed, a
source is *stale* and contributes the configured failsafe current instead of its own value, until it
is set again or released. Before ``start_schedule`` a source imposes nothing.

The total load must stay within every limit an external system gives (K14.FR.01), so the limit in
force at an instant is, per phase, the lowest of the configured grid limit, the CSMS's
site limit (a callable, so that its composite schedule is evaluated at the same instant) and every EMS
source; each value remembers where it came from (``config``, ``csms``, ``ems:<name>``,
``failsafe:<name>``), so operators can see who is holding the site back. Ties keep the earlier one in
that order, so the answer does not depend on the order sources were set.

A source whose stored limit cannot be read back at start (a damaged store entry) is not dropped: the
EMS meant to limit the site and nobody knows how far any more, so it is *damaged* and stale, holding
the failsafe current, until the EMS sets or releases it again (logged, counted in
``ocpp_lc_ems_limits_damaged_total``, ``"damaged": true`` in ``GET /api/v1/limits``).

Durability: :meth:`LimitSources.set` and :meth:`LimitSources.release` write the store first and change
memory only once the write has returned; an HTTP 200 therefore means the limit survives a restart and
a power cut (see ``router/store.py``), and a write that fails leaves the limit in force unchanged.

Changes: :attr:`LimitSources.version` grows by one on every set and release (the balancing loop
compares it with the version it last allocated for), ``on_change`` is called after each, and
:meth:`LimitSources.next_change_after` says when the limit changes by itself (the next period of an
EMS schedule, a validity running out, a change point of the CSMS's site profiles), so the loop can
sleep until then rather than poll.

Nothing here does I/O beyond the store handed in, and nothing imports trio: time comes from the
caller (``now``) or from the injected wall clock.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, Counter
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from .allocator import SiteLimits

log = logging.getLogger("ocpp_lc.balancing.limits")

RateUnit = Literal["A", "W"]
PHASE_NAMES = ("L1", "L2", "L3")
#: Source names travel in URL paths and metric labels: short, and nothing that needs escaping.
SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: A week: longer than any EMS should go without saying anything.
MAX_VALIDITY_S = 7 * 86_400
#: Periods in one schedule (a day in quarter hours is 96).
MAX_PERIODS = 192
#: Nominal voltage used to bound watt limits; the site's own voltage is the allocator's business.
BOUND_VOLTAGE_VOLTS = 230.0
NO_LIMITS = SiteLimits()


class LimitStore(Protocol):
    """Durable keys of one namespace (the router's store namespace satisfies it)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        ...

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; durable when it returns."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""
        ...

    def items(self) -> dict[str, Any]:
        """Every key and value of the namespace."""
        ...


@dataclass(frozen=True, slots=True)
class LimitBounds:
    """What the installer allows an EMS to ask for, and what a stale limit falls back to."""

    max_current_amperes: float = 10_000.0
    failsafe_current_amperes: float = 0.0
    default_validity_s: float = 900.0
    max_validity_s: float = MAX_VALIDITY_S
    max_sources: int = 16

    @property
    def max_power_watts(self) -> float:
        """The watt bound that matches :attr:`max_current_amperes` on three phases at 230 V."""
        return self.max_current_amperes * 3 * BOUND_VOLTAGE_VOLTS


class LimitInvalid(ValueError):
    """A limit request that cannot be used; ``problems`` maps each field (dotted) to what is wrong."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in self.problems.items()))


_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
_NonNegative = Annotated[float, Field(ge=0)]


class PeriodRequest(BaseModel):
    """One period of a schedule: from ``start_offset_s`` after the schedule's start until the next one."""

    model_config = _STRICT
    start_offset_s: Annotated[int, Field(ge=0)]
    limit: _NonNegative


class LimitRequest(BaseModel):
    """The body of ``PUT /api/v1/limits/{source}``: a constant ``limit`` or ``periods``, in ``unit``."""

    model_config = _STRICT
    unit: RateUnit
    limit: _NonNegative | None = None
    periods: Annotated[tuple[PeriodRequest, ...], Field(min_length=1, max_length=MAX_PERIODS)] | None = None
    start_schedule: AwareDatetime | None = None
    valid_for_s: Annotated[float, Field(gt=0)] | None = None
    valid_until: AwareDatetime | None = None


@dataclass(frozen=True, slots=True)
class EmsLimit:
    """One source's limit as accepted: ``periods`` are (offset from ``start``, limit in ``unit``)."""

    source: str
    unit: RateUnit
    periods: tuple[tuple[float, float], ...]
    start: datetime
    received_at: datetime
    valid_until: datetime
    #: Found unreadable in the store: no schedule, stale from the moment it was found (``valid_until``).
    damaged: bool = False

    def is_stale(self, now: datetime) -> bool:
        """True once the validity has run out (the failsafe applies instead)."""
        return now >= self.valid_until

    def age_s(self, now: datetime) -> float:
        """Seconds since the EMS last set this limit."""
        return max(0.0, (now - self.received_at).total_seconds())

    def scheduled_at(self, now: datetime) -> float | None:
        """The schedule's value at ``now`` in :attr:`unit` (ignoring validity); None before the start."""
        elapsed_s = (now - self.start).total_seconds()
        value: float | None = None
        for offset_s, limit in self.periods:
            if offset_s <= elapsed_s:
                value = limit
            else:
                break
        return value

    def to_stored(self) -> dict[str, Any]:
        """The msgpack-friendly form kept in the store."""
        return {
            "unit": self.unit,
            "periods": [[offset_s, limit] for offset_s, limit in self.periods],
            "start": self.start.isoformat(),
            "received_at": self.received_at.isoformat(),
            "valid_until": self.valid_until.isoformat(),
        }

    @staticmethod
    def from_stored(source: str, stored: Mapping[str, Any]) -> EmsLimit:
        """Rebuild a limit from :meth:`to_stored`'s form; ValueError/KeyError/TypeError if it is not that."""
        unit = stored["unit"]
        if unit not in ("A", "W"):
            raise ValueError(f"unknown unit {unit!r}")
        periods = tuple((float(offset_s), float(limit)) for offset_s, limit in stored["periods"])
        if not periods:
            raise ValueError("no periods")
        # What parse_limit_request guarantees, checked again: a NaN or a naive time would poison every
        # comparison the limit engine makes later, far from here.
        if not all(math.isfinite(offset_s) and math.isfinite(limit) and limit >= 0 for offset_s, limit in periods):
            raise ValueError("a period is negative or not finite")
        if any(b[0] <= a[0] for a, b in itertools.pairwise(periods)):
            raise ValueError("periods out of order")
        times = [datetime.fromisoformat(stored[key]) for key in ("start", "received_at", "valid_until")]
        if any(moment.tzinfo is None for moment in times):
            raise ValueError("a time without a time zone")
        return EmsLimit(source, unit, periods, start=times[0], received_at=times[1], valid_until=times[2])

    @staticmethod
    def damaged_at(source: str, found_at: datetime) -> EmsLimit:
        """The stand-in for a source whose stored limit is unreadable: stale (the failsafe) from ``found_at``."""
        return EmsLimit(source, "A", (), start=found_at, received_at=found_at, valid_until=found_at, damaged=True)


def _field_name(loc: Iterable[int | str]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def parse_limit_request(source: str, body: bytes, now: datetime, bounds: LimitBounds) -> EmsLimit:
    """Check a request body against the schema and the bounds; the accepted limit, or LimitInvalid.

    Every problem is reported, each under the field it concerns (``body`` for the document as a whole):
    malformed JSON, unknown fields, wrong types, negative or non-finite numbers, an unknown unit,
    values above the configured maximum, periods out of order, a validity that has already passed.
    """
    problems: dict[str, str] = {}
    if not SOURCE_NAME.fullmatch(source):
        problems["source"] = "must be 1 to 64 letters, digits, '_', '-' or '.'"
    try:
        request = LimitRequest.model_validate_json(body)
    except ValidationError as error:
        for detail in error.errors(include_url=False):
            field = _field_name(detail["loc"])
            message = detail["msg"]
            if detail["type"] == "extra_forbidden":
                message = "unknown field (known: unit, limit, periods, start_schedule, valid_for_s, valid_until)"
            elif field == "unit":
                message = "must be 'A' (per phase) or 'W' (all phases together)"
            problems.setdefault(field, message)
        raise LimitInvalid(problems) from None
    problems |= _semantic_problems(request, now, bounds)
    if problems:
        raise LimitInvalid(problems)
    if request.periods is not None:
        periods = tuple((float(period.start_offset_s), period.limit) for period in request.periods)
    else:
        assert request.limit is not None
        periods = ((0.0, request.limit),)
    if request.valid_until is not None:
        valid_until = request.valid_until
    else:
        valid_until = now + timedelta(seconds=request.valid_for_s or bounds.default_validity_s)
    return EmsLimit(
        source=source,
        unit=request.unit,
        periods=periods,
        start=request.start_schedule or now,
        received_at=now,
        valid_until=valid_until,
    )


def _semantic_problems(request: LimitRequest, now: datetime, bounds: LimitBounds) -> dict[str, str]:
    """What the schema cannot say: one of limit/periods, order, bounds, validity in the future."""
    problems: dict[str, str] = {}
    maximum = bounds.max_current_amperes if request.unit == "A" else bounds.max_power_watts
    unit_words = "A per phase" if request.unit == "A" else "W"
    if (request.limit is None) == (request.periods is None):
        problems["limit"] = "give either 'limit' (a constant) or 'periods' (a schedule), not both or neither"
    if request.limit is not None and request.limit > maximum:
        problems["limit"] = f"must be at most {maximum:g} {unit_words} (the configured maximum)"
    for index, period in enumerate(request.periods or ()):
        if period.limit > maximum:
            problems[f"periods.{index}.limit"] = f"must be at most {maximum:g} {unit_words} (the configured maximum)"
        if index == 0 and period.start_offset_s != 0:
            problems["periods.0.start_offset_s"] = "the first period must start at offset 0"
        elif index > 0 and period.start_offset_s <= request.periods[index - 1].start_offset_s:  # type: ignore[index]
            problems[f"periods.{index}.start_offset_s"] = "periods must be in increasing start_offset_s order"
        elif period.start_offset_s > bounds.max_validity_s:
            problems[f"periods.{index}.start_offset_s"] = f"must be at most {bounds.max_validity_s:g} s"
    if request.valid_for_s is not None and request.valid_until is not None:
        problems["valid_until"] = "give valid_for_s or valid_until, not both"
    if request.valid_for_s is not None and request.valid_for_s > bounds.max_validity_s:
        problems["valid_for_s"] = f"must be at most {bounds.max_validity_s:g} s"
    if request.valid_until is not None:
        ahead_s = (request.valid_until - now).total_seconds()
        if ahead_s <= 0:
            problems["valid_until"] = f"is not in the future (now is {now.isoformat()})"
        elif ahead_s > bounds.max_validity_s:
            problems["valid_until"] = f"must be at most {bounds.max_validity_s:g} s ahead"
    if request.start_schedule is not None:
        ahead_s = (request.start_schedule - now).total_seconds()
        valid_for_s = request.valid_for_s or bounds.default_validity_s
        ends_s = (request.valid_until - now).total_seconds() if request.valid_until is not None else valid_for_s
        if abs(ahead_s) > bounds.max_validity_s:
            problems["start_schedule"] = f"must be within {bounds.max_validity_s:g} s of now"
        elif ahead_s >= ends_s:
            problems["start_schedule"] = "must be before the limit's validity ends (it would never be in force)"
    return problems


@dataclass(frozen=True, slots=True)
class EffectiveLimit:
    """The limit in force at one instant, and where each part of it comes from (``None``: no limit)."""

    at: datetime
    phase_current_amperes: tuple[float | None, float | None, float | None]
    phase_sources: tuple[str | None, str | None, str | None]
    power_watts: float | None
    power_source: str | None
    #: EMS sources whose validity has passed, now contributing the failsafe limit.
    stale_sources: tuple[str, ...]

    @property
    def failsafe_active(self) -> bool:
        """True while any EMS source has gone stale."""
        return bool(self.stale_sources)

    def site_limits(self) -> SiteLimits:
        """As the allocator takes it (a phase without a limit counts as unlimited)."""
        phases = self.phase_current_amperes
        if all(value is None for value in phases):
            return SiteLimits(phase_current_amperes=None, power_watts=self.power_watts)
        current = tuple(math.inf if value is None else value for value in phases)
        return SiteLimits(phase_current_amperes=(current[0], current[1], current[2]), power_watts=self.power_watts)


class LimitSources:
    """The EMS sources, kept in a store, and the effective site limit they make with config and CSMS."""

    def __init__(
        self,
        store: LimitStore,
        bounds: LimitBounds,
        *,
        config_limits: SiteLimits = NO_LIMITS,
        csms_limits: Callable[[datetime], SiteLimits | None] = lambda now: None,
        csms_next_change: Callable[[datetime], datetime | None] = lambda now: None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_change: Callable[[], None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._store = store
        self.bounds = bounds
        self._config_limits = config_limits
        self._csms_limits = csms_limits
        self._csms_next_change = csms_next_change
        self._clock = clock
        self._on_change = on_change
        #: Grows by one on every accepted set and release.
        self.version = 0
        self._limits: dict[str, EmsLimit] = {}
        self.damaged = Counter(
            "ocpp_lc_ems_limits_damaged",
            "EMS limits found unreadable in the store at start; each holds the site at the failsafe current "
            "until the EMS sets or releases it.",
            registry=CollectorRegistry() if registry is None else registry,
        )
        found_at = clock()
        for source, stored in sorted(store.items().items()):
            try:
                self._limits[source] = EmsLimit.from_stored(source, stored)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                # The EMS meant to limit the site and we no longer know how far: fail safe, visibly.
                log.error(
                    "EMS limit %r in the store is unreadable (%s): the failsafe current holds for it until the EMS "
                    "sets or releases it",
                    source,
                    error,
                )
                self._limits[source] = EmsLimit.damaged_at(source, found_at)
                self.damaged.inc()

    def now(self) -> datetime:
        """The injected wall clock."""
        return self._clock()

    def set(self, source: str, body: bytes) -> EmsLimit:
        """Validate and store a limit for ``source``, replacing its previous one; durable when it returns.

        Raises LimitInvalid (nothing changed) or whatever the store raises (nothing changed either).
        """
        now = self._clock()
        limit = parse_limit_request(source, body, now, self.bounds)
        if source not in self._limits and len(self._limits) >= self.bounds.max_sources:
            raise LimitInvalid({"source": f"at most {self.bounds.max_sources} sources; release one first"})
        self._store.put(source, limit.to_stored())
        self._limits[source] = limit
        self._changed()
        return limit

    def release(self, source: str) -> bool:
        """Remove ``source``'s limit (durably); False if it had none."""
        if source not in self._limits:
            return False
        self._store.delete(source)
        del self._limits[source]
        self._changed()
        return True

    def _changed(self) -> None:
        self.version += 1
        if self._on_change is not None:
            self._on_change()

    def sources(self) -> list[EmsLimit]:
        """Every EMS source's limit, by name."""
        return [self._limits[name] for name in sorted(self._limits)]

    def effective(self, now: datetime | None = None) -> EffectiveLimit:
        """The lowest of config, CSMS and EMS limits at ``now`` (default: the clock), with sources."""
        at = self._clock() if now is None else now
        currents: list[float | None] = [None, None, None]
        current_sources: list[str | None] = [None, None, None]
        power: float | None = None
        power_source: str | None = None

        def offer_current(values: tuple[float, float, float], source: str) -> None:
            for phase, value in enumerate(values):
                held = currents[phase]
                if held is None or value < held:
                    currents[phase], current_sources[phase] = value, source

        def offer_power(value: float, source: str) -> None:
            nonlocal power, power_source
            if power is None or value < power:
                power, power_source = value, source

        outside = [("config", self._config_limits), ("csms", self._csms_limits(at))]
        for source, limits in outside:
            if limits is None:
                continue
            if limits.phase_current_amperes is not None:
                offer_current(limits.phase_current_amperes, source)
            if limits.power_watts is not None:
                offer_power(limits.power_watts, source)
        stale: list[str] = []
        for limit in self.sources():
            if limit.is_stale(at):
                stale.append(limit.source)
                failsafe = self.bounds.failsafe_current_amperes
                offer_current((failsafe, failsafe, failsafe), f"failsafe:{limit.source}")
                continue
            value = limit.scheduled_at(at)
            if value is None:
                continue
            if limit.unit == "A":
                offer_current((value, value, value), f"ems:{limit.source}")
            else:
                offer_power(value, f"ems:{limit.source}")
        return EffectiveLimit(
            at=at,
            phase_current_amperes=(currents[0], currents[1], currents[2]),
            phase_sources=(current_sources[0], current_sources[1], current_sources[2]),
            power_watts=power,
            power_source=power_source,
            stale_sources=tuple(stale),
        )

    def next_change_after(self, now: datetime) -> datetime | None:
        """The first instant strictly after ``now`` at which the effective limit may change by itself.

        That is the earliest of every source's own change points: an EMS schedule's next period or its
        validity running out, and the CSMS site profiles' (``csms_next_change``: validity bounds,
        periods, durations, recurrences). Exact and cheap: the balancing loop asks on every pass.
        """
        upcoming: list[datetime] = []
        for limit in self._limits.values():
            if limit.valid_until > now:
                upcoming.append(limit.valid_until)
            for offset_s, _ in limit.periods:
                instant = limit.start + timedelta(seconds=offset_s)
                if now < instant < limit.valid_until:
                    upcoming.append(instant)
        csms = self._csms_next_change(now)
        if csms is not None and csms > now:
            upcoming.append(csms)
        return min(upcoming, default=None)

    def status(self, now: datetime | None = None) -> dict[str, Any]:
        """The JSON document of ``GET /api/v1/limits``."""
        effective = self.effective(now)
        at = effective.at
        phases = {
            name: {"limit_amperes": value, "source": source}
            for name, value, source in zip(
                PHASE_NAMES, effective.phase_current_amperes, effective.phase_sources, strict=True
            )
        }
        return {
            "at": at.isoformat(),
            "phases": phases,
            "power": {"limit_watts": effective.power_watts, "source": effective.power_source},
            "failsafe_active": effective.failsafe_active,
            "failsafe_current_amperes": self.bounds.failsafe_current_amperes,
            "sources": [describe(limit, at) for limit in self.sources()],
        }


def describe(limit: EmsLimit, at: datetime) -> dict[str, Any]:
    """One source as the API shows it (a damaged one: no schedule, stale since it was found)."""
    stale = limit.is_stale(at)
    return {
        "source": limit.source,
        "unit": limit.unit,
        "limit_now": None if stale else limit.scheduled_at(at),
        "periods": [{"start_offset_s": offset_s, "limit": value} for offset_s, value in limit.periods],
        "start_schedule": None if limit.damaged else limit.start.isoformat(),
        "received_at": None if limit.damaged else limit.received_at.isoformat(),
        "valid_until": limit.valid_until.isoformat(),
        "age_s": limit.age_s(at),
        "stale": stale,
        "damaged": limit.damaged,
    }
