"""What the two test peers share: the JSON-lines protocol and an OCPP endpoint on the `ocpp` library.

Theory of operation. A peer is a subprocess driven by a test through pipes. It writes one JSON object
per line on stdout (an *event*) and reads one JSON object per line on stdin (a *command*). Everything a
test may want to assert on is an event, notably every websocket frame exactly as it crossed the wire.

The OCPP side is deliberately not ours: incoming CALLs are routed, validated and answered by the PyPI
`ocpp` library (`ocpp.routing.on` handlers on a `ChargePoint`), so the controller under test talks to
an implementation written by somebody else. We replace only the parts a test harness needs to steer:

* outgoing CALLs are built from raw dicts (a test names the action and payload, and wants the raw
  reply back), so we keep our own table of pending calls instead of the library's single response
  queue;
* each incoming CALL is handled in its own task, so that a response delayed on purpose (`set_delay`)
  does not stop the peer from reading (the library awaits every handler inside its read loop);
* a test may override the response to an action (`set_response`); such a response is sent as given,
  without the library's schema check, so tests can also provoke invalid answers.

The peers run on asyncio because the library and `websockets` do; only the harness side is trio.

Events (stdout), both peers; the CSMS adds `identity` to each, the station does too:
  {"event":"frame","identity":..,"direction":"in"|"out","data":"<exact text>","t":<time.monotonic()>}
  {"event":"binary_frame","identity":..,"direction":..,"size":N,"t":..}  (then ignored)
  {"event":"request","identity":..,"action":..,"payload":{..}}          (each CALL received)
  {"event":"result","ref":R,"identity":..,"action":..,"payload":{..}}   (answer to a `call` command)
  {"event":"error","ref":R,"error":"<text>"[,"code","description","details"]}  (CALLERROR, timeout...)
  {"event":"unmatched_response","identity":..,"data":..}   (a CALLRESULT/CALLERROR for no call of ours)
  {"event":"disconnected","identity":..,"code":N|null,"reason":".."}
  {"event":"command_error","error":..,"cmd":{..}}
CSMS only: "listening" {port}, "connected" {identity, path, subprotocol, authorization, extensions,
headers}, "refused" {path, status}. Station only: "connected" {subprotocol, extensions},
"rejected" {status, body, headers: [[lower-case name, value] …]}, "connect_failed" {error}, "boot"
{payload} or {error}, "heartbeat_failed".

Commands (stdin); the CSMS needs "identity" on call/send_raw/close, and optionally on set_*:
  {"cmd":"call","ref":R,"action":..,"payload":{..},"timeout":30[,"validate":false][,"concurrent":true]}
  {"cmd":"set_response","action":..,"payload":{..}}   ("$now" strings become the current time;
      "payload":null restores the built-in answer; "error":{"code","description","details"} instead
      of "payload" answers with a CALLERROR)
  {"cmd":"set_delay","action":..,"seconds":S}        (wait that long before answering that action)
  {"cmd":"send_raw","data":"<text>"}   {"cmd":"close","code":1000,"reason":".."}   {"cmd":"stop"}
Stdin EOF, `stop`, SIGTERM and SIGINT all close the connections properly and exit with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import json
import logging
import os
import signal
import stat
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from ocpp import v16
from ocpp.exceptions import OCPPError
from ocpp.messages import Call, CallError, CallResult, MessageType, unpack, validate_payload
from ocpp.v201 import ChargePoint
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

LOGGER = logging.getLogger("tests.peers")

#: Large enough for any OCPP message a test sends (firmware URLs, big reports), unlike websockets' 1 MiB.
MAX_MESSAGE_BYTES = 16 * 2**20

#: Ceiling for a single command line from the harness.
MAX_COMMAND_BYTES = 16 * 2**20


def emit(event: dict[str, Any]) -> None:
    """Print one event line and flush it, so the harness sees it while we are still running."""
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def utc_now() -> str:
    """The current time as an OCPP (RFC 3339, UTC, milliseconds) timestamp."""
    now = datetime.datetime.now(datetime.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fill_now(value: Any) -> Any:
    """Replace every string "$now" inside a payload with the current time."""
    if value == "$now":
        return utc_now()
    if isinstance(value, dict):
        return {key: fill_now(item) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_now(item) for item in value]
    return value


def configure_logging() -> None:
    """Library logs go to stderr (the harness keeps its tail); stdout is reserved for events."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")


