"""Sessions as the loop follows them: transactions starting, moving and ending, meter values (underdraw
and overdraw), and the allocator's view of each EVSE (:class:`~balancing.allocator.Session`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import Any, NamedTuple

import trio

from .allocator import Allocation, Session, turn_after, underdraw_since
from .loop_types import MAX_EVSE_ID, LoopCore, log
from .observe import Measurement, transaction_facts
from .overdraw import is_overdrawing, overdraw_since
from .records import EvseRecord
from .rollout import bound_amperes


class SessionTracking(LoopCore):
    """The session part of the loop; see the module docstring."""

    def _on_transaction_event(self, station_id: str, payload: Any) -> None:
        facts = transaction_facts(payload)
        if facts is None:
            self.metrics.ignored.labels("TransactionEvent").inc()
            return
        station = self._station(station_id)
        known = station.transactions.get(facts.transaction_id)
        evse_id = known if known is not None else facts.evse_id
        if known is not None and facts.evse_id is not None and facts.evse_id != known:
            # The transaction moved to another EVSE (or the station says so): end it where it was.
            old = station.evses.get(known)
            if old is not None and old.transaction_id == facts.transaction_id:
                self._end_session(old)
            evse_id = facts.evse_id
        if evse_id is not None and not evse_id_usable(evse_id):
            evse_id = None
        if evse_id is None:
            self.metrics.ignored.labels("TransactionEvent").inc()
            return  # a later event of a transaction whose start we never saw, without its EVSE
        record = self._evse(station_id, evse_id)
        now_s = trio.current_time()
        if facts.event_type == "Ended":
            if record.transaction_id == facts.transaction_id:
                self._end_session(record)
            station.transactions.pop(facts.transaction_id, None)
            return
        if record.transaction_id != facts.transaction_id:
            if record.transaction_id is not None:
                self._end_session(record)  # a new transaction on the EVSE: the old one is over
            station.transactions[facts.transaction_id] = evse_id
            record.transaction_id = facts.transaction_id
            record.started_at = self._wall()
            record.priority = 0
            record.waiting_since_s = now_s
            record.served_since_s = None
            record.generation += 1
            record.tx_profile_accepted = False
            record.valid_until.pop("TxProfile", None)
            # Our TxDefaultProfile governs the new transaction until our TxProfile replaces it.
            self.rollout.session_started(record.key, facts.phases_used)
            self.rollout.installed(record.key, self._default_in_force(record), self._default_phases(record))
            log.info("[%s] transaction %s on EVSE %d joins the balancing", station_id, facts.transaction_id, evse_id)
            self._dirty.add(station_id)
            self.wake()
        if facts.phases_used is not None and facts.phases_used != record.phases_used:
            record.phases_used = facts.phases_used
            self._dirty.add(station_id)
            self.rollout.session_started(record.key, facts.phases_used)
            self.wake()
        record.charging_state = facts.charging_state or record.charging_state
        if facts.measurement is not None:
            self._measured(record, facts.measurement)

    def _end_session(self, record: EvseRecord) -> None:
        station = self._stations[record.station_id]
        record.tx_profile_accepted = False
        self._csms.transaction_ended(station, record.transaction_id)
        if record.transaction_id is not None:
            station.transactions.pop(record.transaction_id, None)
        record.transaction_id = None
        record.started_at = None
        record.charging_state = None
        record.priority = 0
        record.phases_used = None
        record.measured = None
        record.underdraw_since_s = None
        record.overdraw_since_s = None
        record.served_since_s = None
        record.generation += 1
        record.valid_until.pop("TxProfile", None)
        self._dirty.add(record.station_id)
        self.rollout.session_ended(record.key)
        self.rollout.overdraw(record.key, None)
        # The TxProfile ended with the transaction; our TxDefaultProfile governs the EVSE again.
        self.rollout.installed(record.key, self._default_in_force(record), self._default_phases(record))
        self.wake()

    def _measured(self, record: EvseRecord, found: Measurement) -> None:
        record.measured = found
        if record.transaction_id is None:
            return
        current = self._measured_amperes(record)
        applied = self.rollout.evses.get(record.key)
        if current is None or applied is None:
            return
        now_s = trio.current_time()
        self._check_overdraw(record, current, now_s)
        offered = self.allocation.current_amperes(*record.key)
        if applied.trusted and applied.accepted_amperes is not None:
            offered = min(offered, applied.accepted_amperes)
        was = record.underdraw_since_s
        record.underdraw_since_s = underdraw_since(current, offered, was, now_s, self.site.policy)
        if was is not None and record.underdraw_since_s is None:
            self.wake()  # it ramps up: give its share back now

    def _check_overdraw(self, record: EvseRecord, current: float, now_s: float) -> None:
        applied = self.rollout.evses[record.key]
        policy = self.settings.overdraw
        # What it may draw under what it accepted (its bound), leaving any overdraw already counted aside.
        bound = bound_amperes(self.site.station(record.station_id), replace(applied, overdraw_amperes=None))
        record.overdraw_since_s = overdraw_since(current, bound, record.overdraw_since_s, now_s, policy)
        if is_overdrawing(record.overdraw_since_s, now_s, policy):
            if applied.overdraw_amperes is None:
                self.metrics.overdraws.inc()
                log.warning(
                    "[%s] EVSE %d draws %.1f A, above the %.1f A it may draw, for %.0f s: counted at its draw, "
                    "the others are reduced",
                    record.station_id,
                    record.evse_id,
                    current,
                    bound,
                    now_s - (record.overdraw_since_s or now_s),
                )
            if applied.overdraw_amperes != current:
                self.rollout.overdraw(record.key, current)
                self.wake()
        elif record.overdraw_since_s is None and applied.overdraw_amperes is not None:
            log.info("[%s] EVSE %d draws within its limit again (%.1f A)", record.station_id, record.evse_id, current)
            self.rollout.overdraw(record.key, None)
            self.wake()

    def _measured_amperes(self, record: EvseRecord) -> float | None:
        found = record.measured
        if found is None:
            return None
        if found.current_amperes is not None:
            return found.current_amperes
        if found.power_watts is None:
            return None
        station = self.site.station(record.station_id)
        phases = len(station.grid_phases(record.phases_used))
        return found.power_watts / (self.site.nominal_voltage_volts * phases)

    def _session(self, record: EvseRecord, wall: datetime) -> Session:
        station = self._stations[record.station_id]
        cap = self._csms.cap(station, record, wall, self.site.nominal_voltage_volts)
        if record.transaction_id is None:
            idle = self.settings.rollout.idle_current_amperes
            return Session(
                station_id=record.station_id,
                evse_id=record.evse_id,
                reserve_amperes=idle if cap is None else min(idle, cap),
                max_current_amperes=cap,
            )
        return Session(
            station_id=record.station_id,
            evse_id=record.evse_id,
            transaction_id=record.transaction_id,
            priority=record.priority,
            phases_used=record.phases_used,
            measured_current_amperes=self._measured_amperes(record),
            underdraw_since_s=record.underdraw_since_s,
            served_since_s=record.served_since_s,
            waiting_since_s=record.waiting_since_s,
            max_current_amperes=cap,
        )

    def _turns(self, allocation: Allocation, now_s: float) -> list[Turn]:
        """How each session's turn (served or waiting since) moves with this allocation: the changes only."""
        changes: list[Turn] = []
        for record in self._records():
            if record.transaction_id is None:
                continue
            served = allocation.current_amperes(*record.key) > 0
            moved = turn_after(served, record.served_since_s, record.waiting_since_s, now_s)
            if moved != (record.served_since_s, record.waiting_since_s):
                changes.append(Turn(record.station_id, record.evse_id, record.generation, *moved))
        return changes

    def _apply_turns(self, turns: Iterable[tuple[str, int, int, float | None, float]]) -> None:
        """Take the turns :meth:`_turns` computed (in a forked child, maybe, which sends them as plain
        tuples: a :class:`Turn` costs its constructor to unpickle), for sessions still the same."""
        for station_id, evse_id, generation, served_since_s, waiting_since_s in turns:
            station = self._stations.get(station_id)
            record = None if station is None else station.evses.get(evse_id)
            if record is not None and record.generation == generation:
                record.served_since_s, record.waiting_since_s = served_since_s, waiting_since_s


class Turn(NamedTuple):
    """A session's turn after an allocation (:func:`balancing.allocator.turn_after`), for its generation."""

    station_id: str
    evse_id: int
    generation: int
    served_since_s: float | None
    waiting_since_s: float


def evse_id_usable(evse_id: int) -> bool:
    """EVSE ids the profile id scheme has room for (0 is the station as a whole, never an EVSE's)."""
    return 1 <= evse_id <= MAX_EVSE_ID
