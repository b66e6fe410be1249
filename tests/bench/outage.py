"""Outage benchmark: a site charging through a CSMS outage, and the replay once it is back (issue 12, Done-when 6).

Run by hand (not collected by pytest)::

    python tests/bench/outage.py [--stations 200] [--outage-s 60] [--updates 4]

Theory of operation. Two processes:

* the **controller**: ``ocpp-lc run --config <tmp toml>`` as a user starts it (stations and HTTP on
  127.0.0.1 port 0, read from its start-up log line), ``[autonomy]`` at its defaults unless an option
  says otherwise, its own CSMS connection off, pings off on both legs (the CSMS's loss is seen as the TCP
  connection ending), a site grid large enough for every station at its maximum so that balancing runs
  as on a real site;
* **this script**, on one asyncio loop: a minimal CSMS (`websockets`) that can be taken away and
  brought back on the same port, and N stations (`websockets` clients) with one EVSE each.

Phases:

1. **online**: each station connects through the controller, sends BootNotification (the CSMS accepts
   it, so the controller's boot cache learns the verdict), StatusNotification Available and Authorize
   with a token of its own (the authorization cache learns it Accepted).
2. **outage**: the CSMS stops listening and drops every connection at once (like a WAN link or a CSMS
   process dying). Once ``/metrics`` shows every station served locally, each station runs one
   transaction: StatusNotification Occupied, TransactionEvent Started (its idToken), ``--updates``
   TransactionEvent Updated with a meter value each, then Ended and StatusNotification Available, spread
   over the outage. Every answer must be a CALLRESULT (the controller answers them itself).
3. **return**: at ``--outage-s`` after the stop, the CSMS listens again on the same port. It counts every
   WebSocket connection it accepts per 1 s bucket (from the return), and every replayed call (an id of
   the controller's own); the phase ends when the controller's ``/metrics`` show no station local or
   replaying and nothing queued.

Numbers: messages queued (the queue gauges at the end of the outage and the local-answer counter by what
was kept), disk (the state store's files before and at the end of the outage, and the queue bytes
gauge), time from the CSMS's return to its answer to the last replayed call and to the controller
relaying every station again, and the CSMS's peak accepted connections per second against
``reconnect_rate_per_s``. Checks: every TransactionEvent reached the CSMS exactly once and in seqNo order
per transaction, flagged offline; no station saw an answer to a call it did not make.

The script and its stations are pinned to the first CPU and the controller to the second (``--no-pin``:
anywhere), as in ``forwarding.py``, whose process helpers this script reuses (with ``plumbing.py``, as
``ems_rollout.py`` does). Every child is stopped in a ``finally``; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import random
import shlex
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The sibling benchmark's process handling (children stopped in a finally, CPU pinning, /proc readings).
from forwarding import (
    _PROBLEM_LINE,
    BenchError,
    Children,
    Controller,
    choose_layout,
    machine_cpu_s,
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

CALL_TIMEOUT_S = 30.0
SETUP_DEADLINE_S = 120.0
#: How long the controller may take to notice the outage for every station.
LOSS_DEADLINE_S = 30.0
#: The replay must be over within this after the CSMS's return (reconnect pacing + backoff + replay).
RETURN_DEADLINE_S = 600.0
#: Between two reads of /metrics while waiting on the controller (another process's state: polled).
POLL_INTERVAL_S = 0.1
#: The transaction of each station runs within this fraction of the outage (the rest is margin).
TRANSACTION_SPAN = 0.85


def _is_lc_message_id(message_id: str) -> bool:
    from router.ocppj import is_lc_message_id

    return bool(is_lc_message_id(message_id))


# ------------------------------------------------------------------------------------------------
# The CSMS: taken away and brought back on the same port
# ------------------------------------------------------------------------------------------------


@dataclass
class Csms:
    """A minimal CSMS answering every CALL at once; counts accepted connections and replayed calls."""

    port: int = 0
    accepts_s: list[float] = field(default_factory=list)  # perf_counter of every accepted WebSocket
    requests_s: list[float] = field(default_factory=list)  # and of every opening handshake request read
    replayed: Counter[str] = field(default_factory=Counter)  # replayed calls by action
    last_replay_answer_s: float = math.nan
    first_replay_s: float = math.nan
    #: transactionId -> every TransactionEvent seqNo received, in arrival order; and offline flags seen.
    seq_nos: dict[str, list[int]] = field(default_factory=dict)
    offline_flags: Counter[bool] = field(default_factory=Counter)
    _server: Any = None

    async def start(self) -> None:
        from websockets.asyncio.server import serve
        from websockets.typing import Subprotocol

        self._server = await serve(
            self._handle,
            HOST,
            self.port,
            process_request=self._on_request,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            ping_interval=None,
            close_timeout=2,
            backlog=1024,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])

    async def stop(self) -> None:
        """Stop listening and drop every connection without a closing handshake (the CSMS is just gone)."""
        server, self._server = self._server, None
        server.close(close_connections=False)
        for connection in list(server.connections):
            connection.transport.abort()
        await server.wait_closed()

    def _on_request(self, connection: Any, request: Any) -> None:
        self.requests_s.append(time.perf_counter())

    async def _handle(self, connection: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.accepts_s.append(time.perf_counter())
        with contextlib.suppress(ConnectionClosed):
            async for text in connection:
                message = json.loads(text)
                if message[0] != 2:
                    continue
                message_id, action, payload = message[1], message[2], message[3]
                body: dict[str, Any] = {}
                if action == "BootNotification":
                    body = {"currentTime": utc_now(), "interval": 300, "status": "Accepted"}
                elif action == "Heartbeat":
                    body = {"currentTime": utc_now()}
                elif action == "Authorize" or (action == "TransactionEvent" and "idToken" in payload):
                    body = {"idTokenInfo": {"status": "Accepted"}}
                if action == "TransactionEvent":
                    transaction_id = payload["transactionInfo"]["transactionId"]
                    self.seq_nos.setdefault(transaction_id, []).append(payload["seqNo"])
                    self.offline_flags[bool(payload.get("offline"))] += 1
                await connection.send(json.dumps([3, message_id, body]))
                if _is_lc_message_id(message_id):
                    now = time.perf_counter()
                    if not self.replayed:
                        self.first_replay_s = now
                    self.replayed[action] += 1
                    self.last_replay_answer_s = now


# ------------------------------------------------------------------------------------------------
# Stations
# ------------------------------------------------------------------------------------------------


def _meter_value(energy_wh: float) -> list[dict[str, Any]]:
    return [
        {
            "timestamp": utc_now(),
            "sampledValue": [
                {
                    "value": round(energy_wh, 1),
                    "measurand": "Energy.Active.Import.Register",
                    "unitOfMeasure": {"unit": "Wh"},
                },
                {"value": 15.9, "measurand": "Current.Import", "phase": "L1", "unitOfMeasure": {"unit": "A"}},
            ],
        }
    ]


@dataclass
class Station:
    """One simulated station with one EVSE; answers every call of the controller's Accepted."""

    identity: str
    token: str
    transaction_id: str
    oddities: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # CALLERRORs to its calls
    local_token_status: str | None = None
    profiles: int = 0
    connection: Any = None
    _pending: dict[str, asyncio.Future[list[Any]]] = field(default_factory=dict)
    _sequence: int = 0

    async def start(self, url: str, tasks: asyncio.TaskGroup) -> None:
        self.connection = await connect_station(url, self.identity)
        tasks.create_task(self._read())
        boot = await self.call(
            "BootNotification", {"reason": "PowerUp", "chargingStation": {"model": "bench", "vendorName": "ocpp-lc"}}
        )
        if boot.get("status") != "Accepted":
            raise BenchError(f"{self.identity}: BootNotification answered {boot}")
        await self.status("Available")
        answer = await self.call("Authorize", {"idToken": {"idToken": self.token, "type": "ISO14443"}})
        if answer.get("idTokenInfo", {}).get("status") != "Accepted":
            raise BenchError(f"{self.identity}: Authorize answered {answer}")

    async def status(self, status: str) -> None:
        await self.call(
            "StatusNotification", {"timestamp": utc_now(), "connectorStatus": status, "evseId": 1, "connectorId": 1}
        )

    async def transaction(self, updates: int, span_s: float, rng: random.Random) -> None:
        """One transaction spread over ``span_s``: Started, ``updates`` × Updated, Ended (each answered locally)."""
        steps = updates + 2
        gap_s = span_s / steps
        await asyncio.sleep(rng.uniform(0.0, gap_s))  # the stations do not all start in the same instant
        await self.status("Occupied")
        energy_wh = 10_000.0
        info = {"transactionId": self.transaction_id, "chargingState": "Charging"}
        started = await self.call(
            "TransactionEvent",
            {
                "eventType": "Started",
                "timestamp": utc_now(),
                "triggerReason": "Authorized",
                "seqNo": 0,
                "transactionInfo": info,
                "idToken": {"idToken": self.token, "type": "ISO14443"},
                "evse": {"id": 1, "connectorId": 1},
                "meterValue": _meter_value(energy_wh),
            },
        )
        self.local_token_status = started.get("idTokenInfo", {}).get("status")
        for seq_no in range(1, updates + 1):
            await asyncio.sleep(gap_s)
            energy_wh += 250.0
            await self.call(
                "TransactionEvent",
                {
                    "eventType": "Updated",
                    "timestamp": utc_now(),
                    "triggerReason": "MeterValuePeriodic",
                    "seqNo": seq_no,
                    "transactionInfo": info,
                    "meterValue": _meter_value(energy_wh),
                },
            )
        await asyncio.sleep(gap_s)
        await self.call(
            "TransactionEvent",
            {
                "eventType": "Ended",
                "timestamp": utc_now(),
                "triggerReason": "EVCommunicationLost",
                "seqNo": updates + 1,
                "transactionInfo": {**info, "chargingState": "Idle", "stoppedReason": "EVDisconnected"},
                "meterValue": _meter_value(energy_wh + 100.0),
            },
        )
        await self.status("Available")

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        self._sequence += 1
        message_id = f"{self.identity}-{self._sequence}"
        answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._pending[message_id] = answer
        await self.connection.send(json.dumps([2, message_id, action, payload]))
        async with asyncio.timeout(CALL_TIMEOUT_S):
            frame = await answer
        if frame[0] != 3:
            self.errors.append(f"{action}: {frame[2]}")
            return {}
        result: dict[str, Any] = frame[2]
        return result

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for text in self.connection:
                frame = json.loads(text)
                if frame[0] == 2:
                    await self._answer(frame)
                elif frame[1] in self._pending:
                    self._pending.pop(frame[1]).set_result(frame)
                else:
                    self.oddities.append(f"answer to no call of ours ({frame[1][:40]})")
        except ConnectionClosed as closed:
            if closed.rcvd is None or closed.rcvd.code != 1000:
                self.oddities.append(f"connection closed ({closed})")

    async def _answer(self, frame: list[Any]) -> None:
        message_id, action = frame[1], frame[2]
        if action == "SetChargingProfile":
            self.profiles += 1
            body: dict[str, Any] = {"status": "Accepted"}
        elif action == "ClearChargingProfile":
            body = {"status": "Accepted"}
        else:
            self.oddities.append(f"unexpected {action}")
            await self.connection.send(json.dumps([4, message_id, "NotImplemented", "", {}]))
            return
        await self.connection.send(json.dumps([3, message_id, body]))


