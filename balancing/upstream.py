"""Telling the CSMS about EMS limits (K14): NotifyChargingLimit when one is set or changes, ClearedChargingLimit
when one is released.

Theory of operation. To the CSMS every EMS source is one external system, chargingLimitSource ``EMS``
(never CSO, K12.FR.04); it cannot tell our named sources apart. So the reporter keeps, per source, a
*fingerprint* of what the CSMS was told: its unit, its schedule as absolute steps (instant, value
rounded down to one decimal as it was sent), and whether it stood at the failsafe (stale or damaged,
which is then reported as the failsafe current from the moment the validity ran out). On every check
it compares each source's fingerprint now with the reported one, from now on:

* a source that is new, or whose schedule differs anywhere from now on (a value moved by more than
  LimitChangeSignificance percent of the reported one, a period appears or goes, the unit changes,
  it goes stale) → **NotifyChargingLimit** (K14.FR.02). A future period counts as much as the
  present one, so a changed schedule is reported when it is received, not when it begins; a schedule
  merely moving on to its next period is not a change (the CSMS already has it), nor is an EMS
  re-sending the same limit to extend its validity;
* a source released → **ClearedChargingLimit** (K14.FR.03), once per check (the message cannot say
  which source, so two identical ones would tell the CSMS nothing more).

Every NotifyChargingLimit describes *all* EMS sources in force, not only the one that changed: with
NotifyChargingLimitWithSchedules true (K12.FR.03 read for the controller), one chargingSchedule per
source (ids 1, 2, … in source-name order; A per phase on 3 phases, or W over all; limits rounded down
to one decimal; no ``duration``, because a validity running out does not end the limit, it drops it
to the failsafe, which is then reported by itself). The CSMS, which knows only "EMS", can therefore
take the latest NotifyChargingLimit as the whole truth. For the same reason a release while other
sources remain is followed by a NotifyChargingLimit of what still holds, so the ClearedChargingLimit
never leaves the CSMS believing no EMS limit applies.

Durability: each message goes through the own identity's durable outbox, and what it reports is
recorded in the store handed in only once it is queued. A crash in between repeats a report on the
next start; none is ever lost. A record in the older format (reported values per unit) or an
unreadable one counts as "something was reported, the details unknown": the next check reports the
sources anew, or clears them if none remain.

The checks run on every EMS change and whenever a limit may change by itself (validity ends).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from .limits import EmsLimit, LimitSources, LimitStore
from .schedules import round_limit_down

log = logging.getLogger("ocpp_lc.balancing.upstream")

REPORTED_KEY = "reported"
#: The format of the record under REPORTED_KEY (the first one had no version and kept values per unit).
RECORD_FORMAT = 2
#: After a failure to queue a report, the next try.
RETRY_S = 5.0

Send = Callable[[str, dict[str, Any]], Awaitable[None]]


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What the CSMS is told of one source: unit, steps (instant, value as sent) and whether at the failsafe."""

    unit: str
    steps: tuple[tuple[datetime, float], ...]
    failsafe: bool

    @staticmethod
    def of(limit: EmsLimit, now: datetime, failsafe_amperes: float) -> Fingerprint:
        """The fingerprint of ``limit`` as it stands at ``now``."""
        if limit.is_stale(now):
            return Fingerprint("A", ((limit.valid_until, round_limit_down(failsafe_amperes)),), True)
        steps = tuple(
            (limit.start + timedelta(seconds=offset_s), round_limit_down(value)) for offset_s, value in limit.periods
        )
        return Fingerprint(limit.unit, steps, False)

    def value_at(self, at: datetime) -> float | None:
        """The value in force at ``at``; None before the first step."""
        found: float | None = None
        for instant, value in self.steps:
            if instant <= at:
                found = value
            else:
                break
        return found

    def differs(self, reported: Fingerprint, now: datetime, significance: float) -> bool:
        """Whether this is news against ``reported``, from ``now`` on (``significance``: a fraction)."""
        if self.unit != reported.unit or self.failsafe != reported.failsafe:
            return True
        instants = {now} | {instant for instant, _ in (*self.steps, *reported.steps) if instant > now}
        for instant in instants:
            value, told = self.value_at(instant), reported.value_at(instant)
            if (value is None) != (told is None):
                return True
            if value is not None and told is not None and abs(value - told) > significance * told:
                return True
        return False

    def to_stored(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "steps": [[instant.isoformat(), value] for instant, value in self.steps],
            "failsafe": self.failsafe,
        }

    @staticmethod
    def from_stored(stored: Mapping[str, Any]) -> Fingerprint:
        """From :meth:`to_stored`'s form; KeyError/TypeError/ValueError if it is not that."""
        unit = stored["unit"]
        if unit not in ("A", "W"):
            raise ValueError(f"unknown unit {unit!r}")
        steps = tuple((datetime.fromisoformat(instant), float(value)) for instant, value in stored["steps"])
        if any(instant.tzinfo is None for instant, _ in steps):
            raise ValueError("a time without a time zone")
        return Fingerprint(unit, steps, bool(stored["failsafe"]))


