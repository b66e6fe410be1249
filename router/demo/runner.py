"""``ocpp-lc demo``: a sandbox CSMS, the real appliance and simulated stations, in one trio run on loopback.

Theory of operation. :func:`demo_main` owns everything under one nursery: the sandbox CSMS (port 0),
the appliance started exactly as ``ocpp-lc run`` starts it (``run_app`` with settings from
``parse_settings``, stations and HTTP on 127.0.0.1 port 0), and N simulated stations connecting to
the controller. What the view shows comes from the controller's ObserverHub, its Prometheus
metrics and its status document (``App.status()``: limits and balancing), so the demo shows what went
through the router, not what the simulators think they did.

The story a newcomer sees in the first minute (times from the start, see :class:`EmsPlan` and
``FirmwarePlan``): stations boot through the controller and EVs arrive; the site's grid connection
(``[site.grid]``, :data:`DEMO_GRID_AMPERES` per phase) is less than the stations could draw together,
so the balancing loop shares it out with TxDefaultProfile / TxProfile; after 15 s an "EMS script"
lowers the site limit through the EMS HTTP API (``PUT /api/v1/limits/demo-ems``) and the loop brings
the stations down under it; after 35 s it releases it (``DELETE``) and the stations go back up; in
between, the sandbox CSMS has the controller publish a firmware file from a local "vendor" server
(PublishFirmware, L03) and tells one station to update from the controller's URL (UpdateFirmware,
L01), and the station downloads it. After 40 s the sandbox CSMS goes away for 30 s (a WAN outage,
:mod:`router.demo.outage`): the site charges on, answered by the controller, and once the CSMS is
back the controller replays what it kept.

Stopping (``duration_s`` elapsed, or the first Ctrl-C/SIGTERM in :func:`run_demo`) is the
appliance's own graceful shutdown: ``request_shutdown()`` closes every station with 1001, the
stations do not reconnect, then the CSMS stops. A second Ctrl-C cancels everything at once. Either
way the terminal is restored and a summary printed; nothing outlives the run.

The pieces: :mod:`.settings` (the site and the appliance's settings), :mod:`.terminal` (output, log
capture, stopping), :mod:`.ems_script`, :mod:`.outage`, :mod:`.summary` and :mod:`.view`.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final, TextIO

import trio

from ..app import App, run_app
from ..observers import Observation
from .building_meter import DEFAULT_BUILDING_PLAN, BuildingMeter, BuildingPlan, BuildingRecord, meter_entry
from .clock import WallClock, utc_now
from .ems_script import DEFAULT_EMS_PLAN, EmsEvent, EmsPlan, ems_script
from .firmware_source import FirmwareSource
from .outage import DEFAULT_OUTAGE_PLAN, OutagePlan, OutageRecord, outage_script
from .sandbox_csms import FirmwarePlan, FirmwareProgress, SandboxCsms
from .settings import (
    CONTROLLER_IDENTITY,
    DEFAULT_SEED,
    DEMO_GRID_AMPERES,
    FIRMWARE_NAME,
    FIRMWARE_TARGET,
    OCPP_PATH,
    SHUTDOWN_GRACE_S,
    demo_settings,
    station_specs,
)
from .stations import DEFAULT_TIMINGS, SimTimings, SimulatedStation
from .summary import DemoSummary
from .terminal import LogCapture, Output, StopRequest
from .view import (
    Header,
    RelayCounters,
    SiteModel,
    limit_text,
    read_counters,
    read_profile_counts,
    render_live,
    site_balance,
)

__all__ = ["OCPP_PATH", "DemoSummary", "EmsPlan", "StopRequest", "demo_main", "demo_settings", "run_in_foreground"]

REDRAW_INTERVAL_S: Final = 0.5
#: Events buffered for the view, per station. The view reads them as they come, but at start-up every
#: station connects and boots at once, and the view's task then gets the CPU only now and then.
OBSERVER_CAPACITY_PER_STATION: Final = 50
OBSERVER_CAPACITY_MIN: Final = 1000

#: Receives ``(connection label, "sent" | "received", frame text)`` for every frame a simulated
#: station or the sandbox CSMS handles (tests validate them against the OCA schemas).
FrameLog = Callable[[str, str, str], None]


async def demo_main(
    stations: int = 6,
    duration_s: float = 0.0,
    plain: bool = False,
    out: TextIO | None = None,
    *,
    seed: int = DEFAULT_SEED,
    stop: StopRequest | None = None,
    frame_log: FrameLog | None = None,
    timings: SimTimings = DEFAULT_TIMINGS,
    clock: WallClock = utc_now,
    ems: EmsPlan | None = DEFAULT_EMS_PLAN,
    firmware_after_s: float | None = 5.0,
    grid_amperes: float | None = DEMO_GRID_AMPERES,
    outage: OutagePlan | None = DEFAULT_OUTAGE_PLAN,
    building: BuildingPlan | None = DEFAULT_BUILDING_PLAN,
) -> DemoSummary:
    """Run the demo until ``duration_s`` (0: no limit) elapses or ``stop`` is requested; return a summary.

    Writes a live view to ``out`` when it is a terminal and ``plain`` is false, else one line per
    notable event; the summary is printed at the end in both cases. ``ems`` is the EMS script (None:
    none), ``firmware_after_s`` when, after the controller's boot, the sandbox CSMS publishes firmware
    (None: never), ``grid_amperes`` the site's grid limit per phase (None: unlimited), ``outage`` when
    and for how long the sandbox CSMS goes away (None: never), ``building`` the simulated building's
    load behind a grid meter the controller reads (None, or without a grid limit: no meter).
    """
    out = sys.stdout if out is None else out
    stop = StopRequest() if stop is None else stop
    output = Output(out, live=not plain and out.isatty(), clock=clock, on_closed=stop.request)
    capture = LogCapture(None if output.live else output.line)
    root = logging.getLogger()
    root.addHandler(capture)
    model = SiteModel()
    started_s = trio.current_time()
    sims: list[SimulatedStation] = []
    app: App | None = None
    specs = station_specs(stations, seed)
    ems_events: list[EmsEvent] = []
    # A one-element cell: the EMS script writes what it did, the live view reads it.
    ems_state = [f"{ems.source} lowers the limit at {ems.lower_at_s:g} s" if ems is not None else "none"]
    source = FirmwareSource(FIRMWARE_NAME, seed=seed)
    csms = SandboxCsms(path=OCPP_PATH, seed=seed, clock=clock, frame_log=frame_log, on_event=output.line)
    site_limit = "-"
    outage_record = None if outage is None else OutageRecord(outage)
    building_meter = None if building is None or grid_amperes is None else BuildingMeter(building, started_s)
    state = tempfile.TemporaryDirectory(prefix="ocpp-lc-demo-")
    try:
        async with trio.open_nursery() as everything:
            await everything.start(source.serve)
            target = FIRMWARE_TARGET if FIRMWARE_TARGET in {spec.identity for spec in specs} else specs[0].identity
            if firmware_after_s is not None:
                csms.firmware_plan = FirmwarePlan(
                    controller_identity=CONTROLLER_IDENTITY,
                    location=source.url(),
                    md5=source.md5,
                    target_station=target,
                    publish_after_s=firmware_after_s,
                )
            csms_port: int = await everything.start(csms.serve)
            meter, other_load = None, None
            if building_meter is not None:
                meter_port: int = await everything.start(building_meter.serve)
                meter = meter_entry(building_meter.plan, meter_port)
                other_load = building_meter.plan.worst_case_amperes()
            settings = demo_settings(
                csms_port,
                Path(state.name),
                specs,
                grid_amperes=grid_amperes,
                meter=meter,
                other_load_amperes=other_load,
            )
            app = await everything.start(run_app, settings)
            site_limit = limit_text(app.limits.status()["phases"])
            header = Header(
                identity=CONTROLLER_IDENTITY,
                station_url=f"ws://127.0.0.1:{app.station_port}{OCPP_PATH}/<id>",
                metrics_url=f"http://127.0.0.1:{app.http_port}/metrics",
                csms_url=settings.csms.url,
            )
            stopping = trio.Event()
            sims = [
                SimulatedStation(
                    spec.identity,
                    host="127.0.0.1",
                    port=app.station_port,
                    path=OCPP_PATH,
                    rng=random.Random(f"{seed}-station-{number}"),
                    stopping=stopping,
                    timings=timings,
                    clock=clock,
                    frame_log=frame_log,
                    phases=spec.phases,
                    max_current_amperes=spec.max_current_amperes,
                )
                for number, spec in enumerate(specs, start=1)
            ]
            if building_meter is not None:
                rotations = [spec.phase_rotation for spec in specs]
                building_meter.measure(
                    lambda: [(sim.currents_amperes, rotation) for sim, rotation in zip(sims, rotations, strict=True)]
                )
            output.line(f"ocpp-lc demo: controller {CONTROLLER_IDENTITY} takes stations on {header.station_url}")
            output.line(f"sandbox CSMS on {header.csms_url}, metrics on {header.metrics_url}")
            output.line(f"vendor firmware server on http://127.0.0.1:{source.port}/ (the file: {FIRMWARE_NAME})")
            output.line(
                f"{stations} simulated stations; "
                + (f"stopping after {duration_s:g} s or on Ctrl-C" if duration_s else "Ctrl-C to stop")
            )
            output.line(f"site limit {site_limit}: the controller balances the stations' sessions under it")
            if meter is not None:
                output.line(
                    f"building behind a SunSpec grid meter on 127.0.0.1:{meter['port']} (Modbus TCP): "
                    "the EVs get what the building leaves"
                )
            capacity = max(OBSERVER_CAPACITY_MIN, OBSERVER_CAPACITY_PER_STATION * stations)
            with app.hub.subscribe("demo", capacity) as observations:
                async with trio.open_nursery() as watchers:
                    watchers.start_soon(_watch_urgent, stop, everything.cancel_scope)
                    watchers.start_soon(_follow, observations, model, output)
                    if output.live:
                        watchers.start_soon(
                            _redraw,
                            output,
                            model,
                            header,
                            app,
                            capture,
                            started_s,
                            ems_state,
                            csms.firmware,
                            outage_record,
                            None if building_meter is None else building_meter.record,
                        )
                    if building_meter is not None:
                        watchers.start_soon(building_meter.watch, app, output.line)
                    if ems is not None:
                        watchers.start_soon(ems_script, ems, app, output, started_s, ems_events, ems_state)
                    if outage is not None and outage_record is not None:
                        watchers.start_soon(
                            outage_script, outage, csms, app, output.line, started_s, outage_record, capture.expect
                        )
                    async with trio.open_nursery() as fleet:
                        for sim in sims:
                            fleet.start_soon(sim.run)
                        with trio.move_on_after(duration_s if duration_s > 0 else math.inf):
                            await stop.graceful.wait()
                        output.line("stopping: the controller closes every station connection with 1001")
                        stopping.set()
                        app.request_shutdown()
                        # Stations end once they see the close; give them the appliance's grace and a bit.
                        fleet.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S + 2.0
                    with trio.move_on_after(SHUTDOWN_GRACE_S):
                        await app.stopped.wait()
                    watchers.cancel_scope.cancel()
                _drain(observations, model, output)
            everything.cancel_scope.cancel()  # the sandbox CSMS (the appliance has stopped)
    finally:
        root.removeHandler(capture)
        state.cleanup()
    # No app: stopped (a second Ctrl-C) before the appliance was up, so nothing was relayed.
    counters = read_counters(app.metrics) if app is not None else RelayCounters({}, 0, 0, 0)
    station_closes: Counter[int] = Counter()
    for sim in sims:
        station_closes.update(sim.stats.close_codes)
    summary = DemoSummary(
        stations=stations,
        booted=tuple(model.booted),
        transactions_started=model.transactions_started,
        transactions_ended=model.transactions_ended,
        meter_samples=model.meter_samples,
        csms_calls_relayed=model.csms_calls,
        csms_calls_answered=model.csms_calls_answered,
        frames_station_to_csms=counters.frames_to("station_to_csms"),
        frames_csms_to_station=counters.frames_to("csms_to_station"),
        payload_bytes=counters.payload_bytes,
        wire_bytes=counters.wire_bytes,
        energy_wh=model.energy_wh,
        errors=model.call_errors + capture.count,
        station_closes=dict(station_closes),
        duration_s=trio.current_time() - started_s,
        observations_missed=counters.observations_missed,
        site_limit=site_limit,
        profiles=read_profile_counts(app.registry) if app is not None else {},
        ems_events=tuple(ems_events),
        firmware=csms.firmware,
        outage=outage_record,
        building=None if building_meter is None else building_meter.record,
    )
    output.write("\n".join(output.text(line) for line in summary.lines()) + "\n")
    return summary


async def _watch_urgent(stop: StopRequest, scope: trio.CancelScope) -> None:
    await stop.urgent.wait()
    scope.cancel()


async def _follow(observations: trio.MemoryReceiveChannel[Observation], model: SiteModel, output: Output) -> None:
    async for event in observations:
        for sentence in model.apply(event):
            output.line(sentence)


def _drain(observations: trio.MemoryReceiveChannel[Observation], model: SiteModel, output: Output) -> None:
    """Take in what was observed during shutdown (the disconnections), without waiting."""
    while True:
        try:
            event = observations.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        for sentence in model.apply(event):
            output.line(sentence)


async def _redraw(
    output: Output,
    model: SiteModel,
    header: Header,
    app: App,
    capture: LogCapture,
    started_s: float,
    ems_state: list[str],
    firmware: FirmwareProgress,
    outage: OutageRecord | None,
    building: BuildingRecord | None,
) -> None:
    """Redraw the live view in place, twice a second, on the terminal's alternate screen."""
    output.enter_screen()
    try:
        while True:
            width, height = output.size()
            now_s = trio.current_time()
            lines = render_live(
                model,
                header,
                read_counters(app.metrics),
                uptime_s=now_s - started_s,
                clock=(now_s, utc_now()),
                width=width,
                height=height,
                unicode=output.unicode,
                notes=capture.recent,
                balance=site_balance(
                    app.status(),
                    ems=ems_state[0],
                    firmware=firmware_text(firmware),
                    outage="none" if outage is None else outage.text(now_s - started_s),
                    building=""
                    if building is None
                    else building.text(app.status().get("meters"), now_s - started_s, "·" if output.unicode else "|"),
                ),
            )
            output.frame(lines)
            await trio.sleep(REDRAW_INTERVAL_S)
    finally:
        output.leave_screen()


