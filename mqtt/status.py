"""The MQTT line of ``ocpp-lc status`` (kept apart from the service: the CLI loads no MQTT client)."""

from __future__ import annotations

from typing import Any


def status_lines(row: dict[str, Any] | None) -> list[str]:
    """``ocpp-lc status``'s lines for :meth:`MqttService.status` (none when MQTT is off)."""
    if row is None:
        return []
    tls = ", TLS" if row.get("tls") else ""
    if row.get("connected"):
        since = row.get("connected_for_s")
        state = "connected" + ("" if since is None else f" for {since:.0f} s")
    else:
        state = "DISCONNECTED (EMS limits keep their validity, then the failsafe)"
        if row.get("last_error"):
            state += f", last error: {row['last_error']}"
    return [f"mqtt {row.get('broker')}{tls}: {state}  (topics {row.get('topic_prefix')}/...)"]