class FrameLog:
    """A websockets connection as the `ocpp` library wants it (`recv()`/`send(str)`), logging frames.

    Binary frames are reported and then skipped: OCPP-J is text only, and the library would choke on
    them. The `t` of an outgoing frame is taken just before the send, that of an incoming one just
    after the receive, both on `time.monotonic()`, which is system-wide on Linux and therefore
    comparable between the peers of one test.
    """

    def __init__(self, ws: Connection, identity: str) -> None:
        self.ws = ws
        self.identity = identity

    async def recv(self) -> str:
        while True:
            data = await self.ws.recv()
            t = time.monotonic()
            if isinstance(data, str):
                emit({"event": "frame", "identity": self.identity, "direction": "in", "data": data, "t": t})
                return data
            emit({"event": "binary_frame", "identity": self.identity, "direction": "in", "size": len(data), "t": t})

    async def send(self, data: str) -> None:
        t = time.monotonic()
        await self.ws.send(data)
        emit({"event": "frame", "identity": self.identity, "direction": "out", "data": data, "t": t})


@dataclass
class CannedAnswer:
    """A response set by a test: a CALLRESULT payload, or a CALLERROR when `error` is given."""

    payload: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclass
class Behaviour:
    """What tests changed about a peer's answers, per (identity or None for everyone, action)."""

    responses: dict[tuple[str | None, str], CannedAnswer] = field(default_factory=dict)
    delays_s: dict[tuple[str | None, str], float] = field(default_factory=dict)

    def response_for(self, identity: str, action: str) -> CannedAnswer | None:
        return self.responses.get((identity, action), self.responses.get((None, action)))

    def delay_for(self, identity: str, action: str) -> float:
        return self.delays_s.get((identity, action), self.delays_s.get((None, action), 0.0))

    def apply(self, cmd: dict[str, Any]) -> None:
        """Apply a `set_response` or `set_delay` command."""
        key = (cmd.get("identity"), str(cmd["action"]))
        if cmd["cmd"] == "set_delay":
            self.delays_s[key] = float(cmd["seconds"])
        elif "error" in cmd:
            self.responses[key] = CannedAnswer(error=dict(cmd["error"]))
        elif cmd.get("payload") is None:
            # `"payload": null` gives the action back to the built-in handler.
            self.responses.pop(key, None)
        else:
            self.responses[key] = CannedAnswer(payload=dict(cmd["payload"]))


class CallFailed(Exception):
    """An outgoing CALL got no CALLRESULT; `event` holds the fields of the `error` event."""

    def __init__(self, text: str, **fields: Any) -> None:
        super().__init__(text)
        self.event = {"error": text, **fields}


