"""Where a balancing round is computed: on the event loop for a small site, in a forked child for a large one.

Theory of operation (issue #17: the relay never waits for the allocator). A round's computation (the
allocator's sessions, the allocation, the turns, the rollout plan) is a pure function of the loop's
state, :meth:`balancing.loop.Balancer.compute_round`. On a large site it runs in a child forked from
the controller (:mod:`balancing.forked`): the child sees the state as it was at the fork, for free, and
the loop goes on relaying frames meanwhile; :mod:`balancing.forked_round` then applies the answer,
checking every step against what changed meanwhile. A worker thread would not do: the round is Python
code holding the GIL, and the relay would wait as long as if it ran inline (``tests/bench/offloop.py``).

Coalescing comes from the same place: the loop waits on one :class:`trio.Event`; every observation sets
it; while a round is computed a burst of events only sets it again, and the next round takes them all.
On a large site the loop also lets ``gather_s`` pass between the wake-up and the fork: a burst (a
hundred transaction events arrive over a few milliseconds) is then one round rather than three, and
every round is a fork that stops the loop for about two milliseconds (its page tables are copied).
The round that the answers to a round's own profiles wake is foreseen by that round's child, and not
forked when it would send nothing (:mod:`balancing.settling`): a burst is then one fork.

Below ``threshold_evses`` a fork (about a millisecond) costs more than the round; unit tests on trio's
virtual clock keep their exact timing there too. A child that fails (it crashed, or gave no answer within
``timeout_s``) is logged and the round is computed inline; after :data:`MAX_CHILD_FAILURES` in a row the
runner stops forking (something in this environment breaks it) and says so.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import NamedTuple, TypeVar

from . import forked
from .allocator import Allocation
from .loop_types import log
from .rollout import EvseApplied, Plan
from .sessions import Turn

T = TypeVar("T")

#: EVSEs from which a round is computed in a forked child (a round of about 2 ms on this machine).
FORK_THRESHOLD_EVSES = 200
#: Failed children in a row after which rounds stay on the loop.
MAX_CHILD_FAILURES = 3
#: How long a large site's loop gathers observations after a wake-up before it forks a round.
GATHER_S = 0.05


class RoundAnswer(NamedTuple):
    """What :meth:`~balancing.loop.Balancer.compute_round` computed. ``path_cache`` is the rollout's path
    cache when the plan added to it (a child's additions are kept by the parent: computing them is most of
    a cold plan). A round computed in a child also prepared the child's copy of the state first; the rest
    tells the parent what that changed: ``prepared`` (the EVSEs it counted differently, as it counted
    them), ``forgotten`` (stations), ``lapsed`` (EVSEs), ``default_renewals`` (the stations where a
    TxDefaultProfile under a transaction is due) and ``next_renewal`` (when the next profile of ours is to
    be renewed: looking at every EVSE for it is the loop's largest cost between two rounds)."""

    allocation: Allocation
    turns: list[Turn]
    plan: Plan
    path_cache: tuple[dict, dict] | None  # type: ignore[type-arg]
    prepared: dict[tuple[str, int], EvseApplied] | None = None
    forgotten: tuple[str, ...] = ()
    lapsed: tuple[tuple[str, int], ...] = ()
    default_renewals: tuple[str, ...] | None = None
    next_renewal: datetime | None = None


class RoundRunner:
    """Decides where each round is computed, and computes it in a child when it should."""

    #: A threshold no site reaches: every round on the event loop.
    NEVER = 1 << 62

    def __init__(
        self,
        threshold_evses: int = FORK_THRESHOLD_EVSES,
        timeout_s: float = 5.0,
        *,
        nice: int = 10,
        gather_s: float = GATHER_S,
    ) -> None:
        self.threshold_evses = threshold_evses
        self.timeout_s = timeout_s
        self.nice = nice
        self.gather_s = gather_s
        #: Rounds computed in a child, on the loop, and children that failed (tests and benchmarks read them).
        self.forked = 0
        self.inline = 0
        self.failures = 0
        self._failed_in_a_row = 0

    def forks(self, evses: int) -> bool:
        """Whether the next round, on a site of ``evses`` EVSEs, is computed in a child (and counted so)."""
        if forked.AVAILABLE and evses >= self.threshold_evses and self._failed_in_a_row < MAX_CHILD_FAILURES:
            self.forked += 1
            return True
        self.inline += 1
        return False

    async def compute(self, function: Callable[[], T], afterwards: forked.Afterwards | None = None) -> T | None:
        """``function()`` computed in a forked child; ``None`` (logged) if the child failed. With
        ``afterwards``, the same child goes on to a second answer (:func:`balancing.forked.in_child`)."""
        try:
            answer = await forked.in_child(function, self.timeout_s, nice=self.nice, afterwards=afterwards)
        except forked.ChildFailed as error:
            self.failures += 1
            self._failed_in_a_row += 1
            log.warning("balancing round in a child process failed (%s): computed on the event loop", error)
            if self._failed_in_a_row == MAX_CHILD_FAILURES:
                log.error(
                    "balancing: %d child rounds failed in a row; every round is computed on the event loop "
                    "from now on (the relay waits for each)",
                    MAX_CHILD_FAILURES,
                )
            return None
        self._failed_in_a_row = 0
        return answer
