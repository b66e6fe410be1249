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

import datetime
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from router.own.service import OwnIdentity, OwnIdentitySettings
from router.store import Store
from router.tls import CsmsTlsSettings, client_context
from tests.support.certs import LOOPBACK_HOSTS, CertifiedKey, make_pki
from tests.support.peers import Peer, _open_peer, open_csms
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
async def running_controller(
    port: int,
    state_dir: Path,
    *,
    count_security_event: Callable[[str, str], None] | None = None,
    **overrides: Any,
) -> AsyncIterator[Controller]:
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
                # Only when asked for: the other tests run against an OwnIdentity without the hook too.
                **({"count_security_event": count_security_event} if count_security_event else {}),
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
                # A04.FR.01: the start is a security event, sent once the boot is accepted.
                startup = (await wait_calls(csms, "SecurityEventNotification", 1))[0][2]
                assert startup["type"] == "StartupOfTheDevice" and "PowerUp" in startup["techInfo"]

                # #13.10: the variables every station must have, with real values.
                required = {
                    "getVariableData": [
                        {"component": {"name": c}, "variable": {"name": v, **({"instance": i} if i else {})}}
                        for c, v, i in (
                            ("ClockCtrlr", "DateTime", None),
                            ("ClockCtrlr", "TimeSource", None),
                            ("SecurityCtrlr", "CertificateEntries", None),
                            ("SecurityCtrlr", "OrganizationName", None),
                            ("SmartChargingCtrlr", "Entries", "ChargingProfiles"),
                            ("OCPPCommCtrlr", "OfflineThreshold", None),
                            ("OCPPCommCtrlr", "ResetRetries", None),
                            ("OCPPCommCtrlr", "NetworkConfigurationPriority", None),
                            ("OCPPCommCtrlr", "NetworkProfileConnectionAttempts", None),
                        )
                    ]
                }
                before = datetime.datetime.now(datetime.UTC)
                got = (await csms.call(identity=IDENTITY, action="GetVariables", payload=required))["payload"]
                results = got["getVariableResult"]
                assert [r["attributeStatus"] for r in results] == ["Accepted"] * len(results)
                clock = datetime.datetime.fromisoformat(results[0]["attributeValue"].replace("Z", "+00:00"))
                assert abs((clock - before).total_seconds()) < TIMEOUT_S  # the time now, not a constant
                assert [r["attributeValue"] for r in results[1:]] == [
                    "RealTimeClock",
                    "0",
                    "",
                    "0",
                    "600",
                    "0",
                    "1",
                    "3",
                ]
                read_only = await csms.call(
                    identity=IDENTITY, action="SetVariables", payload=_set("SecurityCtrlr", "CertificateEntries", "4")
                )
                refusal = read_only["payload"]["setVariableResult"][0]
                assert refusal["attributeStatus"] == "Rejected"  # B05.FR.09
                assert refusal["attributeStatusInfo"]["reasonCode"] == "ReadOnly"
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
                # A04.FR.01: after the Reset the start is reported as ResetOrReboot.
                events = [payload for _, _, payload in await wait_calls(csms, "SecurityEventNotification", 2)]
                assert [e["type"] for e in events] == ["StartupOfTheDevice", "ResetOrReboot"]
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
            assert len(lc.own.outbox) == 4  # the start-up event and the three
            assert lc.registry.get_sample_value("ocpp_lc_own_outbox_length") == 4
            assert lc.registry.get_sample_value("ocpp_lc_own_link_up") == 0
    # The controller restarts while the CSMS is still down, and queues one more.
    async with running_controller(port, tmp_path / "state") as lc:
        with trio.fail_after(TIMEOUT_S):
            assert len(lc.own.outbox) == 5  # and this start's
            await lc.own.send("SecurityEventNotification", event(4))
            async with open_csms("--port", str(port)) as (csms, _):
                await lc.own.outbox.wait_empty()
    sent = [(action, payload.get("type"), payload.get("techInfo", "")[-9:]) for _, action, payload in calls_in(csms)]
    # Each start queued its StartupOfTheDevice (A04.FR.02: queued while the CSMS was away), in order with the rest.
    started = ("SecurityEventNotification", "StartupOfTheDevice", " PowerUp)")
    queued = [("SecurityEventNotification", "SettingSystemTime", f"message {n}") for n in (1, 2, 3, 4)]
    assert sent == [("BootNotification", None, ""), started, *queued[:3], started, queued[3]]
    validate_frames(csms.frames(identity=IDENTITY))


@asynccontextmanager
async def tls_csms(cert: CertifiedKey, port: int = 0) -> AsyncIterator[tuple[Peer, int]]:
    """The `ocpp` CSMS peer on wss:// with ``cert`` as its server certificate."""
    args = ["csms", "--cert", str(cert.cert_file), "--key", str(cert.key_file), "--"]
    async with _open_peer("tests.support.certs", "csms", [*args, "--host", "127.0.0.1", "--port", str(port)]) as peer:
        listening = await peer.wait_for_event("listening")
        yield peer, int(listening["port"])


async def test_a_csms_certificate_that_does_not_verify_is_reported_once_after_the_outage(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    impostor = pki.rogue_ca.issue("localhost", hosts=LOOPBACK_HOSTS, file_stem="impostor-csms")
    # Security profile 2: the controller trusts the CSO's CA only (A00.FR.308).
    context = client_context(CsmsTlsSettings.model_validate({"security_profile": 2, "ca_file": pki.cso_ca.cert_file}))
    failures: list[tuple[str, str]] = []
    failed_twice = trio.Event()

    def count(event: str, leg: str) -> None:
        failures.append((event, leg))
        if len(failures) >= 2:
            failed_twice.set()

    async with tls_csms(pki.csms_server) as (_, port):
        pass  # a free port, for the impostor first and the real CSMS then
    with trio.fail_after(TIMEOUT_S):
        settings: dict[str, Any] = {"ssl_context": context, "security_profile": 2, "count_security_event": count}
        async with running_controller(port, tmp_path / "state", **settings) as lc:
            async with tls_csms(impostor, port):
                await failed_twice.wait()  # two attempts refused (A00.FR.310/311); then the impostor goes
            async with tls_csms(pki.csms_server, port) as (csms, _):
                await wait_calls(csms, "SecurityEventNotification", 2)
                await lc.own.outbox.wait_empty()
    assert failures[:2] == [("InvalidCsmsCertificate", "own"), ("InvalidCsmsCertificate", "own")]
    reported = [payload for _, action, payload in calls_in(csms) if action == "SecurityEventNotification"]
    assert [e["type"] for e in reported] == ["StartupOfTheDevice", "InvalidCsmsCertificate"]  # once, not per attempt
    assert "certificate verify failed" in reported[1]["techInfo"]
    assert (
        lc.registry.get_sample_value(
            "ocpp_lc_own_security_events_total",
            {"type": "InvalidCsmsCertificate", "source": "own", "outcome": "repeated"},
        )
        == len(failures) - 1
    )
    validate_frames(csms.frames(identity=IDENTITY))
