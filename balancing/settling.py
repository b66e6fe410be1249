"""The round after a forked round, foreseen by its child: skipped when the answers are all it waits for.

Theory of operation (issue #17). Every answer to a profile of ours wakes the balancing loop, because an
accepted decrease can make room for an increase. On a large site every round is a fork, which stops the
relay for a few milliseconds; and after a burst, the round the answers wake is most often one that finds
nothing to send (the decreases freed nothing anyone waits for). So the child of a round, once it has
computed the round, also computes the next one on its own copy: it records the round's steps as sent and
as accepted, through the same methods the loop uses for real answers, and looks at what the round after
them would do, and sends that as a second answer, after the first (:class:`Foreseen` when it would send
nothing: no step, no renewal of a default, no turn or allocation changed; else ``None``).

The loop then keeps a :class:`Settling` for the round: which steps went out, and whether anything else
happened since the fork. A wake-up that only an acceptance of one of those steps caused computes nothing;
once all are accepted the loop takes the foreseen round's next due time and renewal, and waits for the next
event. Anything else makes the next wake-up a real round, as before: an event from a station or the CSMS,
a new limit, a rejected or unanswered step, a step not sent, a renewal's answer, a timer. So a round is
skipped only where the child computed, from the same state and code, that it would change nothing; and
what only time changes (a turn that ends, a profile due for renewal) comes with the timers as before.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import trio

EvseKey = tuple[str, int]


class Foreseen(NamedTuple):
    """The round after a forked round's steps are accepted, as its child found it: nothing to send, and
    these timers; ``recounted``: the EVSEs its preparation counts anew (a default under a transaction whose
    TxProfile was accepted), which the loop then recounts itself."""

    next_due_s: float | None
    next_renewal: datetime | None
    recounted: tuple[EvseKey, ...] = ()


class Settling:
    """What the balancing loop waits for after a forked round whose next round its child foresees."""

    def __init__(self) -> None:
        self._expected: set[EvseKey] = set()
        self._round = 0
        self._applied = False
        self._changed = True
        self._foreseen: Foreseen | None = None
        self._delivered = False  # the child's foresight for the last round came
        self._news = trio.Event()  # the foresight came, or something changed

    def round_forked(self) -> int:
        """A round's child is forked now: what happens from here on is news to it. Returns the round's
        number, for :meth:`foresight`."""
        self._round += 1
        self._expected.clear()
        self._applied = False
        self._changed = False
        self._foreseen = None
        self._delivered = False
        self._news = trio.Event()
        return self._round

    def foresight(self, round_number: int, foreseen: Foreseen | None) -> None:
        """The child's second answer for that round (``None``: the next round is not foreseen empty)."""
        if round_number == self._round:
            self._foreseen = foreseen
            self._delivered = True
            self._news.set()

    def changed(self) -> None:
        """Something the child could not foresee happened: the next wake-up is a real round."""
        self._changed = True
        self._news.set()

    def step_sent(self, key: EvseKey) -> None:
        self._expected.add(key)

    def step_answered(self, key: EvseKey, accepted: bool) -> None:
        """An answer to a step of ours; one the child foresaw only if it is an acceptance of this round's."""
        if accepted and key in self._expected:
            self._expected.discard(key)
        else:
            self.changed()

    def round_applied(self) -> None:
        """The round's answer is applied: its steps went out (those in :meth:`step_sent`)."""
        self._applied = True

    def waiting(self) -> bool:
        """Whether the loop may have only acceptances the child foresaw to wait for (compute nothing now)."""
        foreseen = not self._delivered or self._foreseen is not None
        return self._applied and not self._changed and foreseen

    async def delivered(self) -> None:
        """Until the child's foresight is in (at most the child's timeout: it is then ended), or
        something it could not foresee happens."""
        await self._news.wait()

    def foreseen_in(self) -> bool:
        """Whether the child's foresight for the last round has come (empty or not)."""
        return self._delivered

    def settled(self) -> Foreseen | None:
        """Once the foresight is in and every step accepted: the foreseen round (once)."""
        if not self.waiting() or not self._delivered or self._expected:
            return None
        self._applied = False
        return self._foreseen
