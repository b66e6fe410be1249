"""Polling the site's meters and handing the balancing loop the limits they leave for the EVs.

:class:`MeterService` owns one task per meter (``await nursery.start(service.run)``). Each poll reads
the meter within its timeout, checks the reading (:func:`meters.decode.check_reading`) and feeds it,
with the EV current the loop measures beneath the meter's node, to that meter's
:class:`~meters.headroom.NodeHeadroom`; a failed poll changes nothing until the readings are stale,
then the fallback holds. Every poll is counted by outcome in ``ocpp_lc_meter_readings_total``; the
first failure of a kind is logged, and the same failure again at most once a minute. When a headroom
changes the loop is woken.

How the loop uses it (:meth:`attach`): a meter on the grid node adds its per-phase headroom to the
grid limits the loop allocates against (:meth:`limits_at`); a meter on a circuit lowers that circuit's
``max_current_amperes`` in the site model the loop holds to the headroom of its most loaded phase (the
site model has one current limit per circuit, for all its phases).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from balancing.allocator import SiteLimits
from balancing.rollout import bound_amperes
from balancing.site import GRID_NODE_ID, SiteConfig

from .decode import MeterFault, Phases3, check_reading
from .headroom import HeadroomPolicy, NodeHeadroom
from .modbus import Meter, RegisterReader, open_meter
from .settings import MeterSettings
from .status import amperes as _amperes

if TYPE_CHECKING:
    from balancing.loop import Balancer

log = logging.getLogger("ocpp_lc.meters")

PHASES = ("L1", "L2", "L3")
#: The same failure of a meter is logged again after this long.
REPEAT_LOG_S = 60.0
#: Headroom changes smaller than this do not wake the loop (its own hysteresis is coarser).
WAKE_AMPERES = 0.05
ZERO: Phases3 = (0.0, 0.0, 0.0)


class MeterMetrics:
    """The meters' counters and gauges (labels: meter name, phase)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.readings = Counter(
            "ocpp_lc_meter_readings",
            "Polls of each site meter by outcome: ok, or why the reading was not used (timeout, unreachable, "
            "modbus_error, short_read, garbage, not_sunspec, wrong_model, not_implemented, not_finite, negative, "
            "implausible, error).",
            ["meter", "outcome"],
            registry=registry,
        )
        self.current = Gauge(
            "ocpp_lc_meter_current_amperes",
            "Current the meter measured last, per phase.",
            ["meter", "phase"],
            registry=registry,
        )
        self.other_load = Gauge(
            "ocpp_lc_meter_other_load_amperes",
            "Non-EV load at the meter's node (metered less EV current, smoothed), per phase.",
            ["meter", "phase"],
            registry=registry,
        )
        self.headroom = Gauge(
            "ocpp_lc_meter_headroom_amperes",
            "What the meter's node leaves for its EVs now, per phase (the fallback while the meter fails).",
            ["meter", "phase"],
            registry=registry,
        )
        self.power_headroom = Gauge(
            "ocpp_lc_meter_power_headroom_watts",
            "What the meter's node leaves for its EVs in watts, when the node has a power limit (NaN: none).",
            ["meter"],
            registry=registry,
        )
        self.power = Gauge(
            "ocpp_lc_meter_power_watts",
            "Total active power the meter measured last (negative: export).",
            ["meter"],
            registry=registry,
        )
        self.fallback = Gauge(
            "ocpp_lc_meter_fallback",
            "1 while the meter's readings are missing or unusable and the fallback limit holds at its node.",
            ["meter"],
            registry=registry,
        )


@dataclass
class MeterTask:
    """One configured meter, its reading state and its log bookkeeping."""

    settings: MeterSettings
    meter: Meter
    state: NodeHeadroom
    plausible_max_amperes: float
    last_outcome: str | None = None
    logged_at_s: dict[str, float] = field(default_factory=dict)


