"""Forwarding benchmark: what putting ocpp-lc between stations and a CSMS costs.

Run by hand (not collected by pytest)::

    python tests/bench/forwarding.py [--stations 1,100,1000] [--seconds 10] [--json]

Theory of operation. Three kinds of process, each started from this file or as a user would start it:

* a **CSMS** (``forwarding.py csms``): `websockets` on asyncio, answering every CALL at once with a
  CALLRESULT. It listens twice, with and without permessage-deflate, so the memory run can switch
  compression off on both legs. The same CSMS process serves the direct and the relayed runs.
* the **controller**: ``ocpp-lc run --config <tmp toml>`` (the console script), stations and HTTP on
  127.0.0.1 port 0 (the bound ports are read from its start-up log line, so no other process can take
  them in between), pings off.
* a **load generator** (``forwarding.py load``): N station connections on `websockets`/asyncio, each
  in a closed loop (send a CALL, await its CALLRESULT, repeat), recording every call's latency.

For each message kind (a Heartbeat and a ~400-byte MeterValues) and each N, the same load runs twice:
DIRECT (stations → CSMS) and VIA (stations → controller → CSMS). Throughput is calls completed inside
the measuring window (after a warm-up) per second; latency is send-to-answer per call. The controller's
Prometheus counters are compared with the load generator's counts after every relayed run, so a frame
the controller loses shows up as a mismatch, and its log is scanned for warnings and errors.

Noise: the CPU time of every process and of the whole machine (``/proc/stat``) is sampled at both ends
of each window, so a row says how much other work ran meanwhile; a disturbed direct/via pair is run
again (``--retries``) and the least disturbed attempt is kept.

Then idle memory: a fresh controller per compression setting, RSS with 0 stations, with 1000 stations
connected and idle, and again after each station made one call (which is when permessage-deflate
allocates its zlib state); the differences divided by 1000 are the cost of one station pair.

Every child is started in its own session with PR_SET_PDEATHSIG, tracked by pid and stopped in a
``finally`` (SIGTERM, then SIGKILL); every wait has a deadline; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
PATH = "/ocpp"
SUBPROTOCOL = "ocpp2.0.1"
KINDS = ("hb", "mv")
KIND_NAMES = {"hb": "Heartbeat", "mv": "MeterValues"}

#: A call unanswered this long counts as a stall and ends that station's loop.
CALL_TIMEOUT_S = 10.0
#: Concurrent opening handshakes per load generator: a burst of 1000 SYNs would overflow accept queues.
CONNECT_CONCURRENCY = 50
CONNECT_DEADLINE_S = 90.0
START_DEADLINE_S = 20.0
STOP_GRACE_S = 10.0
#: Other work (in % of one CPU) during a measured window above which a run counts as disturbed. Our own
#: loopback traffic shows up as a few percent of softirq time that no process is charged for.
DISTURBED_PERCENT = 15.0
#: Time for the controller to settle before reading RSS (nothing observable to wait on: memory).
RSS_SETTLE_S = 1.0


# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------


def raise_nofile_limit() -> None:
    """Lift the soft open-files limit to the hard limit: 1000 stations need ~1000-2000 sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65_536, hard))


