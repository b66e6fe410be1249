"""The demo's WAN outage: the sandbox CSMS goes away for a while, then comes back (site autonomy, issue #12).

What a newcomer sees (times from the start, :class:`OutagePlan`): at 40 s the sandbox CSMS stops
listening and drops every connection, as when a site's WAN link fails. The stations stay connected to
the controller, which answers them itself; their transactions go on, balanced, and what the CSMS must
still learn is kept on disk (the view shows the stations ``local`` and the messages kept). At 70 s the
CSMS is back: the controller re-opens each station's connection, paced, replays its kept messages one
at a time, and the pairs relay byte for byte again. :class:`OutageRecord` keeps what happened for the
summary; the script reads the controller's own view of it (``Autonomy``), not the simulators'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from ..app import App
from .sandbox_csms import SandboxCsms
from .view import format_bytes


@dataclass(frozen=True, slots=True)
class OutagePlan:
    """The sandbox CSMS goes away ``at_s`` after the demo started, for ``for_s``."""

    at_s: float = 40.0
    for_s: float = 30.0
    #: How long after the CSMS's return to wait for every replay to end before saying it has not.
    drain_timeout_s: float = 60.0


DEFAULT_OUTAGE_PLAN: Final = OutagePlan()


@dataclass
class OutageRecord:
    """What the controller did through the outage (seconds since the demo started)."""

    plan: OutagePlan
    went_at_s: float | None = None
    back_at_s: float | None = None
    #: The most stations served locally at once.
    most_local: int = 0
    #: Messages (and their stored bytes) kept for the CSMS when it came back.
    kept_at_return: int = 0
    kept_bytes_at_return: int = 0
    #: From the CSMS's return until every station was relayed again; None if not within drain_timeout_s.
    drained_after_s: float | None = None
    #: Kept messages the CSMS took on replay (answered with a result), and those it answered with an error.
    replayed: int = 0
    replay_errors: int = 0
    #: Autonomy is off in the controller's settings: the stations were closed instead.
    autonomy_off: bool = False

    def text(self, now_s: float) -> str:
        """How the outage story is going, in a few words for the live view (``now_s`` since the start)."""
        if self.autonomy_off:
            return "off ([autonomy] enabled = false)"
        if self.went_at_s is None:
            return f"the sandbox CSMS goes away at {self.plan.at_s:g} s for {self.plan.for_s:g} s"
        if self.back_at_s is None:
            return f"CSMS away for {now_s - self.went_at_s:.0f} s"
        if self.drained_after_s is None:
            return f"CSMS back at {self.back_at_s:.0f} s, replaying"
        return f"CSMS back at {self.back_at_s:.0f} s; replayed {self.replayed} messages in {self.drained_after_s:.1f} s"

    def lines(self) -> list[str]:
        """The summary's lines (fit 80 columns)."""
        if self.autonomy_off:
            return ["  outage        site autonomy off: the stations were closed"]
        if self.went_at_s is None:
            return []
        if self.back_at_s is None:
            return [f"  outage        the sandbox CSMS went away at {self.went_at_s:.0f} s (not back at the end)"]
        lines = [
            f"  outage        CSMS away {self.went_at_s:.0f}-{self.back_at_s:.0f} s: {self.most_local} stations "
            f"served locally, {self.kept_at_return} messages kept",
        ]
        if self.drained_after_s is None:
            lines.append("                the replay did not finish in time")
        else:
            errors = f" ({self.replay_errors} refused)" if self.replay_errors else ""
            lines.append(
                f"{'':16}replayed {self.replayed} messages{errors} in {self.drained_after_s:.1f} s after its return"
            )
        return lines


def _replayed(app: App, outcome: str) -> int:
    """Kept messages the controller delivered on replay so far, by the CSMS's answer (from its metrics)."""
    return int(app.registry.get_sample_value("ocpp_lc_autonomy_replayed_total", {"outcome": outcome}) or 0)


async def outage_script(
    plan: OutagePlan,
    csms: SandboxCsms,
    app: App,
    say: Callable[[str], None],
    started_s: float,
    record: OutageRecord,
    expecting: Callable[[bool], None],
) -> None:
    """Take the sandbox CSMS away and bring it back per ``plan``; follow the controller through it.

    ``say`` gets one sentence per step; ``expecting(True)`` while the warnings the outage brings (each
    station's lost connection, the CSMS's unanswered calls) are expected, so they do not count as errors.
    """
    autonomy = app.autonomy
    await trio.sleep_until(started_s + plan.at_s)
    if autonomy is None:
        record.autonomy_off = True
        return
    changes = [trio.Event()]

    def changed() -> None:
        changes[0].set()
        changes[0] = trio.Event()

    autonomy.on_change(changed)
    result_before, error_before = _replayed(app, "result"), _replayed(app, "error")
    expecting(True)
    try:
        csms.go_away()
        record.went_at_s = trio.current_time() - started_s
        say(
            f"the sandbox CSMS goes away for {plan.for_s:g} s (a WAN outage): the stations stay connected "
            "and the controller answers them"
        )
        with trio.move_on_at(started_s + plan.at_s + plan.for_s):
            while True:
                record.most_local = max(record.most_local, sum(1 for s in autonomy.stations() if s.mode == "local"))
                await changes[0].wait()
        record.kept_at_return = autonomy.queue.total_messages
        record.kept_bytes_at_return = autonomy.queue.total_bytes
        csms.come_back()
        back_s = trio.current_time()
        record.back_at_s = back_s - started_s
        say(
            f"the sandbox CSMS is back: {record.most_local} stations were served locally, "
            f"{record.kept_at_return} messages ({format_bytes(record.kept_bytes_at_return)}) kept for it; "
            "the controller replays them"
        )
        with trio.move_on_after(plan.drain_timeout_s):
            while autonomy.stations():
                await changes[0].wait()
            record.drained_after_s = trio.current_time() - back_s
        record.replayed = _replayed(app, "result") - result_before
        record.replay_errors = _replayed(app, "error") - error_before
        if record.drained_after_s is None:
            say(f"replay: not finished {plan.drain_timeout_s:g} s after the CSMS came back")
        else:
            say(
                f"replay done: {record.replayed} messages delivered to the CSMS in {record.drained_after_s:.1f} s; "
                "every station is relayed again"
            )
    finally:
        expecting(False)
