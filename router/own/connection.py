"""The controller's own upstream connection: one websocket to ``<csms url>/<identity>``.

Theory of operation. :class:`OwnConnection` owns the connection for the life of the appliance. It
dials (through an injected ``dial`` coroutine, so tests can hand it in-memory streams and run on the
virtual clock), and when the connection is lost or cannot be opened it waits as Part 4 §5.3 says
before the next attempt (:class:`Backoff`): ``RetryBackOffWaitMinimum`` seconds plus a random part of
at most ``RetryBackOffRandomRange`` seconds, the fixed part doubling after every failed attempt, at
most ``RetryBackOffRepeatTimes`` times; a successful connection starts the sequence afresh. The very
first attempt after start-up is made at once.

Each open connection is a :class:`Session` with a nursery of its own: the reader (the only task that
receives), an optional keepalive (websocket pings every ``WebSocketPingInterval``), and the
``on_session`` coroutine of the owner (boot, heartbeats, outbox). Whatever ends first — the peer
closing, a lost pong, an error in the owner's code — ends the session as a whole; nothing of it
outlives the connection.

Calls from the CSMS are answered by a :class:`Dispatcher`, a table built by the owner: an action in
the table is handled; one that OCPP 2.0.1 defines but the table lacks gets CALLERROR ``NotSupported``,
anything else ``NotImplemented`` (Part 4 §4.3). A handler is synchronous, so the reader never blocks
on it; what must happen after the answer has been sent (a NotifyReport, a triggered message, a
restart: F06.FR.04) it returns as a follow-up, run in the session's nursery. Payloads are checked
with :func:`parse_payload`, which maps what is wrong to the RPC error code that says so.

Calls of ours go through :meth:`Session.call`, which keeps at most one CALL outstanding (§4.1.1) and
gives up after ``MessageTimeout``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import TypeAdapter, ValidationError

from router import ocppj
from router.transport import GOING_AWAY, INTERNAL_ERROR, PROTOCOL_ERROR, ConnectionClosed, HandshakeFailed, WebSocket

log = logging.getLogger("ocpp_lc.own.connection")

#: The only OCPP version the own identity speaks.
SUBPROTOCOL: Final = "ocpp2.0.1"
#: Whatever the configuration says, never reconnect in a tighter loop than this.
MIN_RECONNECT_DELAY_S: Final = 0.1
#: Boot statuses the CSMS can answer, plus "None" before any answer: the labels of the boot gauge.
BOOT_STATUS_LABELS: Final = ("None", "Accepted", "Pending", "Rejected")

T = TypeVar("T")


# -- metrics -------------------------------------------------------------------------------------


class OwnMetrics:
    """The own identity's metrics (prefix ``ocpp_lc_own_``), on a registry handed in."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.link_up = Gauge(
            "ocpp_lc_own_link_up", "1 while the controller's own connection to the CSMS is open.", registry=registry
        )
        self.boot_status = Gauge(
            "ocpp_lc_own_boot_status",
            "1 for the status of the CSMS's last BootNotification answer ('None' before any), 0 for the others.",
            ["status"],
            registry=registry,
        )
        self.calls = Counter(
            "ocpp_lc_own_calls_total",
            "Calls on the own connection: direction 'sent' (ours, outcome result, callerror, timeout, closed) or "
            "'received' (the CSMS's, outcome result, callerror, internal_error).",
            ["direction", "action", "outcome"],
            registry=registry,
        )
        self.connect_attempts = Counter(
            "ocpp_lc_own_connect_attempts_total",
            "Attempts to open the own connection, by outcome (connected, refused, unreachable, tls, invalid, "
            "abandoned, timeout, subprotocol, error).",
            ["outcome"],
            registry=registry,
        )
        self.reconnects = Counter(
            "ocpp_lc_own_reconnects_total",
            "Own connections opened again after an earlier one was lost.",
            registry=registry,
        )
        self.outbox_length = Gauge(
            "ocpp_lc_own_outbox_length", "Messages waiting in the durable upstream outbox.", registry=registry
        )
        self.outbox_failed = Counter(
            "ocpp_lc_own_outbox_failed_total",
            "Outbox messages dropped because the CSMS answered them with a CALLERROR, by action.",
            ["action"],
            registry=registry,
        )
        self.set_boot_status(None)

    def set_boot_status(self, status: str | None) -> None:
        """Show ``status`` (None: no answer yet) on the boot gauge."""
        current = status or "None"
        for label in BOOT_STATUS_LABELS:
            self.boot_status.labels(label).set(1 if label == current else 0)


