"""Renewing the controller's profiles before their validity (``validTo``) lapses, and what a lapse means.

Every profile of ours carries ``validTo``, ``profile_validity_s`` ahead; once half of it has passed the
profile that governs the EVSE is sent again through the rollout (a ``renew`` step, same limit), and our
TxDefaultProfile under a running TxProfile is renewed beside it, so it still holds when the transaction
ends, and moved with the transaction's share so it never allows more than the EVSE is counted at.
A profile that lapsed anyway (its station did not take the renewal) no longer holds the EVSE:
its limit is unknown, counted at its maximum, until the station accepts one of ours again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import trio

from .allocator import EPSILON_AMPERES
from .loop_types import LoopCore, log
from .records import EvseRecord, Purpose
from .rollout import round_down


class ProfileRenewal(LoopCore):
    """The validity part of the loop; see the module docstring."""

    def _renewal_at(self, record: EvseRecord, purpose: Purpose) -> datetime | None:
        valid_until = record.valid_until.get(purpose)
        if valid_until is None:
            return None
        return valid_until - timedelta(seconds=self.settings.profile_validity_s / 2)

    def _renewal_due(self, record: EvseRecord, wall: datetime) -> bool:
        """Whether the profile that governs this EVSE must be renewed now (half its validity is gone)."""
        applied = self.rollout.evses.get(record.key)
        if applied is None or not applied.trusted:
            return False
        at = self._renewal_at(record, record.governing)
        return at is None or at <= wall

    def _next_renewal(self, wall: datetime) -> datetime | None:
        upcoming = [
            at
            for record in self._records()
            for purpose in record.valid_until
            if (at := self._renewal_at(record, purpose)) is not None and at > wall
        ]
        return min(upcoming, default=None)

    def _count_defaults_under_transactions(self) -> None:
        """Tell the rollout which EVSEs carry our TxDefaultProfile under a running TxProfile, and at what."""
        for record in self._records():
            if record.key in self.rollout.evses:
                under = self._default_in_force(record) if record.governing == "TxProfile" else None
                self.rollout.fallback(record.key, under)

    def _default_under_transaction(self, record: EvseRecord) -> float | None:
        """What our TxDefaultProfile under a running TxProfile should allow (``None``: leave it as it is).

        The station applies it the moment the transaction ends (K02.FR.05), before the controller hears of
        it, so it is counted beside the TxProfile (:attr:`EvseApplied.fallback_amperes`). Kept at or below
        the transaction's accepted limit it adds nothing to what the EVSE is counted at: lowered when the
        transaction's share falls under it (to 0 below the EVSE's minimum, where a smaller limit would not
        let an EV charge anyway), raised back toward the idle current when the share allows.
        """
        applied = self.rollout.evses.get(record.key)
        if applied is None or not applied.trusted or applied.in_flight_amperes is not None:
            return None
        share = applied.accepted_amperes
        if share is None:
            return None
        minimum, maximum = self.site.station(record.station_id).evse_range_amperes(record.evse_id)
        target = min(self.settings.rollout.idle_current_amperes, maximum, share)
        if target < minimum - EPSILON_AMPERES:
            target = 0.0
        return round_down(target, self.settings.rollout.resolution_amperes)

    def _renew_defaults_under_transactions(self, nursery: trio.Nursery, wall: datetime, valid_to: datetime) -> None:
        """Our TxDefaultProfile under a running TxProfile governs again when the transaction ends: keep it
        valid, and never above what the transaction is counted at (see :meth:`_default_under_transaction`)."""
        for station_id, station in self._stations.items():
            if not self._connected(station_id, station):
                continue
            for record in station.evses.values():
                if record.governing != "TxProfile" or record.renewing or record.default_amperes is None:
                    continue
                target = self._default_under_transaction(record)
                if target is None:
                    continue
                at = self._renewal_at(record, "TxDefaultProfile")
                lower = target < record.default_amperes - EPSILON_AMPERES
                raise_ = target > record.default_amperes + EPSILON_AMPERES
                if not (lower or raise_) and (at is None or at > wall):
                    continue
                record.renewing = True
                phases = self._default_phases(record)
                payload = self.profile_payload(record, "TxDefaultProfile", target, valid_to, phases)
                kind = "decrease" if lower else "increase" if raise_ else "renew"
                self.metrics.profiles.labels(kind, "sent").inc()
                nursery.start_soon(self._renew_default, record, payload, target, valid_to, kind)

    async def _renew_default(
        self, record: EvseRecord, payload: dict[str, Any], amperes: float, valid_to: datetime, kind: str
    ) -> None:
        try:
            outcome = await self._call(record.station_id, "SetChargingProfile", payload)
        finally:
            record.renewing = False
        accepted = outcome.status == "answered" and (outcome.payload or {}).get("status") == "Accepted"
        self.metrics.profiles.labels(kind, "accepted" if accepted else outcome.status).inc()
        if accepted:
            record.default_amperes = amperes
            record.valid_until["TxDefaultProfile"] = valid_to
            self._dirty.add(record.station_id)
        elif outcome.status != "answered" and record.default_amperes is not None:
            # Unanswered: either may be in force; the larger counts until one is accepted.
            record.default_amperes = max(record.default_amperes, amperes)
            self._dirty.add(record.station_id)
        self.wake()

    def _default_in_force(self, record: EvseRecord) -> float | None:
        """Our TxDefaultProfile's limit at the station if it is still valid there (else unknown)."""
        valid_until = record.valid_until.get("TxDefaultProfile")
        if record.default_amperes is None or valid_until is None or valid_until <= self._wall():
            return None
        return record.default_amperes

    def _lapse(self, wall: datetime) -> None:
        """A profile of ours that lapsed (never renewed) no longer holds the EVSE: its limit is unknown."""
        for record in self._records():
            default_until = record.valid_until.get("TxDefaultProfile")
            if default_until is not None and default_until <= wall:
                del record.valid_until["TxDefaultProfile"]
                record.default_amperes = None
                self._dirty.add(record.station_id)
            until = record.valid_until.get(record.governing)
            applied = self.rollout.evses.get(record.key)
            if until is not None and until <= wall and applied is not None and applied.confirmed:
                log.warning("[%s] the profile on EVSE %d lapsed before it was renewed", *record.key)
                del record.valid_until[record.governing]
                self.rollout.installed(record.key, None)
                self._dirty.add(record.station_id)
