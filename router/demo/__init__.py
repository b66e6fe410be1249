"""``ocpp-lc demo``: the controller at work on loopback, between a sandbox CSMS and simulated stations."""

from __future__ import annotations

from .runner import DemoSummary, StopRequest, demo_main, run_demo

__all__ = ["DemoSummary", "StopRequest", "demo_main", "run_demo"]