class PeerChargePoint(ChargePoint):  # type: ignore[misc]  # the ocpp library is untyped
    """An OCPP 2.0.1 endpoint on the `ocpp` library, steerable by tests. See the module docstring."""

    #: Whether requests are checked against the OCPP 2.0.1 schemas (the library's own validation).
    validates = True

    def __init__(self, identity: str, connection: FrameLog, behaviour: Behaviour) -> None:
        super().__init__(identity, connection)
        self.identity = identity
        self.frame_log = connection
        self.behaviour = behaviour
        self._pending: dict[str, asyncio.Future[CallResult | CallError]] = {}

    async def serve(self) -> None:
        """Read and dispatch frames until the connection closes; fail calls still waiting."""
        running: set[asyncio.Task[None]] = set()
        try:
            async with asyncio.TaskGroup() as handlers:
                while True:
                    try:
                        message = await self.frame_log.recv()
                    except ConnectionClosed:
                        break
                    task = handlers.create_task(self._route_guarded(message))
                    running.add(task)
                    task.add_done_callback(running.discard)
                # Answers still being prepared (delayed ones) cannot be sent any more.
                for task in list(running):
                    task.cancel()
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(CallFailed("connection closed"))

    # The library's read loop, replaced by `serve`.
    start = serve

    async def _route_guarded(self, message: str) -> None:
        try:
            await self.route_message(message)
        except ConnectionClosed:
            pass  # the answer raced with the close; `serve` reports the disconnection
        except Exception:
            LOGGER.exception("%s: error handling %r", self.identity, message)

    async def route_message(self, raw_msg: str) -> None:
        try:
            msg = unpack(raw_msg)
        except OCPPError:
            await super().route_message(raw_msg)  # the library logs it and drops it
            return
        if msg.message_type_id == MessageType.Call:
            await super().route_message(raw_msg)
            return
        future = self._pending.get(msg.unique_id)
        if future is None or future.done():
            emit({"event": "unmatched_response", "identity": self.identity, "data": raw_msg})
            return
        future.set_result(msg)

    async def _handle_call(self, msg: Call) -> Any:
        emit({"event": "request", "identity": self.identity, "action": msg.action, "payload": msg.payload})
        delay_s = self.behaviour.delay_for(self.identity, msg.action)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        canned = self.behaviour.response_for(self.identity, msg.action)
        if canned is None:
            return await self.answer_by_default(msg)
        # The request is still checked like the library does; the test's answer is sent as given.
        if self.validates:
            await validate_payload(msg, self._ocpp_version)
        if canned.error is not None:
            error = canned.error
            reply = CallError(
                msg.unique_id, error.get("code", "GenericError"), error.get("description", ""), error.get("details", {})
            )
            await self._send(reply.to_json())
        else:
            await self._send(CallResult(msg.unique_id, fill_now(copy.deepcopy(canned.payload))).to_json())
        return None

    async def answer_by_default(self, msg: Call) -> Any:
        """Answer a CALL no test has overridden: by default, the library's routing to `@on` handlers."""
        return await super()._handle_call(msg)

    async def call_raw(
        self,
        action: str,
        payload: dict[str, Any],
        *,
        timeout_s: float = 30.0,
        validate: bool = True,
        concurrent: bool = False,
    ) -> dict[str, Any]:
        """Send a CALL and return the raw CALLRESULT payload, or raise CallFailed.

        Like the library, we validate the request and keep one CALL outstanding at a time
        (`concurrent=True` lifts that, for tests of how the other side copes with more).
        """
        unique_id = str(uuid.uuid4())
        request = Call(unique_id, action, payload)
        if validate and self.validates:
            try:
                await validate_payload(request, self._ocpp_version)
            except OCPPError as exc:
                raise CallFailed(f"invalid request: {exc}") from exc
        lock = contextlib.nullcontext() if concurrent else self._call_lock
        async with lock:
            future: asyncio.Future[CallResult | CallError] = asyncio.get_running_loop().create_future()
            self._pending[unique_id] = future
            try:
                await self._send(request.to_json())
                async with asyncio.timeout(timeout_s):
                    reply = await future
            except TimeoutError as exc:
                raise CallFailed(f"timeout after {timeout_s} s", unique_id=unique_id) from exc
            except ConnectionClosed as exc:
                raise CallFailed("connection closed", unique_id=unique_id) from exc
            finally:
                del self._pending[unique_id]
        if isinstance(reply, CallError):
            raise CallFailed(
                f"CALLERROR {reply.error_code}: {reply.error_description}",
                unique_id=unique_id,
                code=reply.error_code,
                description=reply.error_description,
                details=reply.error_details,
            )
        payload_out: dict[str, Any] = reply.payload
        return payload_out


class Ocpp16Echo(PeerChargePoint):
    """An `ocpp1.6` connection: every CALL is answered `[3, id, {}]`, nothing is validated.

    Only tests that relay OCPP 1.6 use it, so it needs no knowledge of 1.6 beyond the shared framing
    (and does not use the library's v16 module).
    """

    validates = False
    _ocpp_version = "1.6"

    async def answer_by_default(self, msg: Call) -> None:
        await self._send(CallResult(msg.unique_id, {}).to_json())


class Peer16ChargePoint(PeerChargePoint):
    """An OCPP 1.6J endpoint on the `ocpp` library: the same harness on the library's v16 messages.

    Incoming CALLs are routed to `@on` handlers and checked against the library's 1.6 schemas, as the
    2.0.1 peers' are against 2.0.1's (the handlers see snake_case keys; a charging schedule's numbers
    arrive as the `Decimal`s the library's 1.6 check makes of them).
    """

    _call = v16.call
    _call_result = v16.call_result
    _ocpp_version = "1.6"


@dataclass(frozen=True)
class CallCommand:
    """A `call` command, checked before it is run so that a malformed one fails on its own."""

    ref: Any
    action: str
    payload: dict[str, Any]
    timeout_s: float
    validate: bool
    concurrent: bool

    @classmethod
    def parse(cls, cmd: dict[str, Any]) -> CallCommand:
        action, payload = cmd["action"], cmd.get("payload", {})
        if not isinstance(action, str) or not isinstance(payload, dict):
            raise TypeError("a call needs a string 'action' and an object 'payload'")
        return cls(
            cmd.get("ref"),
            action,
            payload,
            float(cmd.get("timeout", 30)),
            bool(cmd.get("validate", True)),
            bool(cmd.get("concurrent", False)),
        )


async def run_call_command(cp: PeerChargePoint, call: CallCommand) -> None:
    """Carry out a `call` command and print its `result` or `error` event."""
    try:
        payload = await cp.call_raw(
            call.action, call.payload, timeout_s=call.timeout_s, validate=call.validate, concurrent=call.concurrent
        )
    except CallFailed as exc:
        emit({"event": "error", "ref": call.ref, "identity": cp.identity, "action": call.action, **exc.event})
    else:
        emit({"event": "result", "ref": call.ref, "identity": cp.identity, "action": call.action, "payload": payload})