# -- back-off (Part 4 §5.3) ----------------------------------------------------------------------


@dataclass(frozen=True)
class BackoffParams:
    """The three OCPPCommCtrlr variables of Part 4 §8.1-8.3, in seconds and a count."""

    wait_minimum_s: float
    random_range_s: float
    repeat_times: int


def backoff_delay_s(params: BackoffParams, failures: int, rng: random.Random) -> float:
    """The wait before a reconnection attempt when ``failures`` attempts have failed since the last success.

    The first attempt (``failures == 0``) waits ``wait_minimum_s`` plus a random value of at most
    ``random_range_s``; each failure doubles the fixed part, at most ``repeat_times`` times; every
    attempt draws a new random part. (We double the fixed part only, so that one large random draw is
    not carried into every later wait.)
    """
    doublings = min(max(failures, 0), max(params.repeat_times, 0))
    fixed_s: float = max(params.wait_minimum_s, 0.0) * (1 << doublings)
    random_s = rng.uniform(0.0, params.random_range_s) if params.random_range_s > 0 else 0.0
    return max(fixed_s + random_s, MIN_RECONNECT_DELAY_S)


class Backoff:
    """Counts failed attempts and hands out the next wait; the parameters are read anew each time."""

    def __init__(self, params: Callable[[], BackoffParams], rng: random.Random) -> None:
        self._params = params
        self._rng = rng
        self._failures = 0

    def next_delay_s(self) -> float:
        """The wait before the next attempt; counts that attempt as one more failure until :meth:`reset`."""
        delay_s = backoff_delay_s(self._params(), self._failures, self._rng)
        self._failures += 1
        return delay_s

    def reset(self) -> None:
        """A connection succeeded: the next loss starts again from ``RetryBackOffWaitMinimum``."""
        self._failures = 0


# -- answering the CSMS --------------------------------------------------------------------------


class CallErrorReply(Exception):
    """Raised by a handler (or :func:`parse_payload`): answer the CALL with this CALLERROR."""

    def __init__(self, code: str, description: str) -> None:
        if code not in ocppj.ERROR_CODES:
            raise ValueError(f"{code!r} is not an OCPP-J error code")
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


FollowUp = Callable[["Session"], Awaitable[None]]


@dataclass(frozen=True)
class Reply:
    """A handler's answer: the CALLRESULT payload, and what to do once it has been sent."""

    payload: dict[str, Any]
    then: FollowUp | None = None


Handler = Callable[[dict[str, Any]], Reply]

# Pydantic error types (strict mode) and the RPC error code each one means (Part 4 §4.3).
_OCCURRENCE = frozenset({"missing", "too_short", "too_long"})
_PROPERTY = frozenset({"literal_error", "enum", "string_too_long", "string_too_short", "greater_than_equal"})


def _error_code(error_type: str, value: object) -> str:
    if error_type == "literal_error" and not isinstance(value, str):
        return "TypeConstraintViolation"  # an enumeration is a string; a number there is a type error
    if error_type == "extra_forbidden":
        return "FormatViolation"  # a field the schema does not have (additionalProperties is false)
    if error_type in _OCCURRENCE:
        return "OccurrenceConstraintViolation"
    if error_type in _PROPERTY:
        return "PropertyConstraintViolation"
    if error_type.endswith("_type"):
        return "TypeConstraintViolation"
    return "FormatViolation"


