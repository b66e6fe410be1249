"""Renewing the controller's profiles before their validity (``validTo``) lapses, and what a lapse means.

Every profile of ours carries ``validTo``, ``profile_validity_s`` ahead; once half of it has passed the
profile that governs the EVSE is sent again through the rollout (a ``renew`` step, same limit), and our
TxDefaultProfile under a running TxProfile is renewed beside it, so it still holds when the transaction
ends. A profile that lapsed anyway (its station did not take the renewal) no longer holds the EVSE:
its limit is unknown, counted at its maximum, until the station accepts one of ours again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import trio

from .loop_types import LoopCore, log
from .records import EvseRecord, Purpose


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

    def _renew_defaults_under_transactions(self, nursery: trio.Nursery, wall: datetime, valid_to: datetime) -> None:
        """Our TxDefaultProfile under a running TxProfile governs again when the transaction ends: keep it."""
        for station_id, station in self._stations.items():
            if not self._connected(station_id, station):
                continue
            for record in station.evses.values():
                if record.governing != "TxProfile" or record.renewing or record.default_amperes is None:
                    continue
                at = self._renewal_at(record, "TxDefaultProfile")
                applied = self.rollout.evses.get(record.key)
                if at is None or at > wall or applied is None or applied.in_flight_amperes is not None:
                    continue
                record.renewing = True
                payload = self.profile_payload(
                    record, "TxDefaultProfile", record.default_amperes, valid_to, self._default_phases(record)
                )
                self.metrics.profiles.labels("renew", "sent").inc()
                nursery.start_soon(self._renew_default, record, payload, valid_to)

    async def _renew_default(self, record: EvseRecord, payload: dict[str, Any], valid_to: datetime) -> None:
        try:
            outcome = await self._call(record.station_id, "SetChargingProfile", payload)
        finally:
            record.renewing = False
        accepted = outcome.status == "answered" and (outcome.payload or {}).get("status") == "Accepted"
        self.metrics.profiles.labels("renew", "accepted" if accepted else outcome.status).inc()
        if accepted:
            record.valid_until["TxDefaultProfile"] = valid_to
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
