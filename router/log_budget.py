"""A log budget: bad input from one peer must not flood the log.

Theory of operation. A peer that keeps sending the same nonsense (an EMS publishing an invalid limit
every second, say) gets its refusal logged, but not every time: :meth:`LogBudget.allow` lets ``burst``
lines per key through in each ``window_s`` and counts the rest; the first line let through after some
were held back says how many. Counters (the metrics) still count every refusal: only the log is
budgeted. Keys are few and bounded (``max_keys``: the oldest is dropped first), so a peer varying its
key cannot grow the budget's memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Window:
    started_s: float
    lines: int = 0
    held_back: int = 0


class LogBudget:
    """At most ``burst`` lines per key in each window of ``window_s``; see the module docstring."""

    def __init__(
        self,
        burst: int = 10,
        window_s: float = 60.0,
        *,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window_s = window_s
        self._max_keys = max_keys
        self._clock = clock
        self._windows: OrderedDict[str, _Window] = OrderedDict()

    def allow(self, key: str) -> tuple[bool, int]:
        """Whether to log this line for ``key``, and how many lines for it were held back before it (0
        unless the answer is yes and some were)."""
        now_s = self._clock()
        window = self._windows.get(key)
        if window is None or now_s - window.started_s >= self.window_s:
            held_back = 0 if window is None else window.held_back
            window = _Window(now_s)
            self._windows[key] = window
            if len(self._windows) > self._max_keys:
                self._windows.popitem(last=False)
        else:
            held_back = 0
        self._windows.move_to_end(key)
        if window.lines >= self.burst:
            window.held_back += 1
            return False, 0
        window.lines += 1
        return True, held_back