async def run_close_command(cp: PeerChargePoint, code: int, reason: str) -> None:
    """Close a connection; `serve` then reports the `disconnected` event."""
    try:
        await cp.frame_log.ws.close(code, reason)
    except Exception as exc:
        # e.g. a close code websockets refuses to send: a bad command must not end the peer.
        emit(
            {
                "event": "command_error",
                "error": f"{type(exc).__name__}: {exc}",
                "cmd": {"cmd": "close", "code": code, "reason": reason},
            }
        )


async def read_commands() -> AsyncIterator[dict[str, Any]]:
    """Yield the JSON commands arriving on stdin until EOF; report lines that are not commands."""
    mode = os.fstat(sys.stdin.fileno()).st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or sys.stdin.isatty()):
        # A regular file or /dev/null (a manual run in the background) cannot be polled: take no
        # commands and run until a signal.
        await asyncio.Event().wait()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_COMMAND_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if not isinstance(cmd, dict) or not isinstance(cmd.get("cmd"), str):
                raise ValueError("a command is a JSON object with a string 'cmd'")
        except ValueError as exc:
            emit({"event": "command_error", "error": str(exc), "line": line.decode(errors="replace")})
            continue
        yield cmd


async def close_on(stop: asyncio.Event, ws: Connection) -> None:
    """Close the station's websocket normally once ``stop`` is set."""
    await stop.wait()
    await ws.close(1000, "station stopping")


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT ask for the same clean shutdown as a `stop` command or stdin EOF."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)


async def race(stop: asyncio.Event, work: Callable[[], Any]) -> tuple[bool, Any]:
    """Run `work()` until it finishes or `stop` is set; return (stopped, result)."""
    task = asyncio.ensure_future(work())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return True, None
    return False, task.result()


#: A peer's own commands beyond the shared ones: name -> what to do with the command (done in order).
ExtraCommands = Mapping[str, Callable[[dict[str, Any]], None]]


async def follow_commands(
    behaviour: Behaviour,
    session_of: Callable[[dict[str, Any]], PeerChargePoint | None],
    stop: asyncio.Event,
    extra: ExtraCommands | None = None,
) -> None:
    """Carry out stdin commands; at EOF or `stop`, set `stop` so that the peer shuts down.

    `call` and `close` take time and run as tasks of their own (the caller cancels us, and so them, on
    shutdown); the other commands are done before the next line is read, so their order is kept.
    `extra` adds commands of one peer's own (e.g. the station's `advance_clock`).
    """
    try:
        await _follow_commands(behaviour, session_of, stop, extra or {})
    finally:
        stop.set()


async def _follow_commands(
    behaviour: Behaviour,
    session_of: Callable[[dict[str, Any]], PeerChargePoint | None],
    stop: asyncio.Event,
    extra: ExtraCommands,
) -> None:
    async with asyncio.TaskGroup() as slow_commands:
        async for cmd in read_commands():
            try:
                name = cmd["cmd"]
                if name in ("set_response", "set_delay"):
                    behaviour.apply(cmd)
                elif name in extra:
                    extra[name](cmd)
                elif name == "stop":
                    stop.set()
                elif name in ("call", "send_raw", "close"):
                    session = session_of(cmd)
                    if session is None:
                        raise LookupError(f"not connected: {cmd.get('identity')}")
                    if name == "call":
                        slow_commands.create_task(run_call_command(session, CallCommand.parse(cmd)))
                    elif name == "send_raw":
                        await session.frame_log.send(str(cmd["data"]))
                    else:
                        code, reason = int(cmd.get("code", 1000)), str(cmd.get("reason", ""))
                        slow_commands.create_task(run_close_command(session, code, reason))
                else:
                    raise ValueError(f"unknown command {name!r}")
            except (LookupError, ValueError, TypeError, ConnectionClosed) as exc:
                emit({"event": "command_error", "error": f"{type(exc).__name__}: {exc}", "cmd": cmd})
                if cmd.get("cmd") == "call":  # whoever waits for the answer learns why there is none
                    emit({"event": "error", "ref": cmd.get("ref"), "error": f"{type(exc).__name__}: {exc}"})
        stop.set()  # stdin ended: shut down without waiting for the calls still running


def run_peer(main: Coroutine[Any, Any, int]) -> int:
    """Run a peer's main coroutine; SIGTERM at any time ends the process with status 0."""
    # Before the loop installs its handler (stop_on_signals), and after it removed it again, a
    # SIGTERM would kill us with -15; the harness sends one whenever a test ends.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return asyncio.run(main)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
