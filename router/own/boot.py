"""BootNotification and Heartbeat under the own identity (B01–B03, F06 for the triggered ones).

Theory of operation. :class:`BootState` is the state machine, without I/O: the status of the CSMS's
last answer (None before any), the reason to give, the earliest time the next BootNotification may be
sent, and what else may be sent meanwhile (:meth:`BootState.may_send`):

======================  =================================================================
status                  what the controller may send
======================  =================================================================
None (no answer yet)    BootNotification, and what the CSMS asked for (B01.FR.08, B02.FR.02)
Pending                 the same; the next BootNotification after ``interval`` (B02.FR.04)
Rejected                BootNotification only, after ``interval`` (B03.FR.02)
Accepted                anything; heartbeats every HeartbeatInterval (B01.FR.04)
======================  =================================================================

An answer with interval 0 (or none at all: a timeout, a CALLERROR, a malformed answer) means the
controller picks the wait itself (B02.FR.07, B03.FR.05): the configured default retry interval. A
TriggerMessage(BootNotification) sends one at once with reason ``Triggered``, unless the last answer
was Accepted (F06.FR.17). Boot state lives as long as the process: after a reconnect an accepted
controller does not boot again (Part 4 §5.3), one still waiting carries on waiting.

:class:`Booter` and :class:`Heartbeat` drive it on a :class:`~router.own.connection.Session`. The
heartbeat is due after HeartbeatInterval seconds *without any OCPP exchange* (that is how
OCPPCommCtrlr.HeartbeatInterval is defined), so it is timed from the session's ``last_activity``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired

import trio
from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic reads TypedDicts from here before Python 3.12

from router.own.connection import CallRejected, CallTimeout, OwnMetrics, Session

log = logging.getLogger("ocpp_lc.own.boot")

#: BootReasonEnumType (Part 2 §3.5).
BOOT_REASONS: Final = frozenset(
    {
        "ApplicationReset",
        "FirmwareUpdate",
        "LocalReset",
        "PowerUp",
        "RemoteReset",
        "ScheduledReset",
        "Triggered",
        "Unknown",
        "Watchdog",
    }
)
BootStatus = Literal["Accepted", "Pending", "Rejected"]


@with_config(ConfigDict(extra="forbid"))
class _StatusInfo(TypedDict):
    reasonCode: str
    additionalInfo: NotRequired[str]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class BootNotificationAnswer(TypedDict):
    """BootNotificationResponse, as far as we read it."""

    currentTime: str
    interval: int
    status: BootStatus
    statusInfo: NotRequired[_StatusInfo]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class _HeartbeatAnswer(TypedDict):
    currentTime: str
    customData: NotRequired[dict[str, Any]]


_BOOT_ANSWER = TypeAdapter(BootNotificationAnswer)
_HEARTBEAT_ANSWER = TypeAdapter(_HeartbeatAnswer)


@dataclass
class BootState:
    """Where the boot sequence stands (see the module docstring); no I/O, times on trio's clock."""

    reason: str
    default_retry_s: float
    status: BootStatus | None = None
    next_boot_at: float = -math.inf
    #: The interval of the last Accepted answer, if it was > 0.
    heartbeat_interval_s: int | None = None
    triggered: bool = False

    def __post_init__(self) -> None:
        if self.reason not in BOOT_REASONS:
            raise ValueError(f"{self.reason!r} is not a BootReasonEnumType value")

    def request(self, charging_station: dict[str, Any]) -> dict[str, Any]:
        """The next BootNotificationRequest payload; a pending trigger is used up by it."""
        reason = "Triggered" if self.triggered else self.reason
        self.triggered = False
        return {"reason": reason, "chargingStation": charging_station}

    def on_answer(self, answer: BootNotificationAnswer, now: float) -> None:
        """Take in the CSMS's answer."""
        self.status = answer["status"]
        interval_s = answer["interval"]
        if self.status == "Accepted":
            if interval_s > 0:  # B01.FR.04
                self.heartbeat_interval_s = interval_s
        else:
            # B02.FR.08/B03.FR.06: the interval, or our own choice when it is 0 (B02.FR.07/B03.FR.05).
            self.next_boot_at = now + (interval_s if interval_s > 0 else self.default_retry_s)

    def on_no_answer(self, now: float) -> None:
        """No usable answer (timeout, CALLERROR, malformed): retry after our own interval (B01 error handling)."""
        self.next_boot_at = now + self.default_retry_s

    def trigger(self) -> bool:
        """TriggerMessage(BootNotification): False when the last answer was Accepted (F06.FR.17)."""
        if self.status == "Accepted":
            return False
        self.triggered = True
        return True

    def may_send(self, action: str, *, requested: bool = False) -> bool:
        """Whether a CALL of ``action`` may go now; ``requested``: the CSMS asked for it (B02.FR.02)."""
        if action == "BootNotification" or self.status == "Accepted":
            return True
        if self.status == "Rejected":
            return False  # B03.FR.02
        return requested