# ------------------------------------------------------------------------------------------------
# The controller
# ------------------------------------------------------------------------------------------------


def start_controller(children: Children, args: argparse.Namespace, csms_port: int, cpus: set[int] | None) -> Controller:
    lines = controller_toml(
        state_dir=args.state_dir,
        csms_port=csms_port,
        grid_amperes=min(10_000.0, 32.0 * args.stations + 100),
        why_no_own_connection="only the stations' legs reach the CSMS",
    )
    lines += ["[balancing]", f"enabled = {'false' if args.no_balancing else 'true'}", "[autonomy]"]
    if args.reconnect_rate is not None:
        lines.append(f"reconnect_rate_per_s = {args.reconnect_rate:g}")
    if args.backoff_max_s is not None:
        lines.append(f"reconnect_backoff_max_s = {args.backoff_max_s:g}")
    return start_controller_with(children, "controller", lines, args.controller, cpus)


def autonomy_metrics(text: str) -> dict[str, float]:
    """The autonomy gauges and counters from a /metrics page, keyed by sample (name plus labels)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("ocpp_lc_autonomy_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def local_stations(metrics: dict[str, float]) -> tuple[int, int]:
    return (
        int(metrics.get('ocpp_lc_autonomy_stations{mode="local"}', 0)),
        int(metrics.get('ocpp_lc_autonomy_stations{mode="replaying"}', 0)),
    )


async def read_metrics(client: Any) -> dict[str, float]:
    response = await client.get("/metrics")
    response.raise_for_status()
    return autonomy_metrics(response.text)


async def poll_until(client: Any, done: Any, deadline_s: float, what: str) -> tuple[float, dict[str, float]]:
    """Poll /metrics until ``done(metrics)``; (when the first such answer arrived, the metrics)."""
    while True:
        metrics = await read_metrics(client)
        arrived = time.perf_counter()
        if done(metrics):
            return arrived, metrics
        if arrived > deadline_s:
            raise BenchError(f"{what} not reached in time; autonomy metrics: {metrics}")
        await asyncio.sleep(POLL_INTERVAL_S)


def store_bytes(state_dir: Path) -> dict[str, int]:
    """The state store's size on disk: the database file and its write-ahead log (bytes)."""
    sizes = {"db": 0, "wal": 0}
    for name, key in (("state.sqlite3", "db"), ("state.sqlite3-wal", "wal")):
        with contextlib.suppress(FileNotFoundError):
            sizes[key] = (state_dir / name).stat().st_size
    return sizes


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def accept_rates(accepts_s: list[float], since_s: float) -> dict[str, Any]:
    """Accepted connections after ``since_s``: per 1 s bucket from it, and the busiest sliding second."""
    offsets = sorted(t - since_s for t in accepts_s if t >= since_s)
    buckets = Counter(int(offset) for offset in offsets)
    sliding = 0
    start = 0
    for end, offset in enumerate(offsets):
        while offset - offsets[start] >= 1.0:
            start += 1
        sliding = max(sliding, end - start + 1)
    return {
        "accepts": len(offsets),
        "peak_per_bucket": max(buckets.values(), default=0),
        "peak_sliding_1s": sliding,
        "first_s": offsets[0] if offsets else math.nan,
        "last_s": offsets[-1] if offsets else math.nan,
        "buckets": [buckets.get(second, 0) for second in range(int(offsets[-1]) + 1)] if offsets else [],
    }


