"""Overdraw: an EVSE measured drawing more than the limit it may have installed.

A station that accepted 16 A and lets its EV draw 32 A breaks the site's arithmetic: every other
allocation assumes it keeps to 16 A. The rule is a clock like the underdraw rule's (allocator rule 3),
kept by the caller: the meter values of a session are compared with the most the EVSE may draw under
the profiles it accepted (its *bound*, see :mod:`balancing.rollout`); above it by more than
``margin_amperes`` starts the clock, and once that has lasted ``grace_s`` (time for an EV to follow a
decrease, IEC 61851 allows it seconds, and for a sample to arrive) the EVSE is *overdrawing*: counted at
the larger of its measured draw and its maximum, not trusted, reported, until a sample shows it back
within its limit. Everything here is pure; time is the ``now_s`` the caller passes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OverdrawPolicy:
    """How far above its limit, and for how long, an EVSE may be measured before it counts as overdrawing."""

    margin_amperes: float = 2.0
    grace_s: float = 60.0


def overdraw_since(
    measured_amperes: float, bound_amperes: float, since_s: float | None, now_s: float, policy: OverdrawPolicy
) -> float | None:
    """Since when the EVSE has been measured above its bound by more than the margin (``None``: it is not)."""
    if measured_amperes > bound_amperes + policy.margin_amperes:
        return since_s if since_s is not None else now_s
    return None


def is_overdrawing(since_s: float | None, now_s: float, policy: OverdrawPolicy) -> bool:
    """Whether the clock of :func:`overdraw_since` has run for the grace period."""
    return since_s is not None and now_s - since_s >= policy.grace_s
