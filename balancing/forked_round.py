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
then, with every burst event coalesced into it) sends it. Everything the loop does with the answer is
cut into slices of :data:`SLICE_S` with a checkpoint between them (a plan of a few hundred steps is a
few milliseconds of Python, which the relay should not wait for in one piece); after each, the checks
above are made again. The child packs its answer for that (:class:`PackedRound`).

Once its answer is written, the child goes on to the round after it: with every step recorded as sent and
accepted on its copy, by the loop's own methods, it computes that round and sends a second answer, which
says whether it would send nothing (:class:`~balancing.settling.Foreseen`). The loop, woken by those
acceptances alone, then forks no child for it (:mod:`balancing.settling`).

A child that failed costs the round on the loop (:meth:`~balancing.loop.Balancer.reallocate`), as on a
small site.
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import trio
import trio.lowlevel

from .allocator import EPSILON_AMPERES, AllocatedEvses, Allocation, SiteLimits
from .forked import Afterwards
from .rollout import EvseApplied, Plan, Step, StepKind, bound_amperes, counted_phases
from .settling import Foreseen
from .site import SiteConfig

if TYPE_CHECKING:
    from .loop import Balancer
    from .scheduling import RoundAnswer

#: The most the loop spends on one piece of applying an answer before it lets the relay run (a step sent
#: is about 20 us; the relay's own p99 is a few hundred).
SLICE_S = 0.0001

EvseKey = tuple[str, int]
EVSE_APPLIED_FIELDS = tuple(field.name for field in dataclasses.fields(EvseApplied))
STEP_FIELDS = tuple(field.name for field in dataclasses.fields(Step))
StepFields = tuple[str, int, float, StepKind, "int | None"]  # Step's fields, in STEP_FIELDS order


class PackedRound(NamedTuple):
    """A :class:`~balancing.scheduling.RoundAnswer` as the child sends it. What would cost the loop a
    millisecond to unpickle in one piece comes apart: the steps and turns as plain tuples (a frozen
    dataclass or a named tuple costs its constructor each to unpickle; a step is rebuilt as it is sent),
    the allocation and the path cache pickled on their own, taken between two checkpoints."""

    allocation: bytes
    turns: tuple[tuple[str, int, int, float | None, float], ...]
    steps: tuple[StepFields, ...]  # in plan order: decreases, retries, increases, renewals
    counts: tuple[int, int, int]  # how many decreases, retries, increases lead them
    waiting: tuple[EvseKey, ...]
    next_due_s: float | None
    path_cache: bytes | None
    prepared: dict[EvseKey, tuple[object, ...]] | None  # the EvseApplied fields of each, in order
    forgotten: tuple[str, ...]
    lapsed: tuple[EvseKey, ...]
    default_renewals: tuple[str, ...] | None
    next_renewal: datetime | None


def pack(answer: RoundAnswer, previous: Allocation | None = None) -> PackedRound:
    """In the child: the answer, packed to be taken on the loop in slices. ``previous`` is the allocation
    the parent holds (as it was at the fork): where the new one has the same EVSEs, its keys are not sent."""
    plan = answer.plan
    return PackedRound(
        _pack_allocation(answer.allocation, previous),
        tuple(tuple(turn) for turn in answer.turns),  # type: ignore[misc]
        tuple(tuple(getattr(step, name) for name in STEP_FIELDS) for step in plan.steps),
        (len(plan.decreases), len(plan.retries), len(plan.increases)),
        plan.waiting,
        plan.next_due_s,
        None if answer.path_cache is None else pickle.dumps(answer.path_cache, protocol=pickle.HIGHEST_PROTOCOL),
        None if answer.prepared is None else {key: _fields(applied) for key, applied in answer.prepared.items()},
        answer.forgotten,
        answer.lapsed,
        answer.default_renewals,
        answer.next_renewal,
    )


