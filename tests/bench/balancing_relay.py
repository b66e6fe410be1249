"""Benchmark: does the relay wait for balancing? Relay p99 on a 1,000-EVSE site with and without a burst of
transaction events (issue #17, Done-when 2).

Run by hand (not collected by pytest)::

    python tests/bench/balancing_relay.py [--evses 1000] [--seconds 3] [--mode forked|inline|reference|events]

Theory of operation. One trio loop runs, as in the controller, the balancing loop
(:class:`balancing.loop.Balancer`, the benchmark site of ``allocation.py``: 20 tight circuits, mixed
phases and priorities, underdrawing EVs, every EVSE in a transaction, stations answering every profile
Accepted at once) and a *relay stand-in*: a loopback TCP server that echoes every frame, which is what
the router does per frame (receive, write) and which, like it, can only run when the loop is free. A
separate process plays the station (``balancing_relay.py station PORT SECONDS``): it sends a 200-byte
frame, waits for the echo, records the round trip, ~1,600 times a second, and prints its samples when
done. Its p99 is the relay's latency as a station sees it. (A station is another machine: a thread in the
controller's own process would compete with it for the GIL and measure itself; see ``offloop.py``.)

Two windows of ``--seconds`` each: *quiet* (balancing running, no events) and *burst* (every 0.5 s, 100
TransactionEvents, Ended and Started again on 50 EVSEs, delivered one per checkpoint as the router's
observer delivers them). It prints p50/p99/max of each window, their ratio, how many rounds the bursts
cost and how long each kept the event loop. ``--mode forked`` (the default, what the controller does on a
site this size) computes each round in a forked child (balancing.forked_round); ``--mode inline`` computes
it on the event loop, and ``--mode reference`` does so with the first wave's allocator
(tests/support/reference_allocator.py), for comparison. ``--mode events`` is the baseline: the balancer
takes the same events and never computes a round, so it shows what the events alone cost the relay.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from balancing import loop as balancing_loop
from balancing.allocator import SiteLimits
from balancing.loop import Balancer, LoopSettings
from balancing.loop_types import CallOutcome
from tests.bench.allocation import build

FRAME = b"x" * 199 + b"\n"
ACCEPTED = CallOutcome("answered", {"status": "Accepted"})


async def accept_everything(station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
    await trio.lowlevel.checkpoint()
    return ACCEPTED


async def echo(stream: trio.SocketStream) -> None:
    async with stream:
        while data := await stream.receive_some(65536):
            await stream.send_all(data)


def station(port: int, seconds: float) -> None:
    """The station process: round trips for ``seconds``, then one ``started rtt`` line per sample on stdout
    (``time.perf_counter`` is CLOCK_MONOTONIC on Linux, the same clock in every process)."""
    samples: list[tuple[float, float]] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            sock.sendall(FRAME)
            received = 0
            while received < len(FRAME):
                received += len(sock.recv(65536))
            samples.append((started, time.perf_counter() - started))
            time.sleep(0.0005)
    sys.stdout.write("".join(f"{started!r} {rtt!r}\n" for started, rtt in samples))


async def run_station(
    port: int,
    seconds: float,
    samples: list[tuple[float, float]],
    done: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Start the station process; once it has run, add its samples to ``samples`` and set ``done``."""
    command = [sys.executable, __file__, "station", str(port), str(seconds)]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    task_status.started()
    output = bytearray()
    try:
        with trio.fail_after(seconds + 60):
            assert process.stdout is not None
            while chunk := await process.stdout.receive_some(1 << 20):
                output += chunk
            await process.wait()
    finally:
        process.kill()
    if process.returncode != 0:
        raise RuntimeError(f"the station process failed ({process.returncode})")
    samples.extend((float(at), float(rtt)) for at, rtt in (line.split() for line in output.decode().splitlines()))
    done.set()


def transaction_event(event_type: str, transaction_id: str, evse_id: int) -> dict[str, Any]:
    return {
        "eventType": event_type,
        "timestamp": "2026-01-01T00:00:00Z",
        "triggerReason": "CablePluggedIn" if event_type == "Started" else "EVCommunicationLost",
        "seqNo": 0,
        "transactionInfo": {"transactionId": transaction_id, "chargingState": "Charging"},
        "evse": {"id": evse_id, "connectorId": 1},
    }


def status_notification(evse_id: int) -> dict[str, Any]:
    return {"timestamp": "2026-01-01T00:00:00Z", "connectorStatus": "Available", "evseId": evse_id, "connectorId": 1}


def percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], ordered[-1]


