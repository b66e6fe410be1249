"""The meters' lines in ``ocpp-lc status`` (kept apart from the service: the CLI loads no Modbus client)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def amperes(values: Sequence[float]) -> str:
    """Per-phase currents as ``L1/L2/L3 A``."""
    return "/".join(f"{value:.1f}" for value in values) + " A"


def node_lines(nodes: list[dict[str, Any]] | None) -> list[str]:
    """``ocpp-lc status``'s lines for the ``nodes`` of ``GET /api/v1/limits`` (meters/limits_view.py)."""
    lines = []
    for node in nodes or []:
        phases = node.get("phases", {})
        parts = []
        for name, row in phases.items():
            value = row.get("limit_amperes")
            parts.append(f"{name} {'none' if value is None else f'{value:g} A'} ({row.get('source') or '-'})")
        power = node.get("power") or {}
        if power.get("limit_watts") is not None:
            parts.append(f"power {power['limit_watts']:g} W ({power.get('source')})")
        lines.append(f"  at {node['node']}: " + ", ".join(parts))
        meter = node.get("meter")
        if meter is not None:
            other = meter.get("other_load_amperes")
            state = "FALLBACK" if meter.get("fallback") else "ok"
            lines.append(
                f"    meter {meter['meter']} ({state}): non-EV load {'-' if other is None else amperes(other)}, "
                f"left for EVs {amperes(meter['headroom_amperes'])}"
            )
    return lines


def status_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    """``ocpp-lc status``'s lines for the meters of :meth:`MeterService.status` (none without meters)."""
    lines = []
    for row in rows or []:
        metered = row.get("metered_amperes")
        other = row.get("other_load_amperes")
        state = "FALLBACK (no valid reading)" if row.get("fallback") else "ok"
        last = row.get("last_outcome")
        if row.get("fallback") and last not in (None, "ok"):
            state += f", last: {last}"
        lines.append(f"meter {row['meter']} at {row['node']}: {state}")
        lines.append(
            f"  metered {'-' if metered is None else amperes(metered)}, non-EV load "
            f"{'-' if other is None else amperes(other)}, left for EVs {amperes(row['headroom_amperes'])}"
        )
    return lines
