"""Issue 14 benchmark: ocpp-lc against Debian's nginx as a plain websocket proxy, in the same run.

Run by hand (not collected by pytest); needs ``nginx`` (``apt-get install -y nginx-light``)::

    python tests/bench/versus_nginx.py [--stations 1,100,1000] [--seconds 5] [--repeats 3]
        [--memory 1000,9500] [--storm 1000] [--json]

Theory of operation. It reuses ``forwarding.py``'s processes (its CSMS and load generator, started
as children pinned like there: load generator and CSMS on the first CPU, the proxy under test on
the second) and adds nginx, configured in a temporary directory as a websocket proxy in front of
the same CSMS (``master_process off``: one process, one CPU, like the controller; access log off).

* **throughput**: for each compression setting (``deflate``: the stations offer permessage-deflate,
  which nginx passes through to the CSMS and the controller negotiates on both legs; ``none``:
  nobody compresses), each balancing setting of the controller (on, the default, and off) and each
  station count, the same closed loop of MeterValues calls runs through nginx and through the
  controller, alternately, ``--repeats`` times. Rows give medians: calls/s, p99, the ratios
  controller ÷ nginx, and CPU µs per relayed call (the proxy's CPU time in the window ÷ calls, the
  method of ``forwarding.py``).
* **memory**: a fresh controller per compression setting; its RSS with one warm-up station gone,
  with N idle stations and after one call each; the growth ÷ N is the cost of a pair. nginx's is
  measured the same way. The fd hard limit of the machine bounds N (two sockets per pair).
* **storm**: N stations connect and send BootNotification all at once (no connection gate), after
  the same N did so a moment before and left (a reconnect); the time until the last answer,
  through nginx and through the controller, ``--repeats`` times.
* **compression**: what the per-leg window bits and memory level chosen in ``router/deflate.py``
  cost in compression ratio on a MeterValues stream, against zlib's defaults (computed here).

The machine is shared: every figure is a median of repeats, and the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import forwarding as fw

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {fds};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections {connections}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://{host}:{csms_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


def free_port() -> int:
    """A port free right now (nginx cannot report one it chose itself; the window is tiny)."""
    with socket.socket() as probe:
        probe.bind((fw.HOST, 0))
        return int(probe.getsockname()[1])


def wait_listening(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError), socket.create_connection((fw.HOST, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise fw.BenchError(f"nothing listens on {port} after {timeout_s:g} s")
        time.sleep(0.05)


def start_nginx(children: fw.Children, csms_port: int, cpus: set[int] | None, name: str) -> tuple[fw.Child, int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise fw.BenchError("nginx is not installed (apt-get install -y nginx-light)")
    directory = children.log_dir / name
    directory.mkdir(exist_ok=True)
    port = free_port()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    conf = directory / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            fds=soft, connections=max(1024, soft - 64), dir=directory, host=fw.HOST, port=port, csms_port=csms_port
        )
    )
    child = children.start(
        name, [nginx, "-p", str(directory), "-c", str(conf), "-e", str(directory / "err.log")], cpus=cpus
    )
    wait_listening(port, fw.START_DEADLINE_S)
    return child, port


# ------------------------------------------------------------------------------------------------
# Subcommand: storm (a child process, like forwarding.py's load generator)
# ------------------------------------------------------------------------------------------------


async def _storm(url: str, stations: int, rounds: int) -> None:
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    async def one(index: int) -> float:
        async with connect(
            f"{url}/S{index:05d}", subprotocols=[Subprotocol(fw.SUBPROTOCOL)], ping_interval=None, open_timeout=60
        ) as connection:
            boot = {"chargingStation": {"model": "bench", "vendorName": "ocpp-lc"}, "reason": "PowerUp"}
            await connection.send(json.dumps([2, f"boot-{index}", "BootNotification", boot]))
            while True:
                reply = await connection.recv()
                assert isinstance(reply, str)
                if reply.startswith("[2,"):
                    await connection.send(fw._accept(reply))
                    continue
                assert reply.startswith(f'[3,"boot-{index}"'), reply
                return time.perf_counter()

    fw.raise_nofile_limit()
    for round_index in range(rounds):
        started = time.perf_counter()
        async with asyncio.timeout(120):
            finished = await asyncio.gather(*(one(index) for index in range(stations)), return_exceptions=True)
        failures = [repr(item) for item in finished if isinstance(item, BaseException)]
        times = [item - started for item in finished if isinstance(item, float)]
        fw.emit(
            {
                "event": "storm",
                "round": round_index,
                "booted": len(times),
                "failures": len(failures),
                "first_failure": failures[:1],
                "last_s": max(times) if times else float("nan"),
                "median_s": statistics.median(times) if times else float("nan"),
            }
        )
        await asyncio.sleep(1.0)  # the proxies notice the closes before the next wave
    fw.emit({"event": "done"})


# ------------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------------


def load_run(
    children: fw.Children,
    url: str,
    stations: int,
    args: argparse.Namespace,
    compression: str,
    proxy: fw.Child,
    tag: str,
) -> dict[str, Any]:
    argv = [sys.executable, fw.__file__, "load", "--url", url, "--stations", str(stations), "--kind", "mv"]
    argv += [
        "--seconds",
        str(args.seconds),
        "--warmup",
        str(args.warmup),
        "--prefix",
        tag,
        "--compression",
        compression,
    ]
    load = children.start(f"load-{tag}-{compression}-{stations}", argv, cpus=args.layout.load)
    try:
        index, connected = load.expect_event("connected", fw.CONNECT_DEADLINE_S + 10)
        index, _ = load.expect_event("window_start", args.warmup + 10, index)
        cpu_before, began = proxy.cpu_s(), time.monotonic()
        index, _ = load.expect_event("window_end", args.seconds + 10, index)
        wall_s = time.monotonic() - began
        proxy_cpu_s = proxy.cpu_s() - cpu_before
        _, result = load.expect_event("result", fw.CALL_TIMEOUT_S + 45, index)
        load.popen.wait(15)
    finally:
        children.stop(load)
    result["proxy_cpu_percent"] = proxy_cpu_s / wall_s * 100
    result["us_per_call"] = proxy_cpu_s / result["calls"] * 1e6 if result["calls"] else float("nan")
    result["compressed"] = connected["compressed"]
    return result


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [row[key] for row in rows if row.get(key) == row.get(key)]
    return statistics.median(values) if values else float("nan")


def throughput(children: fw.Children, args: argparse.Namespace, ports: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    nginx, nginx_port = start_nginx(children, ports["port"], args.layout.controller, "nginx")
    try:
        for compression in args.compression:
            csms_port = ports["port"] if compression == "deflate" else ports["plain_port"]
            for balancing in args.balancing:
                name = f"ctrl-{compression}-{'bal' if balancing else 'nobal'}"
                controller = fw.start_controller(
                    children, args.controller, csms_port, args.layout.controller, name, balancing=balancing
                )
                try:
                    for stations in args.stations:
                        runs: dict[str, list[dict[str, Any]]] = {"nginx": [], "ctrl": []}
                        for _ in range(args.repeats):
                            nginx_url = f"ws://{fw.HOST}:{nginx_port}{fw.PATH}"
                            runs["nginx"].append(load_run(children, nginx_url, stations, args, compression, nginx, "N"))
                            ctrl_url = f"ws://{fw.HOST}:{controller.station_port}{fw.PATH}"
                            runs["ctrl"].append(
                                load_run(children, ctrl_url, stations, args, compression, controller.child, "V")
                            )
                            controller.wait_stations(0, 30)
                        row = {"compression": compression, "balancing": balancing, "stations": stations}
                        for who, results in runs.items():
                            for key in ("calls_per_s", "p50_ms", "p99_ms", "us_per_call", "proxy_cpu_percent"):
                                row[f"{who}_{key}"] = _median(results, key)
                            row[f"{who}_errors"] = sum(r["timeouts"] + r["bad_replies"] + r["closed"] for r in results)
                        rows.append(row)
                        fw._say(args, "  " + _row_text(row))
                finally:
                    children.stop(controller.child)
    finally:
        children.stop(nginx)
    return rows


def _row_text(row: dict[str, Any]) -> str:
    calls = row["ctrl_calls_per_s"] / row["nginx_calls_per_s"]
    p99 = row["ctrl_p99_ms"] / row["nginx_p99_ms"]
    return (
        f"{row['compression']:<7} {'on' if row['balancing'] else 'off':<4} {row['stations']:>5} | "
        f"{row['nginx_calls_per_s']:>7.0f} {row['ctrl_calls_per_s']:>7.0f} {calls:>5.2f} | "
        f"{row['nginx_p99_ms']:>7.2f} {row['ctrl_p99_ms']:>7.2f} {p99:>5.2f} | "
        f"{row['nginx_us_per_call']:>6.0f} {row['ctrl_us_per_call']:>6.0f} | "
        f"{row['nginx_errors'] + row['ctrl_errors']}"
    )


def idle_memory(
    children: fw.Children, args: argparse.Namespace, proxy: fw.Child, url: str, stations: int, compression: str
) -> dict[str, Any]:
    """RSS growth per station pair of ``proxy``: N idle stations connected, then after one call each."""
    samples: list[int] = []
    warm: list[int] = []
    fake = fw.Controller(proxy, 0, 0)
    # One station through first (one-off buffers, lazy imports), then the baseline.
    _idle(children, args, url, 1, compression, warm, fake)
    time.sleep(fw.RSS_SETTLE_S)
    baseline = proxy.rss_kib()
    _idle(children, args, url, stations, compression, samples, fake)
    return {
        "compression": compression,
        "stations": stations,
        "rss_0_kib": baseline,
        "kib_per_pair_connected": (samples[0] - baseline) / stations,
        "kib_per_pair_after_call": (samples[1] - baseline) / stations,
    }


def _idle(
    children: fw.Children,
    args: argparse.Namespace,
    url: str,
    stations: int,
    compression: str,
    samples: list[int],
    proxy: fw.Controller,
) -> None:
    argv = [sys.executable, fw.__file__, "load", "--idle", "--url", url, "--stations", str(stations)]
    argv += ["--kind", "mv", "--compression", compression, "--prefix", "M"]
    load = children.start(f"idle-{compression}-{stations}-{time.monotonic_ns()}", argv, cpus=args.layout.load)
    try:
        index, connected = load.expect_event("connected", max(fw.CONNECT_DEADLINE_S, stations / 50) + 30)
        if connected["count"] != stations:
            raise fw.BenchError(f"only {connected['count']} of {stations} idle stations connected")
        time.sleep(fw.RSS_SETTLE_S * 2)
        samples.append(proxy.child.rss_kib())
        load.send_line("call")
        index, called = load.expect_event("called", fw.CALL_TIMEOUT_S + 60, index)
        if called["answered"] != stations:
            raise fw.BenchError(f"idle stations: {called['answered']} of {stations} calls answered")
        time.sleep(fw.RSS_SETTLE_S * 2)
        samples.append(proxy.child.rss_kib())
        load.send_line("close")
        load.expect_event("closed", 60, index)
        load.popen.wait(15)
    finally:
        children.stop(load)
    time.sleep(fw.RSS_SETTLE_S)


def memory(children: fw.Children, args: argparse.Namespace, ports: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for compression in args.compression:
        csms_port = ports["port"] if compression == "deflate" else ports["plain_port"]
        for stations in args.memory:
            controller = fw.start_controller(
                children,
                args.controller,
                csms_port,
                args.layout.controller,
                f"mem-ctrl-{compression}-{stations}",
                max_stations=stations + 100,
                balancing=args.memory_balancing == "on",
            )
            try:
                url = f"ws://{fw.HOST}:{controller.station_port}{fw.PATH}"
                row = idle_memory(children, args, controller.child, url, stations, compression)
                row["proxy"] = "controller"
                rows.append(row)
                fw._say(args, f"  memory {row}")
            finally:
                children.stop(controller.child)
            if stations != min(args.memory):
                continue  # nginx's figure barely depends on N; its big runs would double the time
            nginx, port = start_nginx(
                children, csms_port, args.layout.controller, f"mem-nginx-{compression}-{stations}"
            )
            try:
                row = idle_memory(children, args, nginx, f"ws://{fw.HOST}:{port}{fw.PATH}", stations, compression)
                row["proxy"] = "nginx"
                rows.append(row)
                fw._say(args, f"  memory {row}")
            finally:
                children.stop(nginx)
    return rows


def storm(children: fw.Children, args: argparse.Namespace, ports: dict[str, int]) -> dict[str, Any]:
    result: dict[str, Any] = {"stations": args.storm}
    controller = fw.start_controller(
        children,
        args.controller,
        ports["port"],
        args.layout.controller,
        "storm-ctrl",
        max_stations=args.storm + 100,
        balancing=args.memory_balancing == "on",
    )
    nginx, nginx_port = start_nginx(children, ports["port"], args.layout.controller, "storm-nginx")
    try:
        for who, url in (
            ("nginx", f"ws://{fw.HOST}:{nginx_port}{fw.PATH}"),
            ("ctrl", f"ws://{fw.HOST}:{controller.station_port}{fw.PATH}"),
        ):
            rounds = args.repeats + 1  # the first wave connects, the others reconnect
            argv = [sys.executable, __file__, "storm", url, str(args.storm), str(rounds)]
            load = children.start(f"storm-{who}", argv, cpus=args.layout.load)
            try:
                waves = []
                index = 0
                for _ in range(rounds):
                    index, wave = load.expect_event("storm", 150, index)
                    index += 1
                    waves.append(wave)
                load.expect_event("done", 30, index)
            finally:
                children.stop(load)
            reconnects = waves[1:]
            result[f"{who}_last_s"] = statistics.median(wave["last_s"] for wave in reconnects)
            result[f"{who}_failures"] = sum(wave["failures"] for wave in waves)
            result[f"{who}_first_failure"] = next((w["first_failure"] for w in waves if w["first_failure"]), [])
            fw._say(args, f"  storm {who}: {[round(w['last_s'], 2) for w in waves]} s")
    finally:
        children.stop(nginx)
        children.stop(controller.child)
    return result


def compression_costs() -> list[dict[str, Any]]:
    """Compression ratio of a MeterValues stream (CSMS leg) per zlib setting, context kept."""
    frames = [fw._meter_values_frame(f"{1:08d}-{n:027d}", n).encode() for n in range(1, 501)]
    raw = sum(len(frame) for frame in frames)
    rows = []
    for window_bits, mem_level in ((15, 8), (12, 4), (11, 4), (10, 3)):
        compressor = zlib.compressobj(6, zlib.DEFLATED, -window_bits, mem_level)
        wire = sum(len(compressor.compress(frame) + compressor.flush(zlib.Z_SYNC_FLUSH)) - 4 for frame in frames)
        state_kib = ((1 << (window_bits + 2)) + (1 << (mem_level + 9))) / 1024 + 6
        rows.append({"window_bits": window_bits, "mem_level": mem_level, "ratio": raw / wire, "deflate_kib": state_kib})
    return rows


def report(result: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"ocpp-lc vs nginx — {result['started']} — {result['versions']}",
        f"  CPUs: {result['layout']}",
        f"  load average (1 min) before/after: {result['loadavg_before']:.2f} / {result['loadavg_after']:.2f}",
        f"  medians of {result['repeats']} alternating runs; MeterValues, closed loop, {result['seconds']:g} s windows",
        "",
        "deflate bal     N | calls/s nginx    ctrl ratio | p99 ms nginx   ctrl ratio | µs/call nginx ctrl | errors",
    ]
    lines += [_row_text(row) for row in result["throughput"]]
    if result["memory"]:
        lines += ["", "idle memory per pair (VmRSS growth ÷ N):", "proxy      deflate     N | connected | after 1 call"]
        for row in result["memory"]:
            lines.append(
                f"{row['proxy']:<10} {row['compression']:<7} {row['stations']:>5} | "
                f"{row['kib_per_pair_connected']:>6.1f} KiB | {row['kib_per_pair_after_call']:>6.1f} KiB"
            )
    if result["storm"]:
        storm_result = result["storm"]
        lines += [
            "",
            f"reconnect storm, {storm_result['stations']} stations at once (median time to the last BootNotification "
            f"answer): nginx {storm_result['nginx_last_s']:.2f} s, controller {storm_result['ctrl_last_s']:.2f} s, "
            f"ratio {storm_result['ctrl_last_s'] / storm_result['nginx_last_s']:.2f}; failures nginx "
            f"{storm_result['nginx_failures']}, controller {storm_result['ctrl_failures']}",
        ]
    lines += ["", "compression on the CSMS leg (MeterValues stream, context kept):"]
    for row in result["compression"]:
        lines.append(
            f"  window {row['window_bits']} bits, memLevel {row['mem_level']}: ratio {row['ratio']:.1f}, "
            f"compressor state ~{row['deflate_kib']:.0f} KiB"
        )
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="versus_nginx.py")
    parser.add_argument("--stations", default="1,100,1000")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default="deflate,none")
    parser.add_argument("--balancing", default="on,off")
    parser.add_argument("--memory", default="1000,9500", help="station counts for idle memory ('' skips)")
    parser.add_argument(
        "--memory-balancing", choices=("on", "off"), default="on", help="balancing in the memory and storm runs"
    )
    parser.add_argument("--storm", type=int, default=1000, help="stations in the reconnect storm (0 skips)")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep-logs", type=Path)
    parser.add_argument("--controller", type=lambda text: text.split(), default=fw.default_controller_command())
    args = parser.parse_args(argv)
    args.stations = fw._parse_list(args.stations, int)
    args.memory = fw._parse_list(args.memory, int)
    args.compression = fw._parse_list(args.compression, str)
    args.balancing = [part == "on" for part in fw._parse_list(args.balancing, str)]
    fw.raise_nofile_limit()
    args.layout = fw.choose_layout(not args.no_pin)
    with contextlib.ExitStack() as stack:
        log_dir = args.keep_logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ocpp-lc-nginx-")))
        log_dir.mkdir(parents=True, exist_ok=True)
        children = fw.Children(log_dir)
        stack.callback(children.stop_all)
        result: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "versions": fw._versions(),
            "layout": args.layout.description,
            "repeats": args.repeats,
            "seconds": args.seconds,
            "loadavg_before": os.getloadavg()[0],
        }
        csms = children.start(
            "csms", [sys.executable, fw.__file__, "csms", "--port", "0", "--plain-port", "0"], cpus=args.layout.csms
        )
        _, ports = csms.expect_event("listening", fw.START_DEADLINE_S)
        try:
            result["throughput"] = throughput(children, args, ports) if args.stations else []
            result["memory"] = memory(children, args, ports) if args.memory else []
            result["storm"] = storm(children, args, ports) if args.storm else {}
        except fw.BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            result.setdefault("throughput", [])
            result.setdefault("memory", [])
            result.setdefault("storm", {})
            result["loadavg_after"] = os.getloadavg()[0]
            result["compression"] = compression_costs()
            print("\n".join(report(result)))  # what was measured before the failure
            return 1
        result["compression"] = compression_costs()
        result["loadavg_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(fw._without_nan(result), indent=2, default=str))
    else:
        print("\n".join(report(result)))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["storm"]:
        asyncio.run(_storm(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    else:
        sys.exit(main(sys.argv[1:]))
