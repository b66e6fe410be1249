"""Renewing the controller's profiles before their validity (``validTo``) lapses, and what a lapse means.

Every profile of ours carries ``validTo``, ``profile_validity_s`` ahead; once half of it has passed the
profile that governs the EVSE is sent again through the rollout (a ``renew`` step, same limit), and our
TxDefaultProfile under a running TxProfile is renewed beside it, so it still holds when the transaction
ends, and lowered with the transaction's share so it never allows more than the EVSE is counted at.
A profile that lapsed anyway (its station did not take the renewal) no longer holds the EVSE:
its limit is unknown, counted at its maximum, until the station accepts one of ours again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import trio

from .allocator import EPSILON_AMPERES
from .loop_types import LoopCore, log
from .records import EvseRecord, Purpose
from .rollout import session_phases


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

    def _count_defaults_under_transactions(self, records: Iterable[EvseRecord] | None = None) -> None:
        """Tell the rollout which EVSEs carry our TxDefaultProfile under a running TxProfile, and at what
        (every EVSE, or those of ``records``)."""
        for record in self._records() if records is None else records:
            if record.key in self.rollout.evses:
                under = self._default_in_force(record) if record.governing == "TxProfile" else None
                self.rollout.fallback(record.key, under, None if under is None else self._default_phases(record))

    def _default_under_transaction(self, record: EvseRecord) -> tuple[float, int | None] | None:
        """What our TxDefaultProfile under a running TxProfile should allow, per phase and on how many
        phases (``None``: leave it as it is).

        The station applies it the moment the transaction ends (K02.FR.05), before the controller hears of
        it, so it is counted beside the TxProfile (:attr:`EvseApplied.fallback_amperes`, on its own phases).
        Kept at or below the transaction's accepted limit, on no more phases than the transaction is counted
        on, it adds nothing to what the EVSE is counted at: set to 0 once the transaction's share falls under
        it, and narrowed to a 1-phase EV's phase. It is never raised under a transaction (each change is one
        more call in the station's queue, ahead of the decreases that may follow): once the transaction
        ends the EVSE is idle, and gets its idle current like any idle EVSE where there is room.
        """
        applied = self.rollout.evses.get(record.key)
        if applied is None or not applied.trusted or applied.in_flight_amperes is not None:
            return None
        share, default = applied.accepted_amperes, record.default_amperes
        if share is None or default is None:
            return None
        station = self.site.station(record.station_id)
        target = default if share >= default - EPSILON_AMPERES else 0.0
        phases = session_phases(station, replace(applied, fallback_amperes=None))
        narrowed = None if phases >= station.phases else phases
        return target, narrowed if _fewer(narrowed, record.default_phases) else record.default_phases

    def _renew_defaults_under_transactions(
        self,
        nursery: trio.Nursery,
        wall: datetime,
        valid_to: datetime,
        busy: Collection[str] = (),
        calm: Callable[[], bool] = lambda: True,
        station_ids: Iterable[str] | None = None,
    ) -> None:
        """Our TxDefaultProfile under a running TxProfile governs again when the transaction ends: keep it
        valid, and never above what the transaction is counted at (see :meth:`_default_under_transaction`).
        Only at stations with nothing else of ours under way (``busy``: steps sent this round): what governs
        the EVSEs now goes first. Lowering it only regains capacity (it is counted meanwhile), so that waits,
        like an increase, until no decrease is planned or under way anywhere (``calm`` says so: asked once,
        and only if a default is to be lowered, since looking at every EVSE costs). ``station_ids``:
        look at these stations only (those :meth:`_default_renewals` named in a forked child)."""
        for record, target, phases, lower in self._default_renewals(wall, busy, calm, station_ids):
            record.renewing_to = (target, phases)
            payload = self.profile_payload(record, "TxDefaultProfile", target, valid_to, phases)
            kind = "decrease" if lower else "renew"
            self.metrics.profiles.labels(kind, "sent").inc()
            nursery.start_soon(self._renew_default, record, payload, (target, phases), valid_to, kind)

    def _default_renewals(
        self,
        wall: datetime,
        busy: Collection[str] = (),
        calm: Callable[[], bool] = lambda: True,
        station_ids: Iterable[str] | None = None,
    ) -> list[tuple[EvseRecord, float, int | None, bool]]:
        """The TxDefaultProfiles under transactions to send now, one per station at most: (record, amperes,
        numberPhases, lowering). Reads only; see :meth:`_renew_defaults_under_transactions`."""
        is_calm = functools.cache(calm)
        result = []
        for station_id in self._stations if station_ids is None else station_ids:
            station = self._stations.get(station_id)
            if station is None or not self._connected(station_id, station) or station_id in busy:
                continue
            if any(record.renewing or self._in_flight(record) for record in station.evses.values()):
                continue
            for record in station.evses.values():
                if record.governing != "TxProfile" or record.renewing or record.default_amperes is None:
                    continue
                wanted = self._default_under_transaction(record)
                if wanted is None:
                    continue
                target, phases = wanted
                at = self._renewal_at(record, "TxDefaultProfile")
                lower = target < record.default_amperes - EPSILON_AMPERES or _fewer(phases, record.default_phases)
                lower = lower and is_calm()
                if not lower and (at is None or at > wall):
                    continue
                if not lower:
                    target, phases = record.default_amperes, record.default_phases  # renewed as it is
                result.append((record, target, phases, lower))
                break  # one call of ours at a time per station
        return result

    def _decrease_in_flight(self) -> bool:
        return any(
            applied.in_flight_amperes is not None
            and (applied.accepted_amperes is None or applied.in_flight_amperes < applied.accepted_amperes)
            for applied in self.rollout.evses.values()
        )

    def _in_flight(self, record: EvseRecord) -> bool:
        applied = self.rollout.evses.get(record.key)
        return applied is not None and applied.in_flight_amperes is not None

    async def _renew_default(
        self, record: EvseRecord, payload: dict[str, Any], sent: tuple[float, int | None], valid_to: datetime, kind: str
    ) -> None:
        amperes, phases = sent
        try:
            outcome = await self._call(record.station_id, "SetChargingProfile", payload)
        finally:
            record.renewing_to = None
        accepted = outcome.status == "answered" and (outcome.payload or {}).get("status") == "Accepted"
        self.metrics.profiles.labels(kind, "accepted" if accepted else outcome.status).inc()
        if accepted:
            record.default_amperes, record.default_phases = amperes, phases
            record.valid_until["TxDefaultProfile"] = valid_to
            self._dirty.add(record.station_id)
        elif outcome.status != "answered" and record.default_amperes is not None:
            # Unanswered: either may be in force; the larger counts until one is accepted.
            record.default_amperes = max(record.default_amperes, amperes)
            if _fewer(record.default_phases, phases):
                record.default_phases = phases  # the wider of the two counts
            self._dirty.add(record.station_id)
        station = self._stations.get(record.station_id)
        connected = station is not None and self._connected(record.station_id, station)
        if record.governing == "TxDefaultProfile" and record.key in self.rollout.evses and connected:
            # The transaction ended (or another began) while this was under way: the default governs the
            # EVSE now, as the answer left it (counted at both limits meanwhile, see _default_in_force).
            self.rollout.installed(record.key, self._default_in_force(record), self._default_phases(record))
            self._dirty.add(record.station_id)
        self.wake()

    def _default_in_force(self, record: EvseRecord) -> float | None:
        """Our TxDefaultProfile's limit at the station if it is still valid there (else unknown); while a
        change to it is under way, the larger of the two (the station may have applied it already)."""
        valid_until = record.valid_until.get("TxDefaultProfile")
        if record.default_amperes is None or valid_until is None or valid_until <= self._wall():
            return None
        if record.renewing_to is not None:
            return max(record.default_amperes, record.renewing_to[0])
        return record.default_amperes

    def _default_phases(self, record: EvseRecord) -> int | None:
        """The numberPhases of our TxDefaultProfile at the station (``None``: every phase): as accepted, and
        the wider of two while a change is under way. A default narrowed under a 1-phase EV's transaction
        stays narrowed once that transaction ends, until a wider one is accepted."""
        phases = record.default_phases
        if record.renewing_to is not None and _fewer(phases, record.renewing_to[1]):
            phases = record.renewing_to[1]
        return phases

    def _lapse(self, wall: datetime, records: Iterable[EvseRecord] | None = None) -> list[tuple[str, int]]:
        """A profile of ours that lapsed (never renewed) no longer holds the EVSE: its limit is unknown.
        Looks at every EVSE (or those of ``records``); returns those it changed."""
        changed = []
        for record in self._records() if records is None else records:
            lapsed = False
            default_until = record.valid_until.get("TxDefaultProfile")
            if default_until is not None and default_until <= wall:
                del record.valid_until["TxDefaultProfile"]
                record.default_amperes = None
                self._dirty.add(record.station_id)
                lapsed = True
            until = record.valid_until.get(record.governing)
            applied = self.rollout.evses.get(record.key)
            if until is not None and until <= wall and applied is not None and applied.confirmed:
                log.warning("[%s] the profile on EVSE %d lapsed before it was renewed", *record.key)
                del record.valid_until[record.governing]
                self.rollout.installed(record.key, None)
                self._dirty.add(record.station_id)
                lapsed = True
            if lapsed:
                changed.append(record.key)
        return changed


def _fewer(phases: int | None, than: int | None) -> bool:
    """Whether a numberPhases of ``phases`` allows fewer phases than ``than`` (``None``: every phase)."""
    return phases is not None and (than is None or phases < than)
