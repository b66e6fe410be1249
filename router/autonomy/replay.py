"""Pure helpers for the replay on restore: the order, the payload sent, and a refusal that stops a session.

The replay itself (reconnect, one call outstanding, consume the CSMS's answers) is the link's; these are
the decisions it needs, kept here so they are tested on their own.

``offline`` on replayed TransactionEvents: :func:`replay_payload` sets it to true. The station set it
false because it was connected (to us); but for the CSMS the event did happen while the station was
offline, which is exactly what E04.FR.03 asks the flag to say. With it the CSMS knows that the event is
late and that its idToken was authorised locally (C15), rather than by itself. Every other field, seqNo
included, is the station's own, so the CSMS still spots a repeat after a crash during replay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .queue import LatestEntry, StationMessage
from .responder import BOOT_KEY, DEFAULT_PENDING_INTERVAL_S


def partition_latest(entries: list[LatestEntry]) -> tuple[list[LatestEntry], list[LatestEntry]]:
    """Split a station's latest entries into those sent before its queue and those sent after it.

    A BootNotification goes first: nothing may precede the boot (B01.FR.08), and the queued events of
    before and after the reboot then follow it, as a station's own cached messages would. Every other
    state message goes after the queue, oldest change first, so the CSMS ends with the current state.
    """
    before = [entry for entry in entries if entry.key == BOOT_KEY]
    after = [entry for entry in entries if entry.key != BOOT_KEY]
    return before, sorted(after, key=lambda entry: entry.version)


def boot_verdict(result: object) -> tuple[str, int] | None:
    """(status, seconds to wait) when the CSMS's answer to a replayed boot is Pending or Rejected, else None.

    ``result`` is the CALLRESULT payload (None for a CALLERROR). The wait is the interval the CSMS gave,
    or ours when it gave 0 (B02.FR.07, B03.FR.05). Until the CSMS accepts the boot, nothing else kept
    for the station may reach it (B01.FR.08, B02.FR.02); the link holds the replay meanwhile.
    """
    if not isinstance(result, Mapping):
        return None
    status, interval = result.get("status"), result.get("interval")
    if status not in ("Pending", "Rejected"):
        return None
    if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
        return str(status), interval
    return str(status), DEFAULT_PENDING_INTERVAL_S


def replay_payload(message: StationMessage, *, mark_offline: bool = True) -> dict[str, Any]:
    """The payload to send the CSMS for a kept message: the station's own; ``offline`` set on TransactionEvents."""
    payload = dict(message.payload)
    if mark_offline and message.action == "TransactionEvent":
        payload["offline"] = True  # E04.FR.03; see the module docstring
    return payload


def refused_after_local_accept(message: StationMessage, csms_response: Mapping[str, Any]) -> str | None:
    """The transactionId to stop, if the CSMS refuses an idToken the controller accepted locally.

    Only for a TransactionEvent that was answered Accepted locally, whose transaction had not ended by
    then, and that the CSMS now answers with an idTokenInfo other than Accepted: what a station with
    StopTxOnInvalidId would stop (C15.FR.03/04). The caller sends RequestStopTransaction when
    ``[autonomy] stop_invalid_transactions`` is true, and logs and counts it either way.
    """
    if message.action != "TransactionEvent" or message.local_id_token_status != "Accepted":
        return None
    info = csms_response.get("idTokenInfo")
    if not isinstance(info, Mapping) or info.get("status") in (None, "Accepted"):
        return None
    if message.payload.get("eventType") == "Ended":
        return None
    transaction = message.payload.get("transactionInfo")
    transaction_id = transaction.get("transactionId") if isinstance(transaction, Mapping) else None
    return transaction_id if isinstance(transaction_id, str) else None
