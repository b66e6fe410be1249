"""What the controller itself sends upstream, kept durably until the CSMS has answered it.

Theory of operation. Messages the controller originates on its own identity that must not be lost
(NotifyChargingLimit, ClearedChargingLimit, PublishFirmwareStatusNotification …) are appended to the
store's outbox ``upstream`` as ``{"action": …, "payload": …}`` and delivered strictly in order, one
at a time, whenever the own connection is open *and* the CSMS has accepted the controller's boot
(B01.FR.08: not even messages queued before a restart go earlier).

An entry is removed (acked) only once the CSMS has answered it:

* CALLRESULT — delivered;
* CALLERROR — it will never succeed as it is: logged, counted
  (``ocpp_lc_own_outbox_failed_total``) and dropped, so one bad message cannot block the rest;
* no answer within MessageTimeout — sent again, with a new message id (Part 4 §4.1.4);
* the connection drops (or the appliance stops) before the answer — the entry stays and goes first
  after the next acceptance. Delivery is therefore at least once: a CSMS may see a message twice if
  the connection dropped after it had answered.

Entries survive a restart because the store does (see :mod:`router.store`).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from router import ocppj
from router.own.connection import CallFn, CallRejected, CallTimeout, OwnMetrics
from router.store import Outbox

log = logging.getLogger("ocpp_lc.own.outbox")


class UpstreamOutbox:
    """Durable, ordered delivery of the controller's own messages over the own connection."""

    def __init__(self, queue: Outbox, metrics: OwnMetrics) -> None:
        self._queue = queue
        self._metrics = metrics
        self._added = trio.Event()
        self._emptied = trio.Event()
        self._metrics.outbox_length.set(len(queue))

    def __len__(self) -> int:
        return len(self._queue)

    def enqueue(self, action: str, payload: dict[str, Any]) -> int:
        """Append a message; durable when this returns (StoreError if not). Returns its sequence number."""
        if action not in ocppj.ACTIONS:
            raise ValueError(f"{action!r} is not an OCPP 2.0.1 action")
        if not isinstance(payload, dict):
            raise TypeError("an OCPP payload is a dict")
        seq = self._queue.append({"action": action, "payload": payload})
        self._metrics.outbox_length.set(len(self._queue))
        self._added.set()
        if self._emptied.is_set():
            self._emptied = trio.Event()
        return seq

    async def wait_empty(self) -> None:
        """Return once every queued message has been answered (at once if none is queued)."""
        while len(self._queue):
            await self._emptied.wait()

    async def deliver(self, call: CallFn) -> None:
        """Send the queued messages in order through ``call``, waiting for more; until cancelled.

        ``call`` is the session's :meth:`~router.own.connection.Session.call`; a LinkDown from it (or
        the session's cancellation) ends delivery with the current entry still queued.
        """
        while True:
            entries = self._queue.peek(1)
            if not entries:
                added = self._added
                await added.wait()
                if added is self._added:
                    self._added = trio.Event()
                continue
            seq, item = entries[0]
            if not _well_formed(item):
                log.error("own outbox: entry %d is not a message (%.200r); dropping it", seq, item)
                self._ack(seq)
                continue
            action, payload = item["action"], item["payload"]
            try:
                await call(action, payload)
            except CallRejected as exc:
                # The CSMS understood it and will never take it: keeping it would block everything after it.
                log.warning("own outbox: %s (entry %d) refused: %s %s; dropped", action, seq, exc.code, exc.description)
                self._metrics.outbox_failed.labels(ocppj.action_label(action)).inc()
                self._ack(seq)
            except CallTimeout:
                log.warning("own outbox: %s (entry %d) got no answer; sending it again", action, seq)
            else:
                self._ack(seq)

    def _ack(self, seq: int) -> None:
        self._queue.ack(seq)
        remaining = len(self._queue)
        self._metrics.outbox_length.set(remaining)
        if not remaining:
            self._emptied.set()


def _well_formed(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("action"), str)
        and item["action"] in ocppj.ACTIONS
        and isinstance(item.get("payload"), dict)
    )
