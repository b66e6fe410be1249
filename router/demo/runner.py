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
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import signal
import sys
import tempfile
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

import httpx
import trio

from ..app import App, run_app
from ..config import Settings, parse_settings
from ..observers import Observation
from .clock import WallClock, utc_now
from .firmware_source import FirmwareSource
from .outage import DEFAULT_OUTAGE_PLAN, OutagePlan, OutageRecord, outage_script
from .sandbox_csms import FirmwarePlan, FirmwareProgress, SandboxCsms
from .stations import DEFAULT_TIMINGS, SimTimings, SimulatedStation
from .view import (
    Header,
    RelayCounters,
    ScreenLine,
    SiteModel,
    format_bytes,
    limit_text,
    read_counters,
    read_profile_counts,
    render_live,
    site_balance,
    wall_time,
)

#: Seeds the stations' and the CSMS's random choices: the same seed gives the same story.
DEFAULT_SEED: Final = 2024
CONTROLLER_IDENTITY: Final = "LC-DEMO"
OCPP_PATH: Final = "/ocpp"
REDRAW_INTERVAL_S: Final = 0.5
#: How long the appliance may take to close every station on shutdown.
SHUTDOWN_GRACE_S: Final = 3.0
#: Events buffered for the view, per station. The view reads them as they come, but at start-up every
#: station connects and boots at once, and the view's task then gets the CPU only now and then.
OBSERVER_CAPACITY_PER_STATION: Final = 50
OBSERVER_CAPACITY_MIN: Final = 1000
#: The grid connection's limit per phase: well under what a dozen stations could draw (12 × 32 A).
DEMO_GRID_AMPERES: Final = 100.0
#: The vendor's firmware file the sandbox CSMS has the controller publish.
FIRMWARE_NAME: Final = "demo-fw-1.1.0.bin"
#: The station the sandbox CSMS updates from the published file.
FIRMWARE_TARGET: Final = "DEMO-01"
#: Stations wired on one phase, with their phase rotation (Part 2 §2.13.5): they load grid S and T,
#: not R, which the other stations' 1-phase EVs load (RST rotation).
ONE_PHASE_STATIONS: Final = {4: "STR", 9: "TRS"}

# ANSI control sequences for the live view: alternate screen, cursor, home, clear to end of line / screen.
_ENTER_SCREEN: Final = "\x1b[?1049h\x1b[?25l\x1b[2J"
_LEAVE_SCREEN: Final = "\x1b[?25h\x1b[?1049l"
_HOME: Final = "\x1b[H"
_CLEAR_LINE: Final = "\x1b[K"
_CLEAR_BELOW: Final = "\x1b[J"
_BOLD: Final = "\x1b[1m"
_RESET: Final = "\x1b[0m"

#: Receives ``(connection label, "sent" | "received", frame text)`` for every frame a simulated
#: station or the sandbox CSMS handles (tests validate them against the OCA schemas).
FrameLog = Callable[[str, str, str], None]


class StopRequest:
    """How the demo is told to stop: the first request is graceful, a second one is urgent."""

    def __init__(self) -> None:
        self.graceful = trio.Event()
        self.urgent = trio.Event()

    def request(self) -> None:
        """Ask for a graceful stop; asked again, stop at once."""
        if self.graceful.is_set():
            self.urgent.set()
        self.graceful.set()


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


@dataclass(frozen=True, slots=True)
class StationSpec:
    """One simulated station, as wired on the site (and so as ``[site.stations]`` describes it)."""

    identity: str
    phases: int
    phase_rotation: str
    max_current_amperes: float


def _per_phase(amperes: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.0f}" for value in amperes) + " A"


