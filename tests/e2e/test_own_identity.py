"""The controller under its own identity against an independent CSMS (the PyPI `ocpp` library, in its
own process): boot (B01-B03), heartbeats, the device model's round trips, Reset, and the durable
outbox across a CSMS outage and a restart of the controller.

Only the own identity runs here (no station server): :class:`OwnIdentity` is started as the app
starts it, with a real state store in a temporary directory. The peer is a real process, so these
tests use the real clock with intervals of a second; the exact timing is asserted on the virtual clock
in ``tests/unit/test_own_backoff.py``. Every frame the controller wrote is checked against the OCA
schemas at the end of each test.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from router.own.service import OwnIdentity, OwnIdentitySettings
from router.store import Store
from tests.support.peers import Peer, open_csms
from tests.support.schemas import validate_frames

IDENTITY = "LC01"
#: Generous for a Python subprocess on a loaded two-core machine; a pass takes a few seconds.
TIMEOUT_S = 20
#: How far a real-clock interval of 1 s may stray on a busy machine.
SLACK_S = 0.6


@dataclass
class Controller:
    own: OwnIdentity
    restarts: list[str]
    restart_requested: trio.Event
    registry: CollectorRegistry


@asynccontextmanager
async def running_controller(port: int, state_dir: Path, **overrides: Any) -> AsyncIterator[Controller]:
    """The own identity of a controller with state in ``state_dir``, pointed at 127.0.0.1:``port``."""
    settings: dict[str, Any] = {
        "identity": IDENTITY,
        "csms_host": "127.0.0.1",
        "csms_port": port,
        "csms_path": "/ocpp",
        "connect_timeout_s": 5.0,
        "message_timeout_s": 5,
        "retry_wait_minimum_s": 1,
        "retry_random_range_s": 0,
        "retry_repeat_times": 0,
        "boot_retry_s": 1.0,
        "websocket_ping_interval_s": 0,
        "items_per_message_get_report": 5,
        **overrides,
    }
    registry = CollectorRegistry()
    restarts: list[str] = []
    restart_requested = trio.Event()

    def request_restart(reason: str) -> None:
        restarts.append(reason)
        restart_requested.set()

    with Store.open(state_dir) as store:
        async with trio.open_nursery() as nursery:
            own = OwnIdentity(
                OwnIdentitySettings(**settings),
                store=store,
                registry=registry,
                connected_stations=lambda: ["CS01"],
                request_restart=request_restart,
            )
            await nursery.start(own.run)
            yield Controller(own, restarts, restart_requested, registry)
            nursery.cancel_scope.cancel()


def boot_answer(status: str, interval: int) -> dict[str, Any]:
    return {
        "cmd": "set_response",
        "action": "BootNotification",
        "payload": {"currentTime": "$now", "interval": interval, "status": status},
    }


def requests(csms: Peer, action: str | None = None) -> list[dict[str, Any]]:
    """The CALLs the CSMS received from the controller, in order (with the time of arrival)."""
    return [
        e
        for e in csms.events
        if e.get("event") == "request" and e.get("identity") == IDENTITY and (action is None or e["action"] == action)
    ]


def calls_in(csms: Peer) -> list[tuple[float, str, dict[str, Any]]]:
    """(arrival time, action, payload) of every CALL the controller wrote, from the CSMS's frame log."""
    found = []
    for event in csms.events:
        if event.get("event") == "frame" and event.get("identity") == IDENTITY and event["direction"] == "in":
            frame = json.loads(event["data"])
            if frame[0] == 2:
                found.append((event["t"], frame[2], frame[3]))
    return found


async def wait_calls(csms: Peer, action: str, count: int) -> list[tuple[float, str, dict[str, Any]]]:
    await csms.wait_for(lambda e: len([c for c in calls_in(csms) if c[1] == action]) >= count)
    return [c for c in calls_in(csms) if c[1] == action]