def emit(event: dict[str, Any]) -> None:
    """One JSON event per stdout line, flushed at once (the orchestrator waits on them)."""
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (nan when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# ------------------------------------------------------------------------------------------------
# Subcommand: csms
# ------------------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def _csms_main(port: int, plain_port: int) -> None:
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed
    from websockets.typing import Subprotocol

    async def handler(connection: ServerConnection) -> None:
        try:
            async for text in connection:
                message = json.loads(text)
                if message[0] != 2:
                    continue
                action = message[2]
                if action == "Heartbeat":
                    body = f'{{"currentTime":"{_utc_now()}"}}'
                elif action == "BootNotification":
                    body = f'{{"currentTime":"{_utc_now()}","interval":300,"status":"Accepted"}}'
                else:
                    body = "{}"
                await connection.send(f"[3,{json.dumps(message[1])},{body}]")
        except ConnectionClosed:
            pass

    options: dict[str, Any] = {
        "subprotocols": [Subprotocol(SUBPROTOCOL)],
        "ping_interval": None,
        "close_timeout": 2,
        "backlog": 2048,
    }
    async with (
        serve(handler, HOST, port, compression="deflate", **options) as deflating,
        serve(handler, HOST, plain_port, compression=None, **options) as plain,
    ):
        emit({"event": "listening", "port": _bound_port(deflating), "plain_port": _bound_port(plain)})
        # Until stdin closes (the orchestrator stopped or died) or a signal ends the process.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def _bound_port(server: Any) -> int:
    return int(next(iter(server.sockets)).getsockname()[1])


# ------------------------------------------------------------------------------------------------
# Subcommand: load
# ------------------------------------------------------------------------------------------------


def _meter_values_frame(message_id: str, sequence: int) -> str:
    # A realistic periodic sample (~400 bytes: energy register, current, power), values moving with
    # every call like a real meter's so that compression sees changing text.
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{sequence % 1000:03d}Z"
    energy_wh = 1_234_567.0 + sequence * 0.3
    amperes = 15.9 + sequence % 7 * 0.03
    return (
        f'[2,"{message_id}","MeterValues",{{"evseId":1,"meterValue":[{{"timestamp":"{stamp}",'
        f'"sampledValue":[{{"value":{energy_wh:.1f},"measurand":"Energy.Active.Import.Register",'
        f'"unitOfMeasure":{{"unit":"Wh"}}}},'
        f'{{"value":{amperes:.2f},"measurand":"Current.Import","phase":"L1","unitOfMeasure":{{"unit":"A"}}}},'
        f'{{"value":{amperes * 230:.0f},"measurand":"Power.Active.Import","unitOfMeasure":{{"unit":"W"}}}}]}}]}}]'
    )


def _frame(kind: str, message_id: str, sequence: int) -> str:
    if kind == "hb":
        return f'[2,"{message_id}","Heartbeat",{{}}]'
    return _meter_values_frame(message_id, sequence)


def _accept(call: str) -> str:
    """A CALLRESULT accepting ``call`` (SetChargingProfile and the like)."""
    return f'[3,{json.dumps(json.loads(call)[1])},{{"status":"Accepted"}}]'


@dataclass
class _LoadStats:
    sent: int = 0
    answered: int = 0
    timeouts: int = 0
    bad_replies: int = 0
    closed: int = 0
    latencies_s: list[float] = field(default_factory=list)


async def _call(connection: Any, index: int, sequence: int, kind: str, stats: _LoadStats) -> float | None:
    """One call; its latency in seconds, or None when it failed (counted in ``stats``)."""
    from websockets.exceptions import ConnectionClosed

    message_id = f"{index:08d}-{sequence:027d}"  # 36 characters, like the UUIDs stations use
    frame = _frame(kind, message_id, sequence)
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await connection.send(frame)
            stats.sent += 1
            reply = await connection.recv()
            while isinstance(reply, str) and reply.startswith("[2,"):
                # A call of the controller's own (balancing's charging profiles): answered, as a
                # station would, and not counted as a relayed call.
                await connection.send(_accept(reply))
                reply = await connection.recv()
    except TimeoutError:
        stats.timeouts += 1
        return None
    except ConnectionClosed:
        stats.closed += 1
        return None
    elapsed = time.perf_counter() - started
    stats.answered += 1
    if not (isinstance(reply, str) and reply.startswith(f'[3,"{message_id}"')):
        stats.bad_replies += 1
        return None
    return elapsed


async def _connect_all(url_base: str, stations: int, compression: str | None, prefix: str) -> list[Any]:
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    failures: list[str] = []

    async def one(index: int) -> Any:
        async with gate:
            try:
                return await connect(
                    f"{url_base}/{prefix}{index:05d}",
                    subprotocols=[Subprotocol(SUBPROTOCOL)],
                    compression=compression,
                    ping_interval=None,
                    open_timeout=30,
                    close_timeout=5,
                )
            except Exception as exc:  # counted and reported: a refused station is a result here
                failures.append(f"{type(exc).__name__}: {exc}")
                return None

    # At least 50 handshakes a second (through a proxy, two each): thousands of stations take minutes.
    async with asyncio.timeout(max(CONNECT_DEADLINE_S, stations / 50)):
        connections = await asyncio.gather(*(one(index) for index in range(stations)))
    if failures:
        emit({"event": "connect_failures", "count": len(failures), "first": failures[:3]})
    return [connection for connection in connections if connection is not None]


async def _close_all(connections: list[Any]) -> None:
    async with asyncio.timeout(30):
        await asyncio.gather(*(connection.close() for connection in connections), return_exceptions=True)


async def _load_run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    connections = await _connect_all(args.url, args.stations, args.compression, args.prefix)
    compressed = sum(1 for connection in connections if connection.protocol.extensions)
    emit(
        {
            "event": "connected",
            "count": len(connections),
            "compressed": compressed,
            "seconds": time.perf_counter() - started,
        }
    )
    stats = _LoadStats()
    loop_start = time.perf_counter()
    window_start, window_end = loop_start + args.warmup, loop_start + args.warmup + args.seconds

    async def station(index: int, connection: Any) -> None:
        sequence = 0
        while time.perf_counter() < window_end:
            sequence += 1
            latency_s = await _call(connection, index, sequence, args.kind, stats)
            if latency_s is None:
                return
            done = time.perf_counter()
            if window_start <= done <= window_end:
                stats.latencies_s.append(latency_s)

    async def marks() -> None:
        # The orchestrator samples CPU times of every process on these two lines.
        await asyncio.sleep(window_start - time.perf_counter())
        emit({"event": "window_start"})
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        emit({"event": "window_end"})

    async with asyncio.timeout(args.warmup + args.seconds + CALL_TIMEOUT_S + 10):
        await asyncio.gather(marks(), *(station(index, conn) for index, conn in enumerate(connections)))
    await _close_all(connections)
    latencies = sorted(stats.latencies_s)
    emit(
        {
            "event": "result",
            "stations": args.stations,
            "connected": len(connections),
            "compressed": compressed,
            "calls": len(latencies),
            "window_s": args.seconds,
            "calls_per_s": len(latencies) / args.seconds,
            "p50_ms": percentile(latencies, 0.50) * 1e3,
            "p90_ms": percentile(latencies, 0.90) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "max_ms": (latencies[-1] if latencies else math.nan) * 1e3,
            "sent": stats.sent,
            "answered": stats.answered,
            "timeouts": stats.timeouts,
            "bad_replies": stats.bad_replies,
            "closed": stats.closed,
            "frame_bytes": len(_frame(args.kind, "0" * 36, 1)),
        }
    )


async def _load_idle(args: argparse.Namespace) -> None:
    """Connect, then obey stdin lines: ``call`` (one call per station, all at once), ``close``."""
    connections = await _connect_all(args.url, args.stations, args.compression, args.prefix)
    compressed = sum(1 for connection in connections if connection.protocol.extensions)
    emit({"event": "connected", "count": len(connections), "compressed": compressed})
    loop = asyncio.get_running_loop()
    sequence = 0
    while True:
        command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if command == "call":
            sequence += 1
            stats = _LoadStats()
            await asyncio.gather(
                *(_call(connection, index, sequence, args.kind, stats) for index, connection in enumerate(connections))
            )
            emit({"event": "called", "answered": stats.answered, "failed": stats.timeouts + stats.closed})
        else:  # "close" or EOF
            await _close_all(connections)
            emit({"event": "closed"})
            return


def _load_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="forwarding.py load")
    parser.add_argument("--url", required=True, help="ws://host:port/path; '/<identity>' is appended")
    parser.add_argument("--stations", type=int, required=True)
    parser.add_argument("--kind", choices=KINDS, default="hb")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--compression", choices=("deflate", "none"), default="deflate")
    parser.add_argument("--prefix", default="BENCH")
    parser.add_argument("--idle", action="store_true", help="connect and wait for commands on stdin")
    args = parser.parse_args(argv)
    args.compression = None if args.compression == "none" else args.compression
    raise_nofile_limit()
    asyncio.run(_load_idle(args) if args.idle else _load_run(args))