@dataclass(frozen=True, slots=True)
class Reported:
    """What the CSMS was told, per source; ``unknown``: something was, but the record does not say what."""

    sources: dict[str, Fingerprint]
    unknown: bool = False

    def to_stored(self) -> dict[str, Any]:
        return {"format": RECORD_FORMAT, "sources": {name: print_.to_stored() for name, print_ in self.sources.items()}}

    @staticmethod
    def from_stored(stored: Any) -> Reported:
        """Read the record, whatever state it is in (absent, older format, damaged): never raises."""
        if stored is None or stored == {}:
            return Reported({})
        if not isinstance(stored, dict) or stored.get("format") != RECORD_FORMAT:
            return Reported({}, unknown=True)  # the per-unit format of old, or damage
        sources: dict[str, Fingerprint] = {}
        unknown = False
        raw_sources = stored.get("sources")
        for name, raw in raw_sources.items() if isinstance(raw_sources, dict) else ():
            try:
                sources[str(name)] = Fingerprint.from_stored(raw)
            except (KeyError, TypeError, ValueError, AttributeError):
                unknown = True
        if not isinstance(raw_sources, dict):
            unknown = True
        return Reported(sources, unknown)


@dataclass(frozen=True, slots=True)
class Report:
    """One message to queue, and the record to keep once it is queued."""

    action: str
    payload: dict[str, Any]
    reported: Reported


class EmsReporter:
    """Decides and queues the K14 reports; see the module docstring."""

    def __init__(
        self,
        limits: LimitSources,
        store: LimitStore,
        send: Send,
        *,
        significance_percent: Callable[[], float],
        with_schedules: Callable[[], bool],
    ) -> None:
        self._limits = limits
        self._store = store
        self._send = send
        self._significance_percent = significance_percent
        self._with_schedules = with_schedules
        self._wake = trio.Event()

    def wake(self) -> None:
        """Check again soon (an EMS limit was set or released)."""
        self._wake.set()

    @property
    def reported(self) -> Reported:
        """What the CSMS was last told, per source."""
        return Reported.from_stored(self._store.get(REPORTED_KEY))

    def decide(self, now: datetime) -> list[Report]:
        """The messages to send for the EMS sources at ``now``, in order, each with the record that follows it."""
        failsafe_amperes = self._limits.bounds.failsafe_current_amperes
        current = {limit.source: limit for limit in self._limits.sources()}
        prints = {name: Fingerprint.of(limit, now, failsafe_amperes) for name, limit in current.items()}
        reported = self.reported
        significance = max(0.0, self._significance_percent()) / 100.0
        released = sorted(set(reported.sources) - set(current))
        changed = [
            name
            for name, print_ in prints.items()
            if name not in reported.sources or print_.differs(reported.sources[name], now, significance)
        ]
        reports: list[Report] = []
        if released or (reported.unknown and not current):
            remaining = {name: told for name, told in reported.sources.items() if name in current}
            reports.append(Report("ClearedChargingLimit", {"chargingLimitSource": "EMS"}, Reported(remaining)))
        if current and (changed or released or reported.unknown):
            payload: dict[str, Any] = {"chargingLimit": {"chargingLimitSource": "EMS"}}
            if self._with_schedules():
                payload["chargingSchedule"] = [
                    self._schedule(index, current[name], prints[name]) for index, name in enumerate(sorted(current), 1)
                ]
            reports.append(Report("NotifyChargingLimit", payload, Reported(prints)))
        return reports

    @staticmethod
    def _schedule(schedule_id: int, limit: EmsLimit, print_: Fingerprint) -> dict[str, Any]:
        """One source's chargingSchedule, from the values of its fingerprint (as recorded, rounded down)."""
        if print_.failsafe:
            # The failsafe holds from the moment the validity ran out until the EMS speaks again.
            start = limit.valid_until
            offsets: list[float] = [0.0]
        else:
            start = limit.start
            offsets = [offset_s for offset_s, _ in limit.periods]
        periods: list[dict[str, Any]] = []
        for offset_s, (_, value) in zip(offsets, print_.steps, strict=True):
            period: dict[str, Any] = {"startPeriod": int(offset_s), "limit": value}
            if print_.unit == "A":
                period["numberPhases"] = 3
            periods.append(period)
        return {
            "id": schedule_id,
            "startSchedule": _timestamp(start),
            "chargingRateUnit": print_.unit,
            "chargingSchedulePeriod": periods,
        }

    async def check(self) -> None:
        """Decide at the limits' clock and queue what is to be sent."""
        for report in self.decide(self._limits.now()):
            log.info("EMS limit reported upstream: %s (sources: %s)", report.action, sorted(report.reported.sources))
            # Queued first, recorded after: a crash in between repeats the report, never loses it.
            await self._send(report.action, report.payload)
            self._store.put(REPORTED_KEY, report.reported.to_stored())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check at start, on every wake-up and whenever a limit may change by itself, until cancelled."""
        task_status.started()
        while True:
            self._wake = trio.Event()
            failed = False
            try:
                await self.check()
            except Exception:  # the store (disk full …): try again shortly rather than stop the appliance
                log.exception("EMS limit report to the CSMS could not be queued; retrying")
                failed = True
            now = self._limits.now()
            upcoming = self._limits.next_change_after(now)
            delay_s = 3600.0 if upcoming is None else max(0.0, (upcoming - now).total_seconds()) + 0.001
            if failed:
                delay_s = min(delay_s, RETRY_S)
            with trio.move_on_after(delay_s):
                await self._wake.wait()
