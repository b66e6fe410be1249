"""Telling the CSMS about EMS limits (K14): NotifyChargingLimit on a change, ClearedChargingLimit on release.

Theory of operation. The limit the EMS imposes at an instant is, per unit, the lowest of its sources
(per-phase amperes and watts are kept apart; a stale source stands in with the failsafe current, since
the site is then held there on the EMS's behalf). :meth:`EmsReporter.decide` compares it with what was
last reported to the CSMS:

* nothing imposed any more, after something was reported → ClearedChargingLimit, source EMS
  (K14.FR.03; the stations' profiles then follow the remaining limits, which the balancing loop does);
* a unit that appears, or whose value moved by more than LimitChangeSignificance percent of the
  reported value → NotifyChargingLimit, source EMS (K14.FR.02, never CSO as K12.FR.04 says of a
  station), with the leading source's schedule when NotifyChargingLimitWithSchedules is true
  (K12.FR.03 read for the LC).

What was reported is kept in the store handed in before the message is queued, and the message goes
through the own identity's durable outbox: a restart neither repeats a report nor forgets that a
release must still be reported. The checks run on every EMS change and at every instant the EMS limit
changes by itself (a schedule period, a validity running out).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import trio

from .limits import EmsLimit, LimitSources, LimitStore

log = logging.getLogger("ocpp_lc.balancing.upstream")

REPORTED_KEY = "reported"
#: After a failure to queue a report, the next try.
RETRY_S = 5.0
#: The chargingSchedule ids of our reports (one per unit).
SCHEDULE_IDS = {"A": 1, "W": 2}

Send = Callable[[str, dict[str, Any]], Awaitable[None]]


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
    def reported(self) -> dict[str, float]:
        """What the CSMS was last told, per unit ("A", "W")."""
        stored = self._store.get(REPORTED_KEY)
        if not isinstance(stored, dict):
            return {}
        return {unit: float(value) for unit, value in stored.items() if unit in SCHEDULE_IDS}

    def imposed(self, now: datetime) -> dict[str, tuple[float, EmsLimit]]:
        """Per unit, the lowest EMS value in force at ``now`` and the source that sets it."""
        result: dict[str, tuple[float, EmsLimit]] = {}
        for limit in self._limits.sources():
            if limit.is_stale(now):
                value: float | None = self._limits.bounds.failsafe_current_amperes
                unit = "A"
            else:
                value, unit = limit.scheduled_at(now), limit.unit
            if value is None:
                continue
            held = result.get(unit)
            if held is None or value < held[0]:
                result[unit] = (value, limit)
        return result

    def decide(self, now: datetime) -> list[tuple[str, dict[str, Any], dict[str, float]]]:
        """The messages to send for the EMS limit at ``now``, each with what is reported once it is queued."""
        imposed = self.imposed(now)
        reported = self.reported
        if not imposed:
            if not reported:
                return []
            return [("ClearedChargingLimit", {"chargingLimitSource": "EMS"}, {})]
        significance = self._significance_percent() / 100.0
        changed = set(imposed) != set(reported) or any(
            abs(value - reported[unit]) > significance * reported[unit] or (reported[unit] == 0 and value != 0)
            for unit, (value, _) in imposed.items()
        )
        if not changed:
            return []
        payload: dict[str, Any] = {"chargingLimit": {"chargingLimitSource": "EMS"}}
        if self._with_schedules():
            payload["chargingSchedule"] = [
                self._schedule(unit, limit, now) for unit, (_, limit) in sorted(imposed.items())
            ]
        return [("NotifyChargingLimit", payload, {unit: value for unit, (value, _) in imposed.items()})]

    def _schedule(self, unit: str, limit: EmsLimit, now: datetime) -> dict[str, Any]:
        if limit.is_stale(now):
            # The failsafe holds until the EMS speaks again: one open-ended period from now.
            periods = [{"startPeriod": 0, "limit": self._limits.bounds.failsafe_current_amperes, "numberPhases": 3}]
            return {
                "id": SCHEDULE_IDS[unit],
                "startSchedule": _timestamp(now),
                "chargingRateUnit": unit,
                "chargingSchedulePeriod": periods,
            }
        schedule_periods: list[dict[str, Any]] = []
        for offset_s, value in limit.periods:
            period: dict[str, Any] = {"startPeriod": int(offset_s), "limit": value}
            if unit == "A":
                period["numberPhases"] = 3
            schedule_periods.append(period)
        return {
            "id": SCHEDULE_IDS[unit],
            "startSchedule": _timestamp(limit.start),
            "duration": max(1, int((limit.valid_until - limit.start).total_seconds())),
            "chargingRateUnit": unit,
            "chargingSchedulePeriod": schedule_periods,
        }

    async def check(self) -> None:
        """Decide at the limits' clock and queue what is to be sent."""
        for action, payload, reported in self.decide(self._limits.now()):
            log.info("EMS limit reported upstream: %s %s", action, payload.get("chargingLimit", payload))
            # Queued first, recorded after: a crash in between repeats the report, never loses it.
            await self._send(action, payload)
            self._store.put(REPORTED_KEY, reported)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check at start, on every wake-up and whenever the EMS limit changes by itself, until cancelled."""
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
