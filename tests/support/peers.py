"""Drive the independent test peers (`tests/peers/csms.py`, `tests/peers/station.py`, and the OCPP 1.6J
station `tests/peers/station16.py`) from trio tests.

A peer runs as a subprocess. It prints one JSON event per line on stdout and reads one JSON command
per line on stdin; `Peer` keeps every event in order and lets a test wait for one. Nothing here
sleeps to synchronise: a test waits for the event that proves what it needs, inside its own
`trio.fail_after`. Since the peers are real processes, such tests run on the real clock.

    async with open_csms() as (csms, port), open_station(f"ws://127.0.0.1:{port}/ocpp", "CS01") as cs:
        with trio.fail_after(10):
            await csms.wait_for(lambda e: e["event"] == "request" and e["action"] == "BootNotification")
            reply = await csms.call(identity="CS01", action="GetVariables", payload={...})
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

#: The repository root: the peers are run as `python -m tests.peers.<name>` from there.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: How long a peer gets to exit after its stdin is closed before it gets SIGTERM.
EOF_GRACE_S = 1.0

#: How long a peer gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 3.0

#: How much of a peer's stderr is kept for error messages.
STDERR_TAIL_BYTES = 16_384

Event = dict[str, Any]


class PeerExited(Exception):
    """The peer process ended while a test was waiting on it or writing to it."""

    def __init__(self, name: str, returncode: int | None, stderr_tail: str) -> None:
        super().__init__(f"{name} exited (returncode {returncode}); stderr tail:\n{stderr_tail}")
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class Peer:
    """One running peer: its event history, and the commands a test can send it."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.name = name
        self.events: list[Event] = []
        self._process = process
        self._stdin_lock = trio.Lock()  # a trio stream takes one writer at a time
        self._stderr_tail = bytearray()
        self._stderr_done = trio.Event()
        self._exited = trio.Event()
        self._changed = trio.Event()
        self._refs = itertools.count(1)

    @property
    def returncode(self) -> int | None:
        return self._process.returncode

    def kill(self) -> None:
        """SIGKILL the peer (a crash: no close frames, its sockets just vanish); its events stay readable."""
        if self._process.returncode is None:
            self._process.kill()

    async def wait_exited(self) -> None:
        """Wait until the peer process has ended and its output has been read."""
        await self._exited.wait()

    def stderr_tail(self) -> str:
        return self._stderr_tail.decode(errors="replace")

    def _exit_error(self) -> PeerExited:
        return PeerExited(self.name, self._process.returncode, self.stderr_tail())

    async def wait_for(self, predicate: Callable[[Event], bool]) -> Event:
        """Return the first event, in the whole history, matching `predicate`; wait if none has come.

        Raises PeerExited if the process has ended and printed no such event.
        """
        index = 0
        while True:
            while index < len(self.events):
                event = self.events[index]
                index += 1
                if predicate(event):
                    return event
            if self._exited.is_set():
                raise self._exit_error()
            await self._changed.wait()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds, checking it now and after every new event of this peer.

        For conditions on the history as a whole (e.g. "the latest profile this station received is
        answered"), which `wait_for`'s per-event predicate cannot express. Raises PeerExited if the
        process has ended without the condition holding.
        """
        while not condition():
            if self._exited.is_set():
                raise self._exit_error()
            await self._changed.wait()

    async def wait_for_event(self, name: str, **fields: Any) -> Event:
        """Shorthand for `wait_for`: the first event called `name` whose fields have these values."""
        return await self.wait_for(lambda e: e.get("event") == name and all(e.get(k) == v for k, v in fields.items()))

    async def command(self, cmd: dict[str, Any]) -> None:
        """Write one command line to the peer's stdin."""
        stdin = self._process.stdin
        assert stdin is not None
        line = (json.dumps(cmd, separators=(",", ":")) + "\n").encode()
        async with self._stdin_lock:
            try:
                await stdin.send_all(line)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._exit_error() from exc

    async def call(self, **cmd: Any) -> Event:
        """Send a `call` command; return its `result` or `error` event (which also holds `ref`)."""
        ref = f"{self.name}-{next(self._refs)}"
        await self.command({"cmd": "call", **cmd, "ref": ref})
        return await self.wait_for(lambda e: e.get("event") in ("result", "error") and e.get("ref") == ref)

    def frames(self, identity: str | None = None, direction: str | None = None) -> list[str]:
        """The text frames captured so far, optionally of one identity and one direction ("in"/"out")."""
        return [
            e["data"]
            for e in self.events
            if e.get("event") == "frame"
            and (identity is None or e.get("identity") == identity)
            and (direction is None or e.get("direction") == direction)
        ]

    def _add(self, event: Event) -> None:
        self.events.append(event)
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def _pump_stdout(self) -> None:
        stdout = self._process.stdout
        assert stdout is not None
        pending = bytearray()
        async for chunk in stdout:
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
                self._add(_parse_event(line))
        if pending:
            self._add(_parse_event(bytes(pending)))
        # The last words of a crash are on stderr: have them before anyone hears of the exit.
        await self._stderr_done.wait()
        await self._process.wait()
        self._exited.set()
        self._add({"event": "exited", "returncode": self._process.returncode})

    async def _pump_stderr(self) -> None:
        stderr = self._process.stderr
        assert stderr is not None
        try:
            async for chunk in stderr:
                self._stderr_tail += chunk
                del self._stderr_tail[:-STDERR_TAIL_BYTES]
        finally:
            self._stderr_done.set()

    async def _stop(self) -> None:
        """Stop the peer: stdin EOF, then SIGTERM, then SIGKILL, each after a grace period; reap it."""
        if self._process.stdin is not None:
            await self._process.stdin.aclose()
        # EOF alone lets the peer close its connections properly (close frames, `disconnected`).
        with trio.move_on_after(EOF_GRACE_S):
            await self._process.wait()
        if self._process.returncode is None:
            self._process.terminate()
            with trio.move_on_after(TERMINATE_GRACE_S):
                await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
        # Let the pumps read what the peer printed while stopping (e.g. its `disconnected` events).
        with trio.move_on_after(TERMINATE_GRACE_S):
            await self._exited.wait()


def _parse_event(line: bytes) -> Event:
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if isinstance(event, dict):
        return event
    # Something other than our protocol reached stdout; keep it, a test may want to see it.
    return {"event": "unparsed", "line": line.decode(errors="replace")}


@asynccontextmanager
async def _open_peer(module: str, name: str, args: list[str]) -> AsyncIterator[Peer]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", module, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    peer = Peer(process, name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer._pump_stdout)
            nursery.start_soon(peer._pump_stderr)
            try:
                yield peer
            finally:
                with trio.CancelScope(shield=True):
                    await peer._stop()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the test body raised; a lone error is more readable unwrapped
        # (and `pytest.raises` around the `async with` keeps working).
        if len(group.exceptions) != 1 or isinstance(group.exceptions[0], BaseExceptionGroup):
            raise
        error = group.exceptions[0]
        chain = error.__cause__, error.__context__, error.__suppress_context__
        try:
            raise error
        finally:
            # Leave the error's own chaining as it was, not pointing at the group we dropped.
            error.__cause__, error.__context__, error.__suppress_context__ = chain
    finally:
        if process.returncode is None:  # only if starting the pumps failed
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


@asynccontextmanager
async def open_csms(*args: str) -> AsyncIterator[tuple[Peer, int]]:
    """Start the CSMS peer on 127.0.0.1 and a free port; yield it and its port once it listens.

    Extra `args` are passed on (e.g. "--reject-status", "401"). On exit the process is stopped and
    reaped; its events stay readable.
    """
    async with _open_peer("tests.peers.csms", "csms", ["--host", "127.0.0.1", "--port", "0", *args]) as peer:
        listening = await peer.wait_for_event("listening")
        yield peer, int(listening["port"])


@asynccontextmanager
async def open_station(url: str, identity: str, *args: str) -> AsyncIterator[Peer]:
    """Start a station peer connecting to `<url>/<identity>`; it is yielded without waiting.

    Tests wait for its "connected", "rejected" or "connect_failed" event themselves.
    """
    async with _open_peer(
        "tests.peers.station", f"station {identity}", ["--url", url, "--identity", identity, *args]
    ) as peer:
        yield peer


@asynccontextmanager
async def open_station16(url: str, identity: str, *args: str) -> AsyncIterator[Peer]:
    """Start an OCPP 1.6J station peer (`tests/peers/station16.py`) connecting to `<url>/<identity>`.

    Yielded without waiting, like `open_station`.
    """
    async with _open_peer(
        "tests.peers.station16", f"station16 {identity}", ["--url", url, "--identity", identity, *args]
    ) as peer:
        yield peer
