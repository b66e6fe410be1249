"""The replay on restore: a station's kept messages go to the CSMS as calls of the controller's own.

Theory of operation. An :class:`.upstream.AutonomousUpstream` that has its CSMS websocket back hands it to
:meth:`Replayer.replay`, which delivers what :mod:`.queue` keeps for the station, in the order of
:func:`.replay.partition_latest`: a kept boot before anything else (and until the CSMS accepts it:
:meth:`Replayer._replay_boot`), then the queue, then the other latest entries. One message is out at a
time (§4.1.1), under a fresh id of ours; the leg's reader hands the CSMS's answer over
(:meth:`Replayer.take_answer`), and it stays here: it feeds the caches (:meth:`.service.Autonomy.learn`)
and may stop a transaction whose idToken the CSMS refuses (C15). A message is acknowledged in the queue
only once answered, so a crash or a lost leg repeats it, never loses it.

The replayer never owns the websocket: the leg says which one is current (``current``) and is told when one
is lost (``lost``); the leg's own tasks read it. :meth:`Replayer.end` lets a message that is out get its
answer before the pair ends, so a newer pair of the station does not send it a second time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from router import ocppj
from router.ocppj import Envelope, MessageType
from router.transport import ConnectionClosed, WebSocket

from .queue import StationMessage
from .replay import boot_verdict, partition_latest, refused_after_local_accept, replay_payload
from .service import Autonomy

# The leg's logger: the replay was part of the leg, and log filters name it.
log = logging.getLogger("ocpp_lc.autonomy.upstream")


@dataclass(slots=True)
class _ReplayWait:
    message_id: str
    done: trio.Event
    answer: Envelope | None = None


class Replayer:
    """Delivers one station's kept messages to the CSMS over the leg's current websocket (see the module docstring).

    ``current`` names the leg's websocket (None while there is none); ``lost(real, why)`` tells the leg that
    ``real`` is of no more use (closed, silent, or the CSMS rejected the boot); ``stop_transaction`` asks the
    leg to send the station RequestStopTransaction for a transaction id (C15.FR.03/04).
    """

    def __init__(
        self,
        station_id: str,
        autonomy: Autonomy,
        *,
        answer_timeout_s: float,
        current: Callable[[], WebSocket | None],
        lost: Callable[[WebSocket, str], None],
        stop_transaction: Callable[[str], None],
    ) -> None:
        self.station_id = station_id
        self._autonomy = autonomy
        self._answer_timeout_s = answer_timeout_s
        self._current = current
        self._lost = lost
        self._stop_transaction = stop_transaction
        self._wait: _ReplayWait | None = None
        # Set while a replayed message is out and not yet acknowledged in the queue (see end).
        self._busy: trio.Event | None = None
        # Wakes a replay holding for the CSMS's verdict on a boot: the leg was lost, or the pair ends.
        self._interrupt = trio.Event()
        self._ending = False
        #: No attempt to reach the CSMS before this (trio clock): a Rejected boot's retry interval (B03.FR.02).
        self.not_before_s = -math.inf

    # -- what the leg tells the replayer -----------------------------------------------------------

    @property
    def awaiting_answer(self) -> bool:
        """Whether a replayed message is out: the leg's reader then parses the CSMS's answers."""
        return self._wait is not None

    def take_answer(self, envelope: Envelope) -> bool:
        """Keep ``envelope`` if it answers the replayed message that is out (then it goes nowhere else)."""
        wait = self._wait
        if wait is None or envelope.message_id != wait.message_id:
            return False
        wait.answer = envelope
        wait.done.set()
        return True

    def new_leg(self) -> None:
        """A new CSMS websocket is in use: a boot hold may wait on it again (unless the pair ends)."""
        if not self._ending:
            self._interrupt = trio.Event()

    def leg_lost(self) -> None:
        """The current websocket is gone: stop waiting for an answer or a boot interval on it."""
        if self._wait is not None:
            self._wait.done.set()
        self._interrupt.set()

    async def end(self) -> None:
        """The pair ends: no new message goes out; one that is out gets its answer first (at most the timeout).

        The station may have connected again, and its new pair takes the replay over once this one is done
        with it; without the answer the new pair would send that message a second time.
        """
        self._ending = True
        self._interrupt.set()
        busy = self._busy
        if busy is not None:
            with trio.move_on_after(self._answer_timeout_s):
                await busy.wait()

    # -- the replay --------------------------------------------------------------------------------

    async def replay(self, real: WebSocket, relay_again: Callable[[], None]) -> bool:
        """Deliver everything kept for the station over ``real``; True once it all went and ``relay_again`` ran.

        One pair at a time replays a station's queue (:meth:`.service.Autonomy.replay_lock`): a station
        that connects again while its older pair still replays gets a new pair that waits here until the
        older one has its answer and ends (see :meth:`end`), so that no message goes out twice.
        ``relay_again`` is called with no checkpoint after the last check that nothing is kept.
        """
        async with self._autonomy.replay_lock(self.station_id):
            return await self._replay_locked(real, relay_again)

    async def _replay_locked(self, real: WebSocket, relay_again: Callable[[], None]) -> bool:
        queue = self._autonomy.queue
        while True:
            if not await self._replay_boot(real):
                return False
            while entries := queue.peek(self.station_id, 1):
                if not await self._deliver_kept(real, entries[0].message, lambda: queue.ack(entries[0])):
                    return False
                self._autonomy.refresh_gauges()
                # A boot the station sent meanwhile overtakes what is still queued (B01.FR.08).
                if not await self._replay_boot(real):
                    return False
            for latest in partition_latest(queue.latest(self.station_id))[1]:
                if not await self._deliver_kept(real, latest.message, functools.partial(queue.ack_latest, latest)):
                    return False
            # No checkpoint between this check and the switch: a station call handled locally stores
            # its message before it yields, so nothing can slip in between.
            if self._current() is real and not self._autonomy.has_kept(self.station_id):
                log.info("[%s] replay done: relaying again", self.station_id)
                relay_again()
                return True
            if self._current() is not real:
                return False

    async def _replay_boot(self, real: WebSocket) -> bool:
        """Deliver a kept BootNotification, if any, until the CSMS accepts it; False if the replay must stop.

        Pending: the queue waits, the leg stays open (B02.FR.06; CSMS calls still reach the station) and
        the boot goes again after the CSMS's interval (B02.FR.08), for as long as the CSMS answers Pending:
        holding a station Pending is the CSMS's call (B02.FR.01), so this hold has no time limit of ours,
        and it does not count as time offline (:meth:`.service.Autonomy.csms_holds_pending`); each round is
        logged and counted (``ocpp_lc_autonomy_replayed_boot_held_total{status}``). Rejected: the leg is
        closed (B03.FR.04) and re-opened after that interval (B03.FR.02), boot first. Meanwhile the
        station is answered as the CSMS would (the boot cache has the verdict: SecurityError, B02.FR.09,
        B03.FR.07). It is not closed: told Accepted by us, it would reconnect but not boot again
        (B01.FR.03: boots only).
        """
        queue = self._autonomy.queue
        for latest in partition_latest(queue.latest(self.station_id))[0]:
            while True:
                if self._ending:
                    return False
                with self._message_out():
                    answer = await self._deliver(real, latest.message)
                    verdict = (
                        None
                        if answer is None
                        else boot_verdict(answer.payload if answer.message_type is MessageType.CALLRESULT else None)
                    )
                    if answer is not None and verdict is None:
                        queue.ack_latest(latest)
                if answer is None:
                    return False
                if verdict is None:
                    break
                status, wait_s = verdict
                self._autonomy.metrics.boot_held.labels(status).inc()
                if status == "Rejected":
                    log.warning(
                        "[%s] the CSMS rejected the replayed BootNotification: the replay waits %d s, "
                        "the CSMS connection closed meanwhile",
                        self.station_id,
                        wait_s,
                    )
                    self.not_before_s = trio.current_time() + wait_s
                    self._lost(real, "the CSMS rejected the station's boot")
                    return False
                self._autonomy.csms_holds_pending(self.station_id)
                log.warning(
                    "[%s] the CSMS answered the replayed BootNotification Pending: the replay waits (for as long "
                    "as the CSMS answers Pending, B02.FR.01; not counted as time offline), the boot goes again "
                    "in %d s",
                    self.station_id,
                    wait_s,
                )
                with trio.move_on_after(wait_s):
                    await self._interrupt.wait()
                if self._ending or self._current() is not real:
                    return False
        return True

    async def _deliver_kept(self, real: WebSocket, message: StationMessage, ack: Callable[[], object]) -> bool:
        """Deliver one kept message and ``ack`` it; False if the replay must stop."""
        if self._ending:
            return False
        with self._message_out():
            if await self._deliver(real, message) is None:
                return False
            ack()
            return True

    @contextlib.contextmanager
    def _message_out(self) -> Iterator[None]:
        """Mark a replayed message as out until it is answered and acknowledged: :meth:`end` waits for it."""
        busy = self._busy = trio.Event()
        try:
            yield
        finally:
            self._busy = None
            busy.set()

    async def _deliver(self, real: WebSocket, message: StationMessage) -> Envelope | None:
        """Send one kept message as a call of ours; the CSMS's answer, or None if the leg was lost."""
        if self._current() is not real:
            return None
        wait = _ReplayWait(ocppj.new_lc_message_id(), trio.Event())
        frame = ocppj.encode_call(wait.message_id, message.action, replay_payload(message))
        self._wait = wait
        try:
            try:
                await real.send_text(frame)
            except ConnectionClosed as closed:
                self._lost(real, f"closed ({closed.code})")
                return None
            with trio.move_on_after(self._answer_timeout_s):
                await wait.done.wait()
        finally:
            self._wait = None
        answer = wait.answer
        if answer is None:
            if self._current() is real:
                self._lost(real, f"no answer to a replayed {message.action}")
            return None
        self._replayed(message, answer)
        return answer

    def _replayed(self, message: StationMessage, answer: Envelope) -> None:
        metrics = self._autonomy.metrics
        if answer.message_type is not MessageType.CALLRESULT or not isinstance(answer.payload, dict):
            # Sending it again would only get the same error and hold up the rest: it is dropped.
            metrics.replayed.labels("error").inc()
            log.warning(
                "[%s] the CSMS answered a replayed %s with %s (%s): dropped",
                self.station_id,
                message.action,
                answer.error_code,
                (answer.error_description or "")[:120],
            )
            return
        metrics.replayed.labels("result").inc()
        self._autonomy.learn(self.station_id, message.action, message.payload, answer.payload)
        transaction_id = refused_after_local_accept(message, answer.payload)
        if transaction_id is None:
            return
        status = answer.payload["idTokenInfo"].get("status")
        if not self._autonomy.settings.stop_invalid_transactions:
            metrics.refused_after_local_accept.labels("left_running").inc()
            log.warning(
                "[%s] the CSMS refused (%s) the idToken of transaction %s, accepted locally; it keeps running "
                "([autonomy] stop_invalid_transactions is false)",
                self.station_id,
                status,
                transaction_id,
            )
            return
        metrics.refused_after_local_accept.labels("stop_requested").inc()
        log.warning(
            "[%s] the CSMS refused (%s) the idToken of transaction %s, accepted locally: stopping it",
            self.station_id,
            status,
            transaction_id,
        )
        self._stop_transaction(transaction_id)
