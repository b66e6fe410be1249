"""What the balancing loop writes to the store, and takes back from it after a restart.

A station's record (its EVSEs, sessions, what each may have installed) is written in one transaction per
round for the stations that changed (never per answer: fsyncs add up), and a step is written before it
goes out, so a crash never forgets a limit that may be in force. After a restart every EVSE counts at
its maximum until its station accepts a profile again (:meth:`RolloutState.restore`).
"""

from __future__ import annotations

from typing import Any

from .loop_types import BalancerState, LoopCore, log
from .records import decode, encode


class Persistence(LoopCore):
    """The store part of the loop; see the module docstring."""

    _state: BalancerState | None

    def _flush(self) -> None:
        """Write what changed since the last flush, in one transaction (never per answer: fsyncs add up)."""
        if self._state is None or not self._dirty:
            return
        items: dict[str, Any] = {}
        for station_id in sorted(self._dirty):
            station = self._stations.get(station_id)
            if station is None:
                self._state.delete(station_id)
                continue
            ceilings: dict[int, tuple[float | None, int | None]] = {}
            for evse_id, record in station.evses.items():
                applied = self.rollout.evses.get(record.key)
                if applied is None or applied.accepted_amperes is None:
                    continue
                # The most it may have installed: a step in flight may already be in force there.
                ceiling = max(applied.accepted_amperes, applied.in_flight_amperes or 0.0)
                phases = applied.accepted_phases
                if applied.in_flight_amperes is not None and phases is not None:
                    phases = None if applied.in_flight_phases is None else max(phases, applied.in_flight_phases)
                ceilings[evse_id] = (ceiling, phases)
            items[station_id] = encode(station, ceilings)
        self._dirty.clear()
        if items:
            self._state.put_many(items)

    def _restore(self, state: BalancerState) -> None:
        """Take back what was known before a restart. Every EVSE counts at its maximum until its station
        accepts a profile again (it is retried at once), never above what it may have installed."""
        for station_id, stored in sorted(state.items().items()):
            try:
                station, evses = decode(station_id, stored)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                log.error("[%s] balancing state in the store is unreadable (%s): learned again", station_id, error)
                continue
            self._stations[station_id] = station
            if station.forgotten:
                continue
            for item in evses:
                record = item.record
                self.rollout.restore(station_id, record.evse_id, item.ceiling_amperes, item.phases)
                if record.transaction_id is not None:
                    self.rollout.session_started(record.key, record.phases_used)
                    record.tx_profile_accepted = "TxProfile" in record.valid_until
