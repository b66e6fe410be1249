"""`ocpp-lc demo`: what a newcomer runs first must show the real controller at work, and stop cleanly.

The demo runs on the real clock (its peers are real sockets on loopback), sped up through
`SimTimings` so that a few seconds hold boots, whole charging sessions and CSMS calls. Every frame the
simulated stations and the sandbox CSMS exchanged is checked against the OCA schemas: the demo is
also the fixture later work (balancing, firmware) will test against, so it must speak valid OCPP.
"""

from __future__ import annotations

import datetime
import io
import json
import random
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import trio

from router.app import run_app
from router.demo.charging import ChargingProfiles
from router.demo.runner import OCPP_PATH, demo_main, demo_settings
from router.demo.sandbox_csms import SandboxCsms
from router.demo.stations import SimTimings, SimulatedStation
from router.observers import ObservedMessage
from router.ocppj import MessageType
from tests.support.peers import REPO_ROOT
from tests.support.schemas import validate_frames

#: Short sessions and frequent samples: a few seconds show EVs arriving, charging and leaving.
FAST = SimTimings(
    connect_spread_s=(0.0, 0.3),
    first_arrival_s=(0.2, 1.0),
    idle_s=(0.5, 1.0),
    session_s=(2.5, 3.5),
    sample_s=(0.5, 1.0),
)

#: Bounds a whole demo run, startup and shutdown included, on a loaded two-core machine.
RUN_TIMEOUT_S = 30


class FrameRecorder:
    """Every frame of every connection the demo's peers handled, in order, by connection label."""

    def __init__(self) -> None:
        self.frames: dict[str, list[tuple[str, str]]] = defaultdict(list)

    def __call__(self, label: str, direction: str, text: str) -> None:
        self.frames[label].append((direction, text))

    def texts(self, label: str, direction: str | None = None) -> list[str]:
        return [text for way, text in self.frames[label] if direction in (None, way)]

    def labels(self, *, csms: bool) -> list[str]:
        """Connections of the simulated stations (at the station's or at the CSMS's end).

        The controller's own connection to the CSMS, under its own identity, is not relayed traffic.
        """
        return sorted(label for label in self.frames if label.startswith("DEMO-") and ("#csms" in label) == csms)


