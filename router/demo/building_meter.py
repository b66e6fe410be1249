"""The demo's building: a load that follows the day, behind a SunSpec grid meter the controller reads.

Theory of operation. The meter is pymodbus's own Modbus TCP server (:mod:`meters.simulator`) on
127.0.0.1 port 0, answering a SunSpec map (common model 1, three-phase meter model 203). It sits at
the grid connection, so it measures the building *and* every simulated EV, per grid phase (each
station's phases mapped through its phase rotation). The controller reads it as it reads an installed
meter: ``[[meters]]`` on the grid node (:func:`meter_entry`, used by
:func:`router.demo.settings.demo_settings`), polled by the appliance's meter service, which subtracts the
EV current it knows from the stations' own meter values; the balancing loop gives the EVs what is left.

The building's load (:class:`BuildingPlan`): a base load per phase that follows a compressed day (lowest
at "night", highest at "noon", one day lasting ``day_s``), plus a heat pump that switches on at
``heat_pump_on_at_s`` for ``heat_pump_for_s``. While it runs, the EVs are allowed less; once it stops
they get it back (over a few seconds: the meter service takes a falling load in slowly, its
``fall_time_constant_s``). :class:`BuildingRecord` keeps what the stations were allowed just before,
during and after, for the view and the summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import trio

from balancing.site import GRID_NODE_ID, GRID_PHASES
from meters.simulator import ModbusMeterServer, sunspec_image

from ..app import App
from .charging import NOMINAL_VOLTAGE_V

Phases3 = tuple[float, float, float]
METER_NAME: Final = "grid-meter"
METER_UNIT_ID: Final = 1


@dataclass(frozen=True, slots=True)
class BuildingPlan:
    """The building's load over the demo (seconds since the start) and how its meter is read."""

    #: At "night", per grid phase (L1, L2, L3).
    base_amperes: Phases3 = (12.0, 9.0, 10.0)
    #: What "noon" adds on every phase; one compressed day lasts ``day_s``.
    daily_swing_amperes: float = 8.0
    day_s: float = 240.0
    heat_pump_on_at_s: float = 80.0
    heat_pump_for_s: float = 25.0
    heat_pump_amperes: float = 40.0
    #: How often the simulated meter's registers follow the building and the EVs.
    update_interval_s: float = 0.1
    #: The ``[[meters]]`` entry's settings.
    poll_interval_s: float = 0.5
    fall_time_constant_s: float = 3.0
    #: Covers the simulated EVs' meter values lagging their current by a few per cent.
    safety_margin_amperes: float = 3.0

    def heat_pump_on(self, at_s: float) -> bool:
        return self.heat_pump_on_at_s <= at_s < self.heat_pump_on_at_s + self.heat_pump_for_s

    def load_amperes(self, at_s: float) -> Phases3:
        """The building's current per grid phase ``at_s`` seconds into the demo."""
        daylight = (1 - math.cos(2 * math.pi * at_s / self.day_s)) / 2
        extra = self.daily_swing_amperes * daylight + (self.heat_pump_amperes if self.heat_pump_on(at_s) else 0.0)
        a, b, c = self.base_amperes
        return (a + extra, b + extra, c + extra)

    def worst_case_amperes(self) -> float:
        """The most the building ever draws on a phase (what an installer without a meter must assume)."""
        return max(self.base_amperes) + self.daily_swing_amperes + self.heat_pump_amperes


DEFAULT_BUILDING_PLAN: Final = BuildingPlan()


def meter_entry(plan: BuildingPlan, port: int) -> dict[str, object]:
    """The demo's ``[[meters]]`` entry: the simulated meter on the grid node."""
    return {
        "name": METER_NAME,
        "host": "127.0.0.1",
        "port": port,
        "unit_id": METER_UNIT_ID,
        "node": GRID_NODE_ID,
        "poll_interval_s": plan.poll_interval_s,
        "timeout_s": 1.0,
        "stale_after_s": max(3.0, plan.poll_interval_s),
        "safety_margin_amperes": plan.safety_margin_amperes,
        "fall_time_constant_s": plan.fall_time_constant_s,
    }


@dataclass
class BuildingRecord:
    """What the building did and how balancing followed (amperes: the highest grid phase)."""

    plan: BuildingPlan
    load_amperes: Phases3 = (0.0, 0.0, 0.0)
    peak_load_amperes: float = 0.0
    #: The most balancing let the stations draw (after each reallocation) in the half run's time before
    #: the heat pump switched on; while it ran, once the controller had had half its run to follow; after.
    allowed_before_amperes: float | None = None
    allowed_during_amperes: float | None = None
    allowed_after_amperes: float | None = None
    heat_pump_ran: bool = False

    def text(self, meters: Sequence[dict[str, Any]] | None, now_s: float, dot: str = "·") -> str:
        """The building and what its meter leaves, in a few words for the live view (``now_s``: since the
        start; ``meters``: the controller's status of its meters)."""
        row = next((row for row in meters or () if row.get("meter") == METER_NAME), None)
        load = "/".join(f"{value:.0f}" for value in self.load_amperes)
        if row is None:
            left = "meter not read"
        elif row.get("fallback"):
            left = "meter FALLBACK"
        else:
            left = "meter leaves " + "/".join(f"{value:.0f}" for value in row["headroom_amperes"]) + " A for the EVs"
        plan = self.plan
        if plan.heat_pump_on(now_s):
            off_at_s = plan.heat_pump_on_at_s + plan.heat_pump_for_s
            pump = f"heat pump on (+{plan.heat_pump_amperes:g} A) until {off_at_s:g} s"
        elif now_s < plan.heat_pump_on_at_s:
            pump = f"heat pump at {plan.heat_pump_on_at_s:g} s"
        else:
            pump = "heat pump off"
        return f"load {load} A {dot} {left} {dot} {pump}"

    def lines(self) -> list[str]:
        """The summary's lines."""
        plan = self.plan
        lines = [f"  building      SunSpec meter on the grid, load up to {self.peak_load_amperes:.0f} A per phase"]
        if self.heat_pump_ran:
            before, during, after = (
                "-" if value is None else f"{value:.0f} A"
                for value in (self.allowed_before_amperes, self.allowed_during_amperes, self.allowed_after_amperes)
            )
            lines.append(
                f"{'':16}heat pump +{plan.heat_pump_amperes:g} A at {plan.heat_pump_on_at_s:g}-"
                f"{plan.heat_pump_on_at_s + plan.heat_pump_for_s:g} s: EVs allowed up to {before} before,"
            )
            lines.append(f"{'':16}at most {during} while it ran, up to {after} after (per phase)")
        return lines


