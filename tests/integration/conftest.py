"""In-process trio peers for the router's integration tests: a tiny CSMS and raw stations.

The CSMS here is deliberately small and in-process, so tests about bad input and connection loss
are fast and deterministic: it serves on 127.0.0.1 port 0, records every connection (path,
subprotocols, headers, frames received, how it closed) and answers every CALL with a CALLRESULT.
It can be told to refuse handshakes with an HTTP status, to never answer a handshake, or to never
answer a call. It validates frames with its own few lines of JSON checks (not with the router's
codec), answering malformed ones as Part 4 §4.2.3 and §4.4 prescribe.

Stations are plain websockets from :func:`router.transport.connect` (or raw TCP streams and
trio-websocket in the tests themselves, for byte-level abuse).

Synchronisation is by events, never by sleeping: the CSMS wakes waiters whenever anything it
records changes (:meth:`FakeCsms.wait_until`), and :func:`next_link_event` reads the router's own
observer hub, which publishes a pair's ``disconnected`` event in the same step that updates the
gauges.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from router.app import App, run_app
from router.config import Settings, parse_settings
from router.observers import LinkEvent, Observation
from router.transport import (
    ConnectionClosed,
    HandshakeFailed,
    IncomingHandshake,
    WebSocket,
    connect,
    read_handshake,
)

#: Bound on every network wait in these tests: generous for a loaded two-core machine, where each
#: step takes milliseconds.
IO_TIMEOUT_S = 10.0

OCPP201 = "ocpp2.0.1"
#: What the fake CSMS agrees to speak, in its order of preference.
CSMS_SUBPROTOCOLS = ("ocpp2.0.1", "ocpp2.1", "ocpp1.6")

BOOT_REQUEST: dict[str, Any] = {
    "chargingStation": {"model": "TestModel", "vendorName": "TestVendor"},
    "reason": "PowerUp",
}


# ---------------------------------------------------------------------------------------------------
# The fake CSMS
# ---------------------------------------------------------------------------------------------------


@dataclass
class CsmsConnection:
    """One connection the fake CSMS accepted (or refused), as the CSMS saw it."""

    target: str
    subprotocols: list[str]
    headers: dict[str, str]
    websocket: WebSocket | None = None
    accepted_subprotocol: str | None = None
    frames: list[str] = field(default_factory=list)
    #: How the connection ended, as the CSMS's reader saw it (None while open).
    closed: ConnectionClosed | None = None
    ended: bool = False
    _scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    _close_with: tuple[int, str] | None = None

    @property
    def identity(self) -> str:
        return self.target.rsplit("/", 1)[-1]


def _answer_to(frame: str, csms: FakeCsms) -> str | None:
    """What a strict CSMS replies to ``frame`` (None: nothing, e.g. for a CALLRESULT)."""
    try:
        message = json.loads(frame)
    except ValueError:
        # §4.2.3: the id cannot be read, so the CALLERROR names "-1".
        return json.dumps([4, "-1", "RpcFrameworkError", "message is not valid JSON", {}])
    if not isinstance(message, list) or len(message) < 3 or not isinstance(message[1], str):
        return json.dumps([4, "-1", "RpcFrameworkError", "message is not an OCPP-J array", {}])
    message_type, message_id = message[0], message[1]
    if message_type not in (2, 3, 4):
        # §4.4: an unknown message type is answered with MessageTypeNotSupported.
        return json.dumps([4, message_id, "MessageTypeNotSupported", f"message type {message_type!r}", {}])
    if message_type != 2:
        return None
    action = message[2] if len(message) == 4 else None
    return json.dumps([3, message_id, csms.result_for(str(action))])


class FakeCsms:
    """A CSMS on 127.0.0.1 that records everything (see the module docstring)."""

    def __init__(self, *, refuse_status: int | None = None, answer_handshake: bool = True) -> None:
        self.port = 0
        self.refuse_status = refuse_status
        self.answer_handshake = answer_handshake
        #: False: CALLs are recorded but never answered (a CSMS that hangs).
        self.answers_calls = True
        self.connections: list[CsmsConnection] = []
        self.tcp_connections = 0
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/csms"

    def result_for(self, action: str) -> dict[str, Any]:
        """The CALLRESULT payload for ``action`` (schema-valid for the actions the tests send)."""
        now = "2025-01-01T00:00:00Z"
        if action == "BootNotification":
            return {"currentTime": now, "interval": 300, "status": "Accepted"}
        if action == "Heartbeat":
            return {"currentTime": now}
        return {}

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; re-checked whenever the CSMS records something."""
        while not predicate():
            await self._changed.wait()

    def of(self, identity: str) -> list[CsmsConnection]:
        """The connections (in order) opened for ``identity``."""
        return [conn for conn in self.connections if conn.identity == identity]

    async def connection(self, identity: str, index: int = 0) -> CsmsConnection:
        """Wait for the ``index``-th connection of ``identity`` and return it."""
        await self.wait_until(lambda: len(self.of(identity)) > index)
        return self.of(identity)[index]

    async def wait_ended(self, conn: CsmsConnection) -> ConnectionClosed:
        """Wait until ``conn`` is over and return how it closed."""
        await self.wait_until(lambda: conn.ended)
        assert conn.closed is not None, "the connection ended without a close"
        return conn.closed

    def close(self, conn: CsmsConnection, code: int, reason: str) -> None:
        """Make the CSMS close ``conn`` with ``code`` and ``reason``."""
        conn._close_with = (code, reason)
        conn._scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[FakeCsms] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.tcp_connections += 1
        self._notify()
        try:
            try:
                incoming = await read_handshake(stream, max_message_bytes=16 * 1024 * 1024)
            except HandshakeFailed:
                return
            conn = CsmsConnection(incoming.target, incoming.subprotocols, incoming.headers)
            self.connections.append(conn)
            self._notify()
            try:
                await self._serve_connection(conn, incoming)
            finally:
                conn.ended = True
                self._notify()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _serve_connection(self, conn: CsmsConnection, incoming: IncomingHandshake) -> None:
        if self.refuse_status is not None:
            conn.closed = ConnectionClosed(1006, "refused", by_peer=False)
            await incoming.reject(self.refuse_status, "unknown charging station")
            return
        if not self.answer_handshake:
            await trio.sleep_forever()
        chosen = next((p for p in incoming.subprotocols if p in CSMS_SUBPROTOCOLS), None)
        websocket = await incoming.accept(chosen)
        conn.websocket = websocket
        conn.accepted_subprotocol = chosen
        if chosen is None:
            # Part 4 §3.2: no agreed subprotocol: complete the handshake without one, then close.
            conn.closed = ConnectionClosed(1002, "no agreed OCPP version", by_peer=False)
            await websocket.aclose(1002, "no agreed OCPP version")
            return
        try:
            with conn._scope:
                while True:
                    frame = await websocket.receive_text()
                    conn.frames.append(frame)
                    self._notify()
                    answer = _answer_to(frame, self)
                    if answer is not None and self.answers_calls:
                        await websocket.send_text(answer)
        except ConnectionClosed as closed:
            conn.closed = closed
            return
        code, reason = conn._close_with or (1001, "CSMS shutting down")
        conn.closed = ConnectionClosed(code, reason, by_peer=False)
        await websocket.aclose(code, reason)