async def test_demo_runs_stations_through_the_controller_with_valid_ocpp() -> None:
    recorder = FrameRecorder()
    out = io.StringIO()
    with trio.fail_after(RUN_TIMEOUT_S):
        summary = await demo_main(3, 6.0, True, out, frame_log=recorder, timings=FAST)
    text = out.getvalue()

    # Every station booted through the router: the CSMS's acceptance was observed by the controller.
    assert summary.booted == ("DEMO-01", "DEMO-02", "DEMO-03")
    for identity in summary.booted:
        assert re.search(rf"^\d\d:\d\d:\d\d  {identity} booted: BootNotification accepted", text, re.MULTILINE)
    # EVs came and went, with meter values on the way, and the CSMS's own calls reached the stations.
    assert summary.transactions_ended >= 1
    assert summary.transactions_started >= summary.transactions_ended
    assert summary.meter_samples >= 3 * summary.transactions_ended
    assert summary.energy_wh > 0
    assert re.search(r"DEMO-\d\d transaction [0-9a-f]{8} started \(idToken", text)
    assert re.search(r"DEMO-\d\d transaction [0-9a-f]{8} ended \(EVDisconnected\): \d+\.\d{3} kWh delivered", text)
    assert summary.csms_calls_relayed >= 3  # a GetBaseReport for each station, at least
    assert summary.csms_calls_answered == summary.csms_calls_relayed
    assert "CSMS call relayed to DEMO-01: GetBaseReport" in text
    # The appliance's own metrics counted exactly what arrived at each far end.
    station_labels, csms_labels = recorder.labels(csms=False), recorder.labels(csms=True)
    assert [label.split("#")[0] for label in station_labels] == ["DEMO-01", "DEMO-02", "DEMO-03"]
    assert sorted(label.split("#")[0] for label in csms_labels) == ["DEMO-01", "DEMO-02", "DEMO-03"]
    received_by_csms = sum(len(recorder.texts(label, "received")) for label in csms_labels)
    received_by_stations = sum(len(recorder.texts(label, "received")) for label in station_labels)
    assert summary.frames_station_to_csms == received_by_csms > 30
    assert summary.frames_csms_to_station == received_by_stations > 30
    assert 0 < summary.wire_bytes < summary.payload_bytes  # permessage-deflate on both legs
    # Stopping is the appliance's graceful shutdown: every station is told 1001 (going away).
    assert summary.station_closes == {1001: 3}
    assert "stopping: the controller closes every station connection with 1001" in text
    assert summary.errors == 0
    assert "ocpp-lc demo summary" in text and "3 booted through the controller" in text

    # Byte-for-byte relaying, and valid OCPP 2.0.1 from both kinds of peer, results included.
    for csms_label in csms_labels:
        identity = csms_label.split("#")[0]
        (station_label,) = [label for label in station_labels if label.startswith(f"{identity}#")]
        sent = recorder.texts(station_label, "sent")
        assert recorder.texts(csms_label, "received") == sent[: len(recorder.texts(csms_label, "received"))]
        validate_frames(recorder.texts(station_label))
        validate_frames(recorder.texts(csms_label))
    calls = [
        json.loads(text)[2:]
        for label in csms_labels
        for text in recorder.texts(label, "received")
        if text.startswith("[2,")
    ]
    actions = {action for action, _ in calls}
    assert {"BootNotification", "StatusNotification", "Authorize", "TransactionEvent", "NotifyReport"} <= actions
    # Meter values reached the CSMS: the energy register and the current on each phase.
    samples = [
        {(value.get("measurand"), value.get("phase")) for value in payload["meterValue"][-1]["sampledValue"]}
        for action, payload in calls
        if action == "TransactionEvent" and payload["eventType"] == "Updated"
    ]
    assert samples and all(
        {("Energy.Active.Import.Register", None), *(("Current.Import", f"L{phase}") for phase in (1, 2, 3))} <= sample
        for sample in samples
    )


async def test_live_view_draws_within_the_terminal_and_restores_it() -> None:
    class Terminal(io.StringIO):
        """A UTF-8 'terminal' without a size: the view falls back to 80x24."""

        encoding = "utf-8"

        def isatty(self) -> bool:
            return True

    out = Terminal()
    with trio.fail_after(RUN_TIMEOUT_S):
        summary = await demo_main(2, 2.5, False, out, timings=FAST)
    text = out.getvalue()

    screen, _, after = text.partition("\x1b[?25h\x1b[?1049l")  # cursor shown, normal screen back
    assert screen.startswith("\x1b[?1049h\x1b[?25l")  # drawn on the alternate screen
    assert after.startswith("ocpp-lc demo summary") and summary.booted == ("DEMO-01", "DEMO-02")
    frames = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame).split("\n") for frame in screen.split("\x1b[H")[1:]]
    assert len(frames) >= 4  # redrawn about twice a second
    assert all(len(frame) <= 24 and all(len(line) < 80 for line in frame) for frame in frames)  # no wrap, no scroll
    assert all(frame[0].startswith("ocpp-lc demo · controller LC-DEMO · up 00:00:0") for frame in frames)
    # While running, both stations are listed as connected, and relayed messages scroll by.
    tables = [[line.split() for line in frame if line.startswith("DEMO-0")] for frame in frames]
    assert any(
        [row[0] for row in table] == ["DEMO-01", "DEMO-02"] and {row[2] for row in table} == {"up"} for table in tables
    )
    assert all("RECENT MESSAGES" in frame for frame in frames)
    assert any(line.endswith("BootNotification   Accepted, heartbeat 30 s") for frame in frames for line in frame)


