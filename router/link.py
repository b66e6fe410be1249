"""One relayed station: its two websockets, the pumps between them and the controller's own calls.

Theory of operation (Part 4 §6). A :class:`StationLink` owns a station's socket and the upstream
socket opened for it under the same identity. Two pumps relay frames byte-for-byte, one per
direction; each reads a message only after the previous one was written on, so a slow side slows
only its own station. The pumps parse envelopes on the side, to

* track calls in flight (call durations, the action a reply answers, observers);
* keep at most one call *from our side* outstanding at the station (§4.1.1): relayed CSMS calls
  and the controller's own calls (:meth:`StationLink.call`) share one :class:`CallSlot`;
* take the station's answers to the controller's calls out of the stream: they never go upstream
  (§6.4). Those calls carry fresh ids of a reserved form (:func:`router.ocppj.new_lc_message_id`);
  an answer is recognised by its id alone, compared exactly with the ids the link issued, so a
  malformed answer to our call stays local too and a CSMS id that merely looks like ours is relayed.

The CSMS leg's reader never waits for the call slot: CSMS calls queue (boundedly) for a sender task,
while answers to the station's own calls, pings and pongs keep flowing.

When either socket ends, the other is closed with a deliberate code and reason (§6.3) and the link
is done. Nothing about a station outlives its link. Under site autonomy the CSMS leg is not a socket
but a :class:`router.autonomy.upstream.AutonomousUpstream` (a :class:`CsmsLeg`), which answers the
station itself while the CSMS is gone and restores its socket; the link still just relays, and sees
that leg end only where the strict rule applies again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from . import ocppj
from .call_slot import CallSlot
from .liveness import probe
from .metrics import RouterMetrics
from .observers import LinkEvent, ObservedMessage, ObserverHub, RawFrame, Source
from .ocppj import Envelope, FrameError, MessageType
from .transport import (
    ABNORMAL,
    GOING_AWAY,
    MESSAGE_TOO_BIG,
    NORMAL,
    UNSUPPORTED_DATA,
    ByteCounter,
    ConnectionClosed,
    WebSocket,
)

log = logging.getLogger("ocpp_lc.link")

#: The subprotocols whose payloads the controller reads and writes (1.6 through balancing.ocpp16);
#: other versions are relayed only.
OCPP201: Final = "ocpp2.0.1"
OCPP16: Final = "ocpp1.6"
READABLE: Final = frozenset({OCPP201, OCPP16})

# Close codes a peer may send in a close frame (RFC 6455 §7.4): these are passed on unchanged to the
# other side, so neither end can tell the controller is there (§6.1). 1005/1006 never travel.
_RELAYABLE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


def _relayable(code: int) -> bool:
    return code in _RELAYABLE_CODES or 3000 <= code <= 4999


class CsmsLeg(Protocol):
    """What the link needs of its CSMS leg: a :class:`WebSocket`, or one that outlives the CSMS (site
    autonomy, :class:`router.autonomy.upstream.AutonomousUpstream`, which keeps that leg alive itself)."""

    async def send_text(self, text: str) -> None: ...
    async def receive_text(self) -> str: ...
    async def aclose(self, code: int = NORMAL, reason: str = "") -> None: ...
    async def abort(self) -> None: ...
    def count_bytes(self, sent: ByteCounter, received: ByteCounter) -> None: ...


class LinkError(Exception):
    """Base of errors from :meth:`StationLink.call`."""


class LinkClosed(LinkError):
    """The station's link closed before the call was answered."""


class CallTimeout(LinkError):
    """The station did not answer in time."""


class CallRejected(LinkError):
    """The station answered with a CALLERROR."""

    def __init__(self, code: str, description: str, details: Any) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
        self.details = details


class MalformedReply(CallRejected):
    """The station answered with a frame that is not valid OCPP-J (reported like a CALLERROR)."""

    def __init__(self, reason: str) -> None:
        super().__init__("FormatViolation", f"malformed answer: {reason}", None)


class UnsupportedVersion(LinkError):
    """The link speaks an OCPP version the controller does not write (it only relays it)."""


@dataclass(frozen=True, slots=True)
class LinkTimings:
    """Per-link timing policy, from the configuration."""

    lc_call_timeout_s: float = 30.0
    csms_call_hold_s: float = 25.0
    station_ping_interval_s: float = 60.0
    station_ping_timeout_s: float = 30.0
    csms_ping_interval_s: float = 60.0
    csms_ping_timeout_s: float = 30.0
    tracked_calls_max: int = 64


