"""The CSMS leg of a station pair under site autonomy: relays while the CSMS is there, answers while it is not.

Theory of operation. To :class:`router.link.StationLink` an :class:`AutonomousUpstream` is simply the CSMS
leg: it sends and receives text frames. Behind that it has three modes (:data:`.service.Mode`):

* **relaying** — a real websocket to the CSMS is open; frames pass byte for byte both ways. On the side
  it notes the station's calls, so that the CSMS's answers to BootNotification, Authorize and
  TransactionEvent feed the boot and authorization caches (:meth:`.service.Autonomy.learn`). This is
  done here rather than through :mod:`router.observers`: an observer that falls behind loses events by
  design, and a lost BootNotificationResponse would make an accepted station Pending in the next outage.
  The cost is a second parse of the station's calls and of the CSMS's answers while relaying.
* **local** — the CSMS leg is gone (closed, silent past its ping timeout, or not reachable when the
  station connected). The station's socket stays open; each CALL it sends is answered by
  :class:`.local.LocalService` (durable before the answer is handed to the link); calls it had sent to
  the CSMS and got no answer for are answered that way too. Meanwhile a restore task re-opens the
  CSMS leg with the station's original handshake (kept in memory only, in the ``connect`` callable),
  paced site-wide (:class:`.service.ReconnectPacer`), with a doubling, jittered wait between attempts
  that ends early once another station got through.
* **replaying** — the CSMS leg is back. The kept messages go to it in order with ids of the
  controller's own, one outstanding at a time (§4.1.1), a kept boot before anything else (and until the
  CSMS accepts it), one pair per station at a time; its answers stay here (they feed the caches, and may
  stop a transaction whose idToken it refuses); that delivery is :class:`.replayer.Replayer`'s. The
  station is still answered locally, its new messages queue behind. Calls the CSMS sends meanwhile are
  relayed to the station and its answers go back. Once nothing is kept, the pair relays again.

Ending: past ``max_offline_s`` without the CSMS, or when the CSMS refuses the station's handshake on
restore (HTTP 4xx: 401, 403, 404 …), or agrees to no subprotocol, :meth:`receive_text` and
:meth:`send_text` raise :class:`router.transport.ConnectionClosed`, so the link closes the station as it
would have under the strict §6.3 rule (the station, reconnecting, then meets the CSMS's own answer).

Every task here runs in :meth:`run`, which the station's handler starts beside the link; closing the
leg (:meth:`aclose`) stops them and closes the real websocket, if one is open.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from router import ocppj
from router.link import LinkTimings
from router.liveness import probe
from router.ocppj import Envelope, FrameError, MessageType
from router.transport import ABNORMAL, NORMAL, ByteCounter, ConnectionClosed, HandshakeFailed, WebSocket

from .replayer import Replayer
from .responder import SENT_WHILE_PENDING
from .service import Autonomy, Mode

log = logging.getLogger("ocpp_lc.autonomy.upstream")

#: Opens the CSMS leg again with the station's original handshake; raises HandshakeFailed (also on timeout).
Connect = Callable[[], Awaitable[WebSocket]]
#: Sends a CALL of the controller's own to the station (``StationLink.call``).
CallStation = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

#: Frames waiting for the link's CSMS-to-station pump (relayed CSMS frames and local answers).
INBOUND_MAX: Final = 16
#: Policy violation (RFC 6455): what the station is told when the CSMS refused it on restore.
POLICY_VIOLATION: Final = 1008
#: The first wait between two failed reconnection attempts; it doubles up to reconnect_backoff_max_s.
FIRST_RETRY_S: Final = 1.0


def _message_type(text: str) -> str:
    """The message type digit of an OCPP-J frame, cheaply ('' if it does not look like one)."""
    head = text.lstrip()
    return head[1:].lstrip()[:1] if head.startswith("[") else ""


class AutonomousUpstream:
    """A station's CSMS leg that survives the CSMS (see the module docstring)."""

    def __init__(
        self,
        station_id: str,
        subprotocol: str,
        real: WebSocket | None,
        *,
        autonomy: Autonomy,
        connect: Connect,
        timings: LinkTimings,
    ) -> None:
        """``timings``: the link's; the leg pings the CSMS as ``csms_ping_*`` say (the link then must not), waits
        ``lc_call_timeout_s`` for the answer to a replayed message, and tracks ``tracked_calls_max`` calls."""
        self.station_id = station_id
        self.subprotocol = subprotocol
        self._autonomy = autonomy
        self._connect = connect
        self._timings = timings
        self._real = real
        if real is None:
            self._mode: Mode = "local"
        else:
            self._mode = "replaying" if autonomy.has_kept(station_id) else "relaying"
        #: Set by the station's handler once the link exists: the link's own call API.
        self.call_station: CallStation | None = None
        self._inbound_send, self._inbound = trio.open_memory_channel[str](INBOUND_MAX)
        self._failure: ConnectionClosed | None = None
        self._wake = trio.Event()
        if self._mode != "relaying":
            self._wake.set()
        # Station calls relayed to the CSMS and not answered yet: id -> (action, payload). Bounded.
        self._tracked: dict[str, tuple[str, Any]] = {}
        self._orphans: list[tuple[str, str, Any]] = []  # those the lost CSMS never answered
        self._dead: list[WebSocket] = []
        self._real_scope = trio.CancelScope()
        self._replayer = Replayer(
            station_id,
            autonomy,
            answer_timeout_s=timings.lc_call_timeout_s,
            current=lambda: self._real,
            lost=self._lost,
            stop_transaction=self._request_stop,
        )
        self._counters: tuple[ByteCounter, ByteCounter] | None = None
        self._nursery: trio.Nursery | None = None
        self._stopped = trio.Event()
        autonomy.claim(station_id, self, self._mode)

    @property
    def mode(self) -> Mode:
        """The current mode (see the module docstring)."""
        return self._mode

    # -- what the link sees ------------------------------------------------------------------------

    def count_bytes(self, sent: ByteCounter, received: ByteCounter) -> None:
        """Count the network bytes of every real CSMS websocket this leg opens."""
        self._counters = (sent, received)
        if self._real is not None:
            self._real.count_bytes(sent, received)

    async def receive_text(self) -> str:
        """The next frame for the station: relayed from the CSMS, or a local answer."""
        try:
            return await self._inbound.receive()
        except trio.EndOfChannel:
            assert self._failure is not None
            raise self._closed() from None

    async def send_text(self, text: str) -> None:
        """A frame from the station: to the CSMS while relaying, else answered (or dropped) here."""
        if self._failure is not None:
            raise self._closed()
        real = self._real
        if self._mode == "relaying" and real is not None:
            self._track(text)
            try:
                await real.send_text(text)
            except ConnectionClosed as closed:
                self._lost(real, f"closed ({closed.code})")  # the frame is tracked: answered locally
            return
        await self._serve_locally(text)

    async def aclose(self, code: int = NORMAL, reason: str = "") -> None:
        """End the leg: stop every task of it, close the real websocket (if open) with ``code``.

        A replayed message still out waits for its answer first (at most lc_call_timeout_s): the
        station may have connected again, and its new pair takes the replay over once this one is done
        with it; without the answer the new pair would send that message a second time.
        """
        with trio.CancelScope(shield=True):
            await self._replayer.end()
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
                await self._stopped.wait()
            real, self._real = self._real, None
            if real is not None:
                await real.aclose(code, reason)
            for dead in self._dead:
                await dead.abort()
            self._autonomy.set_mode(self.station_id, None, self)

    async def abort(self) -> None:
        """Drop the real websocket at once (shutdown after a close the peers did not complete)."""
        if self._real is not None:
            await self._real.abort()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _closed(self) -> ConnectionClosed:
        assert self._failure is not None
        return ConnectionClosed(self._failure.code, self._failure.reason, by_peer=True)

    # -- the tasks ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the real websocket, keep it alive, and restore it when lost; until cancelled or failed."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._real is not None:
                    self._start_real(self._real)
                task_status.started()
                while self._failure is None:
                    await self._wake.wait()
                    self._wake = trio.Event()
                    await self._restore()
                nursery.cancel_scope.cancel()
        finally:
            self._stopped.set()

    def _start_real(self, real: WebSocket) -> None:
        """Read and keep alive ``real`` until it is lost (then :meth:`_lost` cancels both)."""
        assert self._nursery is not None
        scope = self._real_scope = trio.CancelScope()
        self._replayer.new_leg()

        async def serve() -> None:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, real)
                    nursery.start_soon(self._keepalive, real)

        self._nursery.start_soon(serve)

    async def _read(self, real: WebSocket) -> None:
        while True:
            try:
                text = await real.receive_text()
            except ConnectionClosed as closed:
                self._lost(real, f"closed ({closed.code} {closed.reason[:60]})")
                return
            kind = _message_type(text)
            tracked: tuple[str, Any] | None = None
            if kind in ("3", "4") and (self._tracked or self._replayer.awaiting_answer):
                try:
                    envelope: Envelope | None = ocppj.parse_frame(text)
                except FrameError:
                    envelope = None
                if envelope is not None:
                    if self._replayer.take_answer(envelope):
                        continue  # §6.4-like: the answer to our replay stays here
                    tracked = self._tracked.pop(envelope.message_id, None)
                    if (
                        tracked is not None
                        and envelope.message_type is MessageType.CALLRESULT
                        and isinstance(tracked[1], dict)
                        and isinstance(envelope.payload, dict)
                    ):
                        self._autonomy.learn(self.station_id, tracked[0], tracked[1], envelope.payload)
            if self._mode == "replaying" and kind in ("3", "4") and tracked is None:
                log.info("[%s] CSMS answer to no call of the replay dropped", self.station_id)
                continue
            await self._to_link(text)

    async def _keepalive(self, real: WebSocket) -> None:
        interval_s, timeout_s = self._timings.csms_ping_interval_s, self._timings.csms_ping_timeout_s
        if interval_s <= 0:
            return
        sequence = 0
        while True:
            await trio.sleep(interval_s)
            sequence += 1
            try:
                alive = await probe(real, sequence.to_bytes(8, "big"), timeout_s)
            except ConnectionClosed:
                return  # the reader reports it
            if not alive:
                log.warning("[%s] nothing came from the CSMS within %g s of a ping", self.station_id, timeout_s)
                self._lost(real, "ping timeout")
                return

    # -- losing and restoring the CSMS leg ---------------------------------------------------------

    def _lost(self, real: WebSocket, why: str) -> None:
        """The real websocket ``real`` is gone: serve locally from now on and start restoring."""
        if self._real is not real:
            return
        self._real = None
        self._dead.append(real)
        self._real_scope.cancel()
        if self._mode != "local":  # (while replaying, only calls sent on by _relay_while_pending are tracked)
            self._orphans.extend(
                (message_id, action, payload) for message_id, (action, payload) in self._tracked.items()
            )
        self._tracked.clear()
        self._replayer.leg_lost()
        log.warning("[%s] CSMS connection lost (%s): serving the station locally", self.station_id, why)
        self._set_mode("local")
        self._wake.set()

    async def _restore(self) -> None:
        while self._failure is None:
            for dead in self._dead:
                await dead.abort()
            self._dead.clear()
            orphans, self._orphans = self._orphans, []
            for message_id, action, payload in orphans:
                await self._answer_locally(message_id, action, payload)
            if self._real is None:
                real = await self._reconnect()
                if real is None:
                    return
                self._real = real
                if self._counters is not None:
                    real.count_bytes(*self._counters)
                self._set_mode("replaying")
                self._start_real(real)
            if await self._replayer.replay(self._real, lambda: self._set_mode("relaying")):
                return

    async def _reconnect(self) -> WebSocket | None:
        settings = self._autonomy.settings
        wait_s = FIRST_RETRY_S
        with trio.move_on_at(self._autonomy.offline_deadline_s(self.station_id)):
            if self._replayer.not_before_s > trio.current_time():
                await trio.sleep_until(self._replayer.not_before_s)  # B03.FR.02: nothing before the retry interval
            while True:
                await self._autonomy.pacer.turn()
                try:
                    real = await self._connect()
                except HandshakeFailed as failed:
                    if failed.status is not None and 400 <= failed.status < 500:
                        log.warning(
                            "[%s] the CSMS refused the station on restore (HTTP %d): closing it",
                            self.station_id,
                            failed.status,
                        )
                        self._fail(POLICY_VIOLATION, f"CSMS refused the connection with HTTP {failed.status}")
                        return None
                    log.info("[%s] CSMS still unreachable: %s", self.station_id, failed.reason)
                else:
                    if real.subprotocol == self.subprotocol:
                        log.info("[%s] CSMS connection restored", self.station_id)
                        self._autonomy.pacer.reached()
                        return real
                    await real.aclose(NORMAL, "")
                    log.warning(
                        "[%s] the CSMS no longer accepts %s: closing the station", self.station_id, self.subprotocol
                    )
                    self._fail(ABNORMAL, "CSMS accepted none of the offered subprotocols")
                    return None
                if await self._autonomy.pacer.back_off(wait_s * self._autonomy.rng.uniform(0.5, 1.0)):
                    wait_s = FIRST_RETRY_S  # another station got through: the CSMS seems back
                else:
                    wait_s = min(2 * wait_s, settings.reconnect_backoff_max_s)
        log.warning(
            "[%s] CSMS unreachable for longer than max_offline_s (%g s): closing the station",
            self.station_id,
            settings.max_offline_s,
        )
        self._fail(ABNORMAL, "CSMS connection lost")
        return None

    def _fail(self, code: int, reason: str) -> None:
        """End the pair: the link sees the CSMS leg closed with ``code`` and closes the station."""
        if self._failure is None:
            self._failure = ConnectionClosed(code, reason, by_peer=True)
            self._inbound_send.close()

    def _set_mode(self, mode: Mode) -> None:
        self._mode = mode
        self._autonomy.set_mode(self.station_id, mode, self)

    # -- what the replay asks of the leg -----------------------------------------------------------

    def _request_stop(self, transaction_id: str) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._stop_transaction, transaction_id)

    async def _stop_transaction(self, transaction_id: str) -> None:
        if self.call_station is None:
            return
        try:
            answer = await self.call_station("RequestStopTransaction", {"transactionId": transaction_id})
        except Exception as error:  # LinkError and kin: the station did not take it; logged, not fatal
            log.warning("[%s] RequestStopTransaction %s failed: %s", self.station_id, transaction_id, error)
            return
        log.info("[%s] RequestStopTransaction %s: %s", self.station_id, transaction_id, answer.get("status"))

    # -- local answers -----------------------------------------------------------------------------

    def _track(self, text: str) -> None:
        if _message_type(text) != "2":
            return
        try:
            envelope = ocppj.parse_frame(text)
        except FrameError:
            return
        if envelope.action is None:
            return
        if len(self._tracked) >= self._timings.tracked_calls_max:
            self._tracked.pop(next(iter(self._tracked)))
        self._tracked[envelope.message_id] = (envelope.action, envelope.payload)

    async def _serve_locally(self, text: str) -> None:
        try:
            envelope = ocppj.parse_frame(text)
        except FrameError as malformed:
            if malformed.message_type == MessageType.CALL and malformed.message_id:
                await self._to_link(ocppj.error_for(malformed))  # Part 4 §4.3, as a CSMS would answer
            else:
                log.info("[%s] unreadable frame while served locally dropped: %s", self.station_id, malformed.reason)
            return
        if envelope.message_type is not MessageType.CALL:
            real = self._real
            if self._mode == "replaying" and real is not None:
                try:
                    await real.send_text(text)  # the station answers a call the CSMS sent during the replay
                except ConnectionClosed as closed:
                    self._lost(real, f"closed ({closed.code})")
            else:
                log.info("[%s] answer to a CSMS call that is gone dropped", self.station_id)
            return
        assert envelope.action is not None
        if await self._relay_while_pending(envelope, text):
            return
        await self._answer_locally(envelope.message_id, envelope.action, envelope.payload)

    async def _relay_while_pending(self, envelope: Envelope, text: str) -> bool:
        """Send a call the CSMS asked for on to it, as the station sent it, while it holds the station Pending.

        B02.FR.01: a CSMS holds a station Pending to read (or set) its configuration before it accepts it;
        B02.FR.02 lets the station send what the CSMS asked for meanwhile. Queued behind the held boot, the
        report the CSMS waits for would reach it only once it had accepted the station: never, if it waits
        for the report. So during the replay, while the CSMS has not accepted the station, such a call
        (:data:`.responder.SENT_WHILE_PENDING`) is relayed and so is the CSMS's answer to it. Should the leg
        go before the answer, the call is answered locally (and queued) like any call the CSMS left open.
        """
        real = self._real
        if (
            self._mode != "replaying"
            or real is None
            or envelope.action not in SENT_WHILE_PENDING
            or self._autonomy.boots.accepted_interval(self.station_id) is not None
        ):
            return False
        self._track(text)
        try:
            await real.send_text(text)
        except ConnectionClosed as closed:
            self._lost(real, f"closed ({closed.code})")  # the call is tracked: answered locally
        return True

    async def _answer_locally(self, message_id: str, action: str, payload: Any) -> None:
        handled = self._autonomy.local.handle(
            self.station_id, message_id, action, payload if isinstance(payload, dict) else {}
        )
        self._autonomy.metrics.local_answers.labels(handled.kept).inc()
        if handled.kept in ("queued", "latest"):
            self._autonomy.refresh_gauges()
        reply = handled.reply
        if reply.error_code is not None:
            frame = ocppj.encode_error(message_id, reply.error_code, reply.error_description)
        else:
            assert reply.result is not None
            frame = ocppj.encode_result(message_id, reply.result)
        await self._to_link(frame)

    async def _to_link(self, text: str) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):  # the pair is ending
            await self._inbound_send.send(text)
