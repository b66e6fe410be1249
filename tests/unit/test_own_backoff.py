"""The own identity's timing on trio's virtual clock: reconnect back-off (Part 4 §5.3), boot retries
(B01-B03), heartbeats, triggers and the outbox's answers, against an in-memory CSMS.

The CSMS here is a few lines over :func:`trio.testing.memory_stream_pair` and our own transport, so
every timer runs on ``autojump_clock`` and the assertions are in exact virtual seconds. The same
behaviour against an independent CSMS in its own process is in ``tests/e2e/test_own_identity.py``.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from router.own.connection import BackoffParams, backoff_delay_s
from router.own.service import OwnIdentity, OwnIdentitySettings
from router.store import Store
from router.transport import ConnectionClosed, HandshakeFailed, WebSocket, client_handshake, read_handshake
from tests.support.schemas import validate_frame

NOW = datetime.datetime(2026, 11, 25, 10, 0, tzinfo=datetime.UTC)
SEED = 7
#: Virtual seconds; generous, since the clock jumps whenever everything waits.
TEST_TIMEOUT_S = 10_000

Answer = Callable[[dict[str, Any]], dict[str, Any] | tuple[str, str] | None]


def boot_answer(status: str, interval: int) -> Answer:
    return lambda payload: {"currentTime": "2026-11-25T10:00:00.000Z", "interval": interval, "status": status}


@dataclass
class MemoryCsms:
    """The CSMS end of the own connection, in memory: records frames with their virtual time.

    ``answers`` maps an action to a function giving the CALLRESULT payload, a (code, description)
    CALLERROR, or None for no answer at all.
    """

    nursery: trio.Nursery
    unreachable_dials: int = 0
    #: Refusals the next dials raise, in order (e.g. TLS failures), before any other outcome.
    dial_failures: list[HandshakeFailed] = field(default_factory=list)
    dials: list[float] = field(default_factory=list)
    received: list[tuple[float, list[Any]]] = field(default_factory=list)
    #: Every frame, as (who wrote it: "lc" or "csms", text).
    frames: list[tuple[str, str]] = field(default_factory=list)
    answers: dict[str, Answer] = field(default_factory=dict)
    websocket: WebSocket | None = None
    changed: trio.Event = field(default_factory=trio.Event)
    replies: dict[str, list[Any]] = field(default_factory=dict)
    reading: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Stop reading (and so answering pings) without closing: a CSMS that hangs.
    deaf: bool = False

    def __post_init__(self) -> None:
        self.answers.setdefault("BootNotification", boot_answer("Accepted", 60))
        self.answers.setdefault("Heartbeat", lambda payload: {"currentTime": "2026-11-25T10:00:00.000Z"})

    async def dial(self) -> WebSocket:
        self.dials.append(trio.current_time())
        self._changed()
        if self.dial_failures:
            raise self.dial_failures.pop(0)
        if self.unreachable_dials > 0:
            self.unreachable_dials -= 1
            raise HandshakeFailed("connection refused", kind="unreachable")
        client_stream, server_stream = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server_stream)
        return await client_handshake(client_stream, "csms", 80, "/ocpp/LC01", ["ocpp2.0.1"])

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def _serve(self, stream: trio.abc.Stream) -> None:
        incoming = await read_handshake(stream, max_message_bytes=1_048_576)
        websocket = await incoming.accept("ocpp2.0.1")
        self.websocket = websocket
        try:
            with trio.CancelScope() as self.reading:
                await self._read(websocket)
            if self.deaf:
                await trio.sleep_forever()
            await websocket.aclose(1001, "restarting")  # asked to by close(); the reader has stopped
        finally:
            if self.websocket is websocket:
                self.websocket = None
            self._changed()

    async def _read(self, websocket: WebSocket) -> None:
        while True:
            try:
                text = await websocket.receive_text()
            except ConnectionClosed:
                return
            self.frames.append(("lc", text))
            frame = json.loads(text)
            self.received.append((trio.current_time(), frame))
            self._changed()
            if frame[0] != 2:
                self.replies[frame[1]] = frame
                continue
            answer = self.answers.get(frame[2], lambda payload: {})(frame[3])
            if isinstance(answer, dict):
                reply = json.dumps([3, frame[1], answer])
            elif isinstance(answer, tuple):
                reply = json.dumps([4, frame[1], answer[0], answer[1], {}])
            else:
                continue
            self.frames.append(("csms", reply))
            await websocket.send_text(reply)

    async def call(self, message_id: str, action: str, payload: dict[str, Any]) -> list[Any]:
        """Send a CALL to the controller and return its answer frame."""
        assert self.websocket is not None
        text = json.dumps([2, message_id, action, payload])
        self.frames.append(("csms", text))
        await self.websocket.send_text(text)
        return await self.wait_until(lambda: self.replies.get(message_id))

    def hang(self) -> None:
        """From now on read nothing, answer nothing, and keep the connection open."""
        self.deaf = True
        self.reading.cancel()

    async def send_raw(self, text: str) -> None:
        assert self.websocket is not None
        self.frames.append(("csms", text))
        await self.websocket.send_text(text)

    async def close(self) -> None:
        """Close the connection as a restarting CSMS would (1001), and wait until it is closed."""
        self.reading.cancel()
        await self.wait_until(lambda: self.websocket is None)

    async def wait_until(self, predicate: Callable[[], Any]) -> Any:
        """Wait until ``predicate()`` holds once the controller has done all it can at this instant.

        ``wait_all_tasks_blocked`` lets the controller finish reacting (the clock does not jump
        meanwhile); only then may time move on, to the CSMS's next event.
        """
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if result := predicate():
                return result
            await self.changed.wait()

    def calls(self, action: str | None = None) -> list[tuple[float, list[Any]]]:
        return [(t, f) for t, f in self.received if f[0] == 2 and (action is None or f[2] == action)]


def own_settings(**overrides: Any) -> OwnIdentitySettings:
    values: dict[str, Any] = {
        "identity": "LC01",
        "csms_host": "csms",
        "csms_port": 80,
        "csms_path": "/ocpp",
        "retry_wait_minimum_s": 5,
        "retry_random_range_s": 10,
        "retry_repeat_times": 3,
        "websocket_ping_interval_s": 0,
        "heartbeat_interval_s": 300,
        "boot_retry_s": 45,
        "message_timeout_s": 30,
        "firmware_version": "1.0.0",
    }
    values.update(overrides)
    return OwnIdentitySettings(**values)


@dataclass
class Running:
    own: OwnIdentity
    csms: MemoryCsms
    registry: CollectorRegistry
    restarts: list[str]


@asynccontextmanager
async def running_own(
    tmp_path: Path, csms_overrides: dict[str, Any] | None = None, **settings: Any
) -> AsyncIterator[Running]:
    registry = CollectorRegistry()
    restarts: list[str] = []
    with Store.open(tmp_path / "state") as store:
        async with trio.open_nursery() as nursery:
            csms = MemoryCsms(nursery, **(csms_overrides or {}))
            own = OwnIdentity(
                own_settings(**settings),
                store=store,
                registry=registry,
                connected_stations=lambda: ["CS02", "CS01"],
                request_restart=restarts.append,
                wall_clock=lambda: NOW,
                rng=random.Random(SEED),
                dial=csms.dial,
            )
            await nursery.start(own.run)
            yield Running(own, csms, registry, restarts)
            nursery.cancel_scope.cancel()
    validate_controller_frames(csms.frames)


def validate_controller_frames(frames: list[tuple[str, str]]) -> None:
    """Every frame the controller wrote is valid OCPP 2.0.1, its answers checked against the CALL they answer.

    The CSMS's own frames are not judged: some tests send invalid ones on purpose.
    """
    action_of_id: dict[str, str] = {}
    for writer, text in frames:
        if writer == "lc":
            validate_frame(text, action_of_id)
        elif text.startswith("[2,"):
            frame = json.loads(text)
            action_of_id[frame[1]] = frame[2]


# -- back-off arithmetic --------------------------------------------------------------------------


def test_backoff_doubles_the_fixed_part_up_to_repeat_times_and_adds_fresh_jitter() -> None:
    params = BackoffParams(wait_minimum_s=5, random_range_s=10, repeat_times=3)
    rng, replay = random.Random(SEED), random.Random(SEED)
    delays = [backoff_delay_s(params, failures, rng) for failures in range(6)]
    jitter = [replay.uniform(0, 10) for _ in range(6)]
    # Part 4 §5.3: 5, 10, 20, 40 s, then no further doubling, each plus its own random part.
    assert delays == pytest.approx(
        [5 + jitter[0], 10 + jitter[1], 20 + jitter[2], 40 + jitter[3], 40 + jitter[4], 40 + jitter[5]]
    )
    assert all(0 <= j <= 10 for j in jitter) and len(set(jitter)) == 6


def test_backoff_without_jitter_is_exact_and_never_a_busy_loop() -> None:
    rng = random.Random(SEED)
    assert backoff_delay_s(BackoffParams(2, 0, 2), 0, rng) == 2
    assert backoff_delay_s(BackoffParams(2, 0, 2), 9, rng) == 8
    assert backoff_delay_s(BackoffParams(0, 0, 0), 0, rng) > 0  # a misconfiguration does not spin


# -- reconnecting ---------------------------------------------------------------------------------


async def test_reconnect_attempts_follow_the_backoff_and_a_success_resets_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    replay = random.Random(SEED)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, {"unreachable_dials": 4}) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            start = csms.dials[0]
            gaps = [b - a for a, b in zip(csms.dials, csms.dials[1:], strict=False)]
            expected = [5 + replay.uniform(0, 10), 10 + replay.uniform(0, 10), 20 + replay.uniform(0, 10)]
            expected.append(40 + replay.uniform(0, 10))
            assert start == pytest.approx(0, abs=1e-6)  # the first attempt is made at once
            assert gaps == pytest.approx(expected)
            assert run.registry.get_sample_value("ocpp_lc_own_connect_attempts_total", {"outcome": "unreachable"}) == 4

            # The CSMS drops the connection: the first reconnection waits WaitMinimum again (reset).
            lost_at = trio.current_time()
            await csms.close()
            await csms.wait_until(lambda: len(csms.dials) == 6)
            assert csms.dials[5] - lost_at == pytest.approx(5 + replay.uniform(0, 10), abs=0.01)
            await csms.wait_until(lambda: run.own.link_up)
            assert run.registry.get_sample_value("ocpp_lc_own_reconnects_total") == 1
            # Accepted before the loss: no second BootNotification on reconnect (Part 4 §5.3).
            assert len(csms.calls("BootNotification")) == 1


async def test_backoff_settings_changed_by_the_csms_apply_to_the_next_attempts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path) as run:
            csms = run.csms
            await csms.wait_until(lambda: csms.calls("Heartbeat") or run.own.boot_status == "Accepted")
            reply = await csms.call(
                "set-1",
                "SetVariables",
                {
                    "setVariableData": [
                        {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": name}, "attributeValue": value}
                        for name, value in (
                            ("RetryBackOffWaitMinimum", "30"),
                            ("RetryBackOffRandomRange", "0"),
                            ("RetryBackOffRepeatTimes", "1"),
                        )
                    ]
                },
            )
            assert [r["attributeStatus"] for r in reply[2]["setVariableResult"]] == ["Accepted"] * 3
            csms.unreachable_dials = 3
            lost_at = trio.current_time()
            await csms.close()
            await csms.wait_until(lambda: run.own.link_up and len(csms.dials) == 5)
            gaps = [b - a for a, b in zip([lost_at, *csms.dials[1:]], csms.dials[1:], strict=False)]
            assert gaps == pytest.approx([30, 60, 60, 60], abs=0.01)


# -- booting ----------------------------------------------------------------------------------------


async def test_pending_boot_is_retried_at_the_interval_then_heartbeats_follow_the_accepted_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = iter([boot_answer("Pending", 20), boot_answer("Pending", 20), boot_answer("Accepted", 90)])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, {"answers": {"BootNotification": lambda p: next(answers)(p)}}) as run:
            csms = run.csms
            await csms.wait_until(lambda: len(csms.calls("Heartbeat")) == 3)
            boots = csms.calls("BootNotification")
            assert [t for t, _ in boots] == pytest.approx([0, 20, 40], abs=1e-6)  # B02.FR.08
            assert {f[3]["reason"] for _, f in boots} == {"PowerUp"}
            # B01.FR.04: heartbeats every 90 s after the acceptance; nothing else before it (B02.FR.02).
            assert [t for t, _ in csms.calls("Heartbeat")] == pytest.approx([130, 220, 310], abs=1e-6)
            assert [f[2] for _, f in csms.calls()][:3] == ["BootNotification"] * 3
            assert run.registry.get_sample_value("ocpp_lc_own_boot_status", {"status": "Accepted"}) == 1
            get = await csms.call(
                "get-1",
                "GetVariables",
                {
                    "getVariableData": [
                        {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}}
                    ]
                },
            )
            assert get[2]["getVariableResult"][0]["attributeValue"] == "90"


async def test_rejected_boot_sends_nothing_until_the_interval_and_refuses_csms_calls(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = iter([boot_answer("Rejected", 120), boot_answer("Accepted", 300)])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, {"answers": {"BootNotification": lambda p: next(answers)(p)}}) as run:
            csms = run.csms
            await run.own.send(
                "SecurityEventNotification", {"type": "StartupOfTheDevice", "timestamp": "2026-11-25T10:00:00Z"}
            )
            await csms.wait_until(lambda: run.own.boot_status == "Rejected")
            # B03.FR.08: while rejected, a CSMS call gets CALLERROR SecurityError.
            refused = await csms.call("trig-1", "TriggerMessage", {"requestedMessage": "Heartbeat"})
            assert refused[0] == 4 and refused[2] == "SecurityError"
            await csms.wait_until(lambda: csms.calls("SecurityEventNotification"))
            boots = csms.calls("BootNotification")
            assert [t for t, _ in boots] == pytest.approx([0, 120], abs=1e-6)  # B03.FR.06
            # B03.FR.02: the queued message only went after the acceptance.
            assert csms.calls("SecurityEventNotification")[0][0] == pytest.approx(120, abs=1e-6)


async def test_unanswered_boot_is_retried_after_the_message_timeout_and_own_interval(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = iter([lambda p: None, boot_answer("Pending", 0), boot_answer("Accepted", 0)])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, {"answers": {"BootNotification": lambda p: next(answers)(p)}}) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            # No answer: MessageTimeout (30 s) then our own 45 s; interval 0: our own 45 s (B02.FR.07).
            assert [t for t, _ in csms.calls("BootNotification")] == pytest.approx([0, 75, 120], abs=1e-6)
            await csms.wait_until(lambda: csms.calls("Heartbeat"))
            # Interval 0 in the Accepted answer leaves HeartbeatInterval as configured (300 s).
            assert csms.calls("Heartbeat")[0][0] == pytest.approx(420, abs=1e-6)


async def test_trigger_message_boot_while_pending_and_heartbeat_any_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = iter([boot_answer("Pending", 600), boot_answer("Accepted", 300)])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, {"answers": {"BootNotification": lambda p: next(answers)(p)}}) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Pending")
            await trio.sleep(10)
            heartbeat = await csms.call("t-1", "TriggerMessage", {"requestedMessage": "Heartbeat"})
            assert heartbeat[2] == {"status": "Accepted"}
            await csms.wait_until(lambda: csms.calls("Heartbeat"))  # allowed while Pending (B02.FR.02)
            boot = await csms.call("t-2", "TriggerMessage", {"requestedMessage": "BootNotification"})
            assert boot[2] == {"status": "Accepted"}
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            boots = csms.calls("BootNotification")
            # Sent at once, not after the 600 s interval, and saying why (B01.FR.09).
            assert boots[1][0] == pytest.approx(10, abs=1e-6)
            assert boots[1][1][3]["reason"] == "Triggered"
            again = await csms.call("t-3", "TriggerMessage", {"requestedMessage": "BootNotification"})
            assert again[2] == {"status": "Rejected"}  # F06.FR.17
            other = await csms.call("t-4", "TriggerMessage", {"requestedMessage": "MeterValues"})
            assert other[2] == {"status": "NotImplemented"}  # F06.FR.08


async def test_heartbeat_counts_from_the_last_exchange(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            await trio.sleep(40)
            await csms.call(
                "g-1",
                "GetVariables",
                {"getVariableData": [{"component": {"name": "LocalController"}, "variable": {"name": "Identity"}}]},
            )
            await csms.wait_until(lambda: csms.calls("Heartbeat"))
            # HeartbeatInterval (60 s from the boot answer) is an interval of inactivity.
            assert csms.calls("Heartbeat")[0][0] == pytest.approx(100, abs=1e-6)


# -- answering the CSMS -----------------------------------------------------------------------------


async def test_unknown_unsupported_and_malformed_calls_get_the_rpc_errors(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            assert (await csms.call("e-1", "FlyToTheMoon", {}))[2] == "NotImplemented"
            assert (await csms.call("e-2", "UnlockConnector", {"evseId": 1, "connectorId": 1}))[2] == "NotSupported"
            assert (await csms.call("e-3", "Reset", {}))[2] == "OccurrenceConstraintViolation"
            assert (await csms.call("e-4", "Reset", {"type": "Soon"}))[2] == "PropertyConstraintViolation"
            assert (await csms.call("e-5", "Reset", {"type": 1}))[2] == "TypeConstraintViolation"
            assert (await csms.call("e-6", "Reset", {"type": "Immediate", "colour": "red"}))[2] == "FormatViolation"
            data = await csms.call("e-7", "DataTransfer", {"vendorId": "com.example", "data": {"x": 1}})
            assert data[2] == {"status": "UnknownVendorId"}  # P01.FR.05
            assert run.restarts == []


async def test_reset_is_answered_first_then_restarts_and_the_next_boot_says_remote_reset(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            evse = await csms.call("r-1", "Reset", {"type": "Immediate", "evseId": 1})
            assert evse[2]["status"] == "Rejected"  # B11.FR.09: no EVSEs here
            reply = await csms.call("r-2", "Reset", {"type": "OnIdle"})
            assert reply[2] == {"status": "Accepted"}
            await csms.wait_until(lambda: run.restarts)
            assert run.restarts == ["RemoteReset"]
        # The "restart": the same state directory, a new controller.
        async with running_own(tmp_path) as again:
            await again.csms.wait_until(lambda: again.csms.calls("BootNotification"))
            assert again.csms.calls("BootNotification")[0][1][3]["reason"] == "RemoteReset"
            await again.csms.wait_until(lambda: again.own.boot_status == "Accepted")
        async with running_own(tmp_path) as third:
            await third.csms.wait_until(lambda: third.csms.calls("BootNotification"))
            assert third.csms.calls("BootNotification")[0][1][3]["reason"] == "PowerUp"


# -- the outbox's answers -----------------------------------------------------------------------------


async def test_outbox_drops_a_refused_message_and_resends_an_unanswered_one(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    unanswered = iter([True, False])
    answers: dict[str, Answer] = {
        "NotifyEvent": lambda p: ("FormatViolation", "no thanks"),
        "SecurityEventNotification": lambda p: None if p["type"] == "Reset" and next(unanswered) else {},
    }
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, {"answers": answers}) as run:
            csms = run.csms
            event = {
                "generatedAt": "2026-11-25T10:00:00Z",
                "seqNo": 0,
                "eventData": [
                    {
                        "eventId": 1,
                        "timestamp": "2026-11-25T10:00:00Z",
                        "trigger": "Alerting",
                        "actualValue": "true",
                        "eventNotificationType": "CustomMonitor",
                        "component": {"name": "LocalController"},
                        "variable": {"name": "Problem"},
                    }
                ],
            }
            await run.own.send("NotifyEvent", event)
            await run.own.send("SecurityEventNotification", {"type": "Reset", "timestamp": "2026-11-25T10:00:00Z"})
            await run.own.send("Heartbeat", {})
            await csms.wait_until(lambda: len(run.own.outbox) == 0)
            # (The controller's own StartupOfTheDevice went first: it was queued when it started.)
            sent = [f[2] for _, f in csms.calls() if f[2] != "BootNotification"]
            assert sent[:5] == [
                "SecurityEventNotification",
                "NotifyEvent",
                "SecurityEventNotification",
                "SecurityEventNotification",
                "Heartbeat",
            ]
            resent = [c for c in csms.calls("SecurityEventNotification") if c[1][3]["type"] == "Reset"]
            assert resent[1][0] - resent[0][0] == pytest.approx(30, abs=1e-6)  # after MessageTimeout
            assert resent[0][1][1] != resent[1][1][1]  # a retry is a new message id (Part 4 §4.1.4)
            assert run.registry.get_sample_value("ocpp_lc_own_outbox_failed_total", {"action": "NotifyEvent"}) == 1
            assert run.registry.get_sample_value("ocpp_lc_own_outbox_length") == 0

            def calls_total(action: str, outcome: str) -> float | None:
                labels = {"direction": "sent", "action": action, "outcome": outcome}
                return run.registry.get_sample_value("ocpp_lc_own_calls_total", labels)

            assert calls_total("NotifyEvent", "callerror") == 1
            assert calls_total("SecurityEventNotification", "timeout") == 1
            assert calls_total("SecurityEventNotification", "result") == 2  # the start-up and the retried one


async def test_a_csms_that_stops_answering_pings_is_dropped_and_dialled_again(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, websocket_ping_interval_s=10, ping_timeout_s=20) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            hung_at = trio.current_time()
            csms.hang()
            await csms.wait_until(lambda: len(csms.dials) == 2)
            # A ping 10 s later, no pong for 20 s, then up to 2 s for a close handshake that never comes,
            # then the back-off (5 s plus at most 10 s).
            assert 10 + 20 + 5 <= csms.dials[1] - hung_at <= 10 + 20 + 2 + 15
            await csms.wait_until(lambda: run.own.link_up)
            assert run.registry.get_sample_value("ocpp_lc_own_reconnects_total") == 1


async def test_frames_that_are_not_calls_or_answers_are_told_apart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path) as run:
            csms = run.csms
            await csms.wait_until(lambda: run.own.boot_status == "Accepted")
            await csms.send_raw('[5,"m-1",{}]')  # a message type OCPP-J 2.0.1 does not have (Part 4 §4.4)
            reply = await csms.wait_until(lambda: csms.replies.get("m-1"))
            assert reply[:3] == [4, "m-1", "MessageTypeNotSupported"]
            await csms.send_raw('[3,"nobody-asked",{}]')  # an answer to no call of ours: ignored
            await csms.send_raw("not json")
            reply = await csms.wait_until(lambda: csms.replies.get("-1"))
            assert reply[:3] == [4, "-1", "RpcFrameworkError"]  # §4.2.3: id unreadable
            # The connection is still up and still answers.
            answer = await csms.call("after", "DataTransfer", {"vendorId": "x"})
            assert answer[2] == {"status": "UnknownVendorId"}
            assert run.registry.get_sample_value("ocpp_lc_own_reconnects_total") == 0
