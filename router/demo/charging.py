"""The charging profiles a simulated station holds, and the current limit they impose now (K01, K08).

Pure and synchronous: the station feeds it SetChargingProfile / ClearChargingProfile payloads and
asks, at each meter sample, what limit applies to its one EVSE. It is a faithful-enough subset of
smart charging for the demo and for the balancing work to test against: absolute, relative and
recurring schedules, validFrom/validTo, stack levels, and the rules that a TxDefaultProfile applies
to an idle EVSE and to a new transaction until a TxProfile for that transaction arrives, that a
TxProfile overrides it and ends with its transaction, and that a ChargingStationMaxProfile caps both.
It is not a full composite-schedule implementation (no minChargingRate, one schedule per profile, no
sales tariffs).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Final

from .clock import parse_time

#: Phase-to-neutral voltage used to turn a power limit (W) into a current limit (A).
NOMINAL_VOLTAGE_V: Final = 230.0

_RECURRENCE_S: Final = {"Daily": 86_400.0, "Weekly": 604_800.0}


@dataclass(frozen=True, slots=True)
class _Installed:
    evse_id: int
    profile: dict[str, Any]
    received_at: datetime.datetime


class ChargingProfiles:
    """The profiles installed on a one-EVSE station."""

    def __init__(self) -> None:
        self._installed: list[_Installed] = []

    def __len__(self) -> int:
        return len(self._installed)

    def install(
        self,
        evse_id: int,
        profile: dict[str, Any],
        now: datetime.datetime,
        transaction_id: str | None,
    ) -> str:
        """Install a profile from SetChargingProfile; return the response status."""
        purpose = profile["chargingProfilePurpose"]
        if evse_id not in (0, 1):
            return "Rejected"  # no such EVSE (K01.FR.28)
        if purpose == "ChargingStationExternalConstraints":
            return "Rejected"  # only an external system sets those, never the CSMS (K01.FR.22)
        if purpose == "ChargingStationMaxProfile" and evse_id != 0:
            return "Rejected"  # it limits the whole station
        if purpose == "TxProfile" and (
            evse_id == 0 or transaction_id is None or profile.get("transactionId") != transaction_id
        ):
            return "Rejected"  # a TxProfile is for a running transaction on an EVSE (K01.FR.09/16/33)
        # A profile with the same id (K01.FR.05), or the same purpose and stack level on the same EVSE
        # (which a CSMS must not send, K01.FR.06), replaces the one installed.
        self._installed = [
            held
            for held in self._installed
            if held.profile["id"] != profile["id"]
            and not (
                held.evse_id == evse_id
                and held.profile["chargingProfilePurpose"] == purpose
                and held.profile["stackLevel"] == profile["stackLevel"]
            )
        ]
        self._installed.append(_Installed(evse_id, profile, now))
        return "Accepted"

    def clear(self, request: dict[str, Any]) -> str:
        """Remove profiles matching a ClearChargingProfile request; return the response status."""
        profile_id = request.get("chargingProfileId")
        criteria = request.get("chargingProfileCriteria") or {}

        def matches(held: _Installed) -> bool:
            if profile_id is not None:
                return bool(held.profile["id"] == profile_id)
            if "evseId" in criteria and held.evse_id != criteria["evseId"]:
                return False
            if (
                "chargingProfilePurpose" in criteria
                and held.profile["chargingProfilePurpose"] != criteria["chargingProfilePurpose"]
            ):
                return False
            return not ("stackLevel" in criteria and held.profile["stackLevel"] != criteria["stackLevel"])

        kept = [held for held in self._installed if not matches(held)]
        removed = len(self._installed) - len(kept)
        self._installed = kept
        return "Accepted" if removed else "Unknown"

    def end_transaction(self, transaction_id: str) -> None:
        """A TxProfile lives as long as its transaction."""
        self._installed = [
            held
            for held in self._installed
            if not (
                held.profile["chargingProfilePurpose"] == "TxProfile"
                and held.profile.get("transactionId") == transaction_id
            )
        ]

    def limit_amperes(
        self,
        now: datetime.datetime,
        *,
        transaction_id: str | None,
        transaction_started: datetime.datetime | None,
    ) -> float | None:
        """The per-phase current limit on EVSE 1 now (K01.FR.51), or None when no profile limits it.

        Idle (``transaction_id`` None), the TxDefaultProfile is what a transaction starting now would
        get; in a transaction, its TxProfile wins over the default (K01.FR.03).
        """
        station_max = self._best("ChargingStationMaxProfile", now, transaction_started, None)
        tx_limit = None
        if transaction_id is not None:
            tx_limit = self._best("TxProfile", now, transaction_started, transaction_id)
        if tx_limit is None:
            tx_limit = self._best("TxDefaultProfile", now, transaction_started, None)
        limits = [limit for limit in (station_max, tx_limit) if limit is not None]
        return min(limits) if limits else None

    def _best(
        self,
        purpose: str,
        now: datetime.datetime,
        transaction_started: datetime.datetime | None,
        transaction_id: str | None,
    ) -> float | None:
        """The limit of the highest stack level of ``purpose`` that has a period in force now (K01.FR.17)."""
        candidates = [
            held
            for held in self._installed
            if held.profile["chargingProfilePurpose"] == purpose
            and held.evse_id in (0, 1)
            and (transaction_id is None or held.profile.get("transactionId") == transaction_id)
        ]
        # At equal stack levels the EVSE's own profile is preferred to the station-wide one.
        candidates.sort(key=lambda held: (held.profile["stackLevel"], held.evse_id), reverse=True)
        for held in candidates:
            limit = _limit_now(held, now, transaction_started)
            if limit is not None:
                return limit
        return None


def _limit_now(held: _Installed, now: datetime.datetime, transaction_started: datetime.datetime | None) -> float | None:
    profile = held.profile
    if "validFrom" in profile and now < parse_time(profile["validFrom"]):
        return None  # K01.FR.36
    if "validTo" in profile and now >= parse_time(profile["validTo"]):
        return None  # K01.FR.37
    schedule = profile["chargingSchedule"][0]
    kind = profile["chargingProfileKind"]
    if kind == "Relative":
        start = transaction_started or held.received_at
    elif "startSchedule" in schedule:
        start = parse_time(schedule["startSchedule"])
    else:
        start = held.received_at
    elapsed_s = (now - start).total_seconds()
    if kind == "Recurring":
        elapsed_s %= _RECURRENCE_S.get(profile.get("recurrencyKind", "Daily"), 86_400.0)
    if elapsed_s < 0 or ("duration" in schedule and elapsed_s >= schedule["duration"]):
        return None  # not started yet (K01.FR.30) or over (K01.FR.11)
    period = None
    for candidate in schedule["chargingSchedulePeriod"]:  # ordered by startPeriod (K01.FR.35, .12)
        if candidate["startPeriod"] <= elapsed_s:
            period = candidate
    if period is None:
        return None
    limit = float(period["limit"])
    if schedule["chargingRateUnit"] == "W":
        # Power over line voltage times phases, three unless the period says otherwise (K01.FR.49/50).
        limit /= NOMINAL_VOLTAGE_V * max(int(period.get("numberPhases", 3)), 1)
    return limit