def parse_payload(adapter: TypeAdapter[T], payload: dict[str, Any]) -> T:
    """Validate a CALL payload; raise :class:`CallErrorReply` naming the first problem and its field."""
    try:
        return adapter.validate_python(payload, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "payload"
        raise CallErrorReply(_error_code(first["type"], first.get("input")), f"{where}: {first['msg']}") from None


class Dispatcher:
    """Routes CSMS calls to a table of handlers built by the owner (no global registry)."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        refuse: Callable[[str], CallErrorReply | None] = lambda action: None,
    ) -> None:
        self._handlers = dict(handlers)
        self._refuse = refuse

    def add(self, action: str, handler: Handler) -> None:
        """Handle ``action`` with ``handler`` from now on (replacing an earlier one)."""
        self._handlers[action] = handler

    def dispatch(self, action: str, payload: dict[str, Any]) -> Reply:
        """The answer to one CALL; raises :class:`CallErrorReply` for a CALLERROR."""
        refusal = self._refuse(action)
        if refusal is not None:
            raise refusal
        handler = self._handlers.get(action)
        if handler is None:
            if action in ocppj.ACTIONS:
                raise CallErrorReply("NotSupported", f"{action} is not supported by this Local Controller")
            raise CallErrorReply("NotImplemented", f"unknown action {action[:64]!r}")
        return handler(payload)


# -- our calls -----------------------------------------------------------------------------------


class OwnCallError(Exception):
    """A call of ours on the own connection got no CALLRESULT."""


class CallRejected(OwnCallError):
    """The CSMS answered with a CALLERROR."""

    def __init__(self, action: str, code: str, description: str) -> None:
        super().__init__(f"{action}: CALLERROR {code}: {description}")
        self.action = action
        self.code = code
        self.description = description


class CallTimeout(OwnCallError):
    """No answer within MessageTimeout."""


class LinkDown(OwnCallError):
    """The connection closed before the call could be sent."""


CallFn = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class _Outstanding:
    """The one call of ours waiting for its answer."""

    def __init__(self, message_id: str, action: str) -> None:
        self.message_id = message_id
        self.action = action
        self.answered = trio.Event()
        self.result: dict[str, Any] | None = None
        self.error: CallRejected | None = None


class LinkPolicy(Protocol):
    """Where the connection reads its timings; the owner backs it with the device model."""

    def backoff(self) -> BackoffParams:
        """RetryBackOff* now."""
        ...

    def message_timeout_s(self) -> float:
        """MessageTimeout now."""
        ...

    def ping_interval_s(self) -> float:
        """WebSocketPingInterval now (0: no pings from our side)."""
        ...


class Session:
    """One open own connection: the CSMS's calls answered, ours sent one at a time.

    ``last_activity`` is the :func:`trio.current_time` of the last OCPP message sent or received,
    which is what the heartbeat interval counts from ("inactivity", OCPPCommCtrlr.HeartbeatInterval).
    """

    def __init__(
        self,
        websocket: WebSocket,
        dispatcher: Dispatcher,
        nursery: trio.Nursery,
        metrics: OwnMetrics,
        policy: LinkPolicy,
    ) -> None:
        self.websocket = websocket
        self._dispatcher = dispatcher
        self._nursery = nursery
        self._metrics = metrics
        self._policy = policy
        self._call_lock = trio.StrictFIFOLock()
        self._outstanding: _Outstanding | None = None
        self.last_activity = trio.current_time()

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send a CALL and return its CALLRESULT payload (Part 4 §4.1.1: one outstanding at a time).

        Raises :class:`CallRejected`, :class:`CallTimeout` (after MessageTimeout) or :class:`LinkDown`.
        """
        async with self._call_lock:
            outstanding = _Outstanding(str(uuid.uuid4()), action)
            label = ocppj.action_label(action)
            self._outstanding = outstanding
            try:
                try:
                    await self._send(ocppj.encode_call(outstanding.message_id, action, payload))
                except ConnectionClosed as exc:
                    self._metrics.calls.labels("sent", label, "closed").inc()
                    raise LinkDown(f"{action}: connection closed") from exc
                with trio.move_on_after(self._policy.message_timeout_s()):
                    await outstanding.answered.wait()
            finally:
                self._outstanding = None
            if not outstanding.answered.is_set():
                self._metrics.calls.labels("sent", label, "timeout").inc()
                raise CallTimeout(f"{action}: no answer within MessageTimeout")
            if outstanding.error is not None:
                self._metrics.calls.labels("sent", label, "callerror").inc()
                raise outstanding.error
            self._metrics.calls.labels("sent", label, "result").inc()
            assert outstanding.result is not None
            return outstanding.result

    def start_soon(self, follow_up: FollowUp) -> None:
        """Run ``follow_up(self)`` in the session's nursery; it ends with the connection."""
        self._nursery.start_soon(self._guarded_follow_up, follow_up)

    async def _guarded_follow_up(self, follow_up: FollowUp) -> None:
        try:
            await follow_up(self)
        except OwnCallError as exc:
            log.warning("own identity: a follow-up could not finish: %s", exc)
        except Exception:
            # One failed follow-up (a bug) must not end the connection for everything else.
            log.exception("own identity: a follow-up failed")

    async def _send(self, text: str) -> None:
        await self.websocket.send_text(text)
        self.last_activity = trio.current_time()

    async def read(self) -> None:
        """Read and handle frames until the connection closes (then return)."""
        while True:
            try:
                text = await self.websocket.receive_text()
            except ConnectionClosed as exc:
                log.info("own identity: connection closed (%d %s)", exc.code, exc.reason or "no reason")
                return
            self.last_activity = trio.current_time()
            try:
                envelope = ocppj.parse_frame(text)
            except ocppj.FrameError as exc:
                await self._answer_bad_frame(text, exc)
                continue
            if envelope.message_type is ocppj.MessageType.CALL:
                await self._answer(envelope)
            else:
                self._settle(envelope)

    async def _answer(self, envelope: ocppj.Envelope) -> None:
        action = envelope.action or ""
        reply: Reply | None = None
        try:
            reply = self._dispatcher.dispatch(action, envelope.payload)
        except CallErrorReply as exc:
            text, outcome = ocppj.encode_error(envelope.message_id, exc.code, exc.description), "callerror"
        except Exception:
            log.exception("own identity: handling %s failed", ocppj.action_label(action))
            text, outcome = ocppj.encode_error(envelope.message_id, "InternalError", "internal error"), "internal_error"
        else:
            text, outcome = ocppj.encode_result(envelope.message_id, reply.payload), "result"
        self._metrics.calls.labels("received", ocppj.action_label(action), outcome).inc()
        try:
            await self._send(text)
        except ConnectionClosed:
            return  # the reader notices on its next receive
        if reply is not None and reply.then is not None:
            self.start_soon(reply.then)

    def _settle(self, envelope: ocppj.Envelope) -> None:
        outstanding = self._outstanding
        if outstanding is None or envelope.message_id != outstanding.message_id or outstanding.answered.is_set():
            # Typically the answer to a call that already timed out.
            log.info("own identity: an answer for no outstanding call (id %s) ignored", envelope.message_id[:36])
            return
        if envelope.message_type is ocppj.MessageType.CALLRESULT:
            outstanding.result = envelope.payload
        else:
            outstanding.error = CallRejected(
                outstanding.action, envelope.error_code or "", (envelope.error_description or "")[:255]
            )
        outstanding.answered.set()

    async def _answer_bad_frame(self, text: str, exc: ocppj.FrameError) -> None:
        log.warning("own identity: invalid frame from the CSMS (%s): %.200s", exc.reason, text)
        try:
            first = json.loads(text)[0]
        except (ValueError, LookupError, TypeError):
            first = None
        if first in (3, 4):
            return  # a broken answer: answering it with a CALLERROR would only confuse the CSMS
        with contextlib.suppress(ConnectionClosed):
            await self._send(ocppj.error_for(exc))

    async def keepalive(self, ping_timeout_s: float) -> None:
        """Ping every WebSocketPingInterval; return (ending the session) when a pong is overdue."""
        payload = 0
        while True:
            interval_s = self._policy.ping_interval_s()
            if interval_s <= 0:
                # Pings off (the CSMS may still ping us; the reader answers). Switching them on again
                # takes effect with the next connection; other changes of the interval at once.
                await trio.sleep_forever()
            await trio.sleep(interval_s)
            payload += 1
            with trio.move_on_after(ping_timeout_s):
                try:
                    await self.websocket.ping(payload.to_bytes(8, "big"))
                except ConnectionClosed:
                    return
                continue
            log.warning("own identity: no pong within %.0f s, dropping the connection", ping_timeout_s)
            return


# -- the connection loop -------------------------------------------------------------------------

Dial = Callable[[], Awaitable[WebSocket]]
OnSession = Callable[[Session], Awaitable[None]]


class OwnConnection:
    """Keeps the own connection open for as long as :meth:`run` runs, reconnecting as §5.3 says."""

    def __init__(
        self,
        *,
        dial: Dial,
        dispatcher: Dispatcher,
        policy: LinkPolicy,
        metrics: OwnMetrics,
        rng: random.Random,
        connect_timeout_s: float,
        ping_timeout_s: float,
        on_dial_failed: Callable[[HandshakeFailed], None] | None = None,
    ) -> None:
        """``on_dial_failed`` hears of every refused handshake (TLS failures, HTTP refusals …)."""
        self._dial = dial
        self._on_dial_failed = on_dial_failed
        self.dispatcher = dispatcher
        self._policy = policy
        self._metrics = metrics
        self._backoff = Backoff(policy.backoff, rng)
        self._connect_timeout_s = connect_timeout_s
        self._ping_timeout_s = ping_timeout_s
        #: The open session, if any.
        self.session: Session | None = None

    async def run(
        self, on_session: OnSession, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, run ``on_session`` on every connection, reconnect after losses; until cancelled."""
        task_status.started()
        attempted = False
        ever_connected = False
        while True:
            if attempted:
                delay_s = self._backoff.next_delay_s()
                log.info("own identity: next connection attempt in %.1f s", delay_s)
                await trio.sleep(delay_s)
            attempted = True
            websocket = await self._open()
            if websocket is None:
                continue
            self._backoff.reset()
            if ever_connected:
                self._metrics.reconnects.inc()
            ever_connected = True
            await self._serve(websocket, on_session)

    async def _open(self) -> WebSocket | None:
        outcome = "timeout"
        websocket: WebSocket | None = None
        with trio.move_on_after(self._connect_timeout_s):
            try:
                websocket = await self._dial()
            except HandshakeFailed as exc:
                outcome = exc.kind
                log.warning("own identity: cannot connect to the CSMS: %s", exc.reason)
                self._tell_dial_failed(exc)
            except Exception:
                # Whatever else goes wrong while dialling is retried like a refusal, with the back-off,
                # rather than ending the appliance.
                outcome = "error"
                log.exception("own identity: connecting to the CSMS failed")
            else:
                outcome = "connected"
        if outcome == "timeout":
            log.warning("own identity: connecting took longer than %.1f s", self._connect_timeout_s)
        if websocket is not None and websocket.subprotocol != SUBPROTOCOL:
            # Part 4 §3.2: without an agreed OCPP version there is nothing to say.
            log.warning("own identity: the CSMS chose subprotocol %r, not %s", websocket.subprotocol, SUBPROTOCOL)
            await websocket.aclose(PROTOCOL_ERROR, f"{SUBPROTOCOL} required")
            websocket, outcome = None, "subprotocol"
        self._metrics.connect_attempts.labels(outcome).inc()
        return websocket

    def _tell_dial_failed(self, failure: HandshakeFailed) -> None:
        if self._on_dial_failed is None:
            return
        try:
            self._on_dial_failed(failure)
        except Exception:
            # Reporting a failure must never stop the reconnecting.
            log.exception("own identity: reporting a failed connection attempt failed")

    async def _serve(self, websocket: WebSocket, on_session: OnSession) -> None:
        close_code, close_reason = GOING_AWAY, "going away"
        self._metrics.link_up.set(1)
        try:
            async with trio.open_nursery() as nursery:
                session = Session(websocket, self.dispatcher, nursery, self._metrics, self._policy)
                self.session = session

                async def read() -> None:
                    await session.read()
                    nursery.cancel_scope.cancel()

                async def keepalive() -> None:
                    await session.keepalive(self._ping_timeout_s)
                    nursery.cancel_scope.cancel()

                async def own_work() -> None:
                    nonlocal close_code, close_reason
                    try:
                        await on_session(session)
                    except* OwnCallError as group:
                        # The connection went away under a call: the reader is about to notice too.
                        log.warning("own identity: %s; reconnecting", group.exceptions[0])
                        nursery.cancel_scope.cancel()
                    except* Exception:
                        # A bug in the owner's code: drop this connection rather than the appliance.
                        log.exception("own identity: session failed; reconnecting")
                        close_code, close_reason = INTERNAL_ERROR, "internal error"
                        nursery.cancel_scope.cancel()

                nursery.start_soon(read)
                nursery.start_soon(keepalive)
                nursery.start_soon(own_work)
        finally:
            self.session = None
            self._metrics.link_up.set(0)
            await websocket.aclose(close_code, close_reason)  # shielded inside; idempotent
