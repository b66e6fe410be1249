"""The test station's own model of the charging profiles it holds, and of the limit they set (Part 2 K01).

Written from the specification, not from the controller's code, so an end-to-end test can ask the
*station* what limit it would apply, and when, rather than trusting what the controller says it sent.

Theory of operation. :class:`ProfileModel` is pure: the caller passes the station's clock (``now``) to
every method. It keeps, per profile id, what the station accepted, and the transactions running per EVSE:

* a profile replaces one with the same id (K01.FR.05); a ClearChargingProfile removes by id or by its
  criteria (evseId, purpose, stackLevel), as K10 describes;
* a profile is valid while ``validFrom <= now < validTo`` (K01.FR.36/37; no validTo: for ever, K01.FR.10);
* a TxProfile applies only to its own transaction while that runs on its EVSE (K01.FR.04), and is gone
  once the transaction ends;
* per purpose the valid profile with the highest stackLevel wins (K01.FR.17), one on the EVSE itself
  before one on EVSE 0 (K01.FR.14/15); a TxProfile that applies overrules TxDefaultProfile;
  ChargingStationMaxProfile and ChargingStationExternalConstraints (EVSE 0 or the EVSE) cap the result;
* within a schedule the period in force is the last one started (K01.FR.12), none past ``duration``
  (K01.FR.11); an Absolute/Recurring schedule starts at startSchedule (recurrence is not modelled), a
  Relative one at its transaction's start, or, with none running, when the profile was installed.

The station's *own default* is what it does when none of that applies: its hardware maximum, reported as
a limit of ``None`` with source ``"own-default"``. :meth:`ProfileModel.next_change` says when the
answer may change next (a validity boundary, a period start or a schedule end), so the station can set
a timer there.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

TX_PROFILE = "TxProfile"
TX_DEFAULT_PROFILE = "TxDefaultProfile"
CAPPING_PURPOSES = ("ChargingStationMaxProfile", "ChargingStationExternalConstraints")


def parse_time(text: Any) -> datetime.datetime | None:
    """An OCPP date-time (RFC 3339) as an aware datetime; ``None`` when absent or unreadable."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


@dataclass(frozen=True)
class Installed:
    """One profile the station accepted, as it keeps it."""

    evse_id: int
    profile: dict[str, Any]
    installed_at: datetime.datetime

    @property
    def id(self) -> int:
        return int(self.profile["id"])

    @property
    def purpose(self) -> str:
        return str(self.profile["chargingProfilePurpose"])

    @property
    def stack_level(self) -> int:
        return int(self.profile["stackLevel"])

    @property
    def valid_from(self) -> datetime.datetime | None:
        return parse_time(self.profile.get("validFrom"))

    @property
    def valid_to(self) -> datetime.datetime | None:
        return parse_time(self.profile.get("validTo"))

    def valid(self, now: datetime.datetime) -> bool:
        start, end = self.valid_from, self.valid_to
        return (start is None or start <= now) and (end is None or now < end)


@dataclass(frozen=True)
class Limit:
    """What governs one EVSE: a limit (``None``: the station's own default) and where it comes from."""

    limit: float | None
    unit: str | None = None
    number_phases: int | None = None
    source: str = "own-default"  # or "profile"
    profile_id: int | None = None
    purpose: str | None = None

    def as_event(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "unit": self.unit,
            "numberPhases": self.number_phases,
            "source": self.source,
            "profileId": self.profile_id,
            "purpose": self.purpose,
        }


OWN_DEFAULT = Limit(None)