# ---------------------------------------------------------------------------------------------------
# Stations and the appliance
# ---------------------------------------------------------------------------------------------------


def settings_for(csms_url: str, *, state_dir: Path, **sections: Any) -> Settings:
    """Settings for a test appliance on port 0, with ``sections`` merged over the defaults.

    The controller's own connection to the CSMS is off: these tests are about relaying, and several
    assert on every connection the CSMS saw (the own identity has its own tests, e.g.
    ``tests/e2e/test_appliance.py``). ``controller={"connect": True}`` turns it on.
    """
    data: dict[str, Any] = {
        "controller": {"connect": False},
        "stations": {"listen": "127.0.0.1:0"},
        "csms": {"url": csms_url},
        "http": {"listen": "127.0.0.1:0"},
        "routing": {"shutdown_grace_s": 2.0},
        "state": {"dir": str(state_dir)},
    }
    for name, values in sections.items():
        if isinstance(values, list):  # an array of tables ([[meters]]) as it is
            data[name] = values
        else:
            data.setdefault(name, {}).update(values)
    return parse_settings(data)


#: ``[autonomy] enabled = false``: the strict §6.3 rule (a lost CSMS leg closes the station; an unreachable
#: CSMS refuses it), for the tests of that rule (issue #12, Done-when 4).
STRICT_6_3: dict[str, Any] = {"enabled": False}

_message_ids = itertools.count(1)


async def call(station: WebSocket, action: str, payload: dict[str, Any]) -> list[Any]:
    """Send a CALL from ``station`` and return the decoded reply (the next message it receives)."""
    message_id = f"t{next(_message_ids)}"
    await station.send_text(json.dumps([2, message_id, action, payload]))
    reply = json.loads(await station.receive_text())
    assert isinstance(reply, list)
    assert reply[1] == message_id, reply
    return reply


