"""Benchmark: where can balancing's heavy work run without stalling the relay? (issue #17, Done-when 2)

Run by hand (not collected by pytest)::

    python tests/bench/offloop.py [--evses 1000] [--seconds 3]

Theory of operation. The relay stand-in and the station process of ``balancing_relay.py`` (a loopback
echo on the trio loop; a separate process sending 200-byte frames and timing each round trip). For each
*placement* the script measures a quiet window (nothing else running) and a busy window during which the
allocator (:func:`balancing.allocator.allocate` on the allocation benchmark's ``--evses`` site) and a
Python stand-in for the rest of a round (a pass over every EVSE building dicts, as ``rollout.plan`` and
the session building do) run back to back, without pause, somewhere:

* ``thread``: in a worker thread of the controller's process, at several ``sys.setswitchinterval``
  values (how long a thread may hold the GIL while another wants it; Python's default is 5 ms);
* ``process``: in a child process at ``nice 10``.

The relay does not wait for the work itself in either case, only for the GIL or for the CPU. It prints
p50/p99/max of both windows and the ratio of their p99, and how many rounds of work were done in the busy
window (a thread that holds the GIL less also gets less done).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balancing.allocator import SiteLimits, allocate
from tests.bench.allocation import build
from tests.bench.balancing_relay import echo, percentiles, run_station

#: Set by :func:`work` once its site is built (the busy window starts then).
ready = threading.Event()


def work(evses: int, stop: threading.Event, rounds: list[int], report: bool = False) -> None:
    """Rounds back to back until ``stop``: the allocation, then a Python pass per EVSE like the plan's (a
    line on stdout after each with ``report``, and one before the first)."""
    site, sessions = build(evses)
    if report:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    ready.set()
    while not stop.is_set():
        allocation = allocate(site, SiteLimits(), sessions, 0.0)
        planned = {}
        for session in sessions:
            key = (session.station_id, session.evse_id)
            planned[key] = {"target": allocation.current_amperes(*key), "phases": session.phases_used}
        rounds[0] += 1
        if report:
            sys.stdout.write("\n")
            sys.stdout.flush()


async def measure(placement: str, switch_s: float, args: argparse.Namespace) -> None:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(switch_s)
    rounds = [0]
    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            samples: list[tuple[float, float]] = []
            done = trio.Event()
            await nursery.start(run_station, port, 2 * args.seconds + 4.0, samples, done)
            await trio.sleep(0.5)
            quiet_from = time.perf_counter()
            await trio.sleep(args.seconds)
            quiet_to = time.perf_counter()
            stop = threading.Event()
            if placement == "thread":
                ready.clear()
                thread = threading.Thread(target=work, args=(args.evses, stop, rounds), daemon=True)
                thread.start()
                await trio.to_thread.run_sync(ready.wait)
                busy_from = time.perf_counter()
                await trio.sleep(args.seconds)
                busy_to = time.perf_counter()
                stop.set()
                await trio.to_thread.run_sync(thread.join)
            else:
                command = [sys.executable, __file__, "worker", str(args.evses)]
                niced = functools.partial(os.nice, 10)
                child = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, preexec_fn=niced)
                assert child.stdout is not None
                output = bytearray()
                while b"ready\n" not in output:
                    output += await child.stdout.receive_some(65536)
                output.clear()
                busy_from = time.perf_counter()
                with trio.move_on_after(args.seconds):
                    while chunk := await child.stdout.receive_some(65536):
                        output += chunk
                busy_to = time.perf_counter()
                child.kill()
                await child.wait()
                rounds[0] = output.count(b"\n")
            await done.wait()
            nursery.cancel_scope.cancel()
    finally:
        sys.setswitchinterval(previous)
    quiet = [rtt for at, rtt in samples if quiet_from <= at < quiet_to]
    busy = [rtt for at, rtt in samples if busy_from <= at < busy_to]
    q50, q99, qmax = percentiles(quiet)
    b50, b99, bmax = percentiles(busy)
    name = f"{placement} (switch interval {switch_s * 1e3:g} ms)" if placement == "thread" else "process (nice 10)"
    print(
        f"{name:36} quiet p50 {q50 * 1e3:.3f} p99 {q99 * 1e3:.3f} max {qmax * 1e3:6.3f} | busy p50 {b50 * 1e3:.3f} "
        f"p99 {b99 * 1e3:6.3f} max {bmax * 1e3:6.3f} ms | p99 x{b99 / q99:6.2f} | {rounds[0]} rounds",
        flush=True,
    )


async def main(args: argparse.Namespace) -> None:
    print(f"{args.evses} EVSEs, {args.seconds:g} s windows, relay stand-in round trips (ms)")
    for switch_s in (0.005, 0.0005, 0.0001, 0.00002):
        await measure("thread", switch_s, args)
    await measure("process", sys.getswitchinterval(), args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        work(int(sys.argv[2]), threading.Event(), [0], report=True)  # until terminated
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evses", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0)
    trio.run(main, parser.parse_args())
