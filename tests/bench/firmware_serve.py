"""Firmware serving benchmark: 50 stations download one file from the controller, and from a plain server.

Run by hand (not collected by pytest)::

    python tests/bench/firmware_serve.py [--size-mib 16] [--clients 50] [--rounds 1]

Theory of operation. Three kinds of process, all on 127.0.0.1 with ports chosen by the OS:

* a **static server**: ``python -m http.server`` serving a directory that holds one random file; it is
  both the controller's download source and the baseline;
* the **controller side** (``firmware_serve.py serve``): the firmware cache and the appliance's HTTP face
  (``FirmwareCache`` + ``router.http.serve_http``, the code the appliance runs) in its own trio process;
  it publishes the file from the static server (download, MD5, publish) and prints the published URL;
* the **downloaders** (this process): N concurrent raw-socket HTTP/1.1 GETs of the file (trio), each
  reading the whole body and checking its length; the MD5 of one body is checked too.

For each server the N downloads start together; throughput is total bytes over the wall time of the
slowest download. The controller's RSS (VmRSS, and VmHWM: its peak) is read from /proc before and
after, and the static server's too. The downloaders take CPU from both servers alike on a small
machine, so the ratio is what to compare, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

REPO_ROOT = Path(__file__).resolve().parents[2]


# -- controller side ------------------------------------------------------------------------------


class _Statuses:
    """The cache's notifier here: prints each status; ``ended`` is set by the last one."""

    def __init__(self) -> None:
        self.ended = trio.Event()

    async def send(self, action: str, payload: dict[str, Any]) -> None:
        print(json.dumps({"status": payload}), file=sys.stderr, flush=True)
        if payload["status"] in ("Published", "DownloadFailed", "InvalidChecksum", "PublishFailed"):
            self.ended.set()


async def serve(source_url: str, checksum: str, state_dir: Path) -> None:
    from prometheus_client import CollectorRegistry

    from firmware_cache import FirmwareCache, FirmwareSettings
    from router.http import build_http_app, serve_http
    from router.store import Store

    registry = CollectorRegistry()
    notifier = _Statuses()
    with Store.open(state_dir) as store:
        async with trio.open_nursery() as nursery:
            cache = FirmwareCache(
                FirmwareSettings(cache_dir=state_dir / "firmware"),
                state=store.namespace("firmware"),
                notifier=notifier,
                registry=registry,
            )
            await nursery.start(cache.run)
            app = build_http_app(registry, lambda: (True, {}), cache.routes())
            port = await nursery.start(serve_http, app, "127.0.0.1", 0)
            cache.public_base_url = f"http://127.0.0.1:{port}"
            answer = cache.publish({"location": source_url, "checksum": checksum, "requestId": 1})
            answer.sent()
            with trio.fail_after(120):
                await notifier.ended.wait()
            print(json.dumps({"url": cache.urls(checksum)[0], "pid": os.getpid()}), flush=True)
            # Until the parent closes our stdin.
            await trio.to_thread.run_sync(sys.stdin.read)
            served = registry.get_sample_value("ocpp_lc_firmware_served_bytes_total")
            print(json.dumps({"served_bytes": served}), file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()


# -- downloaders ----------------------------------------------------------------------------------


async def _download(host: str, port: int, target: str, expected: int, keep: list[bytes] | None) -> float:
    start = time.perf_counter()
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(262_144)
            if not chunk:
                raise RuntimeError("closed before the headers")
            data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n")[0] + b" ":
            raise RuntimeError(f"bad answer: {head[:100]!r}")
        received = len(body)
        parts = [body] if keep is not None else []
        while received < expected:
            chunk = await stream.receive_some(262_144)
            if not chunk:
                break
            received += len(chunk)
            if keep is not None:
                parts.append(chunk)
        if received != expected:
            raise RuntimeError(f"got {received} of {expected} bytes")
        if keep is not None:
            keep.append(b"".join(parts))
    return time.perf_counter() - start


async def load(url: str, clients: int, expected: int, checksum: str) -> dict[str, float]:
    rest = url.split("://", 1)[1]
    authority, _, path = rest.partition("/")
    host, _, port = authority.rpartition(":")
    durations: list[float] = []
    kept: list[bytes] = []
    start = time.perf_counter()
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for number in range(clients):

                async def one(keep: list[bytes] | None = kept if number == 0 else None) -> None:
                    durations.append(await _download(host, int(port), "/" + path, expected, keep))

                nursery.start_soon(one)
    wall = time.perf_counter() - start
    if hashlib.md5(kept[0]).hexdigest() != checksum:
        raise RuntimeError("MD5 mismatch")
    return {
        "wall_s": wall,
        "mib_per_s": clients * expected / wall / 2**20,
        "slowest_s": max(durations),
        "fastest_s": min(durations),
    }


def rss_kib(pid: int) -> dict[str, int]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("--source", required=True)
    serve_parser.add_argument("--checksum", required=True)
    serve_parser.add_argument("--state", required=True)
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.mode == "serve":
        trio.run(serve, args.source, args.checksum, Path(args.state))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = root / "files"
        files.mkdir()
        body = os.urandom(args.size_mib * 2**20)
        (files / "fw.bin").write_bytes(body)
        checksum = hashlib.md5(body).hexdigest()
        static = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        controller = None
        try:
            assert static.stdout is not None
            line = static.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
            static_port = int(line.split(" port ")[1].split()[0])
            static_url = f"http://127.0.0.1:{static_port}/fw.bin"
            controller = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "serve",
                    "--source",
                    static_url,
                    "--checksum",
                    checksum,
                    "--state",
                    str(root / "state"),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            )
            assert controller.stdout is not None
            published = json.loads(controller.stdout.readline())
            results: dict[str, Any] = {
                "file_mib": args.size_mib,
                "clients": args.clients,
                "controller_rss_kib_before": rss_kib(controller.pid),
                "static_rss_kib_before": rss_kib(static.pid),
            }
            for round_number in range(args.rounds):
                for name, url in (("static", static_url), ("controller", published["url"])):
                    results[f"{name}_{round_number}"] = trio.run(load, url, args.clients, len(body), checksum)
            results["controller_rss_kib_after"] = rss_kib(controller.pid)
            results["static_rss_kib_after"] = rss_kib(static.pid)
            print(json.dumps(results, indent=2))
        finally:
            for process in (controller, static):
                if process is not None:
                    if process.stdin is not None:
                        process.stdin.close()
                    process.terminate()
                    try:
                        process.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        process.kill()


if __name__ == "__main__":
    main()