@dataclass(slots=True)
class _Tracked:
    action: str
    payload: Any
    started_s: float


@dataclass(slots=True)
class _PendingLcCall:
    message_id: str
    action: str
    done: trio.Event
    reply: Envelope | None = None
    malformed: FrameError | None = None


#: CSMS calls that may wait for the call slot while the CSMS leg keeps being read. A CSMS keeps one
#: call outstanding per station (§4.1.1), so more than one waits only after the CSMS gave up on an
#: earlier one; past this many the reader waits too (backpressure: memory stays bounded).
CSMS_CALLS_QUEUED_MAX: Final = 8


@dataclass(frozen=True, slots=True)
class CloseDecision:
    """How a link ends: the metrics reason and what each side is told."""

    reason: str
    station_code: int
    station_reason: str
    csms_code: int
    csms_reason: str


def _passed_on(closed: ConnectionClosed, fallback_reason: str) -> tuple[int, str]:
    """The close code and reason to give the other side when one side closed."""
    if closed.by_peer and _relayable(closed.code):
        return closed.code, closed.reason
    return GOING_AWAY, fallback_reason


def decide_close(leg: str, closed: ConnectionClosed) -> CloseDecision:
    """Choose codes and a bounded reason label when ``leg`` ('station' or 'csms') ended."""
    if closed.by_peer:
        kind = "lost" if closed.code == ABNORMAL else "closed"
    elif closed.code == MESSAGE_TOO_BIG:
        kind = "message_too_big"
    elif closed.code == UNSUPPORTED_DATA:
        kind = "binary_frame"
    else:
        kind = "protocol_error"
    if leg == "station":
        code, text = _passed_on(closed, "charging station connection lost")
        if not closed.by_peer:
            text = f"charging station connection closed by the local controller: {closed.reason}"
        return CloseDecision(f"station_{kind}", closed.code, closed.reason, code, text[:120])
    code, text = _passed_on(closed, "CSMS connection lost")
    if not closed.by_peer:
        text = f"CSMS connection closed by the local controller: {closed.reason}"
    return CloseDecision(f"csms_{kind}", code, text[:120], closed.code, closed.reason)


