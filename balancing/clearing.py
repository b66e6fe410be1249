"""Taking the controller's profiles off the stations again (ClearChargingProfile by our ids).

Our profiles must not outlive the balancing that set them: when balancing is switched off
(``[balancing] enabled = false``), or before the controller is removed from a site (``ocpp-lc
balancing release``), every profile of ours is cleared by its id (K10.FR.01/03: the station answers
Accepted, or Unknown where it had none), so each station falls back to its own defaults and to the
CSMS's profiles. Clearing by id touches nothing of the CSMS's, whatever stack level it uses.

:class:`LeftoverProfiles` does it when balancing is off: it reads what the balancing loop left in the
store (the stations and EVSEs it had profiles on), clears a station's profiles when the station
connects, and forgets the station once every clear was answered. Profiles have a bounded validity
anyway (``[balancing] profile_validity_s``), so a station that never comes back is not held for ever.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

log = logging.getLogger("ocpp_lc.balancing.clearing")


class Outcome(Protocol):
    """How a call ended (``balancing.loop.CallOutcome`` fits)."""

    @property
    def status(self) -> str: ...

    @property
    def payload(self) -> Any: ...


class ClearCaller(Protocol):
    async def __call__(self, station_id: str, action: str, payload: dict[str, Any]) -> Outcome: ...


class StoredStations(Protocol):
    """The balancing loop's store namespace."""

    def items(self) -> dict[str, Any]: ...

    def delete(self, key: str) -> bool: ...


def our_profile_ids(profile_id_base: int, evse_ids: Iterable[int]) -> list[int]:
    """Every id the controller may have used on these EVSEs (TxProfile and TxDefaultProfile)."""
    return sorted({profile_id_base + 2 * evse_id + offset for evse_id in evse_ids for offset in (0, 1)})


@dataclass(frozen=True, slots=True)
class Cleared:
    """What clearing one station's profiles gave: ids answered (Accepted or Unknown), ids that failed."""

    station_id: str
    cleared: tuple[int, ...]
    failed: tuple[tuple[int, str], ...]

    @property
    def complete(self) -> bool:
        return not self.failed


async def clear_station(caller: ClearCaller, station_id: str, profile_ids: Iterable[int]) -> Cleared:
    """Send ClearChargingProfile for each id in turn; Unknown counts as cleared (nothing was there)."""
    cleared: list[int] = []
    failed: list[tuple[int, str]] = []
    for profile_id in profile_ids:
        outcome = await caller(station_id, "ClearChargingProfile", {"chargingProfileId": profile_id})
        answer = outcome.payload.get("status") if outcome.status == "answered" and outcome.payload else None
        if answer in ("Accepted", "Unknown"):
            cleared.append(profile_id)
        else:
            failed.append((profile_id, str(answer or outcome.status)))
            if outcome.status == "gone":
                failed.extend((rest, "gone") for rest in profile_ids if rest not in cleared and rest != profile_id)
                break
    return Cleared(station_id, tuple(cleared), tuple(dict.fromkeys(failed)))


def stored_evse_ids(stored: Any) -> list[int]:
    """The EVSE ids of one station in the balancing loop's stored form ([] if unreadable)."""
    try:
        return sorted(int(key) for key in stored["evses"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return []


class LeftoverProfiles:
    """Clears the profiles a former balancing loop left on stations; see the module docstring."""

    def __init__(self, state: StoredStations, caller: ClearCaller, profile_id_base: int) -> None:
        self._state = state
        self._caller = caller
        self._base = profile_id_base
        self._pending = {station_id: stored_evse_ids(stored) for station_id, stored in state.items().items()}
        self._busy: set[str] = set()
        if self._pending:
            log.warning(
                "balancing is off: the controller's profiles are cleared from %d stations as they connect",
                len(self._pending),
            )

    @property
    def pending(self) -> list[str]:
        """Stations whose profiles are still to be cleared."""
        return sorted(self._pending)

    def connected(self, station_id: str, nursery: trio.Nursery) -> None:
        """A station connected: clear our profiles there if any are left (in the background)."""
        if station_id in self._pending and station_id not in self._busy:
            self._busy.add(station_id)
            nursery.start_soon(self._clear, station_id)

    async def _clear(self, station_id: str) -> None:
        try:
            result = await clear_station(
                self._caller, station_id, our_profile_ids(self._base, self._pending[station_id])
            )
        finally:
            self._busy.discard(station_id)
        if result.complete:
            log.info("[%s] the controller's profiles are cleared (%d ids)", station_id, len(result.cleared))
            self._pending.pop(station_id, None)
            self._state.delete(station_id)
        else:
            log.warning(
                "[%s] clearing the controller's profiles failed (%s): tried again on its next connection",
                station_id,
                result.failed[0][1],
            )