def grid_currents(stations: Sequence[tuple[Sequence[float], str]]) -> Phases3:
    """The EVs' current per grid phase from each station's phase currents and its phase rotation."""
    totals = [0.0, 0.0, 0.0]
    for currents, rotation in stations:
        for phase, current in enumerate(currents):
            totals[GRID_PHASES.index(rotation[phase])] += current
    return (totals[0], totals[1], totals[2])


def meter_image(total_amperes: Phases3) -> dict[int, int]:
    """The SunSpec registers of a meter measuring ``total_amperes`` (power at the nominal voltage)."""
    return sunspec_image(total_amperes, power_watts=NOMINAL_VOLTAGE_V * sum(total_amperes), power_exponent=1)


class BuildingMeter:
    """The simulated meter: serve it (``port = await nursery.start(meter.serve)``), then :meth:`watch`."""

    def __init__(self, plan: BuildingPlan, started_s: float) -> None:
        self.plan = plan
        self.record = BuildingRecord(plan)
        self._started_s = started_s
        self._server = ModbusMeterServer(meter_image(plan.load_amperes(0.0)), unit_id=METER_UNIT_ID)
        self._stations: Callable[[], Sequence[tuple[Sequence[float], str]]] = lambda: ()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the meter until cancelled, its registers following the building and the stations' EVs."""
        # The server's thread starts and stops outside trio's loop (its start waits for the socket).
        await trio.to_thread.run_sync(self._server.__enter__)
        try:
            task_status.started(self._server.port)
            while True:
                at_s = trio.current_time() - self._started_s
                load = self.plan.load_amperes(at_s)
                evs = grid_currents(self._stations())
                self._server.image = meter_image((load[0] + evs[0], load[1] + evs[1], load[2] + evs[2]))
                self.record.load_amperes = load
                self.record.peak_load_amperes = max(self.record.peak_load_amperes, *load)
                await trio.sleep(self.plan.update_interval_s)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._server.__exit__, None, None, None)

    def measure(self, stations: Callable[[], Sequence[tuple[Sequence[float], str]]]) -> None:
        """From now on the meter also measures these stations' EVs ((phase currents, rotation) each)."""
        self._stations = stations

    async def watch(self, app: App, say: Callable[[str], None]) -> None:
        """Tell the heat pump's story and note, after every reallocation, what balancing allowed the EVs."""
        plan, record, balancer = self.plan, self.record, app.balancer
        if balancer is None:
            return
        on_at_s = self._started_s + plan.heat_pump_on_at_s
        off_at_s = on_at_s + plan.heat_pump_for_s
        # Half the heat pump's run: time enough for a poll, the decreases and their acceptance.
        settled_at_s = on_at_s + plan.heat_pump_for_s / 2
        # "Before" is as long a while as "during", just before (not the start-up, nor another story).
        before_from_s = on_at_s - plan.heat_pump_for_s / 2
        while True:
            now_s = trio.current_time()
            committed = balancer.phase_bounds_amperes()
            highest = max(committed)
            if now_s < on_at_s:
                if now_s >= before_from_s:
                    record.allowed_before_amperes = max(record.allowed_before_amperes or 0.0, highest)
            elif now_s < off_at_s:
                if not record.heat_pump_ran:
                    record.heat_pump_ran = True
                    say(
                        f"building: the heat pump switches on (+{plan.heat_pump_amperes:g} A per phase); the grid "
                        f"meter shows it and the EVs are allowed less"
                    )
                if now_s >= settled_at_s:
                    record.allowed_during_amperes = max(record.allowed_during_amperes or 0.0, highest)
            else:
                if record.allowed_after_amperes is None:
                    during = record.allowed_during_amperes
                    say(
                        "building: the heat pump switches off; the EVs were allowed at most "
                        f"{'-' if during is None else f'{during:.0f}'} A per phase while it ran, and get more again"
                    )
                record.allowed_after_amperes = max(record.allowed_after_amperes or 0.0, highest)
            moments = (before_from_s, on_at_s, settled_at_s, off_at_s)
            boundary = min((at_s for at_s in moments if at_s > now_s), default=math.inf)
            with trio.move_on_at(boundary):
                await balancer.reallocated.wait()