def _pack_allocation(allocation: Allocation, previous: Allocation | None) -> bytes:
    """An allocation as arrays. Its keys (thousands of tuples: most of what unpickling it costs the loop)
    are left out when they are the previous allocation's, which they are unless an EVSE came or went."""
    evses = allocation.evses
    if not isinstance(evses, AllocatedEvses):
        return pickle.dumps(allocation, protocol=pickle.HIGHEST_PROTOCOL)
    keys: list[EvseKey] | None = evses._keys
    if previous is not None and isinstance(previous.evses, AllocatedEvses) and previous.evses._keys == keys:
        keys = None
    arrays = (evses._allocated, evses._count, evses._mask, evses._fixed)
    fields = (keys, arrays, allocation.overcommitted, allocation.computed_at_s)
    return pickle.dumps(fields, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack_allocation(packed: bytes, previous: Allocation) -> Allocation:
    """The allocation :func:`_pack_allocation` packed, with ``previous`` the one it was packed against."""
    value = pickle.loads(packed)
    if isinstance(value, Allocation):
        return value
    keys, arrays, overcommitted, computed_at_s = value
    if keys is None:
        assert isinstance(previous.evses, AllocatedEvses)  # packed against it: the same EVSEs
        keys = previous.evses._keys
    return Allocation(AllocatedEvses(keys, *arrays), overcommitted, computed_at_s)


def _fields(applied: EvseApplied) -> tuple[object, ...]:
    return tuple(getattr(applied, name) for name in EVSE_APPLIED_FIELDS)


class _ChildRound:
    """In the child: the round (:meth:`compute`, the first answer) and the one after it (:meth:`foresee`)."""

    def __init__(
        self, balancer: Balancer, now_s: float, wall: datetime, limits: SiteLimits, governed: set[EvseKey]
    ) -> None:
        self.balancer, self.now_s, self.wall, self.limits, self.governed = balancer, now_s, wall, limits, governed
        self.answer: RoundAnswer | None = None

    def compute(self) -> PackedRound:
        previous = self.balancer.allocation  # the parent's, as at the fork
        self.answer = self.balancer.compute_round(self.now_s, self.wall, self.limits, prepare=True)
        return pack(self.answer, previous)

    def foresee(self) -> Foreseen | None:
        """After :meth:`compute`: the round its steps' acceptances would wake, computed on the child's copy
        with every step sent and accepted (the loop's own methods for both). If it would send nothing and
        change no allocation or turn: its timers and the EVSEs its preparation counts anew (the parent
        does that to those), else ``None`` (:mod:`balancing.settling`)."""
        answer, balancer, now_s, wall = self.answer, self.balancer, self.now_s, self.wall
        assert answer is not None
        if answer.default_renewals:
            return None  # the parent renews defaults after the round: their answers are a round of their own
        balancer._take_answer(answer.allocation, answer.turns, answer.plan.next_due_s)
        valid_to = wall + timedelta(seconds=balancer.settings.profile_validity_s)
        for step in answer.plan.steps:
            started = balancer._start_step(step, self.governed, now_s, valid_to)
            if started is None:
                return None
            purpose, _, record = started
            balancer._settle(step, purpose, record, record.generation, True, "answered", valid_to)
        following = balancer.compute_round(now_s, wall, self.limits, prepare=True)
        if (
            following.plan.steps
            or following.default_renewals
            or following.turns
            or following.forgotten
            or following.lapsed
            or not _same_allocation(following.allocation, answer.allocation)
        ):
            return None
        return Foreseen(following.plan.next_due_s, following.next_renewal, tuple(following.prepared or ()))


def _same_allocation(a: Allocation, b: Allocation) -> bool:
    if not (isinstance(a.evses, AllocatedEvses) and isinstance(b.evses, AllocatedEvses)):
        return a == b
    x, y = a.evses, b.evses
    arrays = ((x._allocated, y._allocated), (x._count, y._count), (x._mask, y._mask), (x._fixed, y._fixed))
    return (
        a.overcommitted == b.overcommitted
        and x._keys == y._keys
        and all(np.array_equal(first, second) for first, second in arrays)
    )


class _Slices:
    """Time on the loop, given back to the relay every :data:`SLICE_S`."""

    def __init__(self, balancer: Balancer, on_loop_s: float) -> None:
        self.balancer = balancer
        self.on_loop_s = on_loop_s
        self.resumed = time.perf_counter()

    def due(self) -> bool:
        return time.perf_counter() - self.resumed > SLICE_S

    async def pause(self) -> bool:
        """Let the relay run; whether the round may go on (the balancer is not stopping)."""
        self.on_loop_s += time.perf_counter() - self.resumed
        await trio.lowlevel.checkpoint()
        self.resumed = time.perf_counter()
        return not (self.balancer._stopping or self.balancer.released)

    def total_s(self) -> float:
        return self.on_loop_s + time.perf_counter() - self.resumed


async def forked_round(balancer: Balancer, nursery: trio.Nursery) -> None:
    """One balancing round, computed in a forked child; see the module docstring."""
    if balancer._stopping or balancer.released:
        return
    started = time.perf_counter()
    now_s, wall = trio.current_time(), balancer._wall()
    governed = balancer._limits_and_governed(wall)
    limits = balancer.limits
    on_loop_s = time.perf_counter() - started
    await trio.lowlevel.checkpoint()  # the fork is a step of its own (it is the longest the loop waits)
    if balancer._stopping or balancer.released:
        return
    resumed = time.perf_counter()
    rollout = balancer.rollout
    before: dict[EvseKey, EvseApplied | None] = dict(rollout.evses)
    raised = rollout.raised
    cached = len(rollout._paths)
    previous = balancer.allocation  # what the child packs its allocation against
    number = balancer.settling.round_forked()
    on_loop_s += time.perf_counter() - resumed
    child = _ChildRound(balancer, now_s, wall, limits, governed)
    deliver = functools.partial(balancer.settling.foresight, number)
    packed = await balancer.round_runner.compute(child.compute, Afterwards(child.foresee, deliver, nursery))
    if packed is None:
        balancer.metrics.child_rounds.labels("failed").inc()
        balancer.reallocate(nursery)
        return
    balancer.metrics.child_rounds.labels("computed").inc()
    slices = _Slices(balancer, on_loop_s)
    if not await slices.pause():
        return
    allocation = _unpack_allocation(packed.allocation, previous)
    if packed.path_cache is not None and len(rollout._paths) == cached:
        # The child's plan filled the path cache; the parent's next plan (inline, after a failure) and
        # the next child (forked from here) start warm.
        rollout._paths, rollout._shapes = pickle.loads(packed.path_cache)
        rollout._last_shape = None
    if not await slices.pause():
        return
    reference: dict[EvseKey, EvseApplied | None] = before  # what each step is checked against, from here on
    _take_preparation(balancer, packed, now_s, wall, reference)
    if not await slices.pause():
        return
    replaced = balancer.allocation  # freed below, in a slice of its own (thousands of objects)
    balancer._take_answer(allocation, packed.turns, packed.next_due_s)
    balancer.renewal_hint, balancer.renewal_hinted = packed.next_renewal, True
    if not await slices.pause():
        return
    del replaced
    valid_to = balancer._wall() + timedelta(seconds=balancer.settings.profile_validity_s)
    holds = _limits_hold(balancer, limits)
    checked = raised
    dropped = False
    steps: list[Step] = []
    for fields in packed.steps:
        if slices.due():
            if not await slices.pause():
                return
            holds = holds and _limits_hold(balancer, limits)
        step = Step(*fields)
        steps.append(step)
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
            balancer.settling.step_sent(step.key)
        else:
            balancer.settling.changed()  # the child foresaw the next round with it sent
    if dropped:
        balancer.wake()
    decreases, retries, increases = packed.counts
    retried, increased = decreases + retries, decreases + retries + increases
    plan = Plan(
        tuple(steps[:decreases]),
        tuple(steps[decreases:retried]),
        tuple(steps[retried:increased]),
        tuple(steps[increased:]),
        packed.waiting,
        packed.next_due_s,
    )
    balancer._end_round(nursery, plan, wall, valid_to, started, packed.default_renewals)
    balancer.settling.round_applied()
    balancer.last_on_loop_s = slices.total_s()


def _take_preparation(
    balancer: Balancer, answer: PackedRound, now_s: float, wall: datetime, reference: dict[EvseKey, EvseApplied | None]
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
    for key, fields in prepared.items():
        now = evses.get(key)
        if now is not None and _fields(now) == fields:
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
