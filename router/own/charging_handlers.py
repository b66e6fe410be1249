"""The CSMS's smart-charging calls on the controller's own identity, answered from the site-limit book.

SetChargingProfile, ClearChargingProfile, GetChargingProfiles and GetCompositeSchedule on the own
identity concern the site as a whole (K03: the CSMS limits the site with a ChargingStationMaxProfile
on evseId 0). The :class:`~balancing.csms_limits.CsmsLimitBook` decides every answer; this module
only adapts it to :class:`~router.own.service.OwnIdentity`'s handler table: a malformed request
becomes the CALLERROR the book names, and the ReportChargingProfiles parts of a GetChargingProfiles
are queued in the durable outbox once the answer has gone (K09: the report follows the response).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from balancing.csms_limits import CsmsLimitBook, RequestMalformed
from router.own.connection import CallErrorReply, Handler, Reply, Session
from router.own.service import OwnIdentity


def _answering(handle: Callable[[dict[str, Any]], Reply]) -> Handler:
    """``handle`` with the book's RequestMalformed turned into the CALLERROR it names."""

    def handler(payload: dict[str, Any]) -> Reply:
        try:
            return handle(payload)
        except RequestMalformed as malformed:
            raise CallErrorReply(malformed.code, malformed.description) from None

    return handler


def register_csms_limits(own: OwnIdentity, book: CsmsLimitBook, clock: Callable[[], datetime.datetime]) -> None:
    """Answer the CSMS's smart-charging calls on ``own`` from ``book``; ``clock`` is the wall clock (UTC)."""

    def set_profile(payload: dict[str, Any]) -> Reply:
        return Reply(book.set_profile(payload, clock()))

    def clear(payload: dict[str, Any]) -> Reply:
        return Reply(book.clear(payload))

    def composite(payload: dict[str, Any]) -> Reply:
        return Reply(book.composite(payload, clock()))

    def get_profiles(payload: dict[str, Any]) -> Reply:
        response, parts = book.report(payload)
        if not parts:
            return Reply(response)

        async def send_report(session: Session) -> None:
            # Through the outbox: the report is durable and goes out in order once the answer is sent.
            for part in parts:
                await own.send("ReportChargingProfiles", part)

        return Reply(response, then=send_report)

    own.add_handler("SetChargingProfile", _answering(set_profile))
    own.add_handler("ClearChargingProfile", _answering(clear))
    own.add_handler("GetCompositeSchedule", _answering(composite))
    own.add_handler("GetChargingProfiles", _answering(get_profiles))