async def test_rejected_then_pending_then_accepted_boot_and_heartbeats(tmp_path: Path) -> None:
    async with open_csms() as (csms, port):
        await csms.command(boot_answer("Rejected", 1))
        async with running_controller(port, tmp_path / "state") as lc:
            with trio.fail_after(TIMEOUT_S):
                startup = {"type": "StartupOfTheDevice", "timestamp": "2026-11-25T10:00:00Z"}
                await lc.own.send("SecurityEventNotification", startup)
                # B03: retried at the interval. The second boot also proves the first answer was taken in.
                boots = await wait_calls(csms, "BootNotification", 2)
                assert abs(boots[1][0] - boots[0][0] - 1) < SLACK_S
                assert boots[0][2]["reason"] == "PowerUp"
                refused = await csms.call(
                    identity=IDENTITY, action="GetVariables", payload=_get("LocalController", "Identity")
                )
                assert refused["event"] == "error" and refused["code"] == "SecurityError"  # B03.FR.08

                # B02: Pending, retried at the interval; the CSMS may already read the device model.
                await csms.command(boot_answer("Pending", 1))
                # Two more boots: at least one answered Pending, and a later one proving it was taken in.
                count = len(await wait_calls(csms, "BootNotification", 1))
                await wait_calls(csms, "BootNotification", count + 2)
                pending = await csms.call(
                    identity=IDENTITY, action="GetVariables", payload=_get("LocalController", "Identity")
                )
                assert pending["payload"]["getVariableResult"][0]["attributeValue"] == IDENTITY  # B02.FR.01

                await csms.command(boot_answer("Accepted", 1))
                beats = await wait_calls(csms, "Heartbeat", 3)
                gaps = [b[0] - a[0] for a, b in itertools.pairwise(beats)]
                assert all(abs(gap - 1) < SLACK_S for gap in gaps), gaps  # B01.FR.04
                await wait_calls(csms, "SecurityEventNotification", 1)
                assert lc.registry.get_sample_value("ocpp_lc_own_link_up") == 1
                assert lc.registry.get_sample_value("ocpp_lc_own_boot_status", {"status": "Accepted"}) == 1
    # B01.FR.08, B02.FR.02, B03.FR.02: until the (last, accepted) boot, nothing but BootNotification went up,
    # not even the message queued before it.
    actions = [action for _, action, _ in calls_in(csms)]
    boots_sent = actions.count("BootNotification")
    assert boots_sent >= 5
    assert actions[:boots_sent] == ["BootNotification"] * boots_sent
    assert set(actions[boots_sent:]) == {"Heartbeat", "SecurityEventNotification"}
    validate_frames(csms.frames(identity=IDENTITY))


