"""What the scripts that run the controller as a child share: its TOML, its start, and a ``main``'s frame.

Built on ``forwarding.py``'s process handling (:class:`forwarding.Children`: every child stopped in a
``finally``, CPU pinning). Used by ``ems_rollout.py`` and ``outage.py``; run by hand, not by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from forwarding import (
    _UP_LINE,
    START_DEADLINE_S,
    BenchError,
    Children,
    Controller,
    default_controller_command,
    raise_nofile_limit,
)

HOST = "127.0.0.1"
PATH = "/ocpp"
SUBPROTOCOL = "ocpp2.0.1"
#: Stations opening their connections at the same time while a bench sets up.
CONNECT_CONCURRENCY = 50


class BenchStation(Protocol):
    async def start(self, url: str, tasks: asyncio.TaskGroup) -> None: ...


def utc_now() -> str:
    """Now as an OCPP timestamp (UTC, milliseconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def say(text: str) -> None:
    """A progress line, on stderr (stdout carries the report)."""
    print(text, file=sys.stderr, flush=True)


def add_run_options(parser: argparse.ArgumentParser, *, keep: str, output: str) -> None:
    """The options every such script has: --no-pin, --keep-logs (``keep``: what is kept), --json, --controller.

    ``output`` names what is printed without --json.
    """
    parser.add_argument("--no-pin", action="store_true", help="let every process share every CPU")
    parser.add_argument("--keep-logs", type=Path, help=f"keep {keep} here")
    parser.add_argument("--json", action="store_true", help=f"print one JSON document instead of {output}")
    parser.add_argument(
        "--controller",
        type=shlex.split,
        default=default_controller_command(),
        help="command that starts the controller, given 'run --config FILE' (default: the ocpp-lc console script)",
    )


def controller_toml(*, state_dir: Path, csms_port: int, grid_amperes: float, why_no_own_connection: str) -> list[str]:
    """The TOML lines every bench controller starts from; the caller appends its own tables after them.

    Stations and HTTP on 127.0.0.1 port 0 (read from the start-up line), no pings on either leg, the own
    CSMS connection off (``why_no_own_connection`` says why, as a comment), the site grid as given.
    """
    return [
        "[controller]",
        'identity = "LC01"',
        f"connect = false  # {why_no_own_connection}",
        "[state]",
        f'dir = "{state_dir}"',
        "[stations]",
        f'listen = "{HOST}:0"',
        f'path = "{PATH}"',
        "ping_interval_s = 0",
        "handshake_timeout_s = 60",
        "[csms]",
        f'url = "ws://{HOST}:{csms_port}{PATH}"',
        "ping_interval_s = 0",
        "[routing]",
        "shutdown_grace_s = 2",
        "[http]",
        f'listen = "{HOST}:0"',
        "[site.grid]",
        f"max_current_amperes = {grid_amperes:g}",
    ]


def start_controller_with(
    children: Children, name: str, lines: list[str], command: list[str], cpus: set[int] | None
) -> Controller:
    """Write ``lines`` as ``<name>.toml``, start ``command run --config`` it, and wait for its start-up line."""
    config = children.log_dir / f"{name}.toml"
    config.write_text("\n".join([*lines, "[log]", 'level = "info"', ""]))
    child = children.start(name, [*command, "run", "--config", str(config)], cpus=cpus, watch="stderr")
    _, line = child.expect(lambda text: bool(_UP_LINE.search(text)), START_DEADLINE_S, "start-up line")
    match = _UP_LINE.search(line)
    assert match is not None
    return Controller(child, int(match[1]), int(match[2]))


async def connect_station(url: str, identity: str) -> Any:
    """A websocket (``websockets``) to the controller at ``url`` as station ``identity``: OCPP 2.0.1, no pings."""
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    return await connect(
        f"{url}/{identity}",
        subprotocols=[Subprotocol(SUBPROTOCOL)],
        ping_interval=None,
        open_timeout=30,
        close_timeout=5,
    )


async def start_stations(stations: Iterable[BenchStation], url: str, tasks: asyncio.TaskGroup) -> None:
    """Start every station (``station.start(url, tasks)``), at most CONNECT_CONCURRENCY at a time."""
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def bring_up(station: BenchStation) -> None:
        async with gate:
            await station.start(url, tasks)

    await asyncio.gather(*(bring_up(station) for station in stations))


def run_children(keep_logs: Path | None, body: Callable[[Children], None]) -> int:
    """Run ``body`` with the children of a run; 0, or 1 with the first failure on stderr.

    SIGTERM unwinds like Ctrl-C, through the ``finally`` that stops every child; the logs go to
    ``keep_logs`` (made if need be) or to a temporary directory removed afterwards. A BenchError or a
    timeout, also from inside task groups, is a failed run.
    """
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    raise_nofile_limit()
    failures: list[BaseException] = []
    with contextlib.ExitStack() as stack:
        if keep_logs:
            keep_logs.mkdir(parents=True, exist_ok=True)
            log_dir = keep_logs
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ocpp-lc-bench-")))
        children = Children(log_dir)
        stack.callback(children.stop_all)
        try:
            body(children)
        except* (BenchError, TimeoutError) as group:  # the task groups wrap what failed
            failures += _leaves(group)
    if failures:
        print(f"benchmark failed: {failures[0]!r}", file=sys.stderr)
        return 1
    return 0


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for inner in group.exceptions for leaf in _leaves(inner)]
    return [group]


def script(main: Callable[[list[str]], int]) -> None:
    """Run ``main`` with the command line as a script does, and exit with its status (130 on Ctrl-C)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
