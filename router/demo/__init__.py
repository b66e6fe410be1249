"""``ocpp-lc demo``: the controller at work on loopback, between a sandbox CSMS and simulated stations.

The demo itself is in :mod:`router.demo.runner` (``demo_main`` runs it inside trio). This module
stays light so that Ctrl-C is taken care of before the appliance's heavier imports start.
"""

from __future__ import annotations

import signal


def run_demo(stations: int, duration_s: float, plain: bool) -> int:
    """Run the demo in the foreground until ``duration_s`` (0: Ctrl-C); return the exit code."""
    early_signals: list[int] = []
    # From here on Ctrl-C never raises KeyboardInterrupt (whose traceback would greet a newcomer who
    # changed their mind during start-up); trio leaves a non-default handler alone, and its signal
    # receiver takes over while the demo runs.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: early_signals.append(signum))
    try:
        from .runner import run_in_foreground

        return run_in_foreground(stations, duration_s, plain, early_signals)
    finally:
        signal.signal(signal.SIGINT, previous)
