"""Where the allocator runs: on the event loop for a small site, in a worker thread for a large one.

Theory of operation (issue #17: the relay never waits for the allocator). The allocator is a pure
function of immutable values (the frozen :class:`~balancing.site.SiteConfig`, frozen
:class:`~balancing.allocator.SiteLimits` and :class:`~balancing.allocator.Session` objects, a float),
so :func:`trio.to_thread.run_sync` can run it on a tuple of them while the loop goes on relaying frames;
most of its work is numpy, which lets go of the GIL while it computes. The loop then rolls out
the answer with :func:`balancing.rollout.plan`, which checks every increase against what the stations
may draw *now*, so an allocation made from a snapshot a few milliseconds old can hold back an increase
but never let the site exceed a limit; whatever changed meanwhile has woken the loop again.

Coalescing comes from the same place: the loop waits on one :class:`trio.Event`; every observation
sets it; while an allocation runs, a burst of events only sets it again, and the next allocation takes
them all. A burst of 100 transaction events therefore costs about (burst length / allocation time)
allocations, not 100.

Below ``threshold_sessions`` the thread hop (tens of microseconds, plus a trip through the scheduler)
costs more than it saves, and unit tests on trio's virtual clock keep their exact timing.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from .allocator import Allocation, Session, SiteLimits, allocate
from .site import SiteConfig

#: Sessions from which the allocator runs in a worker thread (about 1 ms of allocation on this machine).
THREAD_THRESHOLD_SESSIONS = 200


class AllocationRunner:
    """Runs :func:`balancing.allocator.allocate` off the event loop once the site is large enough."""

    def __init__(self, threshold_sessions: int = THREAD_THRESHOLD_SESSIONS) -> None:
        self.threshold_sessions = threshold_sessions
        # One allocation at a time: a second would only compute from an older snapshot.
        self._limiter = trio.CapacityLimiter(1)
        #: Allocations run in a worker thread, and on the loop (tests and benchmarks read them).
        self.threaded = 0
        self.inline = 0

    async def allocate(
        self, site: SiteConfig, limits: SiteLimits, sessions: Sequence[Session], now_s: float
    ) -> Allocation:
        """The allocation for this snapshot; the caller's task waits, the event loop does not."""
        snapshot = tuple(sessions)  # the caller's list may change while the thread reads it
        if len(snapshot) < self.threshold_sessions:
            self.inline += 1
            return allocate(site, limits, snapshot, now_s)
        self.threaded += 1
        return await trio.to_thread.run_sync(allocate, site, limits, snapshot, now_s, limiter=self._limiter)