def firmware_text(firmware: FirmwareProgress) -> str:
    """How the firmware story is going, in a few words for the view."""
    if firmware.publish_answer is None:
        return "the sandbox CSMS publishes a file through the controller shortly"
    text = f"publish {firmware.publish_status or firmware.publish_answer} ({FIRMWARE_NAME})"
    if firmware.update_station is not None:
        status = firmware.station_status.get(firmware.update_station) or firmware.update_answer or "asked"
        text += f"; {firmware.update_station} update: {status}"
    return text


async def _run_with_signals(stations: int, duration_s: float, plain: bool, early_signals: list[int]) -> None:
    stop = StopRequest()
    # The first SIGINT/SIGTERM asks for a graceful stop, a second one for an immediate one.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def listen() -> None:
                async for _ in signals:
                    stop.request()

            nursery.start_soon(listen)
            if early_signals:  # Ctrl-C while starting: stop as soon as there is something to stop
                stop.request()
            await demo_main(stations, duration_s, plain, sys.stdout, stop=stop)
            nursery.cancel_scope.cancel()


def run_in_foreground(stations: int, duration_s: float, plain: bool, early_signals: list[int]) -> int:
    """Run the demo until it stops; return the exit code (0 when it ran and stopped cleanly).

    The caller has replaced Python's SIGINT handler (no KeyboardInterrupt, so no traceback, however
    early Ctrl-C comes); ``early_signals`` fills with the SIGINTs that came before trio took over.
    """
    code = 0
    try:
        trio.run(_run_with_signals, stations, duration_s, plain, early_signals)
    except* OSError as group:  # a port or file descriptor the machine would not give
        print(f"demo could not start: {group.exceptions[0]}", file=sys.stderr)
        code = 1
    return code
