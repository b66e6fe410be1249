"""``ocpp-lc demo``: a sandbox CSMS, the real appliance and simulated stations, in one trio run on loopback.

Theory of operation. :func:`demo_main` owns everything under one nursery: the sandbox CSMS (port 0),
the appliance started exactly as ``ocpp-lc run`` starts it (``run_app`` with settings from
``parse_settings``, stations and HTTP on 127.0.0.1 port 0), and N simulated stations connecting to
the controller. What the view shows comes from the controller's ObserverHub and its Prometheus
metrics, so the demo shows what went through the router, not what the simulators think they did.

Stopping (``duration_s`` elapsed, or the first Ctrl-C/SIGTERM in :func:`run_demo`) is the
appliance's own graceful shutdown: ``request_shutdown()`` closes every station with 1001, the
stations do not reconnect, then the CSMS stops. A second Ctrl-C cancels everything at once. Either
way the terminal is restored and a summary printed; nothing outlives the run.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import sys
import tempfile
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

import trio

from ..app import App, run_app
from ..config import Settings, parse_settings
from ..observers import Observation
from .clock import WallClock, utc_now
from .sandbox_csms import SandboxCsms
from .stations import DEFAULT_TIMINGS, SimTimings, SimulatedStation
from .view import Header, RelayCounters, ScreenLine, SiteModel, format_bytes, read_counters, render_live, wall_time

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
            f"  errors        {self.errors}",
        ]
        if self.observations_missed:
            lines.append(f"  (the view missed {self.observations_missed} observations: the figures above undercount)")
        return lines


class _LogCapture(logging.Handler):
    """Keeps warnings and errors from the run (the router's included) out of the live view's way."""

    def __init__(self, emit_line: Callable[[str], None] | None) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.recent: deque[str] = deque(maxlen=3)
        self._emit_line = emit_line

    def emit(self, record: logging.LogRecord) -> None:
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


def demo_settings(csms_port: int, state_dir: Path) -> Settings:
    """The appliance's settings for the demo: everything on loopback, ports chosen by the OS, state in
    ``state_dir`` (a throw-away folder: the demo never touches an installed controller's state)."""
    return parse_settings(
        {
            "controller": {"identity": CONTROLLER_IDENTITY},
            "state": {"dir": str(state_dir)},
            "stations": {"listen": "127.0.0.1:0", "path": OCPP_PATH},
            "csms": {"url": f"ws://127.0.0.1:{csms_port}{OCPP_PATH}"},
            "routing": {"shutdown_grace_s": SHUTDOWN_GRACE_S},
            "http": {"listen": "127.0.0.1:0"},
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
) -> DemoSummary:
    """Run the demo until ``duration_s`` (0: no limit) elapses or ``stop`` is requested; return a summary.

    Writes a live view to ``out`` when it is a terminal and ``plain`` is false, else one line per
    notable event; the summary is printed at the end in both cases.
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
    state = tempfile.TemporaryDirectory(prefix="ocpp-lc-demo-")
    try:
        async with trio.open_nursery() as everything:
            csms = SandboxCsms(path=OCPP_PATH, seed=seed, clock=clock, frame_log=frame_log)
            csms_port: int = await everything.start(csms.serve)
            settings = demo_settings(csms_port, Path(state.name))
            app = await everything.start(run_app, settings)
            header = Header(
                identity=CONTROLLER_IDENTITY,
                station_url=f"ws://127.0.0.1:{app.station_port}{OCPP_PATH}/<id>",
                metrics_url=f"http://127.0.0.1:{app.http_port}/metrics",
                csms_url=settings.csms.url,
            )
            stopping = trio.Event()
            width = max(2, len(str(stations)))
            sims = [
                SimulatedStation(
                    f"DEMO-{number:0{width}d}",
                    host="127.0.0.1",
                    port=app.station_port,
                    path=OCPP_PATH,
                    rng=random.Random(f"{seed}-station-{number}"),
                    stopping=stopping,
                    timings=timings,
                    clock=clock,
                    frame_log=frame_log,
                )
                for number in range(1, stations + 1)
            ]
            output.line(f"ocpp-lc demo: controller {CONTROLLER_IDENTITY} takes stations on {header.station_url}")
            output.line(f"sandbox CSMS on {header.csms_url}, metrics on {header.metrics_url}")
            output.line(
                f"{stations} simulated stations; "
                + (f"stopping after {duration_s:g} s or on Ctrl-C" if duration_s else "Ctrl-C to stop")
            )
            capacity = max(OBSERVER_CAPACITY_MIN, OBSERVER_CAPACITY_PER_STATION * stations)
            with app.hub.subscribe("demo", capacity) as observations:
                async with trio.open_nursery() as watchers:
                    watchers.start_soon(_watch_urgent, stop, everything.cancel_scope)
                    watchers.start_soon(_follow, observations, model, output)
                    if output.live:
                        watchers.start_soon(_redraw, output, model, header, app, capture, started_s)
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
    )
    output.write("\n".join(output.text(line) for line in summary.lines()) + "\n")
    return summary


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
    output: _Output, model: SiteModel, header: Header, app: App, capture: _LogCapture, started_s: float
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
            )
            output.frame(lines)
            await trio.sleep(REDRAW_INTERVAL_S)
    finally:
        output.write(_LEAVE_SCREEN)


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