class MeterService:
    """Every ``[[meters]]`` entry, polled; see the module docstring."""

    def __init__(
        self,
        meters: tuple[MeterSettings, ...],
        site: SiteConfig,
        registry: CollectorRegistry,
        *,
        failsafe_amperes: float = 0.0,
        readers: dict[str, RegisterReader] | None = None,
    ) -> None:
        self.site = site
        self.metrics = MeterMetrics(registry)
        self.tasks: list[MeterTask] = []
        for settings in meters:
            node_limits = site.node_limits(settings.node)
            limit = node_limits.max_current_amperes
            if limit is None:
                raise ValueError(f"meter {settings.name!r}: node {settings.node!r} has no max_current_amperes")
            fallback = settings.fallback_other_load_amperes
            policy = HeadroomPolicy(
                node_limit_amperes=limit,
                safety_margin_amperes=settings.safety_margin_amperes,
                fall_time_constant_s=settings.fall_time_constant_s,
                stale_after_s=settings.stale_after_s,
                fallback_other_load_amperes=site.other_load_amperes if fallback is None else fallback,
                failsafe_amperes=failsafe_amperes,
                node_power_watts=node_limits.max_power_watts,
                nominal_voltage_volts=site.nominal_voltage_volts,
            )
            plausible = settings.plausible_max_amperes
            task = MeterTask(
                settings,
                open_meter(settings, None if readers is None else readers.get(settings.name)),
                NodeHeadroom(policy),
                2 * limit if plausible is None else plausible,
            )
            self.tasks.append(task)
            self._export(task)
        self._ev_amperes: Callable[[str], Phases3] = lambda node: ZERO
        self._on_change: Callable[[], None] = lambda: None
        #: Set after every poll of any meter (tests wait on it).
        self.polled = trio.Event()

    # --- the balancing loop's side ----------------------------------------------------------------

    def limits_at(self, outside: Callable[[datetime], SiteLimits]) -> Callable[[datetime], SiteLimits]:
        """``outside`` (the grid limits from config, CSMS and EMS) with the grid meter's headroom folded in."""

        def limits(now: datetime) -> SiteLimits:
            found = outside(now)
            for task in self.tasks:
                if task.settings.node == GRID_NODE_ID:
                    state = task.state
                    metered = SiteLimits(
                        phase_current_amperes=state.headroom_amperes, power_watts=state.power_headroom_watts
                    )
                    found = found.tighter(metered)
            return found

        return limits

    def site_now(self) -> SiteConfig:
        """The site model with every metered circuit's limit lowered to its headroom (its lowest phase)."""
        # Rounded down to 0.1 A (what a profile carries): a smoothed load that drifts by hundredths does
        # not make a new site model (and a new compiled site index for the allocator) at every poll.
        metered: dict[str, dict[str, float]] = {}
        for task in self.tasks:
            update = {"max_current_amperes": math.floor(min(task.state.headroom_amperes) * 10 + 1e-9) / 10}
            if task.state.power_headroom_watts is not None:  # whole watts, for the same reason
                update["max_power_watts"] = float(math.floor(task.state.power_headroom_watts))
            metered[task.settings.node] = update
        metered.pop(GRID_NODE_ID, None)
        if not metered:
            return self.site
        circuits = tuple(
            circuit.model_copy(update=metered[circuit.circuit_id]) if circuit.circuit_id in metered else circuit
            for circuit in self.site.circuits
        )
        # Validated anew rather than copied: the site caches lookups (its circuits among them).
        return SiteConfig.model_validate({**dict(self.site), "circuits": circuits})

    def attach(self, balancer: Balancer) -> None:
        """Measure EV current through ``balancer`` and hand it every change (the site, a wake-up)."""

        def ev_amperes(node: str) -> Phases3:
            return ev_amperes_beneath(balancer, self.site, node)

        def changed() -> None:
            site = self.site_now()
            if site != balancer.site:
                balancer.site = site
            balancer.wake()

        self._ev_amperes = ev_amperes
        self._on_change = changed
        balancer.site = self.site_now()

    # --- polling ------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every meter at its interval until cancelled; the connections are closed on the way out."""
        try:
            async with trio.open_nursery() as nursery:
                for task in self.tasks:
                    nursery.start_soon(self._poll_forever, task)
                task_status.started()
        finally:
            for task in self.tasks:
                task.meter.reader.close()

    async def _poll_forever(self, task: MeterTask) -> None:
        interval_s = task.settings.poll_interval_s
        next_at_s = trio.current_time()
        while True:
            await self.poll(task)
            next_at_s = max(next_at_s + interval_s, trio.current_time())
            await trio.sleep_until(next_at_s)

    async def poll(self, task: MeterTask) -> None:
        """Read one meter once and act on the outcome."""
        name = task.settings.name
        try:
            with trio.fail_after(task.settings.timeout_s):
                reading = await task.meter.read()
            check_reading(reading, task.plausible_max_amperes)
        except MeterFault as fault:
            changed = self._failed(task, fault.outcome, fault.detail)
        except trio.TooSlowError:
            changed = self._failed(task, "timeout", f"no answer within {task.settings.timeout_s:g} s")
        except Exception as error:  # defence in depth: a meter must never stop the appliance
            log.exception("meter %s: reading failed unexpectedly", name)
            changed = self._failed(task, "error", type(error).__name__)
        else:
            now_s = trio.current_time()
            if task.last_outcome not in (None, "ok"):
                log.info("meter %s reads again (%s on the grid phases)", name, _amperes(reading.phase_current_amperes))
            task.last_outcome = "ok"
            self.metrics.readings.labels(name, "ok").inc()
            before = task.state.headroom_amperes
            was_fallback = task.state.fallback
            task.state.accept(reading, self._ev_amperes(task.settings.node), now_s)
            changed = was_fallback or _moved(before, task.state.headroom_amperes)
        self._export(task)
        if changed:
            self._on_change()
        self.polled.set()
        self.polled = trio.Event()

    def _failed(self, task: MeterTask, outcome: str, detail: str) -> bool:
        name = task.settings.name
        now_s = trio.current_time()
        self.metrics.readings.labels(name, outcome).inc()
        last = task.logged_at_s.get(outcome)
        if task.last_outcome != outcome or last is None or now_s - last >= REPEAT_LOG_S:
            log.warning(
                "meter %s: reading not used (%s: %s); the limit in force at %s is unchanged",
                name,
                outcome,
                detail,
                task.settings.node,
            )
            task.logged_at_s[outcome] = now_s
        task.last_outcome = outcome
        if not task.state.check_stale(now_s):
            return False
        log.warning(
            "meter %s: no valid reading for %g s: the EVs at %s fall back to %s",
            name,
            task.settings.stale_after_s,
            task.settings.node,
            _amperes(task.state.headroom_amperes),
        )
        return True

    def _export(self, task: MeterTask) -> None:
        name, state, metrics = task.settings.name, task.state, self.metrics
        for phase, label in enumerate(PHASES):
            metered = math.nan if state.metered_amperes is None else state.metered_amperes[phase]
            other = math.nan if state.other_load_amperes is None or state.fallback else state.other_load_amperes[phase]
            metrics.current.labels(name, label).set(metered)
            metrics.other_load.labels(name, label).set(other)
            metrics.headroom.labels(name, label).set(state.headroom_amperes[phase])
        power_room = state.power_headroom_watts
        metrics.power_headroom.labels(name).set(math.nan if power_room is None else power_room)
        metrics.power.labels(name).set(math.nan if state.power_watts is None else state.power_watts)
        metrics.fallback.labels(name).set(1 if state.fallback else 0)

    def status(self) -> list[dict[str, Any]]:
        """One entry per meter for ``GET /api/v1/status``."""
        rows = []
        for task in self.tasks:
            state = task.state
            rows.append(
                {
                    "meter": task.settings.name,
                    "node": task.settings.node,
                    "fallback": state.fallback,
                    "last_outcome": task.last_outcome,
                    "metered_amperes": None if state.metered_amperes is None else list(state.metered_amperes),
                    "other_load_amperes": None
                    if state.other_load_amperes is None or state.fallback
                    else [round(value, 3) for value in state.other_load_amperes],
                    "headroom_amperes": [round(value, 3) for value in state.headroom_amperes],
                    "power_headroom_watts": None
                    if state.power_headroom_watts is None
                    else round(state.power_headroom_watts, 1),
                    "power_watts": state.power_watts,
                }
            )
        return rows