def reallocations(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("ocpp_lc_balancing_reallocations_total") or 0.0


async def main(args: argparse.Namespace) -> None:
    site, _ = build(args.evses)
    registry = CollectorRegistry()
    balancer = Balancer(
        site, lambda wall: SiteLimits(), accept_everything, LoopSettings(recompute_interval_s=10.0), registry=registry
    )
    if args.mode == "events":
        # The baseline: the same events taken by the balancer, and no round ever computed or applied.
        async def no_round(*_: Any) -> None:
            await trio.lowlevel.checkpoint()

        balancing_loop.forked_round = no_round  # type: ignore[assignment]
    elif args.mode != "forked":
        balancer.round_runner.threshold_evses = 10**9
    if args.mode == "reference":
        from tests.support import reference_allocator

        balancing_loop.allocate = reference_allocator.allocate  # type: ignore[assignment]
    plan_s: list[float] = []
    real_plan = balancing_loop.plan

    def timed_plan(*plan_args: Any, **plan_kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_plan(*plan_args, **plan_kwargs)
        finally:
            plan_s.append(time.perf_counter() - started)

    balancing_loop.plan = timed_plan  # type: ignore[assignment]
    reallocate_s: list[float] = []
    real_reallocate = balancer.reallocate

    def timed_reallocate(*call_args: Any) -> None:
        real_reallocate(*call_args)
        reallocate_s.append(balancer.last_duration_s)

    balancer.reallocate = timed_reallocate  # type: ignore[method-assign]
    real_forked_round = balancing_loop.forked_round

    async def timed_forked_round(*call_args: Any) -> None:
        await real_forked_round(*call_args)
        if args.mode != "events":
            reallocate_s.append(balancer.last_on_loop_s)

    balancing_loop.forked_round = timed_forked_round  # type: ignore[assignment]
    stations = [station.station_id for station in site.stations]
    counter = itertools.count()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        await nursery.start(balancer.run)
        for station_id in stations:
            balancer.station_connected(station_id)
            for evse_id in (1, 2):
                balancer.station_call(station_id, "StatusNotification", status_notification(evse_id))
                balancer.station_call(
                    station_id, "TransactionEvent", transaction_event("Started", f"TX{next(counter)}", evse_id)
                )
        await trio.sleep(3.0)  # every profile out and accepted
        samples: list[tuple[float, float]] = []
        station_done = trio.Event()
        await nursery.start(run_station, port, 2 * args.seconds + 1.5, samples, station_done)
        await trio.sleep(0.5)
        quiet_from = time.perf_counter()
        await trio.sleep(args.seconds)
        burst_from = time.perf_counter()
        before = reallocations(registry)
        plan_s.clear()
        reallocate_s.clear()
        bursts = 0
        while time.perf_counter() - burst_from < args.seconds:
            for station_id in stations[bursts * 25 % len(stations) :][:25]:
                for evse_id in (1, 2):
                    balancer.station_call(station_id, "TransactionEvent", transaction_event("Ended", "-", evse_id))
                    await trio.lowlevel.checkpoint()
                    balancer.station_call(
                        station_id, "TransactionEvent", transaction_event("Started", f"TX{next(counter)}", evse_id)
                    )
                    await trio.lowlevel.checkpoint()
            bursts += 1
            await trio.sleep(0.5)
        burst_to = time.perf_counter()
        spent = reallocations(registry) - before
        await station_done.wait()
        nursery.cancel_scope.cancel()
    quiet = [rtt for at, rtt in samples if quiet_from <= at < burst_from]
    burst = [rtt for at, rtt in samples if burst_from <= at < burst_to]
    runner = balancer.round_runner
    print(f"mode {args.mode}, {args.evses} EVSEs, {len(quiet)} + {len(burst)} round trips")
    for name, values in (("quiet", quiet), ("burst", burst)):
        p50, p99, worst = percentiles(values)
        print(f"  {name:5}: p50 {p50 * 1e3:6.3f} ms  p99 {p99 * 1e3:6.3f} ms  max {worst * 1e3:7.3f} ms")
    print(f"  burst p99 / quiet p99: {percentiles(burst)[1] / percentiles(quiet)[1]:.2f}")
    print(
        f"  {bursts} bursts of 100 transaction events: {spent:.0f} rounds ({spent / max(bursts, 1):.1f} per burst); "
        f"rounds in a child {runner.forked} (failed {runner.failures}), on the loop {runner.inline}"
    )
    if reallocate_s:
        where = "outside the child" if args.mode == "forked" else "the whole round"
        median_ms, max_ms = statistics.median(reallocate_s) * 1e3, max(reallocate_s) * 1e3
        print(f"  on the loop per round during the bursts ({where}): median {median_ms:.2f} ms, max {max_ms:.2f} ms")
    if plan_s and args.mode != "forked":
        print(f"  of which rollout.plan() median {statistics.median(plan_s) * 1e3:.1f} ms")


if __name__ == "__main__":
    if sys.argv[1:2] == ["station"]:
        station(int(sys.argv[2]), float(sys.argv[3]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--evses", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--mode", choices=("forked", "inline", "reference", "events"), default="forked")
    trio.run(main, parser.parse_args())
