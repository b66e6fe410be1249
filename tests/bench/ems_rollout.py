"""EMS rollout benchmark: from an EMS limit change to every station's profile accepted (issue 5, Done-when 6).

Run by hand (not collected by pytest)::

    python tests/bench/ems_rollout.py [--stations 200] [--rounds 5] [--default-interval-rounds 1]

Theory of operation. Two processes:

* the **controller**: ``ocpp-lc run --config <tmp toml>`` as a user starts it (stations and HTTP on
  127.0.0.1 port 0, read from its start-up log line), its own CSMS connection off, a site whose grid
  connection is large enough for every station at its maximum (32 A), and ``[balancing]
  min_interval_s`` as chosen for the run;
* **this script**, on one asyncio loop: a minimal CSMS (`websockets`, answering every CALL at once with
  a schema-valid CALLRESULT) and N stations (`websockets` clients) with one EVSE each. Each station
  connects through the controller, sends BootNotification and StatusNotification (EVSE 1), waits for
  the idle EVSE's TxDefaultProfile, sends TransactionEvent Started (a transaction of its own on EVSE 1),
  and answers every SetChargingProfile with Accepted, noting when it answered, the EVSE, the purpose
  and the limit. Every station-side time comes from one clock in one process.

Once every station has its TxProfile and ``GET /api/v1/allocations`` shows the allocation installed
(every EVSE's installed limit equal to its allocation rounded down to 0.1 A, nothing in flight), each
round does two phases:

1. **decrease**: ``PUT /api/v1/limits/bench`` with a per-phase limit of ``--share`` A per station, which
   lowers every station's share; timed from just before the request is sent to the moment the last
   station answered Accepted to its lowered TxProfile, and to the first ``/api/v1/allocations`` answer
   that shows the allocation installed again;
2. **release**: ``DELETE /api/v1/limits/bench``; the same times for the increases back to the maximum.

The controller's CPU time (``/proc/<pid>/stat``) is read at both ends of each phase, and the balancing
metrics (``/metrics``) before and after the rounds. The script and its stations are pinned to the first
CPU and the controller to the second (``--no-pin``: anywhere), as in ``forwarding.py``, whose process
helpers this script reuses (with ``plumbing.py``, as ``outage.py`` does). Every child is stopped in a
``finally``; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import resource
import shlex
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# The sibling benchmark's process handling (children stopped in a finally, CPU pinning, /proc readings).
from forwarding import (
    BenchError,
    Children,
    Controller,
    choose_layout,
    machine_cpu_s,
    percentile,
)
from plumbing import (
    HOST,
    PATH,
    SUBPROTOCOL,
    add_run_options,
    connect_station,
    controller_toml,
    run_children,
    say,
    script,
    start_controller_with,
    start_stations,
    utc_now,
)

SOURCE = "bench"
#: Profile limits are rounded down to this before they are sent ([balancing] resolution_amperes default).
RESOLUTION_AMPERES = 0.1
CALL_TIMEOUT_S = 30.0
SETUP_DEADLINE_S = 90.0
#: A phase must finish within this (plus the rate limit when one applies).
PHASE_DEADLINE_S = 60.0
#: Between two reads of /api/v1/allocations while waiting for the controller to see what stations accepted.
POLL_INTERVAL_S = 0.005


# ------------------------------------------------------------------------------------------------
# CSMS and stations (all in this process, one clock)
# ------------------------------------------------------------------------------------------------


async def serve_csms(ready: asyncio.Future[int], stop: asyncio.Event) -> None:
    """Answer every CALL at once with a CALLRESULT the OCA schemas accept; the port into ``ready``."""
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed
    from websockets.typing import Subprotocol

    async def handler(connection: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in connection:
                message = json.loads(text)
                if message[0] != 2:
                    continue
                action = message[2]
                body: dict[str, Any] = {}
                if action == "BootNotification":
                    body = {"currentTime": utc_now(), "interval": 300, "status": "Accepted"}
                elif action == "Heartbeat":
                    body = {"currentTime": utc_now()}
                await connection.send(json.dumps([3, message[1], body]))

    async with serve(
        handler, HOST, 0, subprotocols=[Subprotocol(SUBPROTOCOL)], ping_interval=None, close_timeout=2, backlog=1024
    ) as server:
        ready.set_result(int(next(iter(server.sockets)).getsockname()[1]))
        await stop.wait()


@dataclass(frozen=True, slots=True)
class Accepted:
    """One SetChargingProfile a station answered Accepted: when (perf_counter), for which EVSE, what."""

    at_s: float
    evse_id: int
    purpose: str
    limit_amperes: float
    transaction_id: str | None


@dataclass
class Station:
    """One simulated station with one EVSE and one transaction; answers every profile Accepted."""

    identity: str
    transaction_id: str
    on_profile: Callable[[Station, Accepted], None]
    profiles: list[Accepted] = field(default_factory=list)
    oddities: list[str] = field(default_factory=list)
    connection: Any = None
    _pending: dict[str, asyncio.Future[list[Any]]] = field(default_factory=dict)
    _sequence: int = 0
    _default_answered: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, url: str, tasks: asyncio.TaskGroup) -> None:
        """Connect, start the reader, and go through boot, status and transaction start."""
        self.connection = await connect_station(url, self.identity)
        tasks.create_task(self._read())
        boot = await self.call(
            "BootNotification",
            {"reason": "PowerUp", "chargingStation": {"model": "bench", "vendorName": "ocpp-lc"}},
        )
        if boot.get("status") != "Accepted":
            raise BenchError(f"{self.identity}: BootNotification answered {boot}")
        await self.call(
            "StatusNotification",
            {"timestamp": utc_now(), "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1},
        )
        # The transaction starts once the idle EVSE's TxDefaultProfile is answered: a transaction that
        # starts while it is in flight leaves the EVSE's limit unknown to the controller, which then
        # waits out min_interval_s twice (a retry at the minimum, then the increase) before the session
        # gets its share; with the default 30 s that would dominate the set-up, not the rollout measured.
        async with asyncio.timeout(CALL_TIMEOUT_S):
            await self._default_answered.wait()
        await self.call(
            "TransactionEvent",
            {
                "eventType": "Started",
                "timestamp": utc_now(),
                "triggerReason": "Authorized",
                "seqNo": 0,
                "transactionInfo": {"transactionId": self.transaction_id, "chargingState": "Charging"},
                "evse": {"id": 1, "connectorId": 1},
            },
        )

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        self._sequence += 1
        message_id = f"{self.identity}-{self._sequence}"
        answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = answer
        await self.connection.send(json.dumps([2, message_id, action, payload]))
        async with asyncio.timeout(CALL_TIMEOUT_S):
            frame = await answer
        if frame[0] != 3:
            raise BenchError(f"{self.identity}: {action} answered with {frame}")
        result: dict[str, Any] = frame[2]
        return result

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            async for text in self.connection:
                frame = json.loads(text)
                if frame[0] == 2:
                    await self._answer(frame)
                elif frame[1] in self._pending:
                    self._pending.pop(frame[1]).set_result(frame)

    async def _answer(self, frame: list[Any]) -> None:
        message_id, action, payload = frame[1], frame[2], frame[3]
        if action != "SetChargingProfile":
            self.oddities.append(f"unexpected {action}")
            await self.connection.send(json.dumps([4, message_id, "NotImplemented", "", {}]))
            return
        profile = payload["chargingProfile"]
        schedule = profile["chargingSchedule"][0]
        await self.connection.send(json.dumps([3, message_id, {"status": "Accepted"}]))
        accepted = Accepted(
            at_s=time.perf_counter(),
            evse_id=payload["evseId"],
            purpose=profile["chargingProfilePurpose"],
            limit_amperes=float(schedule["chargingSchedulePeriod"][0]["limit"]),
            transaction_id=profile.get("transactionId"),
        )
        if payload["evseId"] != 1 or schedule["chargingRateUnit"] != "A":
            self.oddities.append(f"profile for EVSE {payload['evseId']} in {schedule['chargingRateUnit']}")
        if accepted.purpose == "TxProfile" and accepted.transaction_id != self.transaction_id:
            self.oddities.append(f"TxProfile for transaction {accepted.transaction_id}")
        self.profiles.append(accepted)
        if accepted.purpose == "TxDefaultProfile":
            self._default_answered.set()
        self.on_profile(self, accepted)

    def tx_limit(self) -> float | None:
        """The limit of the last TxProfile this station accepted."""
        for accepted in reversed(self.profiles):
            if accepted.purpose == "TxProfile":
                return accepted.limit_amperes
        return None


class Site:
    """The stations of one run and a way to wait until each has accepted a TxProfile since an instant."""

    def __init__(self, count: int) -> None:
        self.stations = [Station(f"EMS{index:05d}", f"tx-{index:05d}", self._on_profile) for index in range(count)]
        self._since_s = math.inf
        self._done: set[str] = set()
        self._all = asyncio.Event()

    def _on_profile(self, station: Station, accepted: Accepted) -> None:
        if accepted.purpose == "TxProfile" and accepted.at_s >= self._since_s:
            self._done.add(station.identity)
            if len(self._done) == len(self.stations):
                self._all.set()

    def expect_tx_profiles(self, since_s: float) -> asyncio.Event:
        """An event set once every station has answered a TxProfile Accepted at or after ``since_s``."""
        self._since_s = since_s
        self._done = {
            station.identity
            for station in self.stations
            if any(a.purpose == "TxProfile" and a.at_s >= since_s for a in station.profiles)
        }
        self._all = asyncio.Event()
        if len(self._done) == len(self.stations):
            self._all.set()
        return self._all

    def accepted_since(self, since_s: float) -> list[Accepted]:
        return [a for station in self.stations for a in station.profiles if a.at_s >= since_s]

    def missing(self) -> int:
        return len(self.stations) - len(self._done)


# ------------------------------------------------------------------------------------------------
# The controller's HTTP face
# ------------------------------------------------------------------------------------------------


def steady(document: dict[str, Any], stations: int) -> bool:
    """Every station's EVSE in a session, its allocation installed (rounded down as sent), nothing in flight."""
    rows = document["allocations"]
    if len(rows) != stations:
        return False
    for row in rows:
        allocated, installed = row["allocated_amperes"], row["installed_amperes"]
        if row["transaction_id"] is None or row["profile_in_flight"] or allocated is None or installed is None:
            return False
        if not allocated - RESOLUTION_AMPERES - 1e-6 < installed <= allocated + 1e-6:
            return False
    return True