def ev_amperes_beneath(balancer: Balancer, site: SiteConfig, node: str) -> Phases3:
    """What the EVs in sessions beneath ``node`` draw per grid phase, from their own meter values.

    An EV's highest phase current counts on every grid phase it uses (as the loop's own sums do), but
    never more than it may draw now (:func:`balancing.rollout.bound_amperes`): EV meter values come far
    less often than the grid meter's, and an EV just lowered still shows its old draw, which taken as it
    is would make the building's load look smaller by what the EVs gave up. An EV that has not
    reported counts as 0 here, so its draw counts as other load: the safe side, as is any error of this
    estimate downwards.
    """
    totals = [0.0, 0.0, 0.0]
    for record in balancer.records():
        if record.transaction_id is None:
            continue
        measured = balancer.measured_amperes(record)
        if measured is None:
            continue
        station = site.station(record.station_id)
        if node != GRID_NODE_ID and node not in site.circuit_path(station.circuit_id):
            continue
        applied = balancer.rollout.evses.get(record.key)
        if applied is not None:
            measured = min(measured, bound_amperes(station, applied))
        for phase in station.grid_phases(record.phases_used):
            totals[phase] += measured
    return (totals[0], totals[1], totals[2])


def _moved(before: Phases3, after: Phases3) -> bool:
    return any(abs(a - b) >= WAKE_AMPERES for a, b in zip(before, after, strict=True))