class Booter:
    """Sends BootNotification on a session until the CSMS accepts the controller."""

    def __init__(
        self,
        state: BootState,
        charging_station: dict[str, Any],
        metrics: OwnMetrics,
        on_accepted: Callable[[BootNotificationAnswer], None],
    ) -> None:
        self.state = state
        self._charging_station = charging_station
        self._metrics = metrics
        self._on_accepted = on_accepted
        self._wake = trio.Event()

    @property
    def status(self) -> BootStatus | None:
        """The status of the last answer; None before any."""
        return self.state.status

    def trigger(self) -> bool:
        """TriggerMessage(BootNotification): send one now; False (answer Rejected) once accepted."""
        if not self.state.trigger():
            return False
        self._wake.set()
        return True

    async def until_accepted(self, session: Session) -> None:
        """Return once the CSMS has accepted the controller (at once if it already has)."""
        while self.state.status != "Accepted":
            wake = self._wake
            with trio.move_on_at(self.state.next_boot_at):
                await wake.wait()
            if wake.is_set():
                self._wake = trio.Event()
            await self._boot_once(session)

    async def _boot_once(self, session: Session) -> None:
        request = self.state.request(self._charging_station)
        try:
            raw = await session.call("BootNotification", request)
        except (CallTimeout, CallRejected) as exc:
            log.warning("own identity: BootNotification got no answer (%s); retrying later", exc)
            self.state.on_no_answer(trio.current_time())
            return
        try:
            answer = _BOOT_ANSWER.validate_python(raw, strict=True)
        except ValidationError as exc:
            log.warning("own identity: malformed BootNotification answer (%s); retrying later", exc.errors()[0]["msg"])
            self.state.on_no_answer(trio.current_time())
            return
        self.state.on_answer(answer, trio.current_time())
        self._metrics.set_boot_status(answer["status"])
        log.info(
            "own identity: BootNotification (%s) %s, interval %d s",
            request["reason"],
            answer["status"],
            answer["interval"],
        )
        if answer["status"] == "Accepted":
            self._on_accepted(answer)


class Heartbeat:
    """Sends Heartbeat after HeartbeatInterval seconds without any OCPP exchange."""

    def __init__(self, interval_s: Callable[[], float]) -> None:
        self._interval_s = interval_s
        self._changed = trio.Event()

    def interval_changed(self) -> None:
        """HeartbeatInterval changed: reschedule at once rather than at the old deadline."""
        self._changed.set()

    async def run(self, session: Session) -> None:
        """Keep heartbeating on ``session`` until it ends (cancellation)."""
        while True:
            deadline = session.last_activity + max(self._interval_s(), 1.0)
            if trio.current_time() >= deadline:
                await self.beat(session)
                continue
            changed = self._changed
            with trio.move_on_at(deadline):
                await changed.wait()
            if changed.is_set():
                self._changed = trio.Event()

    async def beat(self, session: Session) -> None:
        """Send one Heartbeat now (also what TriggerMessage(Heartbeat) does)."""
        try:
            raw = await session.call("Heartbeat", {})
        except (CallTimeout, CallRejected) as exc:
            log.warning("own identity: Heartbeat failed: %s", exc)
            return
        try:
            _HEARTBEAT_ANSWER.validate_python(raw, strict=True)
        except ValidationError:
            log.warning("own identity: malformed Heartbeat answer: %.200r", raw)
