"""At most one call from the controller's side outstanding at a station (Part 4 §4.1.1).

Relayed CSMS calls and the controller's own calls to a station share one :class:`CallSlot`
(:class:`router.link.StationLink` holds it); kept here so that the link module stays the pair itself.
"""

from __future__ import annotations

import logging
import math

import trio

from .metrics import RouterMetrics

log = logging.getLogger("ocpp_lc.link")


class CallSlot:
    """At most one call from our side outstanding at the station (§4.1.1).

    Whoever sends a CALL to the station (the downstream pump for a CSMS call, or the controller)
    first acquires the slot with that call's id; the station's answer releases it. A holder that is
    never answered loses the slot at its deadline, so one lost answer does not block a station.
    """

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self._holder: str | None = None
        self._deadline = math.inf
        self._released = trio.Event()

    @property
    def holder(self) -> str | None:
        """The id of the outstanding call, if any."""
        return self._holder

    async def acquire(self, message_id: str, hold_s: float) -> bool:
        """Wait for the slot and take it for ``message_id``; return whether we had to wait."""
        waited = False
        while self._holder is not None:
            waited = True
            with trio.move_on_at(self._deadline):
                await self._released.wait()
            if self._holder is not None and trio.current_time() >= self._deadline:
                log.warning("call %s was never answered by the station; releasing", self._holder)
                self._metrics.unanswered_calls.inc()
                self._free()
        self._holder = message_id
        self._deadline = trio.current_time() + hold_s
        self._released = trio.Event()
        return waited

    def release(self, message_id: str) -> bool:
        """Free the slot if ``message_id`` holds it; return whether it did."""
        if self._holder != message_id:
            return False
        self._free()
        return True

    def _free(self) -> None:
        self._holder = None
        self._deadline = math.inf
        self._released.set()
