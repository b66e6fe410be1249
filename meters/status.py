"""The meters' lines in ``ocpp-lc status`` (kept apart from the service: the CLI loads no Modbus client)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def amperes(values: Sequence[float]) -> str:
    """Per-phase currents as ``L1/L2/L3 A``."""
    return "/".join(f"{value:.1f}" for value in values) + " A"


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
