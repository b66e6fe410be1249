"""The one call the link makes for each station CALL while the station is served locally.

:meth:`LocalService.handle` asks the responder for the answer, keeps what the CSMS must still learn in
the replay queue (durable when it returns), and only then hands back the reply for the station. If the
message cannot be kept (queue full, disk full or failing) the station is answered with a CALLERROR
InternalError instead, so that it keeps the message itself and sends it again (a station retries a
transaction message the CSMS failed to process); the failure is logged, and ``kept`` says why, for a
counter. One station's trouble never touches another's queue.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from router.own.catalogue import rfc3339
from router.store import StoreError

from .auth_cache import LocalAuthorization
from .queue import QueueFull, ReplayQueue, StationMessage
from .responder import Disposition, LocalReply, LocalResponder

log = logging.getLogger("ocpp_lc.autonomy")

Kept = Literal["queued", "latest", "dropped", "queue_full", "store_failed"]


@dataclass(frozen=True)
class HandledCall:
    """The reply to send the station (``reply``) and what became of the message (``kept``, a metric label)."""

    reply: LocalReply
    kept: Kept
    seq: int | None = None  # the queue's sequence number, when queued


class LocalService:
    """Responder plus queue: answer a local station's CALL, keeping first what must reach the CSMS."""

    def __init__(
        self,
        responder: LocalResponder,
        queue: ReplayQueue,
        *,
        wall_clock: Callable[[], datetime.datetime],
        on_authorized: Callable[[LocalAuthorization], None] | None = None,
    ) -> None:
        self.responder = responder
        self.queue = queue
        self._wall_clock = wall_clock
        self._on_authorized = on_authorized

    def handle(self, station_id: str, message_id: str, action: str, payload: Mapping[str, Any]) -> HandledCall:
        """Answer one CALL of ``station_id``; when this returns, whatever the reply promises is on disk.

        ``on_authorized`` hears of every idToken judged locally whose verdict the station is given (not of
        one whose message could not be kept: that station is answered with an error instead).
        """
        handled = self._handle(station_id, message_id, action, payload)
        authorization = handled.reply.authorization
        if authorization is not None and handled.reply.error_code is None and self._on_authorized is not None:
            self._on_authorized(authorization)
        return handled

    def _handle(self, station_id: str, message_id: str, action: str, payload: Mapping[str, Any]) -> HandledCall:
        reply = self.responder.answer(station_id, action, payload)
        if reply.error_code is not None or reply.disposition is Disposition.DROP:
            return HandledCall(reply, "dropped")
        message = StationMessage(
            action=action,
            payload=payload,
            message_id=message_id,
            received_at=rfc3339(self._wall_clock()),
            local_id_token_status=None if reply.authorization is None else reply.authorization.status,
        )
        try:
            if reply.disposition is Disposition.QUEUE:
                return HandledCall(reply, "queued", self.queue.append(station_id, message))
            assert reply.latest_key is not None
            self.queue.put_latest(station_id, reply.latest_key, message)
            return HandledCall(reply, "latest")
        except QueueFull as full:
            log.warning("station %s: %s not kept for the CSMS: %s", station_id, action, full)
            return HandledCall(_refusal(reply, str(full)), "queue_full")
        except StoreError as failure:
            log.error("station %s: %s not kept for the CSMS, the state store failed: %s", station_id, action, failure)
            return HandledCall(_refusal(reply, "the controller could not store the message"), "store_failed")


def _refusal(reply: LocalReply, why: str) -> LocalReply:
    refused = LocalReply.error("InternalError", f"{why}; send it again later")
    return replace(refused, authorization=reply.authorization)