async def test_simulated_station_honours_a_charging_profile_sent_through_the_controller(tmp_path: Path) -> None:
    # The hooks balancing and firmware publishing will use: the controller's own calls to a station.
    recorder = FrameRecorder()
    with trio.fail_after(RUN_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            csms_port = await nursery.start(SandboxCsms(frame_log=recorder).serve)
            app = await nursery.start(run_app, demo_settings(csms_port, tmp_path))
            stopping = trio.Event()
            station = SimulatedStation(
                "DEMO-01",
                host="127.0.0.1",
                port=app.station_port,
                path=OCPP_PATH,
                rng=random.Random(7),
                stopping=stopping,
                timings=SimTimings(first_arrival_s=(0.1, 0.2), session_s=(30.0, 30.0), sample_s=(0.3, 0.5)),
                frame_log=recorder,
            )
            with app.hub.subscribe("test", 1000) as observed:
                nursery.start_soon(station.run)
                started = await _next_transaction_event(observed, "Started")
                transaction_id = started["transactionInfo"]["transactionId"]
                link = app.links.get("DEMO-01")
                assert link is not None

                reply = await link.call("SetChargingProfile", _tx_profile(transaction_id, limit_amperes=8.0))
                assert reply == {"status": "Accepted"}
                updated = await _next_transaction_event(observed, "Updated")
                assert updated["triggerReason"] == "ChargingRateChanged"
                currents = _currents(updated)
                assert currents and max(currents) <= 8.0 and max(currents) > 7.0

                reply = await link.call("SetChargingProfile", _tx_profile(transaction_id, limit_amperes=3.0))
                assert reply == {"status": "Accepted"}  # below the 6 A an AC EV needs: charging pauses
                updated = await _next_transaction_event(observed, "Updated")
                assert updated["triggerReason"] == "ChargingStateChanged"
                assert updated["transactionInfo"]["chargingState"] == "SuspendedEVSE"
                assert max(_currents(updated)) == 0.0

                firmware = {
                    "requestId": 1,
                    "firmware": {"location": "http://127.0.0.1/fw.bin", "retrieveDateTime": started["timestamp"]},
                }
                assert await link.call("UpdateFirmware", firmware) == {"status": "Accepted"}
                assert station.firmware_request == firmware

            stopping.set()
            app.request_shutdown()
            await app.stopped.wait()
            nursery.cancel_scope.cancel()
    assert station.stats.close_codes == {1001: 1}
    for label in recorder.frames:
        validate_frames(recorder.texts(label))


def _tx_profile(transaction_id: str, *, limit_amperes: float) -> dict[str, Any]:
    return {
        "evseId": 1,
        "chargingProfile": {
            "id": 900,
            "stackLevel": 0,
            "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Relative",
            "transactionId": transaction_id,
            "chargingSchedule": [
                {
                    "id": 1,
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit_amperes}],
                }
            ],
        },
    }


async def _next_transaction_event(observed: trio.MemoryReceiveChannel[Any], event_type: str) -> dict[str, Any]:
    async for event in observed:
        if (
            isinstance(event, ObservedMessage)
            and event.message_type is MessageType.CALL
            and event.action == "TransactionEvent"
            and event.payload["eventType"] == event_type
        ):
            payload: dict[str, Any] = event.payload
            return payload
    raise AssertionError("observations ended")


def _currents(transaction_event: dict[str, Any]) -> list[float]:
    sampled = transaction_event["meterValue"][-1]["sampledValue"]
    return [value["value"] for value in sampled if value.get("measurand") == "Current.Import"]


