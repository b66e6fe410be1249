"""Helpers for comparing what a station and the CSMS saw of the same connection."""

from __future__ import annotations

import json
from collections.abc import Iterable

#: The prefix of message ids the controller uses for calls of its own (router/ocppj.py).
CONTROLLER_ID_PREFIX = "lc~"


def is_controller_exchange(frame: str) -> bool:
    """True for a controller's own CALL to a station or the station's answer to it (never relayed, §6.4)."""
    try:
        message = json.loads(frame)
    except ValueError:
        return False
    return isinstance(message, list) and len(message) > 1 and str(message[1]).startswith(CONTROLLER_ID_PREFIX)


def relayed(frames: Iterable[str]) -> list[str]:
    """A station's frames without its exchanges with the controller itself: what the CSMS must see."""
    return [frame for frame in frames if not is_controller_exchange(frame)]