def check_transactions(csms: Csms, stations: list[Station], events_each: int) -> dict[str, int]:
    duplicates = missing = out_of_order = 0
    for station in stations:
        seen = csms.seq_nos.get(station.transaction_id, [])
        duplicates += len(seen) - len(set(seen))
        missing += len(set(range(events_each)) - set(seen))
        out_of_order += int(seen != sorted(seen))
    return {"duplicates": duplicates, "missing": missing, "transactions_out_of_order": out_of_order}


async def run(children: Children, args: argparse.Namespace, cpus: set[int] | None) -> dict[str, Any]:
    import httpx

    from router.autonomy.settings import AutonomySettings

    defaults = AutonomySettings()
    result: dict[str, Any] = {
        "stations": args.stations,
        "outage_s": args.outage_s,
        "updates": args.updates,
        "reconnect_rate_per_s": args.reconnect_rate
        if args.reconnect_rate is not None
        else defaults.reconnect_rate_per_s,
        "reconnect_backoff_max_s": args.backoff_max_s
        if args.backoff_max_s is not None
        else defaults.reconnect_backoff_max_s,
    }
    rng = random.Random(args.seed)
    csms = Csms()
    await csms.start()
    controller = await asyncio.to_thread(start_controller, children, args, csms.port, cpus)
    result["controller_pid"] = controller.child.pid
    stations = [Station(f"OUT{index:05d}", f"TAG{index:05d}", f"tx-{index:05d}") for index in range(args.stations)]
    station_tasks = asyncio.TaskGroup()
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://{HOST}:{controller.http_port}", timeout=30) as client,
            station_tasks,
        ):
            # 1. online
            began = time.perf_counter()
            url = f"ws://{HOST}:{controller.station_port}{PATH}"
            async with asyncio.timeout(SETUP_DEADLINE_S):
                await start_stations(stations, url, station_tasks)
            result["setup_s"] = time.perf_counter() - began
            say(f"  {args.stations} stations booted and authorised online in {result['setup_s']:.1f} s")
            await asyncio.sleep(2.0)  # let balancing's first profiles settle before the store is measured
            result["store_bytes_before"] = store_bytes(args.state_dir)
            metrics_before = await read_metrics(client)
            log_mark = len(controller.child.lines)

            # 2. outage
            cpu_before, machine_before = controller.child.cpu_s(), machine_cpu_s()
            stopped = time.perf_counter()
            await csms.stop()
            say(f"  CSMS gone; its return is due in {args.outage_s:g} s")
            seen, _ = await poll_until(
                client,
                lambda m: local_stations(m)[0] == args.stations,
                stopped + LOSS_DEADLINE_S,
                "every station served locally",
            )
            result["all_local_after_s"] = seen - stopped
            span_s = max(1.0, (args.outage_s - result["all_local_after_s"]) * TRANSACTION_SPAN)
            async with asyncio.timeout(args.outage_s + CALL_TIMEOUT_S):
                await asyncio.gather(*(station.transaction(args.updates, span_s, rng) for station in stations))
            result["transactions_done_s"] = time.perf_counter() - stopped
            await asyncio.sleep(max(0.0, stopped + args.outage_s - time.perf_counter()))
            at_end = await read_metrics(client)
            result["store_bytes_end_of_outage"] = store_bytes(args.state_dir)
            result["queue_messages"] = int(at_end.get("ocpp_lc_autonomy_queue_messages", 0))
            result["queue_bytes"] = int(at_end.get("ocpp_lc_autonomy_queue_bytes", 0))
            result["local_answers"] = {
                key.split('kept="', 1)[1].rstrip('"}'): value - metrics_before.get(key, 0.0)
                for key, value in at_end.items()
                if key.startswith("ocpp_lc_autonomy_local_answers_total{")
            }
            result["local_at_end_of_outage"] = local_stations(at_end)

            # 3. return
            await csms.start()
            returned = time.perf_counter()
            say(f"  CSMS back after {returned - stopped:.1f} s; waiting for the replay")
            relaying, after = await poll_until(
                client,
                lambda m: local_stations(m) == (0, 0) and m.get("ocpp_lc_autonomy_queue_messages", 1) == 0,
                returned + RETURN_DEADLINE_S,
                "every station relaying with nothing queued",
            )
            result["controller_cpu_s"] = controller.child.cpu_s() - cpu_before
            busy_s, steal_s = (a - b for a, b in zip(machine_cpu_s(), machine_before, strict=True))
            result["machine_busy_s"], result["machine_steal_s"] = busy_s, steal_s
            result["wall_s"] = time.perf_counter() - stopped
            result["all_relaying_after_return_s"] = relaying - returned
            result["last_replay_answer_after_return_s"] = csms.last_replay_answer_s - returned
            result["first_replay_after_return_s"] = csms.first_replay_s - returned
            result["replayed_calls"] = dict(csms.replayed)
            result["replayed_total"] = {
                key.split('outcome="', 1)[1].rstrip('"}'): value - metrics_before.get(key, 0.0)
                for key, value in after.items()
                if key.startswith("ocpp_lc_autonomy_replayed_total{")
            }
            result["store_bytes_after_replay"] = store_bytes(args.state_dir)
            result["accepts"] = accept_rates(csms.accepts_s, returned)
            result["requests"] = accept_rates(csms.requests_s, returned)
            result["checks"] = check_transactions(csms, stations, args.updates + 2)
            result["offline_flags"] = {str(key): value for key, value in csms.offline_flags.items()}
            result["local_token_statuses"] = dict(Counter(str(s.local_token_status) for s in stations))
            result["station_errors"] = sum(len(s.errors) for s in stations)
            result["station_error_examples"] = sorted({e for s in stations for e in s.errors})[:3]
            result["oddities"] = sorted({odd for s in stations for odd in s.oddities})[:5]
            problems = [line for line in controller.child.lines[log_mark:] if _PROBLEM_LINE.search(line)]
            result["log_warnings"] = sum(1 for line in problems if " WARNING " in line)
            result["log_errors"] = [line for line in problems if " WARNING " not in line][:3]
            await asyncio.gather(*(station.connection.close() for station in stations))
    finally:
        await asyncio.to_thread(children.stop, controller.child)
        with contextlib.suppress(Exception):
            await csms.stop()
    return result