def _get(component: str, variable: str, instance: str | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": variable}
    if instance:
        ref["instance"] = instance
    return {"getVariableData": [{"component": {"name": component}, "variable": ref}]}


def _set(component: str, variable: str, value: str) -> dict[str, Any]:
    return {
        "setVariableData": [{"component": {"name": component}, "variable": {"name": variable}, "attributeValue": value}]
    }


async def _report(csms: Peer, request_id: int) -> list[dict[str, Any]]:
    """The NotifyReport parts of one report, once the last (tbc false) has arrived."""
    await csms.wait_for(
        lambda e: (
            e.get("event") == "request"
            and e["action"] == "NotifyReport"
            and e["payload"]["requestId"] == request_id
            and not e["payload"].get("tbc", False)
        )
    )
    return [e["payload"] for e in requests(csms, "NotifyReport") if e["payload"]["requestId"] == request_id]


async def test_device_model_round_trips_and_values_survive_a_restart(tmp_path: Path) -> None:
    async with open_csms() as (csms, port):
        async with running_controller(port, tmp_path / "state") as lc:
            with trio.fail_after(TIMEOUT_S):
                await wait_calls(csms, "BootNotification", 1)

                stations = await csms.call(
                    identity=IDENTITY, action="GetVariables", payload=_get("LocalController", "ChargingStation")
                )
                assert stations["payload"]["getVariableResult"][0]["attributeValue"] == "CS01"
                changed = await csms.call(
                    identity=IDENTITY,
                    action="SetVariables",
                    payload=_set("OCPPCommCtrlr", "RetryBackOffRepeatTimes", "7"),
                )
                assert changed["payload"]["setVariableResult"][0]["attributeStatus"] == "Accepted"
                refused = await csms.call(
                    identity=IDENTITY, action="SetVariables", payload=_set("SecurityCtrlr", "SecurityProfile", "3")
                )
                assert refused["payload"]["setVariableResult"][0]["attributeStatus"] == "Rejected"

                full = await csms.call(
                    identity=IDENTITY, action="GetBaseReport", payload={"requestId": 1, "reportBase": "FullInventory"}
                )
                assert full["payload"] == {"status": "Accepted"}
                parts = await _report(csms, 1)
                # Split by ItemsPerMessage[GetReport] (5 here), numbered from 0, tbc on all but the last.
                assert [p["seqNo"] for p in parts] == list(range(len(parts))) and len(parts) > 3
                assert all(len(p["reportData"]) <= 5 for p in parts)
                entries = {(d["component"]["name"], d["variable"]["name"]): d for p in parts for d in p["reportData"]}
                assert entries[("OCPPCommCtrlr", "RetryBackOffRepeatTimes")]["variableAttribute"][0]["value"] == "7"

                summary = await csms.call(
                    identity=IDENTITY,
                    action="GetBaseReport",
                    payload={"requestId": 2, "reportBase": "SummaryInventory"},
                )
                assert summary["payload"] == {"status": "Accepted"}
                assert len(await _report(csms, 2)) == 1
                custom = await csms.call(
                    identity=IDENTITY,
                    action="GetReport",
                    payload={"requestId": 3, "componentVariable": [{"component": {"name": "SmartChargingCtrlr"}}]},
                )
                assert custom["payload"] == {"status": "Accepted"}
                smart = [d for p in await _report(csms, 3) for d in p["reportData"]]
                assert {d["component"]["name"] for d in smart} == {"SmartChargingCtrlr"}
                empty = await csms.call(
                    identity=IDENTITY, action="GetReport", payload={"requestId": 4, "componentCriteria": ["Problem"]}
                )
                assert empty["payload"] == {"status": "EmptyResultSet"}  # B08.FR.15

                reset = await csms.call(identity=IDENTITY, action="Reset", payload={"type": "Immediate"})
                assert reset["payload"] == {"status": "Accepted"}
                await lc.restart_requested.wait()  # only once the answer has gone (B11.FR.03)
                assert lc.restarts == ["RemoteReset"]

        # The appliance restarts: the same state directory, a new controller.
        async with running_controller(port, tmp_path / "state") as lc:
            with trio.fail_after(TIMEOUT_S):
                boots = await wait_calls(csms, "BootNotification", 2)
                assert boots[1][2]["reason"] == "RemoteReset"  # B01.FR.09, B11.FR.04
                again = await csms.call(
                    identity=IDENTITY, action="GetVariables", payload=_get("OCPPCommCtrlr", "RetryBackOffRepeatTimes")
                )
                # (Not HeartbeatInterval: an accepted boot sets that one from the CSMS's interval, B01.FR.04.)
                assert again["payload"]["getVariableResult"][0]["attributeValue"] == "7"
    validate_frames(csms.frames(identity=IDENTITY))


async def test_outbox_delivers_in_order_after_an_outage_and_a_restart(tmp_path: Path) -> None:
    def event(n: int) -> dict[str, Any]:
        return {"type": "SettingSystemTime", "timestamp": f"2026-11-25T10:00:0{n}Z", "techInfo": f"message {n}"}

    async with open_csms() as (csms, port):
        pass  # the CSMS is down from here on; its port is where it will come back
    async with running_controller(port, tmp_path / "state") as lc:
        with trio.fail_after(TIMEOUT_S):
            for n in (1, 2, 3):
                await lc.own.send("SecurityEventNotification", event(n))
            assert len(lc.own.outbox) == 3
            assert lc.registry.get_sample_value("ocpp_lc_own_outbox_length") == 3
            assert lc.registry.get_sample_value("ocpp_lc_own_link_up") == 0
    # The controller restarts while the CSMS is still down, and queues one more.
    async with running_controller(port, tmp_path / "state") as lc:
        with trio.fail_after(TIMEOUT_S):
            assert len(lc.own.outbox) == 3
            await lc.own.send("SecurityEventNotification", event(4))
            async with open_csms("--port", str(port)) as (csms, _):
                await lc.own.outbox.wait_empty()
    sent = [(action, payload.get("techInfo")) for _, action, payload in calls_in(csms)]
    assert sent == [("BootNotification", None)] + [("SecurityEventNotification", f"message {n}") for n in (1, 2, 3, 4)]
    validate_frames(csms.frames(identity=IDENTITY))