class StationLink:
    """A relayed station: both sockets, the pumps, keepalives and the controller's call API."""

    def __init__(
        self,
        station_id: str,
        station: WebSocket,
        csms: CsmsLeg,
        *,
        metrics: RouterMetrics,
        hub: ObserverHub,
        timings: LinkTimings,
    ) -> None:
        self.station_id = station_id
        self.subprotocol = station.subprotocol
        self._station = station
        self._csms = csms
        self._metrics = metrics
        self._hub = hub
        self._timings = timings
        self._slot = CallSlot(metrics)
        self._lc_lock = trio.Lock()
        self._lc_pending: _PendingLcCall | None = None
        # The ids of the controller's recent calls to this station, exactly (bounded, oldest first):
        # the station's answers to these, however malformed, are ours (§6.4), even late ones.
        self._lc_ids: dict[str, None] = {}
        # Calls in flight, by id, to match answers: those the station sent (answered by the CSMS) and
        # those sent to the station (by the CSMS). Bounded: a peer that never answers cannot grow them.
        self._station_calls: dict[str, _Tracked] = {}
        self._calls_to_station: dict[str, _Tracked] = {}
        self._decision: CloseDecision | None = None
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        self.connected_at_s = trio.current_time()
        self._readable = self.subprotocol in READABLE
        wire = metrics.wire_bytes
        station.count_bytes(wire.labels("station", "sent"), wire.labels("station", "received"))
        csms.count_bytes(wire.labels("csms", "sent"), wire.labels("csms", "received"))

    # -- the controller's own calls ------------------------------------------------------------

    async def call(self, action: str, payload: dict[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
        """Send a CALL of the controller's own to the station and return its CALLRESULT payload.

        Raises :class:`CallRejected` on a CALLERROR, :class:`CallTimeout` if no answer comes within
        ``timeout_s`` (default: the configured LC call timeout, which includes waiting for a CSMS
        call to the same station to be answered first), :class:`LinkClosed` if the link ends, and
        :class:`UnsupportedVersion` if the station speaks neither OCPP 2.0.1 nor 1.6 (the payload must be
        of the station's version).
        """
        if not self._readable:
            raise UnsupportedVersion(f"{self.station_id} speaks {self.subprotocol}, not {OCPP201} or {OCPP16}")
        if self._done.is_set():
            raise LinkClosed(f"{self.station_id} is not connected")
        limit_s = self._timings.lc_call_timeout_s if timeout_s is None else timeout_s
        message_id = ocppj.new_lc_message_id()
        if len(self._lc_ids) >= self._timings.tracked_calls_max:
            self._lc_ids.pop(next(iter(self._lc_ids)))
        self._lc_ids[message_id] = None
        frame = ocppj.encode_call(message_id, action, payload)
        label = ocppj.action_label(action)
        pending = _PendingLcCall(message_id, action, trio.Event())
        outcome = "closed"
        try:
            with trio.fail_after(limit_s):
                async with self._lc_lock:
                    await self._slot.acquire(message_id, limit_s)
                    self._lc_pending = pending
                    try:
                        await self._station.send_text(frame)
                    except ConnectionClosed as exc:
                        raise LinkClosed(f"{self.station_id} disconnected") from exc
                    self._count("lc_to_station", label, frame)
                    if self._hub.wants_raw:
                        self._hub.publish(RawFrame(self.station_id, "lc_to_station", frame, trio.current_time()))
                    self._observe("lc", MessageType.CALL, message_id, action, payload, None)
                    await self._wait_reply(pending)
        except trio.TooSlowError:
            outcome = "timeout"
            raise CallTimeout(f"{self.station_id} did not answer {action} within {limit_s:g} s") from None
        finally:
            if self._lc_pending is pending:
                self._lc_pending = None
            self._slot.release(message_id)
            if pending.reply is not None:
                outcome = "result" if pending.reply.message_type is MessageType.CALLRESULT else "error"
            elif pending.malformed is not None:
                outcome = "error"
            self._metrics.lc_calls.labels(label, outcome).inc()
        if pending.malformed is not None:
            raise MalformedReply(pending.malformed.reason)
        reply = pending.reply
        assert reply is not None
        if reply.message_type is MessageType.CALLERROR:
            raise CallRejected(reply.error_code or "", reply.error_description or "", reply.payload)
        result: dict[str, Any] = reply.payload
        return result

    async def _wait_reply(self, pending: _PendingLcCall) -> None:
        # Wake on the reply or on the link ending, whichever comes first.
        async with trio.open_nursery() as nursery:

            async def on_done() -> None:
                await self._done.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on_done)
            await pending.done.wait()
            nursery.cancel_scope.cancel()
        if pending.reply is None and pending.malformed is None:
            raise LinkClosed(f"{self.station_id} disconnected before answering {pending.action}")

    # -- lifetime ------------------------------------------------------------------------------

    def close(self, reason: str, code: int = NORMAL, text: str = "") -> None:
        """Ask the link to end: both sides get ``code`` with ``text``; ``reason`` labels the metric."""
        if self._decision is None:
            self._decision = CloseDecision(reason, code, text, code, text)
        self._cancel_scope.cancel()

    async def abort(self) -> None:
        """Drop both sockets at once (after a close that the peers did not complete in time)."""
        self.close("shutdown", GOING_AWAY, "local controller shutting down")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._station.abort)
            nursery.start_soon(self._csms.abort)
        await self._done.wait()

    @property
    def done(self) -> trio.Event:
        """Set once both sockets are closed."""
        return self._done

    async def run(self) -> CloseDecision:
        """Relay until either side ends, then close both; return how the link ended.

        Always closes both sockets, whatever happens (cancellation included).
        """
        self._hub.publish(LinkEvent(self.station_id, "connected", self.subprotocol, trio.current_time()))
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump_station_to_csms)
                    nursery.start_soon(self._pump_csms_to_station)
                    nursery.start_soon(
                        self._keepalive,
                        self._station,
                        "station",
                        self._timings.station_ping_interval_s,
                        self._timings.station_ping_timeout_s,
                    )
                    if isinstance(self._csms, WebSocket):  # an autonomous leg keeps itself alive
                        nursery.start_soon(
                            self._keepalive,
                            self._csms,
                            "csms",
                            self._timings.csms_ping_interval_s,
                            self._timings.csms_ping_timeout_s,
                        )
        except Exception:
            log.exception("[%s] unexpected error; closing the pair", self.station_id)
            self._metrics.handler_errors.inc()
            if self._decision is None:
                self._decision = CloseDecision(
                    "internal_error", 1011, "local controller error", 1011, "local controller error"
                )
        finally:
            decision = self._decision or CloseDecision(
                "shutdown", GOING_AWAY, "local controller shutting down", GOING_AWAY, "local controller shutting down"
            )
            self._decision = decision
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as closer:
                    closer.start_soon(self._station.aclose, decision.station_code, decision.station_reason)
                    closer.start_soon(self._csms.aclose, decision.csms_code, decision.csms_reason)
                self._done.set()
                self._metrics.pair_closes.labels(decision.reason).inc()
                self._hub.publish(
                    LinkEvent(self.station_id, "disconnected", self.subprotocol, trio.current_time(), decision.reason)
                )
        log.info(
            "[%s] pair closed (%s): station got %d, CSMS got %d",
            self.station_id,
            decision.reason,
            decision.station_code,
            decision.csms_code,
        )
        return decision

    def _end(self, decision: CloseDecision) -> None:
        if self._decision is None:
            self._decision = decision
        self._cancel_scope.cancel()

    async def _keepalive(self, websocket: WebSocket, leg: str, interval_s: float, timeout_s: float) -> None:
        """Ping at ``interval_s``; nothing from the peer for ``timeout_s`` after it means it is gone.

        Any byte counts, not only the pong, and time spent queued behind a draining message of ours
        does not (:func:`router.liveness.probe`): a slow but healthy peer is not closed (Part 4 §5.2).
        """
        if interval_s <= 0:
            return
        sequence = 0
        while True:
            await trio.sleep(interval_s)
            sequence += 1
            try:
                alive = await probe(websocket, sequence.to_bytes(8, "big"), timeout_s)
            except ConnectionClosed:
                return  # the pump reading this leg reports the close, after relaying what came before it
            if not alive:
                log.warning("[%s] nothing came from the %s leg within %g s of a ping", self.station_id, leg, timeout_s)
                if leg == "station":
                    self._end(
                        CloseDecision(
                            "station_timeout",
                            GOING_AWAY,
                            "ping timeout",
                            GOING_AWAY,
                            "charging station not responding",
                        )
                    )
                else:
                    self._end(
                        CloseDecision("csms_timeout", GOING_AWAY, "CSMS not responding", GOING_AWAY, "ping timeout")
                    )
                return

    # -- the pumps -----------------------------------------------------------------------------

    def _count(self, direction: str, label: str, text: str) -> None:
        self._metrics.count_frame(direction, label, len(text) if text.isascii() else len(text.encode()))

    def _parse(self, text: str, direction: str) -> tuple[Envelope | None, FrameError | None]:
        try:
            return ocppj.parse_frame(text), None
        except FrameError as exc:
            # Relayed unchanged all the same (unless it answers our own call): the far end owns
            # validation (and answers it).
            self._metrics.invalid_frames.labels(direction, exc.kind).inc()
            log.info("[%s] %s frame is not valid OCPP-J (%s)", self.station_id, direction, exc.reason)
            return None, exc

    def _observe(
        self,
        source: Source,
        message_type: MessageType,
        message_id: str,
        action: str | None,
        payload: Any,
        request: Any,
    ) -> None:
        if self._readable and self._hub.has_subscribers:
            self._hub.publish(
                ObservedMessage(
                    self.station_id,
                    source,
                    message_type,
                    message_id,
                    action,
                    payload,
                    request,
                    trio.current_time(),
                    self.subprotocol,
                )
            )

    def _track(self, table: dict[str, _Tracked], envelope: Envelope) -> None:
        if len(table) >= self._timings.tracked_calls_max:
            table.pop(next(iter(table)))  # the oldest: its answer is long overdue
        assert envelope.action is not None
        table[envelope.message_id] = _Tracked(envelope.action, envelope.payload, trio.current_time())

    async def _pump_station_to_csms(self) -> None:
        direction = "station_to_csms"
        while True:
            try:
                text = await self._station.receive_text()
            except ConnectionClosed as closed:
                self._end(decide_close("station", closed))
                return
            envelope, malformed = self._parse(text, direction)
            message_id = envelope.message_id if envelope is not None else malformed.message_id if malformed else None
            is_call = envelope is not None and envelope.message_type is MessageType.CALL
            if message_id is not None and not is_call and message_id in self._lc_ids:
                # Decided by the id alone, whatever the rest of the frame: §6.4, never relayed upstream.
                self._answer_lc_call(message_id, envelope, malformed, text)
                continue
            if envelope is not None and not is_call:
                self._slot.release(envelope.message_id)
            elif envelope is None and message_id is not None and malformed and malformed.message_type != 2:
                self._slot.release(message_id)  # a malformed answer still ends the call it answers
            if self._hub.wants_raw:
                self._hub.publish(RawFrame(self.station_id, direction, text, trio.current_time()))
            try:
                await self._csms.send_text(text)
            except ConnectionClosed as closed:
                self._end(decide_close("csms", closed))
                return
            self._after_relay(envelope, text, direction, "station")

    async def _pump_csms_to_station(self) -> None:
        # CALLs go through a sender task that waits for the call slot, queued so that the reader
        # never waits for the slot: everything else (answers to the station's calls, and the
        # pings/pongs read along the way) keeps flowing meanwhile.
        direction = "csms_to_station"
        calls_send, calls_receive = trio.open_memory_channel[tuple[str, Envelope | None, str]](CSMS_CALLS_QUEUED_MAX)
        unreadable = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_csms_calls, calls_receive)
            async with calls_send:
                while True:
                    try:
                        text = await self._csms.receive_text()
                    except ConnectionClosed as closed:
                        self._end(decide_close("csms", closed))
                        return
                    envelope, malformed = self._parse(text, direction)
                    if envelope is not None and envelope.message_type is MessageType.CALL:
                        await calls_send.send((text, envelope, envelope.message_id))
                    elif malformed is not None and malformed.message_type == MessageType.CALL:
                        # Meant as a call: the station may well act on it, so it takes the slot like
                        # any other. An id we cannot read gets a key no answer matches (the hold frees it).
                        unreadable += 1
                        slot_id = malformed.message_id or f"\x00unreadable-{unreadable}"
                        await calls_send.send((text, None, slot_id))
                    elif not await self._to_station(text, envelope):
                        return

    async def _send_csms_calls(self, calls: trio.MemoryReceiveChannel[tuple[str, Envelope | None, str]]) -> None:
        async with calls:
            async for text, envelope, slot_id in calls:
                if await self._slot.acquire(slot_id, self._timings.csms_call_hold_s):
                    self._metrics.held_calls.inc()
                if not await self._to_station(text, envelope):
                    return

    async def _to_station(self, text: str, envelope: Envelope | None) -> bool:
        direction = "csms_to_station"
        if self._hub.wants_raw:
            self._hub.publish(RawFrame(self.station_id, direction, text, trio.current_time()))
        try:
            await self._station.send_text(text)
        except ConnectionClosed as closed:
            self._end(decide_close("station", closed))
            return False
        self._after_relay(envelope, text, direction, "csms")
        return True

    def _after_relay(self, envelope: Envelope | None, text: str, direction: str, source: Source) -> None:
        """Bookkeeping once a frame is on its way: metrics, call tracking, observers."""
        calls_sent_by_source = self._station_calls if source == "station" else self._calls_to_station
        calls_answered_by_source = self._calls_to_station if source == "station" else self._station_calls
        if envelope is None:
            self._count(direction, "other", text)
            return
        if envelope.message_type is MessageType.CALL:
            self._count(direction, ocppj.action_label(envelope.action), text)
            self._track(calls_sent_by_source, envelope)
            self._observe(source, envelope.message_type, envelope.message_id, envelope.action, envelope.payload, None)
            return
        tracked = calls_answered_by_source.pop(envelope.message_id, None)
        label = ocppj.action_label(tracked.action if tracked else None)
        self._count(direction, label, text)
        if tracked is not None:
            # The answer's sender is the leg that answered: 'station' answers CSMS calls.
            self._metrics.call_duration.labels(source, label).observe(trio.current_time() - tracked.started_s)
        self._observe(
            source,
            envelope.message_type,
            envelope.message_id,
            tracked.action if tracked else None,
            envelope.payload,
            tracked.payload if tracked else None,
        )

    def _answer_lc_call(
        self, message_id: str, envelope: Envelope | None, malformed: FrameError | None, text: str
    ) -> None:
        pending = self._lc_pending
        if pending is None or pending.message_id != message_id:
            self._metrics.late_replies.inc()
            self._count("station_to_lc", "other", text)
            log.info("[%s] late answer to controller call %s dropped", self.station_id, message_id)
            return
        self._count("station_to_lc", ocppj.action_label(pending.action), text)
        if self._hub.wants_raw:
            self._hub.publish(RawFrame(self.station_id, "station_to_lc", text, trio.current_time()))
        self._slot.release(message_id)
        if envelope is None:
            # Ends the call at once as failed rather than leaving it to its timeout.
            log.warning(
                "[%s] malformed answer to controller call %s (%s)",
                self.station_id,
                pending.action,
                malformed.reason if malformed else "",
            )
            pending.malformed = malformed
            pending.done.set()
            return
        pending.reply = envelope
        pending.done.set()
        self._observe("station", envelope.message_type, envelope.message_id, pending.action, envelope.payload, None)
