"""The demo's EMS script: lower the site limit through the controller's EMS HTTP API, then release it,
and watch how the balancing loop follows (what it committed, what the stations drew).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import httpx
import trio

from ..app import App
from .terminal import Output
from .view import limit_text


@dataclass(frozen=True, slots=True)
class EmsPlan:
    """The demo's EMS script: lower the site limit at ``lower_at_s``, release it at ``release_at_s``."""

    lower_at_s: float = 15.0
    release_at_s: float = 35.0
    limit_amperes: float = 60.0
    source: str = "demo-ems"
    #: How long to wait for the balancing loop to follow a change before saying it has not yet.
    settle_timeout_s: float = 20.0


DEFAULT_EMS_PLAN: Final = EmsPlan()


@dataclass(frozen=True, slots=True)
class EmsEvent:
    """One step of the EMS script and how balancing followed it."""

    action: str  # "lowered" or "released"
    at_s: float  # since the demo started
    status_code: int  # of the EMS API's answer
    limit: str  # the limit in force afterwards, as the view shows it
    #: How long until the stations' measured draw was within the new limit (lowered) or above the
    #: lowered one again (released); None if that did not happen in time.
    settled_s: float | None
    drawn_amperes: tuple[float, float, float]  # per grid phase, when settled (or given up)
    committed_amperes: tuple[float, float, float]  # what balancing let the stations draw, then
    #: While lowered, from settling until the release: the most the stations drew and were allowed
    #: per grid phase (a reading after every reallocation).
    peak_drawn_amperes: tuple[float, float, float] | None = None
    peak_committed_amperes: tuple[float, float, float] | None = None


async def ems_script(
    plan: EmsPlan,
    app: App,
    output: Output,
    started_s: float,
    events: list[EmsEvent],
    state: list[str],
) -> None:
    """What an EMS would do: lower the site limit through the EMS API, then release it.

    After each step it watches the stations follow (what the controller's balancing loop committed and
    the draw the stations reported), so that the view and the summary can say how long that took.
    """
    path = f"/api/v1/limits/{plan.source}"
    lowered = plan.limit_amperes + 0.05  # the meters' rounding
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}", timeout=10.0, trust_env=False) as client:
        await trio.sleep_until(started_s + plan.lower_at_s)
        body = {"unit": "A", "limit": plan.limit_amperes, "valid_for_s": plan.release_at_s - plan.lower_at_s + 600}
        try:
            response = await client.put(path, json=body)
        except httpx.HTTPError as exc:
            output.line(f"EMS script: the controller did not answer: {exc}")
            return
        at_s = trio.current_time() - started_s
        state[0] = f"{plan.source} {plan.limit_amperes:g} A since {at_s:.0f} s" if response.is_success else "refused"
        output.line(
            f"EMS {plan.source} lowers the site limit to {plan.limit_amperes:g} A per phase: "
            f"PUT {path} answered {response.status_code}"
        )
        limit = limit_text(app.limits.status()["phases"])
        settled_s, drawn, committed = await follow_balancing(
            app, lambda drawn, committed: max(drawn) <= lowered and max(committed) <= lowered, plan.settle_timeout_s
        )
        _say_settled(output, "within the lowered limit", settled_s, drawn)
        # Until the release: the most the stations drew and were allowed, after every reallocation.
        peaks = [drawn, committed]
        try:
            with trio.move_on_at(started_s + plan.release_at_s):
                while settled_s is not None and app.balancer is not None:
                    await app.balancer.reallocated.wait()
                    peaks[0] = _highest(peaks[0], app.balancer.measured_phase_amperes())
                    peaks[1] = _highest(peaks[1], app.balancer.phase_bounds_amperes())
                await trio.sleep_forever()
        finally:
            event = EmsEvent("lowered", at_s, response.status_code, limit, settled_s, drawn, committed)
            if settled_s is not None:
                event = dataclasses.replace(event, peak_drawn_amperes=peaks[0], peak_committed_amperes=peaks[1])
            events.append(event)

        try:
            response = await client.delete(path)
        except httpx.HTTPError as exc:
            output.line(f"EMS script: the controller did not answer: {exc}")
            return
        at_s = trio.current_time() - started_s
        state[0] = f"{plan.source} released at {at_s:.0f} s" if response.is_success else "release refused"
        limit = limit_text(app.limits.status()["phases"])
        output.line(
            f"EMS {plan.source} releases its limit: DELETE {path} answered {response.status_code}; site limit {limit}"
        )
        settled_s, drawn, committed = await follow_balancing(
            app, lambda drawn, committed: max(committed) > lowered, plan.settle_timeout_s
        )
        events.append(EmsEvent("released", at_s, response.status_code, limit, settled_s, drawn, committed))
        if settled_s is None:
            output.line("balancing: the stations are not allowed more than the lowered limit yet")
        else:
            amperes = "/".join(f"{value:.0f}" for value in committed)
            output.line(f"balancing: the stations may draw {amperes} A per phase again after {settled_s:.1f} s")


def _highest(seen: tuple[float, float, float], now: tuple[float, float, float]) -> tuple[float, float, float]:
    return (max(seen[0], now[0]), max(seen[1], now[1]), max(seen[2], now[2]))


def _say_settled(output: Output, what: str, settled_s: float | None, drawn: tuple[float, float, float]) -> None:
    amperes = "/".join(f"{value:.0f}" for value in drawn)
    if settled_s is None:
        output.line(f"balancing: the stations draw {amperes} A per phase, not yet {what}")
    else:
        output.line(f"balancing: the stations draw {amperes} A per phase, {what} after {settled_s:.1f} s")


Phases = tuple[float, float, float]


async def follow_balancing(
    app: App, done: Callable[[Phases, Phases], bool], timeout_s: float
) -> tuple[float | None, Phases, Phases]:
    """Wait, reallocation by reallocation, until the measured draw and the committed current per grid
    phase satisfy ``done``; return how long that took (None: not in time) and both.

    The draw is what the stations reported through the controller, so it follows a new limit only
    once the stations have accepted their profiles and reported their new current.
    """
    balancer = app.balancer
    if balancer is None:
        return None, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0)
    began = trio.current_time()
    with trio.move_on_after(timeout_s):
        while not done(drawn := balancer.measured_phase_amperes(), committed := balancer.phase_bounds_amperes()):
            await balancer.reallocated.wait()
        return trio.current_time() - began, drawn, committed
    return None, balancer.measured_phase_amperes(), balancer.phase_bounds_amperes()