async def wait_steady(client: Any, stations: int, deadline_s: float) -> float:
    """Poll /api/v1/allocations until steady; the perf_counter when the first steady answer arrived."""
    while True:
        response = await client.get("/api/v1/allocations")
        arrived = time.perf_counter()
        response.raise_for_status()
        document = response.json()
        if steady(document, stations):
            return arrived
        if arrived > deadline_s:
            rows = document["allocations"]
            unsettled = [row for row in rows if row["profile_in_flight"] or row["installed_amperes"] is None]
            raise BenchError(f"allocation not installed in time: {len(rows)} rows, {len(unsettled)} unsettled")
        await asyncio.sleep(POLL_INTERVAL_S)  # another process's state: nothing to wait on but a poll


def balancing_metrics(text: str) -> dict[str, float]:
    """The balancing counters and the reallocation histogram from a /metrics page, keyed by sample."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("ocpp_lc_balancing_profiles_total", "ocpp_lc_balancing_reallocation")):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def histogram_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    name = "ocpp_lc_balancing_reallocation_seconds"
    count = after.get(f"{name}_count", 0.0) - before.get(f"{name}_count", 0.0)
    total = after.get(f"{name}_sum", 0.0) - before.get(f"{name}_sum", 0.0)
    buckets = sorted(
        (float(key.split('le="', 1)[1].split('"', 1)[0]), after[key] - before.get(key, 0.0))
        for key in after
        if key.startswith(f"{name}_bucket")
    )

    def upper(fraction: float) -> float:
        return next((bound for bound, seen in buckets if seen >= fraction * count), math.inf)

    profiles = {
        key.split("{", 1)[1].rstrip("}"): after[key] - before.get(key, 0.0)
        for key in after
        if key.startswith("ocpp_lc_balancing_profiles_total") and after[key] - before.get(key, 0.0)
    }
    return {
        "reallocations": int(count),
        "mean_ms": total / count * 1e3 if count else math.nan,
        "p90_le_ms": upper(0.9) * 1e3 if count else math.nan,
        "max_le_ms": upper(1.0) * 1e3 if count else math.nan,
        "profiles": profiles,
    }


# ------------------------------------------------------------------------------------------------
# One run: a controller, N stations, rounds of decrease and release
# ------------------------------------------------------------------------------------------------


def start_controller(
    children: Children, args: argparse.Namespace, csms_port: int, cpus: set[int] | None, run: RunPlan
) -> Controller:
    lines = controller_toml(
        state_dir=children.log_dir / (run.name + "-state"),
        csms_port=csms_port,
        grid_amperes=args.grid_amperes,
        why_no_own_connection="no upstream reports: only the station side of the rollout is measured",
    )
    lines.append("[balancing]")
    if run.min_interval_s is not None:
        lines.append(f"min_interval_s = {run.min_interval_s:g}")
    return start_controller_with(children, run.name, lines, args.controller, cpus)


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure_phase(
    client: Any, site: Site, controller: Controller, method: str, body: dict[str, Any] | None, deadline_s: float
) -> dict[str, Any]:
    """Send the EMS request; times until every station accepted a TxProfile and the API shows it installed."""
    stations = len(site.stations)
    before_limits = [station.tx_limit() for station in site.stations]
    cpu_before, own_before, machine_before = controller.child.cpu_s(), own_cpu_s(), machine_cpu_s()
    sent = time.perf_counter()
    done = site.expect_tx_profiles(sent)
    url = f"/api/v1/limits/{SOURCE}"
    response = await (client.put(url, json=body) if method == "PUT" else client.delete(url))
    answered = time.perf_counter()
    if response.status_code != 200:
        raise BenchError(f"{method} {url} answered {response.status_code}: {response.text[:200]}")
    try:
        async with asyncio.timeout(max(0.0, deadline_s - time.perf_counter())):
            await done.wait()
    except TimeoutError:
        raise BenchError(f"{method}: {site.missing()} of {stations} stations got no TxProfile in time") from None
    installed = await wait_steady(client, stations, deadline_s)
    wall_s = time.perf_counter() - sent
    controller_cpu_s = controller.child.cpu_s() - cpu_before
    busy_s, steal_s = (after - earlier for after, earlier in zip(machine_cpu_s(), machine_before, strict=True))
    others_s = max(0.0, busy_s - controller_cpu_s - (own_cpu_s() - own_before))
    accepted = site.accepted_since(sent)
    times = sorted(a.at_s - sent for a in accepted)
    after_limits = [station.tx_limit() for station in site.stations]
    wrong_way = sum(
        1
        for old, new in zip(before_limits, after_limits, strict=True)
        if old is None or new is None or (new >= old if method == "PUT" else new <= old)
    )
    return {
        "http_ms": (answered - sent) * 1e3,
        "first_ms": times[0] * 1e3,
        "last_ms": times[-1] * 1e3,
        "installed_ms": (installed - sent) * 1e3,
        "profiles": len(accepted),
        "profiles_per_s": len(accepted) / times[-1] if times[-1] > 0 else math.inf,
        "controller_cpu_ms": controller_cpu_s * 1e3,
        "others_s": others_s + steal_s,
        "wall_s": wall_s,
        "limits": sorted({limit for limit in after_limits if limit is not None}),
        "wrong_way": wrong_way,
    }


@dataclass(frozen=True, slots=True)
class RunPlan:
    """One controller configuration: its name, ``min_interval_s`` (None: left at the default) and rounds."""

    name: str
    min_interval_s: float | None
    effective_interval_s: float
    rounds: int


async def run_config(
    children: Children, args: argparse.Namespace, layout_cpus: set[int] | None, run: RunPlan
) -> dict[str, Any]:
    """Start a controller, bring N stations up, run the rounds; everything this run measured."""
    import httpx

    name = run.name
    stop_csms = asyncio.Event()
    csms_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    shown = f"{run.effective_interval_s:g}" + (" (the default)" if run.min_interval_s is None else "")
    result: dict[str, Any] = {"min_interval_s": shown, "rounds": []}
    async with asyncio.TaskGroup() as tasks:
        csms_task = tasks.create_task(serve_csms(csms_ready, stop_csms))
        csms_port = await csms_ready
        controller = await asyncio.to_thread(start_controller, children, args, csms_port, layout_cpus, run)
        site = Site(args.stations)
        station_tasks = asyncio.TaskGroup()
        try:
            async with (
                httpx.AsyncClient(base_url=f"http://{HOST}:{controller.http_port}", timeout=30) as client,
                station_tasks,
            ):
                began = time.perf_counter()
                ready = site.expect_tx_profiles(began)
                url = f"ws://{HOST}:{controller.station_port}{PATH}"
                async with asyncio.timeout(SETUP_DEADLINE_S):
                    await start_stations(site.stations, url, station_tasks)
                    await ready.wait()
                    await wait_steady(client, args.stations, time.perf_counter() + SETUP_DEADLINE_S)
                result["setup_s"] = time.perf_counter() - began
                result["initial_limits"] = sorted({station.tx_limit() or 0.0 for station in site.stations})
                setup_tx = [a for station in site.stations for a in station.profiles if a.purpose == "TxProfile"]
                result["setup_tx_profiles"] = len(setup_tx)
                result["setup_tx_limits"] = sorted({a.limit_amperes for a in setup_tx})
                say(f"  {name}: {args.stations} stations charging after {result['setup_s']:.1f} s")
                metrics_before = balancing_metrics((await client.get("/metrics")).text)
                log_mark = len(controller.child.lines)
                body = {"unit": "A", "limit": args.share * args.stations, "valid_for_s": 3600}
                for index in range(run.rounds):
                    phases = {}
                    deadline = time.perf_counter() + PHASE_DEADLINE_S
                    phases["decrease"] = await measure_phase(client, site, controller, "PUT", body, deadline)
                    deadline = time.perf_counter() + PHASE_DEADLINE_S + run.effective_interval_s
                    phases["release"] = await measure_phase(client, site, controller, "DELETE", None, deadline)
                    result["rounds"].append(phases)
                    say(
                        f"  {name} round {index + 1}: decrease {phases['decrease']['last_ms']:.0f} ms, "
                        f"release {phases['release']['last_ms']:.0f} ms"
                    )
                metrics_after = balancing_metrics((await client.get("/metrics")).text)
                result["metrics"] = histogram_summary(metrics_before, metrics_after)
                result["log_problems"] = [
                    line
                    for line in controller.child.lines[log_mark:]
                    if " WARNING " in line or " ERROR " in line or "Traceback" in line
                ]
                result["oddities"] = sorted({odd for station in site.stations for odd in station.oddities})
                # Closing ends every station's reader, which lets the task group finish.
                await asyncio.gather(*(station.connection.close() for station in site.stations))
        finally:
            stop_csms.set()
            await asyncio.to_thread(children.stop, controller.child)
        await csms_task
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> str:
    ordered = sorted(values)
    return (
        f"{statistics.median(ordered):>7.0f} {percentile(ordered, 0.9):>6.0f} {ordered[-1]:>6.0f}" if ordered else "-"
    )


def report(result: dict[str, Any]) -> list[str]:
    out = [
        "",
        f"ocpp-lc EMS rollout benchmark — {result['started']}",
        f"  controller: {result['controller_command']} run --config <tmp>.toml; CPUs: {result['layout']}",
        f"  site: {result['stations']} stations × 1 EVSE in a transaction (3 phases, 6–32 A), grid "
        f"{result['grid_amperes']:g} A per phase; EMS limit {result['ems_amperes']:g} A per phase "
        f"({result['share']:g} A per station) by PUT /api/v1/limits/{SOURCE}, released by DELETE",
        "  times from just before the HTTP request is sent; 'last': the last station answered Accepted to its "
        "TxProfile; 'installed': /api/v1/allocations first showed every allocation installed and nothing in "
        "flight (polled every 5 ms after 'last'); 'HTTP': the API's answer",
    ]
    for run in result["runs"]:
        out.append("")
        out.append(
            f"[balancing] min_interval_s = {run['min_interval_s']}: {len(run['rounds'])} rounds "
            f"(set-up {run['setup_s']:.1f} s with {run['setup_tx_profiles']} TxProfiles at {run['setup_tx_limits']} A; "
            f"{run['initial_limits']} A before the first round)"
        )
        head = (
            f"{'phase':<9} | {'first ms':>8} | {'last ms: median':>15} {'p90':>6} {'max':>6} | "
            f"{'installed ms':>12} {'p90':>6} {'max':>6} | {'HTTP ms':>7} | {'profiles':>8} {'per s':>6} | "
            f"{'ctrl CPU ms':>11} {'µs/profile':>10} | {'others':>6} | limits after"
        )
        out += [head, "-" * len(head)]
        for phase in ("decrease", "release"):
            rows = [item[phase] for item in run["rounds"]]

            def column(key: str, rows: list[dict[str, Any]] = rows) -> list[float]:
                return [float(row[key]) for row in rows]

            cpu = statistics.median(column("controller_cpu_ms"))
            profiles = statistics.median(column("profiles"))
            limits = sorted({limit for row in rows for limit in row["limits"]})
            wrong = sum(row["wrong_way"] for row in rows)
            out.append(
                f"{phase:<9} | {statistics.median(column('first_ms')):>8.0f} | {_stats(column('last_ms')):>29} | "
                f"{_stats(column('installed_ms')):>26} | {statistics.median(column('http_ms')):>7.1f} | "
                f"{profiles:>8.0f} {statistics.median(column('profiles_per_s')):>6.0f} | "
                f"{cpu:>11.0f} {cpu * 1e3 / profiles if profiles else math.nan:>10.0f} | "
                f"{sum(column('others_s')) / sum(column('wall_s')) * 100:>5.0f}% | {limits}"
                + (f"  ({wrong} stations moved the wrong way or not at all)" if wrong else "")
            )
        metrics = run["metrics"]
        out.append(
            f"  ocpp_lc_balancing_reallocation_seconds over the rounds: {metrics['reallocations']} reallocations, "
            f"mean {metrics['mean_ms']:.2f} ms, p90 ≤ {metrics['p90_le_ms']:g} ms, max ≤ {metrics['max_le_ms']:g} ms "
            "(histogram buckets)"
        )
        out.append(
            "  ocpp_lc_balancing_profiles_total over the rounds: "
            + ", ".join(f"{labels} +{value:.0f}" for labels, value in sorted(metrics["profiles"].items()))
        )
        if run["oddities"]:
            out.append(f"  stations saw: {run['oddities'][:5]}")
        if run["log_problems"]:
            out.append(
                f"  controller log: {len(run['log_problems'])} warning/error lines, first: {run['log_problems'][:3]}"
            )
    out.append("")
    out.append(
        "  'per s': profiles accepted ÷ 'last'; 'ctrl CPU': the controller's CPU time from the request to "
        "'installed' (median); 'others': what other processes and the hypervisor took during that phase over all "
        "rounds (% of one CPU; 10 ms clock ticks, so rough for short phases); well above ~15 % the numbers are "
        "worse than the controller is"
    )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ems_rollout.py",
        description="Time from an EMS limit change to every station's charging profile accepted, through ocpp-lc.",
    )
    parser.add_argument("--stations", type=int, default=200, help="stations, one EVSE and one transaction each")
    parser.add_argument("--rounds", type=int, default=5, help="decrease/release rounds with min_interval_s = 0")
    parser.add_argument(
        "--default-interval-rounds",
        type=int,
        default=1,
        help="then rounds with the default [balancing] min_interval_s (each waits that long to release; 0: skip)",
    )
    parser.add_argument("--share", type=float, default=16.0, help="per-station share under the EMS limit (A)")
    add_run_options(parser, keep="the controller's log and TOML", output="the tables")
    args = parser.parse_args(argv)
    if args.stations < 1 or not 6 <= args.share < 31:
        parser.error("--stations must be positive and --share between 6 and 31 A (below the 32 A maximum)")
    # Room for every station at its 32 A maximum, within what the site model accepts.
    args.grid_amperes = min(10_000.0, 32.0 * args.stations + 100)
    if args.share * args.stations > 10_000:
        parser.error("--share × --stations must stay within 10,000 A (the EMS API's default maximum)")

    layout = choose_layout(not args.no_pin)
    from router.config import BalancingSettings

    default_interval_s = BalancingSettings().min_interval_s
    result: dict[str, Any] = {
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "controller_command": shlex.join(args.controller),
        "layout": "pinned: this script (CSMS + stations) on one CPU, the controller on another"
        if layout.controller
        else "unpinned",
        "stations": args.stations,
        "grid_amperes": args.grid_amperes,
        "share": args.share,
        "ems_amperes": args.share * args.stations,
        "runs": [],
    }
    say(f"CPUs: {result['layout']}")
    plans = [RunPlan("controller-interval-0", 0.0, 0.0, args.rounds)]
    plans.append(RunPlan("controller-default", None, default_interval_s, args.default_interval_rounds))

    def body(children: Children) -> None:
        for run in plans:
            if run.rounds > 0:
                result["runs"].append(asyncio.run(run_config(children, args, layout.controller, run)))

    if run_children(args.keep_logs, body):
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print("\n".join(report(result)))
    return 0


if __name__ == "__main__":
    script(main)
