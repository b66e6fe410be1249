"""The trio side of the faulty-fleet simulation (tests/unit/test_fleet_faults.py): the controller's
incarnations on one store, the Caller, the stations answering, meter values, and the checks of the
physical current and of waiting. See that test module's docstring for what is modelled and why.
"""

from __future__ import annotations

import math
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from balancing.loop import Balancer, CallOutcome, LoopSettings
from balancing.overdraw import OverdrawPolicy
from balancing.rollout import RolloutPolicy
from balancing.site import GRID_NODE_ID, SiteConfig
from router.store import Store
from tests.support.faulty_stations import (
    CALL_TIMEOUT_S,
    GRACE_S,
    HOP_MAX_S,
    IDLE_AMPERES,
    LEAD_S,
    MARGIN_AMPERES,
    METER_INTERVAL_S,
    MIN_INTERVAL_S,
    RECONNECT_MAX_S,
    TOLERANCE_AMPERES,
    UNDERDRAW_HEADROOM_AMPERES,
    VALIDITY_S,
    VOLTAGE,
    WAIT_LIMIT_S,
    Frame,
    Installed,
    Schedule,
    SimEvse,
    SimStation,
    seconds_of,
    vector,
    wall_at,
)
from tests.support.schemas import validate_call, validate_result


class Fleet:
    """Stations, schedule, the controller's incarnations, the Caller and the checks."""

    def __init__(self, site: SiteConfig, seed: int, state_dir: Path, nursery: trio.Nursery) -> None:
        self.site, self.seed, self.state_dir, self.nursery = site, seed, state_dir, nursery
        self.schedule = Schedule()
        self.stations: dict[str, SimStation] = {}
        parents = {c.circuit_id: c.parent_id for c in site.circuits}
        for index, config in enumerate(site.stations):
            path = [config.circuit_id]
            while path[-1] != GRID_NODE_ID:
                path.append(parents[path[-1]] or GRID_NODE_ID)
            ids = [evse.evse_id for evse in config.evses] or [1]
            self.stations[config.station_id] = SimStation(
                config,
                {i: SimEvse(i, config.evse_range_amperes(i)[1], config.evse_range_amperes(i)[0]) for i in ids},
                ["station:" + config.station_id, *path],
                random.Random(f"{seed}-{config.station_id}"),
                meter_in_tx=index % 2 == 0,
            )
        self.balancer: Balancer | None = None
        self.registry = CollectorRegistry()
        self.scope: trio.CancelScope | None = None
        self.closed = trio.Event()
        self.up_since_s = 0.0
        self.settings = LoopSettings(
            recompute_interval_s=30.0,
            rollout=RolloutPolicy(
                hysteresis_amperes=1.0,
                min_interval_s=MIN_INTERVAL_S,
                resolution_amperes=0.1,
                idle_current_amperes=IDLE_AMPERES,
            ),
            profile_validity_s=VALIDITY_S,
            decrease_lead_s=LEAD_S,
            overdraw=OverdrawPolicy(margin_amperes=MARGIN_AMPERES, grace_s=GRACE_S),
        )
        self.stats: dict[str, int] = {}
        self.checks = 0
        self.excused = 0
        self.max_excused_after_s = 0.0
        self.max_wait_s = 0.0
        self.wait_checks = 0
        self.peak_grid_amperes = 0.0
        self.overdraws_detected = 0.0
        self._validations: dict[str, int] = {}
        self._configured: dict[tuple[str, int], float] = {}

    def count(self, kind: str, amount: int = 1) -> None:
        self.stats[kind] = self.stats.get(kind, 0) + amount

    def validate(self, action: str, payload: dict[str, Any], *, result: bool = False) -> None:
        """Schema-check what both sides write: the first 50 of each kind and every 50th after (cost)."""
        label = action + (" result" if result else "")
        seen = self._validations[label] = self._validations.get(label, 0) + 1
        if seen <= 50 or seen % 50 == 0:
            (validate_result if result else validate_call)(action, payload)

    # --- the controller: start, crash -----------------------------------------------------------

    async def incarnation(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """One life of the controller: a Balancer on the store, until its scope is cancelled (a crash)."""
        self.closed = trio.Event()
        try:
            with Store.open(self.state_dir) as store:
                registry = self.registry = CollectorRegistry()
                balancer = Balancer(
                    self.site,
                    self.schedule.limits_at,
                    self.call,
                    self.settings,
                    next_limit_change=self.schedule.next_change,
                    wall_clock=lambda: wall_at(trio.current_time()),
                    registry=registry,
                    state=store.namespace("balancing"),
                )
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(balancer.run)
                        self.balancer, self.scope, self.up_since_s = balancer, scope, trio.current_time()
                        task_status.started()
                        await trio.sleep_forever()
                detected = registry.get_sample_value("ocpp_lc_balancing_overdraws_total")
                self.overdraws_detected += detected or 0.0
        finally:
            self.closed.set()

    def finish(self) -> None:
        if self.balancer is not None:
            self.overdraws_detected += self.registry.get_sample_value("ocpp_lc_balancing_overdraws_total") or 0.0

    def crash(self) -> None:
        """Kill the controller now: its tasks are cancelled, every link drops (see :meth:`drop_link`)."""
        assert self.balancer is not None and self.scope is not None
        self.count("crash")
        self.count("crash_mid_rollout", any(s.current or s.queue for s in self.stations.values()))
        self.balancer, scope, self.scope = None, self.scope, None
        scope.cancel()
        now_s = trio.current_time()
        for station in self.stations.values():
            self.drop_link(station)
            for evse in station.evses.values():
                evse.trusted = False
                evse.update_overdraw(now_s, down=True)
        self.check(now_s)

    async def restart(self, after_s: float) -> None:
        await trio.sleep(after_s)
        await self.closed.wait()
        await self.nursery.start(self.incarnation)
        self.count("restart")
        now_s = trio.current_time()
        for station in self.stations.values():
            for evse in station.evses.values():
                evse.update_overdraw(now_s, restarted=True)  # the new controller knows nothing of it
            if station.fault != "offline":
                self.nursery.start_soon(self.reconnect_later, station, station.rng.uniform(0.5, RECONNECT_MAX_S))

    async def reconnect_later(self, station: SimStation, after_s: float) -> None:
        await trio.sleep(after_s)
        if self.balancer is not None and not station.connected and station.fault != "offline":
            self.connect(station)

    # --- links --------------------------------------------------------------------------------

    def connect(self, station: SimStation) -> None:
        balancer = self.balancer
        assert balancer is not None
        station.connected = True
        balancer.station_connected(station.station_id)
        for evse in station.evses.values():
            status = "Available" if evse.ev is None else "Occupied"
            payload = {
                "timestamp": wall_at(trio.current_time()).isoformat(),
                "connectorStatus": status,
                "evseId": evse.evse_id,
                "connectorId": 1,
            }
            self.send(station, "StatusNotification", payload)
        self.report_phases(station, trio.current_time())  # what changed while it was away (queued events)

    def drop_link(self, station: SimStation) -> None:
        """The link drops: calls waiting in the controller's queue are gone; the frame on the wire arrives
        (applied, never answered) or not, at random."""
        if station.connected and self.balancer is not None:
            self.balancer.station_disconnected(station.station_id)
        station.connected = False
        for frame in station.queue:
            frame.gone = frame.lost = True
            frame.done.set()
        station.queue.clear()
        frame = station.current
        if frame is not None:
            on_the_wire = not frame.gone and trio.current_time() < frame.arrives_at_s
            frame.gone = True
            frame.lost = frame.lost or station.rng.random() < 0.5
            frame.done.set()
            if on_the_wire:
                self.count("cut_frame_lost" if frame.lost else "cut_frame_arrives")

    def send(self, station: SimStation, action: str, payload: dict[str, Any]) -> None:
        self.validate(action, payload)
        if self.balancer is not None and station.connected:
            self.balancer.station_call(station.station_id, action, payload)

    def transaction_event(self, station: SimStation, evse: SimEvse, event_type: str, **extra: Any) -> dict[str, Any]:
        assert evse.transaction_id is not None
        station.seq_no += 1
        reason = {"Started": "CablePluggedIn", "Ended": "EVDeparted"}.get(event_type, "ChargingStateChanged")
        payload: dict[str, Any] = {
            "eventType": event_type,
            "timestamp": wall_at(trio.current_time()).isoformat(),
            "triggerReason": extra.pop("trigger", reason),
            "seqNo": station.seq_no,
            "transactionInfo": {
                "transactionId": evse.transaction_id,
                "chargingState": "Idle" if event_type == "Ended" else "Charging",
            },
            "evse": {"id": evse.evse_id, "connectorId": 1},
            **extra,
        }
        self.send(station, "TransactionEvent", payload)
        return payload

    def report_phases(self, station: SimStation, now_s: float) -> None:
        """A station reports a change of the phases its EVs use at once (numberOfPhasesUsed)."""
        for evse in station.evses.values():
            used = evse.phases_used(station.config.phases, now_s)
            if evse.ev is not None and used != evse.reported_phases and station.connected and self.balancer:
                evse.reported_phases = used
                self.transaction_event(station, evse, "Updated", numberOfPhasesUsed=used)
                self.count("phases_reported")

    async def meter(self, station: SimStation) -> None:
        await trio.sleep(station.rng.uniform(0.0, METER_INTERVAL_S))
        while True:
            now_s = trio.current_time()
            for evse in station.evses.values():
                if evse.ev is None or not station.connected or self.balancer is None:
                    continue
                draw = evse.draw_amperes(now_s)
                samples = [
                    {"value": draw, "measurand": "Current.Import", "phase": f"L{k + 1}", "unitOfMeasure": {"unit": "A"}}
                    for k in range(evse.phases_used(station.config.phases, now_s))
                ]
                meter = [{"timestamp": wall_at(now_s).isoformat(), "sampledValue": samples}]
                if station.meter_in_tx:
                    self.transaction_event(station, evse, "Updated", trigger="MeterValuePeriodic", meterValue=meter)
                else:
                    self.send(station, "MeterValues", {"evseId": evse.evse_id, "meterValue": meter})
            await trio.sleep(METER_INTERVAL_S)  # a sample changes no current: nothing to check

    # --- the Caller and the stations answering ---------------------------------------------------

    async def call(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        assert action == "SetChargingProfile"
        self.validate(action, payload)
        station = self.stations[station_id]
        if not station.connected:
            return CallOutcome("gone", detail="not connected")
        frame = Frame(payload, trio.current_time())
        station.queue.append(frame)
        station.arrived.set()
        with trio.move_on_after(CALL_TIMEOUT_S):
            await frame.done.wait()
        if frame in station.queue:
            station.queue.remove(frame)  # its turn did not come in time: never sent
        evse = station.evses[int(payload["evseId"])]
        if not frame.done.is_set():
            self.count("timeout")
            evse.trusted = False
            return CallOutcome("timeout", detail="no answer in time")
        if frame.gone or frame.answer is None:
            evse.trusted = False
            return CallOutcome("gone", detail="link closed")
        self.validate(action, frame.answer, result=True)
        evse.trusted = frame.answer["status"] == "Accepted"
        return CallOutcome("answered", frame.answer)

    async def serve(self, station: SimStation) -> None:
        rng = station.rng
        while True:
            if not station.queue:
                station.arrived = trio.Event()
                await station.arrived.wait()
                continue
            frame = min(station.queue, key=Frame.order)
            station.queue.remove(frame)
            station.current = frame
            fault = station.fault
            lost_answer = fault == "flaky" and rng.random() < 0.3
            late = fault == "flaky" and rng.random() < 0.3
            frame.arrives_at_s = trio.current_time() + rng.uniform(0.05, HOP_MAX_S)
            await trio.sleep_until(frame.arrives_at_s)
            if frame.lost or station.fault == "ignoring":
                self.count("lost_in_transit" if frame.lost else "ignored")
                station.current = None
                continue
            answer = self.apply(station, frame)
            if frame.gone or lost_answer:
                self.count("applied_unanswered")
                station.current = None
                continue
            back_s = CALL_TIMEOUT_S + rng.uniform(0.5, 3.0) if late else rng.uniform(0.05, HOP_MAX_S)
            await trio.sleep(back_s)
            station.current = None
            if not frame.gone:
                self.count("late", late)
                frame.answer = answer
                frame.done.set()

    def apply(self, station: SimStation, frame: Frame) -> dict[str, Any]:
        profile = frame.payload["chargingProfile"]
        (schedule,) = profile["chargingSchedule"]
        (period,) = schedule["chargingSchedulePeriod"]
        assert schedule["chargingRateUnit"] == "A" and profile["chargingProfileKind"] == "Relative"
        evse = station.evses[int(frame.payload["evseId"])]
        if station.fault == "rejecting":
            self.count("rejected")
            return {"status": "Rejected"}
        purpose = profile["chargingProfilePurpose"]
        if purpose == "TxProfile" and profile.get("transactionId") != evse.transaction_id:
            self.count("stale_tx")  # K01.FR.09
            return {"status": "Rejected", "statusInfo": {"reasonCode": "TxNotFound"}}
        valid_to_s = seconds_of(datetime.fromisoformat(profile["validTo"].replace("Z", "+00:00")))
        now_s = trio.current_time()
        assert valid_to_s > frame.sent_at_s + VALIDITY_S - 1, "a profile of ours with a short validity"
        installed = Installed(
            float(period["limit"]), period.get("numberPhases"), valid_to_s, profile.get("transactionId")
        )
        if purpose == "TxProfile":
            evse.tx = installed
        else:
            evse.default = installed
        self.count("accepted")
        self.nursery.start_soon(self.lapse_at, station, evse, installed)
        evse.update_overdraw(now_s, down=self.balancer is None)
        self.report_phases(station, now_s)
        self.check(now_s)
        return {"status": "Accepted"}

    async def check_at(self, at_s: float) -> None:
        await trio.sleep_until(at_s)
        self.check(at_s)

    async def lapse_at(self, station: SimStation, evse: SimEvse, installed: Installed) -> None:
        """At its validTo the station stops applying a profile: if it still mattered, that is a lapse."""
        await trio.sleep_until(installed.valid_to_s)
        now_s = trio.current_time()
        if evse.default is installed or (evse.tx is installed and evse.transaction_id == installed.transaction_id):
            self.count("lapsed")
        evse.update_overdraw(now_s, down=self.balancer is None)
        self.report_phases(station, now_s)
        self.check(now_s)

    # --- the checks ---------------------------------------------------------------------------------

    def capacity(self, node: str, index: int, grid: tuple[float, float, float, float]) -> float:
        value = self._configured.get((node, index))
        if value is None:
            limits: Any = self.site.station(node[8:]) if node.startswith("station:") else self.site.node_limits(node)
            if index < 3:
                value = math.inf if limits.max_current_amperes is None else limits.max_current_amperes
            else:
                value = math.inf if limits.max_power_watts is None else limits.max_power_watts / VOLTAGE
            self._configured[(node, index)] = value
        return min(value, grid[index]) if node == GRID_NODE_ID else value

    def sums(self, now_s: float, compliant: bool = False) -> dict[str, list[float]]:
        """Physical amperes per node and grid phase (``compliant``: overdrawing EVSEs at their limit)."""
        found: dict[str, list[float]] = {}
        for station in self.stations.values():
            for evse in station.evses.values():
                amperes = evse.draw_amperes(now_s, compliant)
                if amperes <= 0:
                    continue
                phases = station.grid_phases(evse.phases_used(station.config.phases, now_s))
                for node in station.nodes:
                    per_phase = found.setdefault(node, [0.0, 0.0, 0.0])
                    for phase in phases:
                        per_phase[phase] += amperes
        return found

    def check(self, now_s: float) -> None:
        self.checks += 1
        grid = vector(self.schedule.at(now_s))
        sums = self.sums(now_s)
        compliant: dict[str, list[float]] | None = None
        for node, per_phase in sums.items():
            for index in range(4):
                drawn = per_phase[index] if index < 3 else sum(per_phase)
                limit = self.capacity(node, index, grid)
                if drawn <= limit + TOLERANCE_AMPERES:
                    continue
                windows = [
                    (station.station_id, evse.evse_id, evse.visible_since_s)
                    for station in self.stations.values()
                    if node in station.nodes
                    for evse in station.evses.values()
                    if evse.excused(now_s)
                ]
                compliant = compliant or self.sums(now_s, compliant=True)
                fair = compliant.get(node, [0.0] * 3)
                fair_drawn = fair[index] if index < 3 else sum(fair)
                what = f"L{index + 1}" if index < 3 else "power"
                assert windows and fair_drawn <= limit + TOLERANCE_AMPERES, (
                    f"seed {self.seed} t={now_s:.3f}s {node} {what} draws {drawn:.2f} A over its limit "
                    f"{limit:.2f} A (without overdraw {fair_drawn:.2f} A; overdraw windows {windows}); "
                    f"{self.describe(node, now_s)}"
                )
                self.excused += 1
                for _, _, since in windows:
                    if since is not None and since != math.inf:
                        self.max_excused_after_s = max(self.max_excused_after_s, now_s - since)
        self.peak_grid_amperes = max(self.peak_grid_amperes, *sums.get(GRID_NODE_ID, [0.0]))
        self.check_waiting(now_s)

    def describe(self, node: str, now_s: float) -> str:
        parts = []
        for station in self.stations.values():
            if node in station.nodes:
                for evse in station.evses.values():
                    if evse.ev is not None:
                        parts.append(
                            f"{station.station_id}/{evse.evse_id} fault={station.fault} draws "
                            f"{evse.draw_amperes(now_s):.1f} A x{evse.phases_used(station.config.phases, now_s)}"
                            f" (limit {evse.limit_amperes(now_s):.1f}, governing {evse.governing(now_s)})"
                        )
        return "; ".join(parts)

    @staticmethod
    def add_load(
        load: dict[tuple[str, int], float], station: SimStation, phases: tuple[int, ...], amperes: float
    ) -> None:
        for node in station.nodes:
            for phase in phases:
                load[(node, phase)] = load.get((node, phase), 0.0) + amperes
            load[(node, 3)] = load.get((node, 3), 0.0) + amperes * len(phases)

    @staticmethod
    def demand_amperes(evse: SimEvse) -> float:
        assert evse.ev is not None
        return max(evse.min_amperes, min(evse.max_amperes, evse.ev.max_amperes + UNDERDRAW_HEADROOM_AMPERES))

    def check_waiting(self, now_s: float) -> None:
        """No session at a healthy station waits for current beyond WAIT_LIMIT_S while its minimum fits."""
        if self.balancer is None:
            for station in self.stations.values():
                for evse in station.evses.values():
                    evse.waiting_since_s = None
            return
        grid = vector(self.schedule.lowest(now_s, now_s + LEAD_S))
        waiting = [
            (station, evse)
            for station in self.stations.values()
            if station.connected and station.fault is None
            for evse in station.evses.values()
            if evse.ev is not None and evse.trusted and evse.limit_amperes(now_s) == 0
        ]
        waiting_ids = {id(evse) for _, evse in waiting}
        for station in self.stations.values():
            for evse in station.evses.values():
                if id(evse) not in waiting_ids:
                    evse.waiting_since_s = None
        if not waiting:
            return
        # Capacity exists for its minimum when it fits beside every other session at what that one would
        # take (its EV's own maximum plus the underdraw headroom, once the allocator has seen it draw less:
        # K03.FR.04 serves a higher chargingPriority up to that, whatever the lower ones get) and every EVSE
        # the controller cannot trust at its maximum.
        load: dict[tuple[str, int], float] = {}
        for station in self.stations.values():
            phases = station.grid_phases(station.config.phases)
            for evse in station.evses.values():
                if not evse.trusted or station.fault is not None or evse.overdrawing:
                    self.add_load(load, station, phases, evse.max_amperes)
                elif id(evse) in waiting_ids:
                    self.add_load(load, station, phases, evse.min_amperes)  # every waiting one at its minimum
                elif evse.ev is not None:
                    self.add_load(load, station, phases, self.demand_amperes(evse))
        for station, evse in waiting:
            phases = station.grid_phases(station.config.phases)
            fits = all(
                load.get((node, index), 0.0) <= self.capacity(node, index, grid) + TOLERANCE_AMPERES
                for node in station.nodes
                for index in (*phases, 3)
            )
            if not fits:
                evse.waiting_since_s = None
                continue
            self.wait_checks += 1
            if evse.waiting_since_s is None:
                evse.waiting_since_s = now_s
                # The condition changes only where check() runs; a check at the deadline makes it exact.
                self.nursery.start_soon(self.check_at, now_s + WAIT_LIMIT_S + 1e-3)
            waited_s = now_s - evse.waiting_since_s
            self.max_wait_s = max(self.max_wait_s, waited_s)
            assert waited_s <= WAIT_LIMIT_S, (
                f"seed {self.seed} t={now_s:.3f}s {station.station_id}/{evse.evse_id} has waited "
                f"{waited_s:.1f} s at 0 A though its minimum fits"
            )