@dataclass
class ProfileModel:
    """Profiles and transactions of one station; see the module docstring."""

    profiles: dict[int, Installed] = field(default_factory=dict)
    #: evseId -> (transactionId, when it started on the station's clock)
    transactions: dict[int, tuple[str, datetime.datetime]] = field(default_factory=dict)

    # -- what the station is told and does --------------------------------------------------------

    def install(self, evse_id: int, profile: dict[str, Any], now: datetime.datetime) -> None:
        """A SetChargingProfile the station accepted (K01.FR.05: same id replaces)."""
        self.profiles[int(profile["id"])] = Installed(evse_id, profile, now)

    def clear(self, request: dict[str, Any]) -> list[int]:
        """A ClearChargingProfile: remove by id, else by the criteria given; return the ids removed."""
        profile_id = request.get("chargingProfileId")
        if profile_id is not None:
            removed = [int(profile_id)] if int(profile_id) in self.profiles else []
        else:
            criteria = request.get("chargingProfileCriteria") or {}
            removed = [
                installed.id
                for installed in self.profiles.values()
                if criteria.get("evseId", installed.evse_id) == installed.evse_id
                and criteria.get("chargingProfilePurpose", installed.purpose) == installed.purpose
                and criteria.get("stackLevel", installed.stack_level) == installed.stack_level
            ]
        for found in removed:
            del self.profiles[found]
        return removed

    def transaction_started(self, evse_id: int, transaction_id: str, now: datetime.datetime) -> None:
        if self.transactions.get(evse_id, (None,))[0] != transaction_id:
            self.transactions[evse_id] = (transaction_id, now)

    def transaction_ended(self, transaction_id: str) -> None:
        """The transaction is over: it leaves its EVSE, and its TxProfiles go with it."""
        for evse_id, (running, _) in list(self.transactions.items()):
            if running == transaction_id:
                del self.transactions[evse_id]
        for installed in list(self.profiles.values()):
            if installed.purpose == TX_PROFILE and installed.profile.get("transactionId") == transaction_id:
                del self.profiles[installed.id]

    # -- what applies --------------------------------------------------------------------------------

    def evse_ids(self) -> list[int]:
        """The EVSEs the station has heard of through profiles or transactions (EVSE 0 is the station)."""
        return sorted({p.evse_id for p in self.profiles.values() if p.evse_id > 0} | set(self.transactions))

    def _applies(self, installed: Installed, evse_id: int, now: datetime.datetime) -> bool:
        if installed.evse_id not in (0, evse_id) or not installed.valid(now):
            return False
        if installed.purpose == TX_PROFILE:
            running = self.transactions.get(evse_id)
            return running is not None and installed.profile.get("transactionId") == running[0]
        return True

    def _schedule_start(self, installed: Installed, evse_id: int) -> datetime.datetime | None:
        schedule = installed.profile["chargingSchedule"][0]
        if installed.profile.get("chargingProfileKind") != "Relative":
            return parse_time(schedule.get("startSchedule"))
        running = self.transactions.get(evse_id)
        if running is not None and installed.purpose in (TX_PROFILE, TX_DEFAULT_PROFILE):
            return running[1]
        return installed.installed_at

    def _period(self, installed: Installed, evse_id: int, now: datetime.datetime) -> dict[str, Any] | None:
        """The period of the profile's schedule in force now (``None``: not started, or past its duration)."""
        start = self._schedule_start(installed, evse_id)
        if start is None or now < start:
            return None
        schedule = installed.profile["chargingSchedule"][0]
        elapsed_s = (now - start).total_seconds()
        duration = schedule.get("duration")
        if duration is not None and elapsed_s >= float(duration):
            return None
        in_force = None
        for period in schedule["chargingSchedulePeriod"]:
            if float(period["startPeriod"]) <= elapsed_s:
                in_force = period
        return in_force

    def _winner(self, purpose: str, evse_id: int, now: datetime.datetime) -> tuple[Installed, dict[str, Any]] | None:
        candidates = [
            (installed.stack_level, installed.evse_id == evse_id, installed.id, installed)
            for installed in self.profiles.values()
            if installed.purpose == purpose and self._applies(installed, evse_id, now)
        ]
        for *_, installed in sorted(candidates, key=lambda c: (c[0], c[1], c[2]), reverse=True):
            period = self._period(installed, evse_id, now)
            if period is not None:
                return installed, period
        return None

    def limit(self, evse_id: int, now: datetime.datetime) -> Limit:
        """What governs ``evse_id`` at ``now``: the profiles that apply, or the station's own default."""
        found = self._winner(TX_PROFILE, evse_id, now) or self._winner(TX_DEFAULT_PROFILE, evse_id, now)
        result = OWN_DEFAULT
        if found is not None:
            installed, period = found
            result = Limit(
                float(period["limit"]),
                installed.profile["chargingSchedule"][0]["chargingRateUnit"],
                period.get("numberPhases"),
                "profile",
                installed.id,
                installed.purpose,
            )
        for purpose in CAPPING_PURPOSES:
            cap = self._winner(purpose, evse_id, now)
            if cap is None:
                continue
            installed, period = cap
            unit = installed.profile["chargingSchedule"][0]["chargingRateUnit"]
            if result.limit is None or (unit == result.unit and float(period["limit"]) < result.limit):
                result = Limit(
                    float(period["limit"]), unit, period.get("numberPhases"), "profile", installed.id, purpose
                )
        return result

    def next_change(self, now: datetime.datetime) -> datetime.datetime | None:
        """The earliest moment after ``now`` at which :meth:`limit` may answer differently."""
        moments: list[datetime.datetime] = []
        for installed in self.profiles.values():
            moments += [m for m in (installed.valid_from, installed.valid_to) if m is not None]
            schedule = installed.profile["chargingSchedule"][0]
            for evse_id in {installed.evse_id, *self.transactions}:
                start = self._schedule_start(installed, evse_id)
                if start is None:
                    continue
                periods = schedule["chargingSchedulePeriod"]
                moments += [start + datetime.timedelta(seconds=float(p["startPeriod"])) for p in periods]
                if schedule.get("duration") is not None:
                    moments.append(start + datetime.timedelta(seconds=float(schedule["duration"])))
        return min((m for m in moments if m > now), default=None)