def report(result: dict[str, Any]) -> list[str]:
    accepts = result["accepts"]
    requests = result["requests"]
    rate = result["reconnect_rate_per_s"]
    answers = result["local_answers"]
    checks = result["checks"]
    kib = 1024
    db_growth = result["store_bytes_end_of_outage"]["db"] - result["store_bytes_before"]["db"]
    wal_growth = result["store_bytes_end_of_outage"]["wal"] - result["store_bytes_before"]["wal"]
    busy_percent = result["machine_busy_s"] / result["wall_s"] * 100
    out = [
        "",
        f"ocpp-lc outage benchmark — {result['started']}",
        f"  controller: {result['controller_command']} run --config <tmp>.toml; CPUs: {result['layout']}",
        f"  {result['stations']} stations, each one transaction (Started, {result['updates']} Updated, Ended, "
        f"each with a meter value) during a {result['outage_s']:g} s outage; [autonomy] reconnect_rate_per_s = "
        f"{rate:g}, reconnect_backoff_max_s = {result['reconnect_backoff_max_s']:g}",
        f"  set-up {result['setup_s']:.1f} s; every station local {result['all_local_after_s']:.2f} s after the "
        f"CSMS went; transactions done {result['transactions_done_s']:.1f} s after",
        "",
        "during the outage",
        f"  messages kept for the CSMS: {result['queue_messages']} (ocpp_lc_autonomy_queue_messages at the end); "
        "local answers by what was kept: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(answers.items())),
        f"  queue bytes (ocpp_lc_autonomy_queue_bytes): {result['queue_bytes']} "
        f"({result['queue_bytes'] / max(1, result['queue_messages']):.0f} B a message)",
        "  state store on disk, state.sqlite3 + its WAL (KiB): "
        + "; ".join(
            f"{when} {sizes['db'] / kib:.0f} + {sizes['wal'] / kib:.0f}"
            for when, sizes in (
                ("before", result["store_bytes_before"]),
                ("end of the outage", result["store_bytes_end_of_outage"]),
                ("after the replay", result["store_bytes_after_replay"]),
            )
        )
        + f" (growth over the outage: {(db_growth) / kib:+.0f} KiB database, {wal_growth / kib:+.0f} KiB WAL)",
        "",
        "after the CSMS's return",
        f"  first replayed call at the CSMS after {result['first_replay_after_return_s']:.2f} s; its answer to the "
        f"last replayed call after {result['last_replay_answer_after_return_s']:.2f} s; every station relaying "
        f"with nothing queued (/metrics, polled every {POLL_INTERVAL_S * 1e3:.0f} ms) after "
        f"{result['all_relaying_after_return_s']:.2f} s",
        f"  replayed calls: {sum(result['replayed_calls'].values())} ("
        + ", ".join(f"{k} {v}" for k, v in sorted(result["replayed_calls"].items()))
        + "); ocpp_lc_autonomy_replayed_total: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(result["replayed_total"].items())),
        f"  CSMS accepted {accepts['accepts']} connections, from {accepts['first_s']:.2f} s to "
        f"{accepts['last_s']:.2f} s: peak {accepts['peak_per_bucket']} in a 1 s bucket "
        f"({accepts['peak_sliding_1s']} in the busiest sliding second) against reconnect_rate_per_s = {rate:g}",
        f"  accepts per 1 s bucket: {accepts['buckets']}",
        f"  opening handshake requests read (before the CSMS answers them): peak {requests['peak_per_bucket']} in a "
        f"1 s bucket, {requests['peak_sliding_1s']} in the busiest sliding second",
        "",
        "checks",
        f"  TransactionEvents at the CSMS: {checks['duplicates']} repeated, {checks['missing']} missing, "
        f"{checks['transactions_out_of_order']} transactions out of seqNo order; "
        f"offline flags {result['offline_flags']}",
        f"  idToken status answered locally to Started: {result['local_token_statuses']}; CALLERRORs to stations: "
        f"{result['station_errors']} {result['station_error_examples']}; "
        f"stations saw: {result['oddities'] or 'nothing odd'}",
        f"  controller log: {result['log_warnings']} warnings (the CSMS's loss, one or more per station), "
        f"errors: {result['log_errors'] or 'none'}",
        f"  CPU from the CSMS's stop to the end: controller {result['controller_cpu_s']:.1f} s, whole machine "
        f"{busy_percent:.0f} % of one CPU on average over {result['wall_s']:.0f} s "
        f"(steal {result['machine_steal_s']:.1f} s); a shared machine inflates the times after the return",
    ]
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="outage.py", description="A site charging through a CSMS outage behind ocpp-lc, and the replay after."
    )
    parser.add_argument("--stations", type=int, default=200, help="stations, one EVSE and one transaction each")
    parser.add_argument("--outage-s", type=float, default=60.0, help="how long the CSMS is away (s)")
    parser.add_argument("--updates", type=int, default=4, help="TransactionEvent Updated per transaction")
    parser.add_argument("--reconnect-rate", type=float, help="[autonomy] reconnect_rate_per_s (default: its default)")
    parser.add_argument("--backoff-max-s", type=float, help="[autonomy] reconnect_backoff_max_s (default: its default)")
    parser.add_argument("--no-balancing", action="store_true", help="[balancing] enabled = false")
    parser.add_argument("--seed", type=int, default=1, help="seed of the stations' start offsets")
    add_run_options(parser, keep="the controller's log, TOML and state", output="the report")
    args = parser.parse_args(argv)
    if args.stations < 1 or args.outage_s < 5 or args.updates < 0:
        parser.error("--stations must be positive, --outage-s at least 5, --updates not negative")

    layout = choose_layout(not args.no_pin)
    result: dict[str, Any] = {}

    def body(children: Children) -> None:
        args.state_dir = children.log_dir / "state"
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        result.update(asyncio.run(run(children, args, layout.controller)))
        result["started"] = started
        result["controller_command"] = shlex.join(args.controller)
        result["layout"] = (
            "pinned: this script (CSMS + stations) on one CPU, the controller on another"
            if layout.controller
            else "unpinned"
        )

    if run_children(args.keep_logs, body):
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print("\n".join(report(result)))
    return 0


if __name__ == "__main__":
    script(main)