async def assert_still_served(station: WebSocket) -> None:
    """The station's calls still reach the CSMS and come back answered."""
    reply = await call(station, "Heartbeat", {})
    assert reply[0] == 3
    assert reply[2] == {"currentTime": "2025-01-01T00:00:00Z"}


def metric(app: App, name: str, **labels: str) -> float:
    """The current value of one sample in the app's registry (0 when it was never touched)."""
    value = app.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def next_link_event(
    events: trio.MemoryReceiveChannel[Observation], kind: str, station_id: str | None = None
) -> LinkEvent:
    """Skip observations until a LinkEvent of ``kind`` (for ``station_id``) arrives.

    A ``disconnected`` event is published in the same scheduling step as the registry and the
    ``stations_connected`` gauge are updated, so the gauges are current once it is received.
    """
    async for event in events:
        if isinstance(event, LinkEvent) and event.kind == kind and station_id in (None, event.station_id):
            return event
    raise AssertionError("the observer channel closed")


def live_task_names() -> list[str]:
    """The names of every task in this trio run (to prove handlers and pumps ended)."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    root = trio.lowlevel.current_root_task()
    assert root is not None  # always, inside a trio run
    walk(root)
    return names


#: A relayed station runs as its server handler, four link tasks (two pumps, the CSMS-call sender, the
#: station keepalive) and, its CSMS leg being autonomous (the default), that leg's four (its supervisor,
#: the real websocket's server, reader and keepalive).
TASKS_PER_PAIR = 9
#: The same with site autonomy off: the link keeps the CSMS leg alive itself (its second keepalive).
TASKS_PER_STRICT_PAIR = 6


def pair_tasks() -> list[str]:
    """Live tasks that belong to station handlers or pairs."""
    return [
        name
        for name in live_task_names()
        if "StationServer._handle" in name or "StationLink." in name or "AutonomousUpstream." in name
    ]


async def settled_pair_tasks() -> list[str]:
    """:func:`pair_tasks` once every task has run as far as it can (a handler that saw its pair end may
    need a scheduling turn more to return: leaving a nursery is a schedule point in trio)."""
    await trio.testing.wait_all_tasks_blocked()
    return pair_tasks()


class Lab:
    """Starts fake CSMSs, appliances and stations in one nursery and tears them down in order."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self._nursery = nursery
        self._tmp_path = tmp_path
        self._apps: list[App] = []
        self._stations: list[WebSocket] = []

    async def start_csms(self, *, refuse_status: int | None = None, answer_handshake: bool = True) -> FakeCsms:
        csms = FakeCsms(refuse_status=refuse_status, answer_handshake=answer_handshake)
        started: FakeCsms = await self._nursery.start(csms.serve)
        return started

    async def start_app(self, csms_url: str, **sections: Any) -> App:
        # Each appliance its own state directory: a store is held by one process (and app) at a time.
        settings = settings_for(csms_url, state_dir=self._tmp_path / f"state-{len(self._apps)}", **sections)
        app: App = await self._nursery.start(run_app, settings, CollectorRegistry())
        self._apps.append(app)
        return app

    async def station(
        self,
        app: App,
        identity: str,
        *,
        subprotocols: Iterable[str] = (OCPP201,),
        path: str | None = None,
        compress: bool = True,
    ) -> WebSocket:
        """Connect a station (raises HandshakeFailed on refusal); the lab closes it at the end."""
        target = path if path is not None else f"/ocpp/{identity}"
        websocket = await connect(
            "127.0.0.1", app.station_port, target, subprotocols=list(subprotocols), compress=compress
        )
        self._stations.append(websocket)
        return websocket

    async def teardown(self) -> None:
        # Stations first (each closing handshake is answered by a live appliance, so nobody waits
        # out a close drain), then the appliances, then the CSMS with the nursery.
        with trio.move_on_after(IO_TIMEOUT_S):
            for websocket in self._stations:
                if websocket.closed is None:
                    await websocket.aclose(1000, "test over")
            for app in self._apps:
                app.request_shutdown()
                await app.stopped.wait()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    async with trio.open_nursery() as nursery:
        lab = Lab(nursery, tmp_path)
        try:
            yield lab
        finally:
            await lab.teardown()
            nursery.cancel_scope.cancel()


@pytest.fixture
async def csms(lab: Lab) -> FakeCsms:
    return await lab.start_csms()


__all__ = [
    "BOOT_REQUEST",
    "IO_TIMEOUT_S",
    "OCPP201",
    "TASKS_PER_PAIR",
    "CsmsConnection",
    "FakeCsms",
    "Lab",
    "assert_still_served",
    "call",
    "live_task_names",
    "metric",
    "next_link_event",
    "pair_tasks",
    "settings_for",
]