async def test_ctrl_c_stops_the_demo_cleanly_with_a_summary() -> None:
    command = [sys.executable, "-c", "from router.cli import main; main()", "demo", "--plain", "--duration", "30"]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    stdout, stderr = bytearray(), bytearray()
    try:
        async with trio.open_nursery() as nursery:

            async def drain(stream: Any, into: bytearray) -> None:
                async with stream:
                    while chunk := await stream.receive_some(65_536):
                        into.extend(chunk)

            nursery.start_soon(drain, process.stderr, stderr)
            assert process.stdout is not None
            with trio.fail_after(20):  # interpreter start-up and imports included
                while b" booted: " not in stdout:
                    chunk = await process.stdout.receive_some(65_536)
                    assert chunk, f"demo exited early: {stderr.decode(errors='replace')}"
                    stdout.extend(chunk)
            process.send_signal(signal.SIGINT)
            with trio.fail_after(10):
                await drain(process.stdout, stdout)
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()

    output, errors = stdout.decode(), stderr.decode()
    assert process.returncode == 0, errors
    assert "Traceback" not in errors
    assert "stopping: the controller closes every station connection with 1001" in output
    assert "ocpp-lc demo summary" in output
    assert re.search(r"^  stations +6 simulated, [1-6] booted through the controller$", output, re.MULTILINE)
    # Whoever was connected was told 1001 (going away), and nothing else.
    assert re.search(r"^  shutdown +station connections closed: [1-6] with 1001$", output, re.MULTILINE)
    assert re.search(r"errors\s+0$", output, re.MULTILINE)


def test_station_profiles_follow_the_smart_charging_rules_balancing_relies_on() -> None:
    # Pure: the arithmetic behind the simulated current, checked without sockets.
    start = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
    profiles = ChargingProfiles()

    def profile(profile_id: int, purpose: str, stack: int, unit: str, *periods: tuple[int, float]) -> dict[str, Any]:
        return {
            "id": profile_id,
            "stackLevel": stack,
            "chargingProfilePurpose": purpose,
            "chargingProfileKind": "Absolute",
            "chargingSchedule": [
                {
                    "id": profile_id,
                    "startSchedule": "2026-01-01T12:00:00Z",
                    "chargingRateUnit": unit,
                    "chargingSchedulePeriod": [{"startPeriod": at_s, "limit": limit} for at_s, limit in periods],
                }
            ],
        }

    def limit(at_s: float, transaction_id: str | None = "tx-1") -> float | None:
        now = start + datetime.timedelta(seconds=at_s)
        return profiles.limit_amperes(now, transaction_id=transaction_id, transaction_started=start)

    assert limit(0) is None  # nothing installed: no limit
    # A TxProfile needs its running transaction (K01.FR.09, K01.FR.33).
    tx_profile = profile(1, "TxProfile", 0, "A", (0, 20.0)) | {"transactionId": "tx-1"}
    assert profiles.install(1, tx_profile, start, None) == "Rejected"
    assert profiles.install(1, tx_profile | {"transactionId": "tx-2"}, start, "tx-1") == "Rejected"
    # A power limit becomes a current per phase over three phases at 230 V (K01.FR.49/50).
    assert profiles.install(1, profile(2, "TxDefaultProfile", 0, "W", (0, 11_040.0), (60, 4_140.0)), start, None) == (
        "Accepted"
    )
    assert limit(10) == 16.0 and limit(90) == 6.0  # periods follow each other (K01.FR.12)
    assert limit(10, transaction_id=None) is None  # a TxDefaultProfile limits transactions only
    # A TxProfile overrides the default; the station maximum caps both.
    assert profiles.install(1, tx_profile, start, "tx-1") == "Accepted"
    assert limit(10) == 20.0
    assert profiles.install(0, profile(3, "ChargingStationMaxProfile", 0, "A", (0, 12.0)), start, None) == "Accepted"
    assert limit(10) == 12.0
    # The same id replaces (K01.FR.05); clearing by id removes it; a TxProfile ends with its transaction.
    assert profiles.install(0, profile(3, "ChargingStationMaxProfile", 0, "A", (0, 25.0)), start, None) == "Accepted"
    assert limit(10) == 20.0
    assert (
        profiles.clear({"chargingProfileId": 3}) == "Accepted" and profiles.clear({"chargingProfileId": 3}) == "Unknown"
    )
    profiles.end_transaction("tx-1")
    assert limit(10) == 16.0 and len(profiles) == 1