def station_specs(count: int, seed: int = DEFAULT_SEED) -> list[StationSpec]:
    """The demo's stations: mostly 3-phase 16 or 32 A, two 1-phase 32 A ones with their own rotation."""
    width = max(2, len(str(count)))
    specs = []
    for number in range(1, count + 1):
        rotation = ONE_PHASE_STATIONS.get(number)
        rating = random.Random(f"{seed}-rating-{number}").choice((16.0, 32.0, 32.0))
        specs.append(
            StationSpec(
                identity=f"DEMO-{number:0{width}d}",
                phases=1 if rotation else 3,
                phase_rotation=rotation or "RST",
                max_current_amperes=32.0 if rotation else rating,
            )
        )
    return specs


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What happened during a demo run, as the controller saw it."""

    stations: int
    booted: tuple[str, ...]
    transactions_started: int
    transactions_ended: int
    meter_samples: int
    csms_calls_relayed: int
    csms_calls_answered: int
    frames_station_to_csms: int
    frames_csms_to_station: int
    payload_bytes: int
    wire_bytes: int
    energy_wh: float
    errors: int
    station_closes: dict[int, int]  # close code the stations' connections ended with → count
    duration_s: float
    observations_missed: int = 0  # events the view lost because it fell behind (it never slows the router)
    site_limit: str = "-"  # the configured grid limit, as the view shows it
    profiles: dict[str, int] = field(default_factory=dict)  # balancing's SetChargingProfile by outcome
    ems_events: tuple[EmsEvent, ...] = ()
    firmware: FirmwareProgress = field(default_factory=FirmwareProgress)
    firmware_name: str = FIRMWARE_NAME
    outage: OutageRecord | None = None

    def lines(self) -> list[str]:
        """The summary as printed at the end of the demo (fits 80 columns)."""
        closes = ", ".join(f"{count} with {code}" for code, count in sorted(self.station_closes.items())) or "none"
        in_progress = self.transactions_started - self.transactions_ended
        lines = [
            f"ocpp-lc demo summary ({self.duration_s:.0f} s)",
            f"  stations      {self.stations} simulated, {len(self.booted)} booted through the controller",
            f"  shutdown      station connections closed: {closes}",
            f"  transactions  {self.transactions_started} started, {self.transactions_ended} ended "
            f"({in_progress} in progress at shutdown)",
            f"  meter values  {self.meter_samples} samples relayed",
            f"  relayed       station → CSMS {self.frames_station_to_csms} messages, "
            f"CSMS → station {self.frames_csms_to_station}",
            f"  bytes         {format_bytes(self.payload_bytes)} of OCPP-J, "
            f"{format_bytes(self.wire_bytes)} on the wire",
            f"  CSMS calls    {self.csms_calls_relayed} relayed to stations, {self.csms_calls_answered} answered",
            f"  energy        {self.energy_wh / 1000:.3f} kWh delivered",
            f"  balancing     site limit {self.site_limit}; {self.profiles.get('sent', 0)} charging profiles "
            f"sent, {self.profiles.get('accepted', 0)} accepted",
        ]
        for event in self.ems_events:
            lines.append(f"  EMS           {event.action} at {event.at_s:.0f} s: {event.limit}")
            if event.settled_s is None:
                lines.append("                the stations did not follow in time")
            elif event.action == "lowered":
                peak = event.peak_drawn_amperes
                lines.append(
                    f"{'':16}stations within it after {event.settled_s:.1f} s"
                    + ("" if peak is None else f", drew at most {_per_phase(peak)} until released")
                )
            else:
                allowed = _per_phase(event.committed_amperes)
                lines.append(f"{'':16}stations allowed {allowed} again after {event.settled_s:.1f} s")
        firmware = self.firmware
        if firmware.publish_answer is not None:
            lines.append(
                f"  firmware      {self.firmware_name}: publish {firmware.publish_status or firmware.publish_answer}"
                + "".join(f"; {station} {status}" for station, status in sorted(firmware.station_status.items()))
            )
        if self.outage is not None:
            lines.extend(self.outage.lines())
        lines.append(f"  errors        {self.errors}")
        if self.observations_missed:
            lines.append(f"  (the view missed {self.observations_missed} observations: the figures above undercount)")
        return lines


class _LogCapture(logging.Handler):
    """Keeps warnings and errors from the run (the router's included) out of the live view's way."""

    def __init__(self, emit_line: Callable[[str], None] | None) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        #: Warnings during the planned outage (each station's lost CSMS connection ...): shown, not errors.
        self.expecting = False
        self.expected = 0
        self.recent: deque[str] = deque(maxlen=3)
        self._emit_line = emit_line

    def expect(self, expecting: bool) -> None:
        self.expecting = expecting

    def emit(self, record: logging.LogRecord) -> None:
        if self.expecting and record.levelno == logging.WARNING:
            self.expected += 1
        else:
            self.count += 1
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        self.recent.append(text)
        if self._emit_line is not None:
            self._emit_line(text)


class _Output:
    """Where the demo writes: line by line (``plain``) or full-screen frames (``live``).

    If the reader goes away (``ocpp-lc demo | head``), the demo stops as if Ctrl-C had been pressed.
    """

    def __init__(self, out: TextIO, *, live: bool, clock: WallClock, on_closed: Callable[[], None]) -> None:
        self.out = out
        self.live = live
        self.unicode = (getattr(out, "encoding", None) or "").lower().replace("-", "") in ("utf8", "utf8sig")
        self._origin = (trio.current_time(), clock())
        self._on_closed = on_closed
        self._closed = False

    def text(self, text: str) -> str:
        return text if self.unicode else text.replace("→", "->").replace("·", "|")

    def write(self, text: str) -> None:
        if self._closed:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            self._closed = True
            if self.out is sys.stdout:
                # What Python's documentation advises, so that the interpreter's own last flush of
                # stdout at exit does not complain about the pipe as well.
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self._on_closed()

    def line(self, text: str) -> None:
        """One timestamped line (plain mode only: the live view owns the screen)."""
        if not self.live:
            self.write(f"{wall_time(trio.current_time(), *self._origin)}  {self.text(text)}\n")

    def size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self.out.fileno())
        except (OSError, ValueError, AttributeError):
            return 80, 24
        return size.columns, size.lines

    def frame(self, lines: list[ScreenLine]) -> None:
        # Every line clears its own rest, the last one the rest of the screen; no newline after the
        # last line, so a full screen never scrolls.
        body = "\n".join(
            f"{_BOLD}{line.text}{_RESET}{_CLEAR_LINE}" if line.emphasis else f"{line.text}{_CLEAR_LINE}"
            for line in lines
        )
        self.write(_HOME + body + _CLEAR_BELOW)


def demo_settings(
    csms_port: int, state_dir: Path, stations: list[StationSpec] | None = None, *, grid_amperes: float | None = None
) -> Settings:
    """The appliance's settings for the demo: everything on loopback, ports chosen by the OS, state in
    ``state_dir`` (a throw-away folder: the demo never touches an installed controller's state).

    With ``grid_amperes`` the site has that grid limit and ``stations`` are described in ``[site]``;
    balancing runs either way, tuned for a demo whose sessions last seconds, not hours: reallocation
    every second, increases at most every 2 s per station, an EV that takes less than it is given
    handing the rest on after 5 s.
    """
    site: dict[str, object] = {
        "stations": [
            {
                "station_id": spec.identity,
                "phases": spec.phases,
                "phase_rotation": spec.phase_rotation,
                "evse_max_current_amperes": spec.max_current_amperes,
            }
            for spec in stations or []
        ],
        "policy": {"underdraw_grace_s": 5.0, "rotation_period_s": 20.0},
    }
    if grid_amperes is not None:
        site["grid"] = {"max_current_amperes": grid_amperes}
    return parse_settings(
        {
            "controller": {"identity": CONTROLLER_IDENTITY},
            "state": {"dir": str(state_dir)},
            "stations": {"listen": "127.0.0.1:0", "path": OCPP_PATH},
            "csms": {"url": f"ws://127.0.0.1:{csms_port}{OCPP_PATH}"},
            "routing": {"shutdown_grace_s": SHUTDOWN_GRACE_S},
            "http": {"listen": "127.0.0.1:0"},
            # One attempt a second: the local "vendor" server is up from the start.
            "firmware": {"retry_interval_s": 1},
            "site": site,
            "balancing": {"recompute_interval_s": 1.0, "min_interval_s": 2.0, "hysteresis_amperes": 1.0},
            # The outage lasts seconds, not hours: stations try the CSMS again at least every 2 s.
            "autonomy": {"reconnect_backoff_max_s": 2.0},
        },
        source="<demo>",
    )


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
) -> DemoSummary:
    """Run the demo until ``duration_s`` (0: no limit) elapses or ``stop`` is requested; return a summary.

    Writes a live view to ``out`` when it is a terminal and ``plain`` is false, else one line per
    notable event; the summary is printed at the end in both cases. ``ems`` is the EMS script (None:
    none), ``firmware_after_s`` when, after the controller's boot, the sandbox CSMS publishes firmware
    (None: never), ``grid_amperes`` the site's grid limit per phase (None: unlimited), ``outage`` when
    and for how long the sandbox CSMS goes away (None: never).
    """
    out = sys.stdout if out is None else out
    stop = StopRequest() if stop is None else stop
    output = _Output(out, live=not plain and out.isatty(), clock=clock, on_closed=stop.request)
    capture = _LogCapture(None if output.live else output.line)
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
            settings = demo_settings(csms_port, Path(state.name), specs, grid_amperes=grid_amperes)
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
            output.line(f"ocpp-lc demo: controller {CONTROLLER_IDENTITY} takes stations on {header.station_url}")
            output.line(f"sandbox CSMS on {header.csms_url}, metrics on {header.metrics_url}")
            output.line(f"vendor firmware server on http://127.0.0.1:{source.port}/ (the file: {FIRMWARE_NAME})")
            output.line(
                f"{stations} simulated stations; "
                + (f"stopping after {duration_s:g} s or on Ctrl-C" if duration_s else "Ctrl-C to stop")
            )
            output.line(f"site limit {site_limit}: the controller balances the stations' sessions under it")
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
                        )
                    if ems is not None:
                        watchers.start_soon(_ems_script, ems, app, output, started_s, ems_events, ems_state)
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
    )
    output.write("\n".join(output.text(line) for line in summary.lines()) + "\n")
    return summary


async def _ems_script(
    plan: EmsPlan,
    app: App,
    output: _Output,
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
        settled_s, drawn, committed = await _follow_balancing(
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
        settled_s, drawn, committed = await _follow_balancing(
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


def _say_settled(output: _Output, what: str, settled_s: float | None, drawn: tuple[float, float, float]) -> None:
    amperes = "/".join(f"{value:.0f}" for value in drawn)
    if settled_s is None:
        output.line(f"balancing: the stations draw {amperes} A per phase, not yet {what}")
    else:
        output.line(f"balancing: the stations draw {amperes} A per phase, {what} after {settled_s:.1f} s")


Phases = tuple[float, float, float]


async def _follow_balancing(
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


async def _watch_urgent(stop: StopRequest, scope: trio.CancelScope) -> None:
    await stop.urgent.wait()
    scope.cancel()


async def _follow(observations: trio.MemoryReceiveChannel[Observation], model: SiteModel, output: _Output) -> None:
    async for event in observations:
        for sentence in model.apply(event):
            output.line(sentence)


def _drain(observations: trio.MemoryReceiveChannel[Observation], model: SiteModel, output: _Output) -> None:
    """Take in what was observed during shutdown (the disconnections), without waiting."""
    while True:
        try:
            event = observations.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        for sentence in model.apply(event):
            output.line(sentence)


async def _redraw(
    output: _Output,
    model: SiteModel,
    header: Header,
    app: App,
    capture: _LogCapture,
    started_s: float,
    ems_state: list[str],
    firmware: FirmwareProgress,
    outage: OutageRecord | None,
) -> None:
    """Redraw the live view in place, twice a second, on the terminal's alternate screen."""
    output.write(_ENTER_SCREEN)
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
                ),
            )
            output.frame(lines)
            await trio.sleep(REDRAW_INTERVAL_S)
    finally:
        output.write(_LEAVE_SCREEN)


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
