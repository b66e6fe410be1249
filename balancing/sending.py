"""Sending the controller's profiles: one SetChargingProfile per planned step, and what its answer means.

A step is recorded as sent (:meth:`RolloutState.sent`: an increase counts from then on) and marked for
the store before it goes out, each in its own task; ``link.call`` keeps one call of ours outstanding per
station (Part 4 §4.1.1). Its answer settles what the EVSE is known to have installed: accepted, rejected
(counted at its maximum until it accepts one), or unanswered (either may be in force). A TxProfile
refused because its transaction has just ended at the station (K01.FR.09) is not a fault.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import trio

from .loop_types import Caller, CallOutcome, LoopCore, log, reason_code, timestamp
from .records import EvseRecord, Purpose
from .rollout import Step


class ProfileSending(LoopCore):
    """The sending part of the loop; see the module docstring."""

    _caller: Caller
    _stopping: bool

    def _send_step(
        self, nursery: trio.Nursery, step: Step, governed: set[tuple[str, int]], now_s: float, valid_to: datetime
    ) -> bool:
        """Start sending one step of the plan; whether it went out."""
        started = self._start_step(step, governed, now_s, valid_to)
        if started is None:
            return False
        purpose, payload, record = started
        nursery.start_soon(self._send, step, purpose, payload, record.generation, valid_to)
        return True

    def _start_step(
        self, step: Step, governed: set[tuple[str, int]], now_s: float, valid_to: datetime
    ) -> tuple[Purpose, dict[str, Any], EvseRecord] | None:
        """Record one step as sent, if it is to be sent: its purpose, payload and EVSE (``None``: not sent).
        A forked child foreseeing the next round does this on its copy (:mod:`balancing.settling`)."""
        station = self._stations.get(step.station_id)
        if station is None or not self._connected(step.station_id, station):
            return None  # nothing to send to; it stays counted at its maximum until it is back
        if step.key in governed:
            return None  # a CSMS profile outranks ours there: sending changes nothing
        record = station.evses[step.evse_id]
        if record.renewing:
            return None  # one call of ours per EVSE: planned again once the renewal is answered
        purpose: Purpose = "TxProfile" if record.transaction_id is not None else "TxDefaultProfile"
        payload = self.profile_payload(record, purpose, step.current_amperes, valid_to, step.phases)
        self.rollout.sent(step, now_s)
        self._dirty.add(step.station_id)  # written before it goes out: a crash never forgets it
        self.metrics.profiles.labels(step.kind, "sent").inc()
        return purpose, payload, record

    def profile_payload(
        self,
        record: EvseRecord,
        purpose: Purpose,
        amperes: float,
        valid_to: datetime | None = None,
        phases: int | None = None,
    ) -> dict[str, Any]:
        """The SetChargingProfileRequest that installs ``amperes`` per phase on one EVSE."""
        profile_id = self.settings.profile_id(record.evse_id, purpose)
        period: dict[str, Any] = {"startPeriod": 0, "limit": amperes}
        if phases is not None and phases < 3:
            period["numberPhases"] = phases  # K01.FR.49: without it the station assumes 3
        profile: dict[str, Any] = {
            "id": profile_id,
            "stackLevel": self.settings.stack_level,
            "chargingProfilePurpose": purpose,
            # Relative with one open-ended period: in force from now (or the transaction's start) on.
            "chargingProfileKind": "Relative",
            "chargingSchedule": [{"id": profile_id, "chargingRateUnit": "A", "chargingSchedulePeriod": [period]}],
        }
        if valid_to is not None:
            profile["validTo"] = timestamp(valid_to)
        if purpose == "TxProfile":
            profile["transactionId"] = record.transaction_id
        return {"evseId": record.evse_id, "chargingProfile": profile}

    async def _call(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        try:
            return await self._caller(station_id, action, payload)
        except Exception as error:  # defence in depth: one station's failure must not stop the loop
            log.exception("[%s] %s failed unexpectedly", station_id, action)
            return CallOutcome("gone", detail=type(error).__name__)

    async def _send(
        self, step: Step, purpose: Purpose, payload: dict[str, Any], generation: int, valid_to: datetime
    ) -> None:
        outcome = await self._call(step.station_id, "SetChargingProfile", payload)
        accepted = outcome.status == "answered" and (outcome.payload or {}).get("status") == "Accepted"
        label = "accepted" if accepted else "rejected" if outcome.status == "answered" else outcome.status
        self.metrics.profiles.labels(step.kind, label).inc()
        station = self._stations.get(step.station_id)
        record = None if station is None else station.evses.get(step.evse_id)
        # A TxProfile for a transaction that ended meanwhile is rightly refused (K01.FR.09): not a fault.
        overtaken = record is None or record.generation != generation
        status_info = (outcome.payload or {}).get("statusInfo") if outcome.status == "answered" else None
        ended_there = purpose == "TxProfile" and reason_code(status_info) == "TxNotFound"
        if not accepted and not self._stopping and not overtaken and ended_there:
            # The transaction ended at the station before the profile arrived; its TransactionEvent is on its
            # way: counted at its maximum until that comes, but not a fault worth a warning.
            log.info("[%s] TxProfile on EVSE %d: the transaction has ended there", step.station_id, step.evse_id)
        elif not accepted and not self._stopping and not overtaken:
            log.warning(
                "[%s] %s of %.1f A on EVSE %d: %s%s; counted at its maximum until it accepts one",
                step.station_id,
                purpose,
                step.current_amperes,
                step.evse_id,
                label,
                f" ({outcome.detail or status_info})" if outcome.detail or status_info else "",
            )
        self._settle(step, purpose, record, generation, accepted, outcome.status, valid_to)
        self._answered(step.key, accepted)

    def _settle(
        self,
        step: Step,
        purpose: Purpose,
        record: EvseRecord | None,
        generation: int,
        accepted: bool,
        status: str,
        valid_to: datetime,
    ) -> None:
        if record is None or step.key not in self.rollout.evses:
            return  # forgotten meanwhile
        self._dirty.add(step.station_id)
        if accepted and purpose == "TxDefaultProfile":
            record.default_amperes = step.current_amperes
            record.default_phases = step.phases
        if accepted:
            record.valid_until[purpose] = valid_to
        if record.generation != generation:
            # A transaction started or ended while this was under way. No TxProfile of ours exists for
            # the transaction there is now (one would carry the new generation), so our
            # TxDefaultProfile governs the EVSE, idle or not: known if the station accepted one.
            self.rollout.installed(step.key, self._default_in_force(record), self._default_phases(record))
            return
        if accepted:
            self.rollout.accepted(step)
            if purpose == "TxProfile":
                record.tx_profile_accepted = True
        elif status == "answered" or status == "error":
            self.rollout.rejected(step)
        else:
            self.rollout.unanswered(step)