# ------------------------------------------------------------------------------------------------
# Orchestrator: child processes
# ------------------------------------------------------------------------------------------------


class BenchError(Exception):
    """A phase failed or missed its deadline; the message says which and what was seen."""


_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _child_setup(cpus: set[int] | None) -> None:
    # Runs in the child between fork and exec: die with the orchestrator, lift the fd limit (inherited
    # through exec, so the controller gets it too), and pin to the chosen CPUs.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    raise_nofile_limit()
    if cpus:
        os.sched_setaffinity(0, cpus)


class Child:
    """A process we started: its lines (stdout or stderr, copied to a log file) and its pid."""

    def __init__(
        self, name: str, argv: list[str], *, log_dir: Path, cpus: set[int] | None, watch: str = "stdout"
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: TextIO = self.log_path.open("a", encoding="utf-8")
        self._log.write(f"# {' '.join(argv)}\n")
        self._log.flush()
        watched = subprocess.PIPE
        self.popen = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=watched if watch == "stdout" else subprocess.DEVNULL,
            stderr=watched if watch == "stderr" else self._log,
            text=True,
            bufsize=1,
            start_new_session=True,  # a terminal Ctrl-C reaches only us; we stop the children in order
            preexec_fn=lambda: _child_setup(cpus),
        )
        self.pid = self.popen.pid
        self.lines: list[str] = []
        self._changed = threading.Condition()
        stream = self.popen.stdout if watch == "stdout" else self.popen.stderr
        assert stream is not None
        self._reader = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._reader.start()

    def _read(self, stream: TextIO) -> None:
        for line in stream:
            self._log.write(line)
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def expect(self, predicate: Callable[[str], bool], timeout_s: float, what: str, start: int = 0) -> tuple[int, str]:
        """Wait for a line (from index ``start``) matching ``predicate``; (its index, the line)."""
        deadline = time.monotonic() + timeout_s
        index = start
        with self._changed:
            while True:
                while index < len(self.lines):
                    if predicate(self.lines[index]):
                        return index, self.lines[index]
                    index += 1
                remaining = deadline - time.monotonic()
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise BenchError(f"{self.name} exited with {self.popen.returncode} before {what}{self._tail()}")
                if remaining <= 0:
                    raise BenchError(f"{self.name}: no {what} within {timeout_s:g} s{self._tail()}")
                self._changed.wait(min(remaining, 0.5))

    def expect_event(self, event: str, timeout_s: float, start: int = 0) -> tuple[int, dict[str, Any]]:
        """Wait for the JSON event line ``event``; (its index, the event)."""

        def matches(line: str) -> bool:
            return line.startswith("{") and json.loads(line).get("event") == event

        index, line = self.expect(matches, timeout_s, f"'{event}' event", start)
        return index, json.loads(line)

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text + "\n")
        self.popen.stdin.flush()

    def _tail(self) -> str:
        self._log.flush()
        tail = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        return "\n  last lines of " + str(self.log_path) + ":\n    " + "\n    ".join(tail)

    def cpu_s(self) -> float:
        """User + system CPU seconds so far (from /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        """Resident set size in KiB (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise BenchError(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
        with contextlib.suppress(OSError, ValueError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(5)
        self._log.close()


class Children:
    """Every child of this run, stopped in reverse order on exit, whatever happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._live: list[Child] = []

    def start(self, name: str, argv: list[str], *, cpus: set[int] | None, watch: str = "stdout") -> Child:
        child = Child(name, argv, log_dir=self.log_dir, cpus=cpus, watch=watch)
        self._live.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self._live:
            self._live.remove(child)

    def stop_all(self) -> None:
        while self._live:
            self.stop(self._live[-1])


# ------------------------------------------------------------------------------------------------
# Orchestrator: the controller
# ------------------------------------------------------------------------------------------------

_UP_LINE = re.compile(r"up: stations on port (\d+), HTTP on port (\d+)")
_PROBLEM_LINE = re.compile(r"^\S+ (WARNING|ERROR|CRITICAL) |^Traceback")


@dataclass
class Controller:
    child: Child
    station_port: int
    http_port: int

    def http_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=5) as response:
            return str(response.read().decode())

    def stations_connected(self) -> int:
        return int(json.loads(self.http_get("/healthz"))["stations_connected"])

    def wait_stations(self, expected: int, timeout_s: float) -> None:
        """Wait until /healthz reports ``expected`` stations (polled: another process's state)."""
        deadline = time.monotonic() + timeout_s
        while (seen := self.stations_connected()) != expected:
            if time.monotonic() > deadline:
                raise BenchError(f"controller reports {seen} stations, expected {expected}, after {timeout_s:g} s")
            time.sleep(0.05)

    def counters(self) -> dict[str, float]:
        """Sums of the counters this benchmark checks, from /metrics."""
        sums: dict[str, float] = {}
        for line in self.http_get("/metrics").splitlines():
            if line.startswith("#") or not line.startswith("ocpp_lc_"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            key = name
            direction = re.search(r'direction="([a-z_]+)"', name_labels)
            reason = re.search(r'reason="([a-z_]+)"', name_labels)
            if name == "ocpp_lc_frames_total" and direction:
                key = f"frames:{direction[1]}"
            elif reason and name in ("ocpp_lc_pair_closes_total", "ocpp_lc_handshake_refusals_total"):
                key = f"{name.removeprefix('ocpp_lc_').removesuffix('_total')}:{reason[1]}"
            elif name not in (
                "ocpp_lc_handler_errors_total",
                "ocpp_lc_invalid_frames_total",
                "ocpp_lc_unanswered_calls_total",
                "ocpp_lc_held_csms_calls_total",
            ):
                continue
            sums[key] = sums.get(key, 0.0) + float(value)
        return sums

    def problems_since(self, start: int) -> list[str]:
        return [line for line in self.child.lines[start:] if _PROBLEM_LINE.search(line)]


def default_controller_command() -> list[str]:
    """The console script next to this interpreter, as a user runs it (or its entry point)."""
    script = Path(sys.executable).with_name("ocpp-lc")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from router.cli import main; main()"]


def start_controller(
    children: Children,
    command: list[str],
    csms_port: int,
    cpus: set[int] | None,
    name: str,
    *,
    balancing: bool = True,
    max_stations: int = 5000,
) -> Controller:
    config = children.log_dir / f"{name}.toml"
    config.write_text(
        "\n".join(
            [
                "[controller]",
                'identity = "LC01"',
                "connect = false",  # only the relayed stations are measured
                "[state]",
                f'dir = "{children.log_dir / (name + "-state")}"',
                "[stations]",
                f'listen = "{HOST}:0"',  # port 0: the log line tells which; no window for another process
                f'path = "{PATH}"',
                "ping_interval_s = 0",
                "handshake_timeout_s = 60",
                f"max_stations = {max_stations}",
                "[csms]",
                f'url = "ws://{HOST}:{csms_port}{PATH}"',
                "ping_interval_s = 0",
                "connect_timeout_s = 60",
                "[routing]",
                "shutdown_grace_s = 2",
                "[http]",
                f'listen = "{HOST}:0"',
                "[log]",
                'level = "info"',
                "[balancing]",
                f"enabled = {'true' if balancing else 'false'}",
                "",
            ]
        )
    )
    child = children.start(name, [*command, "run", "--config", str(config)], cpus=cpus, watch="stderr")
    _, line = child.expect(lambda text: bool(_UP_LINE.search(text)), START_DEADLINE_S, "start-up line")
    match = _UP_LINE.search(line)
    assert match is not None
    return Controller(child, int(match[1]), int(match[2]))


# ------------------------------------------------------------------------------------------------
# Orchestrator: phases
# ------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Which CPUs each process may use (None: wherever the kernel likes)."""

    load: set[int] | None
    csms: set[int] | None
    controller: set[int] | None
    description: str


def choose_layout(pin: bool) -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) >= 2:
        first, second = {cpus[0]}, {cpus[1]}
        os.sched_setaffinity(0, first)  # this script only waits on pipes; keep it off the controller's CPU
        return Layout(
            first,
            first,
            second,
            f"pinned: load generator + CSMS + this script share CPU {cpus[0]}; the controller has CPU {cpus[1]} "
            f"to itself (DIRECT runs leave CPU {cpus[1]} idle)",
        )
    return Layout(None, None, None, f"unpinned: every process shares CPUs {cpus} (the kernel schedules)")


def machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, all CPUs together (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def run_load(
    children: Children,
    url: str,
    stations: int,
    kind: str,
    seconds: float,
    warmup: float,
    layout: Layout,
    watched: list[Child],
    prefix: str,
) -> dict[str, Any]:
    """One closed-loop run; the load generator's result plus CPU use of ``watched`` in the window."""
    argv = [
        sys.executable,
        __file__,
        "load",
        "--url",
        url,
        "--stations",
        str(stations),
        "--kind",
        kind,
        "--seconds",
        str(seconds),
        "--warmup",
        str(warmup),
        "--prefix",
        prefix,
    ]
    load = children.start(f"load-{prefix}-{kind}-{stations}", argv, cpus=layout.load)
    try:
        index, connected = load.expect_event("connected", CONNECT_DEADLINE_S + 10)
        index, _ = load.expect_event("window_start", warmup + 10, index)
        before = {child.name: child.cpu_s() for child in [load, *watched]}
        machine_before, began = machine_cpu_s(), time.monotonic()
        index, _ = load.expect_event("window_end", seconds + 10, index)
        wall_s = time.monotonic() - began
        cpu_percent = {child.name: (child.cpu_s() - before[child.name]) / wall_s * 100 for child in [load, *watched]}
        busy_s, steal_s = (after - earlier for after, earlier in zip(machine_cpu_s(), machine_before, strict=True))
        ours_s = sum(cpu_percent.values()) / 100 * wall_s
        # What the rest of the machine (other users, this script, stray softirq time) took meanwhile.
        cpu_percent["others"] = max(0.0, busy_s - ours_s) / wall_s * 100
        cpu_percent["steal"] = steal_s / wall_s * 100
        _, result = load.expect_event("result", CALL_TIMEOUT_S + 45, index)
        load.popen.wait(15)
    finally:
        children.stop(load)
    result["connect_s"] = connected["seconds"]
    result["cpu_percent"] = {name.split("-")[0]: round(value, 1) for name, value in cpu_percent.items()}
    return result


def throughput_phase(
    children: Children, args: argparse.Namespace, layout: Layout, csms: Child, csms_port: int
) -> list[dict[str, Any]]:
    controller = start_controller(children, args.controller, csms_port, layout.controller, "controller")
    rows: list[dict[str, Any]] = []
    try:
        for kind in args.kinds:
            for stations in args.stations:
                # Other users of the machine make a run slower than it is: repeat a disturbed pair and
                # keep the attempt the rest of the machine disturbed least.
                attempts = []
                for attempt in range(1 + args.retries):
                    attempts.append(measure_pair(children, args, layout, csms, csms_port, controller, kind, stations))
                    if attempts[-1]["disturbance"] <= DISTURBED_PERCENT:
                        break
                    if attempt < args.retries:
                        _say(args, f"    disturbed ({attempts[-1]['disturbance']:.0f}% of a CPU by others): again")
                best = min(attempts, key=lambda row: row["disturbance"])
                best["attempts"] = len(attempts)
                rows.append(best)
    finally:
        children.stop(controller.child)
    return rows


def measure_pair(
    children: Children,
    args: argparse.Namespace,
    layout: Layout,
    csms: Child,
    csms_port: int,
    controller: Controller,
    kind: str,
    stations: int,
) -> dict[str, Any]:
    """The same load direct and via the controller: one table row."""
    row: dict[str, Any] = {"kind": kind, "stations": stations}
    direct_url = f"ws://{HOST}:{csms_port}{PATH}"
    row["direct"] = run_load(children, direct_url, stations, kind, args.seconds, args.warmup, layout, [csms], "D")
    _say(args, f"  {KIND_NAMES[kind]:<11} N={stations:<5} direct {row['direct']['calls_per_s']:>8.0f} calls/s")
    controller.wait_stations(0, 30)
    log_mark, counters_before = len(controller.child.lines), controller.counters()
    via_url = f"ws://{HOST}:{controller.station_port}{PATH}"
    watched = [csms, controller.child]
    row["via"] = run_load(children, via_url, stations, kind, args.seconds, args.warmup, layout, watched, "V")
    _say(args, f"  {KIND_NAMES[kind]:<11} N={stations:<5} via    {row['via']['calls_per_s']:>8.0f} calls/s")
    controller.wait_stations(0, 30)
    counters_after = controller.counters()
    delta = {key: counters_after[key] - counters_before.get(key, 0.0) for key in counters_after}
    row["controller"] = check_relay(row["via"], delta, controller.problems_since(log_mark))
    row["disturbance"] = max(
        run["cpu_percent"]["others"] + run["cpu_percent"]["steal"] for run in (row["direct"], row["via"])
    )
    return row


def check_relay(via: dict[str, Any], delta: dict[str, float], problems: list[str]) -> dict[str, Any]:
    """Compare what the controller counted with what the load generator sent and got back."""
    relayed_up = delta.get("frames:station_to_csms", 0.0)
    relayed_down = delta.get("frames:csms_to_station", 0.0)
    findings = []
    if relayed_up != via["sent"]:
        findings.append(f"relayed {relayed_up:.0f} frames upstream, stations sent {via['sent']}")
    if relayed_down != via["answered"]:
        findings.append(f"relayed {relayed_down:.0f} frames downstream, stations got {via['answered']}")
    for key, value in sorted(delta.items()):
        bad_close = key.startswith("pair_closes:") and key != "pair_closes:station_closed"
        if value and (bad_close or not key.startswith(("frames:", "pair_closes:"))):
            findings.append(f"{key} +{value:.0f}")
    return {"findings": findings, "log_problems": len(problems), "log_examples": problems[:5]}


def memory_phase(
    children: Children, args: argparse.Namespace, layout: Layout, ports: dict[str, int]
) -> list[dict[str, Any]]:
    rows = []
    for compression in args.memory_compression:
        port = ports["port"] if compression == "deflate" else ports["plain_port"]
        controller = start_controller(
            children, args.controller, port, layout.controller, f"controller-mem-{compression}"
        )
        try:
            url = f"ws://{HOST}:{controller.station_port}{PATH}"
            # One station through first, so one-off costs (lazy imports, first buffers) are not
            # charged to the thousand.
            idle_pair(children, controller, url, 1, compression, layout, [])
            time.sleep(RSS_SETTLE_S)
            baseline = controller.child.rss_kib()
            samples: list[int] = []
            negotiated = idle_pair(children, controller, url, args.memory_stations, compression, layout, samples)
            rows.append(
                {
                    "compression": compression,
                    "stations": args.memory_stations,
                    "compressed_station_legs": negotiated,
                    "rss_0_kib": baseline,
                    "rss_connected_kib": samples[0],
                    "rss_after_call_kib": samples[1],
                    "kib_per_pair_connected": (samples[0] - baseline) / args.memory_stations,
                    "kib_per_pair_after_call": (samples[1] - baseline) / args.memory_stations,
                }
            )
            _say(args, f"  memory {compression}: {rows[-1]['kib_per_pair_after_call']:.1f} KiB per pair after a call")
        finally:
            children.stop(controller.child)
    return rows


def idle_pair(
    children: Children,
    controller: Controller,
    url: str,
    stations: int,
    compression: str,
    layout: Layout,
    samples: list[int],
) -> int:
    """Connect ``stations`` idle stations; RSS into ``samples`` when connected and after one call each."""
    argv = [
        sys.executable,
        __file__,
        "load",
        "--idle",
        "--url",
        url,
        "--stations",
        str(stations),
        "--kind",
        "mv",
        "--compression",
        compression,
        "--prefix",
        "M",
    ]
    load = children.start(f"load-idle-{compression}-{stations}", argv, cpus=layout.load)
    try:
        index, connected = load.expect_event("connected", CONNECT_DEADLINE_S + 10)
        if connected["count"] != stations:
            raise BenchError(f"only {connected['count']} of {stations} idle stations connected")
        controller.wait_stations(stations, 30)
        time.sleep(RSS_SETTLE_S)
        samples.append(controller.child.rss_kib())
        load.send_line("call")
        index, called = load.expect_event("called", CALL_TIMEOUT_S + 30, index)
        if called["answered"] != stations:
            raise BenchError(f"idle stations: {called['answered']} of {stations} calls answered")
        time.sleep(RSS_SETTLE_S)
        samples.append(controller.child.rss_kib())
        load.send_line("close")
        load.expect_event("closed", 40, index)
        load.popen.wait(15)
    finally:
        children.stop(load)
    controller.wait_stations(0, 30)
    return int(connected["compressed"])


# ------------------------------------------------------------------------------------------------
# Orchestrator: report
# ------------------------------------------------------------------------------------------------


def _say(args: argparse.Namespace, text: str) -> None:
    # Progress goes to stderr so that --json output on stdout stays one document.
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "-"


def _cpu_us_per_call(run: dict[str, Any], percent: float) -> float:
    return percent / 100 * run["window_s"] / run["calls"] * 1e6 if run["calls"] else math.nan


def report(result: dict[str, Any]) -> Iterator[str]:
    yield ""
    yield f"ocpp-lc forwarding benchmark — {result['started']}"
    yield f"  versions: {result['versions']}"
    yield f"  controller: {result['controller_command']} run --config <tmp>.toml"
    yield f"  CPUs: {result['layout']}"
    yield (
        f"  load: closed loop, one call in flight per station; {result['warmup_s']:g} s warm-up, then "
        f"{result['seconds']:g} s measured; permessage-deflate on every leg (station offers it, CSMS and "
        "controller accept it); pings off"
    )
    yield f"  load average (1 min) before/after: {result['loadavg_before']:.2f} / {result['loadavg_after']:.2f}"
    yield "  (other processes on this machine share the same CPUs; compare runs made at the same time)"
    yield ""
    head = (
        f"{'message':<11} {'N':>5} | {'calls/s direct':>14} {'via':>7} {'via/dir':>7} | "
        f"{'p50 ms dir':>10} {'via':>6} {'+ms':>6} {'×':>5} | "
        f"{'p99 ms dir':>10} {'via':>6} {'+ms':>6} {'×':>5} | {'ctrl CPU':>8} {'µs/call':>7} | check"
    )
    yield head
    yield "-" * len(head)
    for row in result["throughput"]:
        direct, via, check = row["direct"], row["via"], row["controller"]
        cpu = via["cpu_percent"].get("controller", math.nan)
        cpu_us = _cpu_us_per_call(via, cpu)
        errors = [
            f"{mode}: {name} {run[name]}"
            for mode, run in (("direct", direct), ("via", via))
            for name in ("timeouts", "bad_replies", "closed")
            if run[name]
        ]
        errors += [
            f"{mode}: {run['connected']}/{run['stations']} connected"
            for mode, run in (("direct", direct), ("via", via))
            if run["connected"] != run["stations"]
        ]
        errors += [
            f"{mode}: deflate on {run['compressed']}/{run['connected']}"
            for mode, run in (("direct", direct), ("via", via))
            if run["compressed"] != run["connected"]
        ]
        errors += check["findings"]
        if check["log_problems"]:
            errors.append(f"{check['log_problems']} warning/error log lines")
        yield (
            f"{KIND_NAMES[row['kind']]:<11} {row['stations']:>5} | {direct['calls_per_s']:>14.0f} "
            f"{via['calls_per_s']:>7.0f} {_ratio(via['calls_per_s'], direct['calls_per_s']):>7} | "
            f"{direct['p50_ms']:>10.2f} {via['p50_ms']:>6.2f} {via['p50_ms'] - direct['p50_ms']:>+6.2f} "
            f"{_ratio(via['p50_ms'], direct['p50_ms']):>5} | "
            f"{direct['p99_ms']:>10.2f} {via['p99_ms']:>6.2f} {via['p99_ms'] - direct['p99_ms']:>+6.2f} "
            f"{_ratio(via['p99_ms'], direct['p99_ms']):>5} | {cpu:>7.0f}% {cpu_us:>7.0f} | "
            f"{'; '.join(errors) or 'ok'}"
        )
    yield ""
    yield (
        "CPU use in the measured window (% of one CPU), direct → via; 'others': the rest of the machine "
        "(other users' processes), 'steal': taken by the hypervisor:"
    )
    for row in result["throughput"]:
        direct_cpu, via_cpu = row["direct"]["cpu_percent"], row["via"]["cpu_percent"]
        names = ("load", "csms", "others", "steal")
        parts = [f"{name} {direct_cpu.get(name, 0):.0f}→{via_cpu.get(name, 0):.0f}" for name in names]
        parts.insert(2, f"controller {via_cpu.get('controller', 0):.0f}")
        # CPU per call of both websocket endpoints together, as a yardstick for the controller's µs/call.
        endpoints_us = _cpu_us_per_call(row["direct"], direct_cpu.get("load", 0) + direct_cpu.get("csms", 0))
        parts.append(f"load+csms direct {endpoints_us:.0f} µs/call")
        mark = "  DISTURBED" if row["disturbance"] > DISTURBED_PERCENT else ""
        tries = f" (best of {row['attempts']} attempts)" if row["attempts"] > 1 else ""
        yield f"  {KIND_NAMES[row['kind']]:<11} N={row['stations']:<5} {', '.join(parts)}{tries}{mark}"
    disturbed = [row for row in result["throughput"] if row["disturbance"] > DISTURBED_PERCENT]
    if disturbed:
        yield (
            f"  WARNING: in {len(disturbed)} row(s) other work took over {DISTURBED_PERCENT:g}% of a CPU during a "
            "window: those numbers are worse than the controller is; run again on a quiet machine"
        )
    frame_sizes = {row["kind"]: row["direct"]["frame_bytes"] for row in result["throughput"]}
    yield "  frame sizes (bytes, uncompressed): " + ", ".join(f"{KIND_NAMES[k]} {v}" for k, v in frame_sizes.items())
    problems = [ex for row in result["throughput"] for ex in row["controller"]["log_examples"]]
    if problems:
        yield "controller log warnings/errors (first few):"
        yield from (f"  {line}" for line in problems[:10])
    if result["memory"]:
        yield ""
        yield "Idle memory of the controller (VmRSS; a fresh controller per row; stations idle, pings off):"
        head = (
            f"{'compression':<11} {'N':>5} | {'RSS 0 stations':>14} | {'RSS N connected':>15} {'KiB/pair':>8} | "
            f"{'RSS after 1 call each':>21} {'KiB/pair':>8}"
        )
        yield head
        yield "-" * len(head)
        for row in result["memory"]:
            yield (
                f"{row['compression']:<11} {row['stations']:>5} | {row['rss_0_kib'] / 1024:>10.1f} MiB | "
                f"{row['rss_connected_kib'] / 1024:>11.1f} MiB {row['kib_per_pair_connected']:>8.1f} | "
                f"{row['rss_after_call_kib'] / 1024:>17.1f} MiB {row['kib_per_pair_after_call']:>8.1f}"
            )
        yield (
            "  'deflate': stations and CSMS both negotiate permessage-deflate (zlib state is allocated on the "
            "first message each way, hence the second column); 'none': neither does."
        )
    if result.get("log_dir"):
        yield f"logs: {result['log_dir']}"


def _without_nan(value: Any) -> Any:
    """``value`` with NaN (a percentile of no calls) as null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nan(item) for item in value]
    return value


def _versions() -> str:
    names = ("ocpp-lc", "trio", "wsproto", "websockets")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def _parse_list(text: str, convert: Callable[[str], Any]) -> list[Any]:
    return [convert(part) for part in text.split(",") if part.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="forwarding.py",
        description="Throughput, added latency and idle memory of ocpp-lc against direct connections "
        "(subcommands 'csms' and 'load' are the helper processes it starts).",
    )
    parser.add_argument("--stations", default="1,100,1000", help="station counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window")
    parser.add_argument("--kinds", default="hb,mv", help="message kinds: hb (Heartbeat), mv (~400-byte MeterValues)")
    parser.add_argument("--memory-stations", type=int, default=1000, help="stations for the memory run (0: skip)")
    parser.add_argument("--memory-compression", default="deflate,none", help="memory runs: deflate and/or none")
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help=f"repeat a direct/via pair this often while others use over {DISTURBED_PERCENT:g}%% of a CPU",
    )
    parser.add_argument("--no-pin", action="store_true", help="let every process share every CPU")
    parser.add_argument("--keep-logs", type=Path, help="write the children's logs here instead of a temp dir")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument(
        "--controller",
        type=shlex.split,
        default=default_controller_command(),
        help="command that starts the controller, given 'run --config FILE' (default: the ocpp-lc console script)",
    )
    args = parser.parse_args(argv)
    args.stations = _parse_list(args.stations, int)
    args.kinds = _parse_list(args.kinds, str)
    args.memory_compression = _parse_list(args.memory_compression, str)
    if not set(args.kinds) <= set(KINDS) or not set(args.memory_compression) <= {"deflate", "none"}:
        parser.error("--kinds takes hb,mv and --memory-compression deflate,none")

    # SIGTERM unwinds like Ctrl-C, through the finally that stops every child.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    layout = choose_layout(not args.no_pin)
    with contextlib.ExitStack() as stack:
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            log_dir = args.keep_logs
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ocpp-lc-bench-")))
        children = Children(log_dir)
        stack.callback(children.stop_all)
        result: dict[str, Any] = {
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": _versions(),
            "layout": layout.description,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "loadavg_before": os.getloadavg()[0],
            "log_dir": str(args.keep_logs) if args.keep_logs else None,
            "controller_command": shlex.join(args.controller),
        }
        _say(args, f"CPUs: {layout.description}")
        csms = children.start(
            "csms", [sys.executable, __file__, "csms", "--port", "0", "--plain-port", "0"], cpus=layout.csms
        )
        _, ports = csms.expect_event("listening", START_DEADLINE_S)
        try:
            result["throughput"] = throughput_phase(children, args, layout, csms, int(ports["port"]))
            result["memory"] = memory_phase(children, args, layout, ports) if args.memory_stations else []
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
        result["loadavg_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(_without_nan(result), indent=2))
    else:
        print("\n".join(report(result)))
    return 0


def _csms_entry(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="forwarding.py csms")
    parser.add_argument("--port", type=int, default=0, help="port with permessage-deflate (0: any free one)")
    parser.add_argument("--plain-port", type=int, default=0, help="port without compression (0: any free one)")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    asyncio.run(_csms_main(args.port, args.plain_port))


if __name__ == "__main__":
    if sys.argv[1:2] == ["csms"]:
        _csms_entry(sys.argv[2:])
    elif sys.argv[1:2] == ["load"]:
        _load_main(sys.argv[2:])
    else:
        try:
            sys.exit(main(sys.argv[1:]))
        except KeyboardInterrupt:  # every child is stopped by then
            print("interrupted", file=sys.stderr)
            sys.exit(130)
