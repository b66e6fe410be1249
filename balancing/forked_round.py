"""A balancing round computed in a forked child, and applied on the loop without trusting it blindly.

Theory of operation (issue #17). :func:`forked_round` takes the limits ahead and the EVSEs governed by
CSMS profiles on the loop, notes what every EVSE was counted at (``before``: the rollout's immutable
:class:`~balancing.rollout.EvseApplied` of each) and has :meth:`~balancing.loop.Balancer.compute_round`
computed in a child (:mod:`balancing.scheduling`). The child also does the round's preparation (stations
forgotten, profiles lapsed, our defaults under transactions counted: an O(EVSEs) pass each) on its copy,
and names what it changed; the parent then does the same to those only (:func:`_take_preparation`), so
the loop never walks every EVSE in one piece.
While the child computes, the loop relays frames and takes observations: answers to earlier steps, a
transaction starting, a station going away, a new limit. So when the answer comes back, it is applied
step by step, and a step goes out only if it is still right:

* a step for an EVSE whose record changed meanwhile (any answer, event or new EVSE replaced its
  ``EvseApplied``) is dropped: the next round plans it from what is known now;
* an increase goes out only while nothing that may raise what an EVSE is counted at has happened
  (:attr:`~balancing.rollout.RolloutState.raised`; if it moved, :func:`bounds_rose` looks whether a
  bound actually rose) and the limits ahead are not tighter than the ones the child planned against.
  Decreases, retries and renewals never raise a bound, so they only need their EVSE unchanged.

A dropped step wakes the loop at once, so the round after this one (computed from the state as it is
then, with every burst event coalesced into it) sends it. The steps go out in chunks of
:data:`SEND_CHUNK` with a checkpoint between them: a plan of a few hundred steps is a few milliseconds
of Python, which the relay should not wait for in one piece; each chunk checks again.

A child that failed costs the round on the loop (:meth:`~balancing.loop.Balancer.reallocate`), as on a
small site.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import trio
import trio.lowlevel

from .allocator import EPSILON_AMPERES, SiteLimits
from .rollout import EvseApplied, bound_amperes, counted_phases
from .site import SiteConfig

if TYPE_CHECKING:
    from .loop import Balancer
    from .scheduling import RoundAnswer

#: Steps started between two checkpoints of the loop.
SEND_CHUNK = 8

EvseKey = tuple[str, int]


async def forked_round(balancer: Balancer, nursery: trio.Nursery) -> None:
    """One balancing round, computed in a forked child; see the module docstring."""
    if balancer._stopping or balancer.released:
        return
    started = time.perf_counter()
    now_s, wall = trio.current_time(), balancer._wall()
    governed = balancer._limits_and_governed(wall)
    limits = balancer.limits
    rollout = balancer.rollout
    before = dict(rollout.evses)
    raised = rollout.raised
    cached = len(rollout._paths)
    on_loop_s = time.perf_counter() - started
    compute = functools.partial(balancer.compute_round, now_s, wall, limits, prepare=True)
    answer = await balancer.round_runner.compute(compute)
    if answer is None:
        balancer.metrics.child_rounds.labels("failed").inc()
        balancer.reallocate(nursery)
        return
    balancer.metrics.child_rounds.labels("computed").inc()
    if balancer._stopping or balancer.released:
        return
    resumed = time.perf_counter()
    if answer.path_cache is not None and len(rollout._paths) == cached:
        # The child's plan filled the path cache; the parent's next plan (inline, after a failure) and
        # the next child (forked from here) start warm.
        rollout._paths, rollout._shapes = answer.path_cache
        rollout._last_shape = None
    reference: dict[EvseKey, EvseApplied | None] = dict(before)
    _take_preparation(balancer, answer, now_s, wall, reference)
    balancer._take_answer(answer)
    valid_to = balancer._wall() + timedelta(seconds=balancer.settings.profile_validity_s)
    holds = _limits_hold(balancer, limits)
    checked = raised
    dropped = False
    for index, step in enumerate(answer.plan.steps):
        if index and index % SEND_CHUNK == 0:
            on_loop_s += time.perf_counter() - resumed
            await trio.lowlevel.checkpoint()
            resumed = time.perf_counter()
            if balancer._stopping or balancer.released:
                return
            holds = holds and _limits_hold(balancer, limits)
        if rollout.evses.get(step.key) is not reference.get(step.key):
            dropped = True  # its EVSE changed meanwhile: planned again from what is known now
            continue
        if step.kind == "increase":
            if holds and rollout.raised != checked:
                holds = not bounds_rose(balancer.site, reference, rollout.evses)
                checked = rollout.raised
            if not holds:
                dropped = True
                continue
        if balancer._send_step(nursery, step, governed, now_s, valid_to):
            reference[step.key] = rollout.evses[step.key]  # our own step: counted by the plan
    if dropped:
        balancer.wake()
    balancer._end_round(nursery, answer.plan, wall, valid_to, started, answer.default_renewals)
    balancer.last_on_loop_s = on_loop_s + time.perf_counter() - resumed


def _take_preparation(
    balancer: Balancer, answer: RoundAnswer, now_s: float, wall: datetime, reference: dict[EvseKey, EvseApplied | None]
) -> None:
    """Do to the parent's state what the child's preparation did to its copy, for the stations and EVSEs it
    names only (the same methods, on the state as it is now). Where the result is what the child planned
    from, that EVSE counts as unchanged for its step."""
    balancer._forget_gone(now_s, answer.forgotten)
    balancer._lapse(wall, [record for key in answer.lapsed if (record := balancer._record(key)) is not None])
    prepared = answer.prepared or {}
    records = [record for key in prepared if (record := balancer._record(key)) is not None]
    balancer._count_defaults_under_transactions(records)
    evses = balancer.rollout.evses
    for key, applied in prepared.items():
        now = evses.get(key)
        if now is not None and now == applied:
            reference[key] = now


def _limits_hold(balancer: Balancer, planned: SiteLimits) -> bool:
    """Whether the limits ahead are still no tighter than those the child planned against."""
    return planned.tighter(balancer._limits_ahead(balancer._wall())) == planned


def bounds_rose(
    site: SiteConfig, before: Mapping[EvseKey, EvseApplied | None], now: Mapping[EvseKey, EvseApplied]
) -> bool:
    """Whether any EVSE is counted at more now than in ``before`` (more current, or on more phases), or is
    new: an increase planned from ``before`` may then no longer fit."""
    for key, applied in now.items():
        was = before.get(key)
        if was is applied:
            continue
        if was is None:
            return True
        station = site.station(applied.station_id)
        if bound_amperes(station, applied) > bound_amperes(station, was) + EPSILON_AMPERES:
            return True
        if counted_phases(station, applied) > counted_phases(station, was):
            return True
    return False
