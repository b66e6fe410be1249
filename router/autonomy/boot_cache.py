"""The last BootNotification verdict the CSMS gave each station, kept durably (B01, B02).

While relaying, every BootNotificationResponse the CSMS sends a station is fed to :meth:`BootCache.learn`.
While the CSMS is unreachable the local responder asks :meth:`BootCache.accepted_interval`: a station
whose last verdict was Accepted is answered Accepted with the interval the CSMS gave it; any other
station (never seen, or last told Pending or Rejected) is not yet accepted by the CSMS, so it is answered
Pending (B02) and may send nothing else through us until the CSMS has seen it (B02.FR.09).

One store namespace, keyed by station id; values are msgpack-friendly dicts. Synchronous, like the store.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from router.store import KeyValue

log = logging.getLogger("ocpp_lc.autonomy.boot")

_STATUSES = frozenset({"Accepted", "Pending", "Rejected"})


class BootCache:
    """Per station: the status and interval of the CSMS's last BootNotificationResponse.

    Give it ``store.namespace("autonomy.boot")``. Only a change is written, so a station that reboots
    often does not cost a write per boot.
    """

    def __init__(self, keys: KeyValue) -> None:
        self._keys = keys
        self._verdicts: dict[str, tuple[str, int]] = {}
        for station_id, value in keys.items().items():
            status = value.get("status") if isinstance(value, dict) else None
            interval = value.get("interval") if isinstance(value, dict) else None
            if status in _STATUSES and isinstance(interval, int) and not isinstance(interval, bool):
                self._verdicts[station_id] = (str(status), interval)
            else:
                log.warning("boot cache: dropping the unreadable entry of station %s", station_id)
                keys.delete(station_id)

    def learn(self, station_id: str, response: Mapping[str, Any]) -> None:
        """Remember the CSMS's BootNotificationResponse to ``station_id``; durable when it returns."""
        status, interval = response.get("status"), response.get("interval")
        if status not in _STATUSES or not isinstance(interval, int) or isinstance(interval, bool):
            return  # not a BootNotificationResponse we can use; what we knew stands
        verdict = (str(status), interval)
        if self._verdicts.get(station_id) != verdict:
            self._keys.put(station_id, {"status": verdict[0], "interval": verdict[1]})
            self._verdicts[station_id] = verdict

    def accepted_interval(self, station_id: str) -> int | None:
        """The heartbeat interval (s) the CSMS gave ``station_id`` when it last accepted it; None if it did not."""
        verdict = self._verdicts.get(station_id)
        return verdict[1] if verdict is not None and verdict[0] == "Accepted" else None
