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

import pytest
import trio

from router.app import run_app
from router.demo.charging import ChargingProfiles
from router.demo.firmware_source import FirmwareSource
from router.demo.outage import OutagePlan
from router.demo.runner import OCPP_PATH, EmsPlan, demo_main, demo_settings
from router.demo.sandbox_csms import SandboxCsms
from router.demo.stations import SimTimings, SimulatedStation
from router.demo.view import Header, RelayCounters, SiteModel, render_live, site_balance
from router.observers import ObservedMessage
from router.ocppj import MessageType, is_lc_message_id
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
        summary = await demo_main(
            4, 11.0, True, out, frame_log=recorder, timings=FAST, ems=EMS, firmware_after_s=0.5, grid_amperes=60.0
        )
    text = out.getvalue()

    # Every station booted through the router: the CSMS's acceptance was observed by the controller.
    assert summary.booted == STATIONS
    for identity in summary.booted:
        assert re.search(rf"^\d\d:\d\d:\d\d  {identity} booted: BootNotification accepted", text, re.MULTILINE)
    # EVs came and went, with meter values on the way, and the CSMS's own calls reached the stations.
    assert summary.transactions_ended >= 1
    assert summary.transactions_started >= summary.transactions_ended
    assert summary.meter_samples >= 3 * summary.transactions_ended
    assert summary.energy_wh > 0
    assert re.search(r"DEMO-\d\d transaction [0-9a-f]{8} started \(idToken", text)
    assert re.search(r"DEMO-\d\d transaction [0-9a-f]{8} ended \(EVDisconnected\): \d+\.\d{3} kWh delivered", text)
    assert summary.csms_calls_relayed >= 4  # a GetBaseReport for each station, at least
    assert summary.csms_calls_answered == summary.csms_calls_relayed
    assert "CSMS call relayed to DEMO-01: GetBaseReport" in text
    # The appliance's own metrics counted exactly what arrived at each far end (the controller's own
    # calls to the stations, and their answers, are not relayed).
    station_labels, csms_labels = recorder.labels(csms=False), recorder.labels(csms=True)
    assert [label.split("#")[0] for label in station_labels] == list(STATIONS)
    assert sorted(label.split("#")[0] for label in csms_labels) == list(STATIONS)
    received_by_csms = sum(len(recorder.texts(label, "received")) for label in csms_labels)
    received_by_stations = sum(len(_relayed(recorder.texts(label, "received"))) for label in station_labels)
    assert summary.frames_station_to_csms == received_by_csms > 40
    assert summary.frames_csms_to_station == received_by_stations > 40
    assert 0 < summary.wire_bytes < summary.payload_bytes  # permessage-deflate on both legs
    # Stopping is the appliance's graceful shutdown: every station is told 1001 (going away).
    assert summary.station_closes == {1001: 4}
    assert "stopping: the controller closes every station connection with 1001" in text
    assert summary.errors == 0, text
    assert "ocpp-lc demo summary" in text and "4 booted through the controller" in text

    # Byte-for-byte relaying, and valid OCPP 2.0.1 from both kinds of peer and from the controller's
    # own identity (PublishFirmware's statuses, the answers to the CSMS), results included.
    for csms_label in csms_labels:
        identity = csms_label.split("#")[0]
        (station_label,) = [label for label in station_labels if label.startswith(f"{identity}#")]
        sent = _relayed(recorder.texts(station_label, "sent"))
        assert recorder.texts(csms_label, "received") == sent[: len(recorder.texts(csms_label, "received"))]
        validate_frames(recorder.texts(station_label))
        validate_frames(recorder.texts(csms_label))
    (own_label,) = [label for label in recorder.frames if label.startswith("LC-DEMO#")]
    validate_frames(recorder.texts(own_label))
    calls = [
        json.loads(text)[2:]
        for label in csms_labels
        for text in recorder.texts(label, "received")
        if text.startswith("[2,")
    ]
    actions = {action for action, _ in calls}
    assert {"BootNotification", "StatusNotification", "Authorize", "TransactionEvent", "NotifyReport"} <= actions
    # Meter values reached the CSMS: the energy register, the power and the current on each phase the
    # station has (DEMO-04 is wired on one phase).
    samples = [
        {(value.get("measurand"), value.get("phase")) for value in payload["meterValue"][-1]["sampledValue"]}
        for action, payload in calls
        if action == "TransactionEvent" and payload["eventType"] == "Updated"
    ]
    assert samples and all(
        {("Energy.Active.Import.Register", None), ("Power.Active.Import", None), ("Current.Import", "L1")} <= sample
        for sample in samples
    )

    # Balancing: every station got a TxDefaultProfile of 0 A while idle, and every transaction that
    # ran to its end got a TxProfile of its own, which the station accepted (K01.FR.03).
    for label in station_labels:
        profiles = _profiles_accepted(recorder.texts(label))
        assert ("TxDefaultProfile", None, 0.0) in profiles, label
        ended = {
            payload["transactionInfo"]["transactionId"]
            for action, payload in _calls(recorder.texts(label, "sent"))
            if action == "TransactionEvent" and payload["eventType"] == "Ended"
        }
        assert ended <= {transaction_id for purpose, transaction_id, _ in profiles if purpose == "TxProfile"}, label
    # The grid connection (60 A) is shared out: more was wanted than it carries.
    assert "site limit 60 A per phase (config): the controller balances" in text

    # The EMS script lowered the limit through the EMS API and the stations' draw followed under it;
    # released, the configured limit was back in force and allocations rose above the lowered limit.
    lowered, released = summary.ems_events
    assert (lowered.action, lowered.status_code, released.action, released.status_code) == (
        "lowered",
        200,
        "released",
        200,
    )
    assert lowered.limit == "12 A per phase (ems:demo-ems)" and released.limit == "60 A per phase (config)"
    assert lowered.settled_s is not None and max(lowered.drawn_amperes) <= 12.05
    assert max(lowered.committed_amperes) <= 12.0
    assert released.settled_s is not None and max(released.committed_amperes) > 12.0
    assert "PUT /api/v1/limits/demo-ems answered 200" in text and "DELETE /api/v1/limits/demo-ems answered 200" in text
    # Until the release, after every reallocation, the stations were allowed and drew no more.
    assert lowered.peak_committed_amperes is not None and max(lowered.peak_committed_amperes) <= 12.0
    assert lowered.peak_drawn_amperes is not None and max(lowered.peak_drawn_amperes) <= 12.05

    # Firmware: the CSMS had the controller publish the vendor's file (L03), then told DEMO-01 to
    # update from the controller's URL (L01); the station downloaded it from there.
    own_calls = _calls(recorder.texts(own_label, "received"))  # at the CSMS's end of the controller's own link
    published = [payload for action, payload in own_calls if action == "PublishFirmwareStatusNotification"]
    assert [payload["status"] for payload in published] == [
        "Downloading",
        "Downloaded",
        "ChecksumVerified",
        "Published",
    ]
    (url,) = published[-1]["location"]
    assert url.endswith("/demo-fw-1.1.0.bin") and "/firmware/" in url
    (station_label,) = [label for label in station_labels if label.startswith("DEMO-01#")]
    (update,) = [
        payload for action, payload in _calls(recorder.texts(station_label, "received")) if action == "UpdateFirmware"
    ]
    assert update["firmware"]["location"] == url
    statuses = [
        payload["status"]
        for action, payload in _calls(recorder.texts(station_label, "sent"))
        if action == "FirmwareStatusNotification"
    ]
    assert statuses == ["Downloading", "Downloaded", "Installing", "Installed"]
    assert summary.firmware.publish_status == "Published"
    assert summary.firmware.station_status == {"DEMO-01": "Installed"}
    assert "firmware      demo-fw-1.1.0.bin: publish Published; DEMO-01 Installed" in text


#: Four stations: DEMO-04 is wired on one phase (grid S first, rotation STR).
STATIONS = ("DEMO-01", "DEMO-02", "DEMO-03", "DEMO-04")
#: The EMS script on the test's short clock: 12 A per phase from 4 s to 7.5 s.
EMS = EmsPlan(lower_at_s=4.0, release_at_s=7.5, limit_amperes=12.0, settle_timeout_s=3.0)


def _relayed(texts: list[str]) -> list[str]:
    """The frames of a station's connection that travel to or from the CSMS (not the controller's own)."""
    return [text for text in texts if not is_lc_message_id(str(json.loads(text)[1]))]


def _calls(texts: list[str]) -> list[tuple[str, dict[str, Any]]]:
    return [(frame[2], frame[3]) for frame in map(json.loads, texts) if frame[0] == 2]


def _profiles_accepted(texts: list[str]) -> set[tuple[str, str | None, float]]:
    """(purpose, transactionId, limit) of every SetChargingProfile a station received and accepted."""
    answers = {frame[1]: frame[2] for frame in map(json.loads, texts) if frame[0] == 3}
    accepted = set()
    for frame in map(json.loads, texts):
        if frame[0] == 2 and frame[2] == "SetChargingProfile" and answers.get(frame[1], {}).get("status") == "Accepted":
            profile = frame[3]["chargingProfile"]
            limit = profile["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"]
            accepted.add((profile["chargingProfilePurpose"], profile.get("transactionId"), float(limit)))
    return accepted


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
    # The limit in force and where it comes from, what balancing committed, the firmware story, and
    # per station what was allocated, what the station accepted and what it draws.
    assert all(
        "limit      100 A per phase (config) · EMS demo-ems lowers the limit at 15 s" in frame for frame in frames
    )
    assert all(any(line.startswith("balancing  committed ") for line in frame) for frame in frames)
    assert all(any(line.startswith("firmware   ") for line in frame) for frame in frames)
    assert all(any(line.split()[4:8] == ["PH", "ALLOC", "INST", "DRAW"] for line in frame) for frame in frames)
    # While running, both stations are listed as connected, and relayed messages scroll by.
    tables = [[line.split() for line in frame if line.startswith("DEMO-0")] for frame in frames]
    assert any(
        [row[0] for row in table] == ["DEMO-01", "DEMO-02"] and {row[2] for row in table} == {"up"} for table in tables
    )
    assert all("RECENT MESSAGES" in frame for frame in frames)
    assert any(line.endswith("BootNotification   Accepted, heartbeat 30 s") for frame in frames for line in frame)


async def test_simulated_station_honours_a_charging_profile_sent_through_the_controller(tmp_path: Path) -> None:
    # The simulator alone, under profiles and an UpdateFirmware the test sends through the controller's
    # own-call API (the balancing loop is off so that its profiles do not mix with the test's).
    recorder = FrameRecorder()
    source = FirmwareSource("fw.bin", size_bytes=10_000)
    with trio.fail_after(RUN_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(source.serve)
            csms_port = await nursery.start(SandboxCsms(frame_log=recorder).serve)
            settings = demo_settings(csms_port, tmp_path)
            settings = settings.model_copy(
                update={"balancing": settings.balancing.model_copy(update={"enabled": False})}
            )
            app = await nursery.start(run_app, settings)
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
                # Reported at once, not at the next periodic sample: a balancing controller reads it.
                assert updated["triggerReason"] == "ChargingRateChanged"
                currents = _currents(updated)
                assert currents and max(currents) <= 8.0 and max(currents) > 7.0
                assert {value["measurand"] for value in updated["meterValue"][-1]["sampledValue"]} >= {
                    "Current.Import",
                    "Power.Active.Import",
                }

                reply = await link.call("SetChargingProfile", _tx_profile(transaction_id, limit_amperes=3.0))
                assert reply == {"status": "Accepted"}  # below the 6 A an AC EV needs: charging pauses
                updated = await _next_transaction_event(observed, "Updated")
                assert updated["triggerReason"] == "ChargingStateChanged"
                assert updated["transactionInfo"]["chargingState"] == "SuspendedEVSE"
                assert max(_currents(updated)) == 0.0

                firmware = {
                    "requestId": 1,
                    "firmware": {"location": source.url(), "retrieveDateTime": started["timestamp"]},
                }
                assert await link.call("UpdateFirmware", firmware) == {"status": "Accepted"}
                assert station.firmware_request == firmware
                # The station downloads the file and reports each step (L01).
                statuses = []
                async for event in observed:
                    if (
                        isinstance(event, ObservedMessage)
                        and event.action == "FirmwareStatusNotification"
                        and event.message_type is MessageType.CALL
                    ):
                        statuses.append(event.payload["status"])
                        if event.payload["status"] == "Installed":
                            break
                assert statuses == ["Downloading", "Downloaded", "Installing", "Installed"]
                assert station.firmware_downloaded == (10_000, source.md5)

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
    assert re.search(
        r"^  stations +12 simulated, (?:[1-9]|1[0-2]) booted through the controller$", output, re.MULTILINE
    )
    # Whoever was connected was told 1001 (going away), and nothing else.
    assert re.search(r"^  shutdown +station connections closed: (?:[1-9]|1[0-2]) with 1001$", output, re.MULTILINE)
    assert re.search(r"errors\s+0$", output, re.MULTILINE)
    # Nothing listens any more on the ports the demo announced: controller (stations and HTTP),
    # sandbox CSMS, firmware source and the building's grid meter (#16).
    ports = {int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)", output)}
    assert len(ports) == 5
    for port in ports:
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)


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
    # Idle, the default is what a transaction starting now gets (it applies until a TxProfile arrives).
    assert limit(10, transaction_id=None) == 16.0
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


class TimedRecorder(FrameRecorder):
    """A FrameRecorder that also notes when (trio time) each frame was handled."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, list[float]] = defaultdict(list)

    def __call__(self, label: str, direction: str, text: str) -> None:
        super().__call__(label, direction, text)
        self.times[label].append(trio.current_time())


async def test_the_sandbox_csms_goes_away_the_site_charges_on_and_the_replay_drains() -> None:
    # Issue #12: the demo's WAN outage, on the test's short clock (away from 4 s to 8 s).
    recorder = TimedRecorder()
    out = io.StringIO()
    plan = OutagePlan(at_s=4.0, for_s=4.0, drain_timeout_s=8.0)
    origin_s = trio.current_time()
    with trio.fail_after(RUN_TIMEOUT_S):
        summary = await demo_main(
            4, 14.0, True, out, frame_log=recorder, timings=FAST, ems=None, firmware_after_s=None, outage=plan
        )
    text = out.getvalue()
    outage = summary.outage
    assert outage is not None and outage.went_at_s is not None and outage.back_at_s is not None
    assert 4.0 <= outage.went_at_s < outage.back_at_s
    assert outage.back_at_s >= 8.0

    # Every station was served locally, and stayed connected throughout: each connection ended only at
    # the shutdown, with 1001.
    assert outage.most_local == 4
    assert summary.station_closes == {1001: 4}
    assert summary.errors == 0, text
    # The site charged on: transactions started while the CSMS was away, answered by the controller.
    went_s, back_s = origin_s + outage.went_at_s, origin_s + outage.back_at_s
    station_labels, csms_labels = recorder.labels(csms=False), recorder.labels(csms=True)
    started_offline = [
        payload
        for label in station_labels
        for (way, frame), at_s in zip(recorder.frames[label], recorder.times[label], strict=True)
        if way == "sent" and went_s < at_s < back_s
        for action, payload in _calls([frame])
        if action == "TransactionEvent" and payload["eventType"] == "Started"
    ]
    assert started_offline
    assert outage.kept_at_return > 0 and outage.kept_bytes_at_return > 0
    # Then the CSMS came back and the replay drained; every station is relayed again.
    assert outage.drained_after_s is not None and outage.drained_after_s < plan.drain_timeout_s
    assert outage.replayed >= outage.kept_at_return and outage.replay_errors == 0
    assert "the sandbox CSMS goes away for 4 s (a WAN outage)" in text
    assert re.search(r"the sandbox CSMS is back: 4 stations were served locally, \d+ messages", text)
    assert re.search(r"replay done: \d+ messages delivered to the CSMS in \d+\.\d s", text)
    assert re.search(r"^  outage +CSMS away 4-\d+ s: 4 stations served locally, \d+ messages kept$", text, re.MULTILINE)

    # At the CSMS: every TransactionEvent a station sent before the CSMS came back arrived exactly once,
    # in seqNo order per transaction; the ones kept during the outage carry offline=true (E04.FR.03).
    sent_before_back = {
        (label.split("#")[0], payload["transactionInfo"]["transactionId"], payload["seqNo"])
        for label in station_labels
        for (way, frame), at_s in zip(recorder.frames[label], recorder.times[label], strict=True)
        if way == "sent" and at_s < back_s
        for action, payload in _calls([frame])
        if action == "TransactionEvent"
    }
    arrived: list[tuple[str, str, int]] = []
    offline: set[tuple[str, str, int]] = set()
    for label in csms_labels:
        for action, payload in _calls(recorder.texts(label, "received")):
            if action == "TransactionEvent":
                key = (label.split("#")[0], payload["transactionInfo"]["transactionId"], payload["seqNo"])
                arrived.append(key)
                if payload.get("offline"):
                    offline.add(key)
    assert len(arrived) == len(set(arrived))  # nothing twice
    assert sent_before_back <= set(arrived)
    sent_while_away = {
        (label.split("#")[0], payload["transactionInfo"]["transactionId"], payload["seqNo"])
        for label in station_labels
        for (way, frame), at_s in zip(recorder.frames[label], recorder.times[label], strict=True)
        if way == "sent" and went_s + 0.5 < at_s < back_s
        for action, payload in _calls([frame])
        if action == "TransactionEvent"
    }
    assert sent_while_away and sent_while_away <= offline
    by_transaction: dict[tuple[str, str], list[int]] = defaultdict(list)
    for station, transaction_id, seq_no in arrived:
        by_transaction[station, transaction_id].append(seq_no)
    assert all(seq_nos == sorted(seq_nos) for seq_nos in by_transaction.values())
    # No CSMS answer to a replayed call reached a station: every answer a station got is to a call it sent.
    for label in station_labels:
        frames = [(way, json.loads(text)) for way, text in recorder.frames[label]]
        calls_sent = {frame[1] for way, frame in frames if way == "sent" and frame[0] == 2}
        answers = {frame[1] for way, frame in frames if way == "received" and frame[0] in (3, 4)}
        assert answers <= calls_sent, label
    # Every frame on every connection is valid OCPP 2.0.1: the stations', the CSMS's, and the replayed ones.
    for label in recorder.frames:
        validate_frames(recorder.texts(label))


def test_live_view_shows_the_stations_served_locally_and_what_is_kept() -> None:
    # Pure: the view's rendering of the controller's status document during an outage (issue #12).
    model = SiteModel()
    for station_id in ("DEMO-01", "DEMO-02", "DEMO-03"):
        model.row(station_id).connected = True
    status = {
        "autonomy": {
            "enabled": True,
            "stations": [
                {"station_id": "DEMO-01", "mode": "local", "offline_for_s": 12.0, "queued_messages": 9},
                {"station_id": "DEMO-02", "mode": "replaying", "offline_for_s": 31.0, "queued_messages": 2},
            ],
            "queue_messages": 11,
            "queue_bytes": 2048,
        }
    }
    balance = site_balance(status, ems="none", firmware="-", outage="CSMS away for 12 s")
    lines = [
        line.text
        for line in render_live(
            model,
            Header("LC-DEMO", "ws://127.0.0.1:1/ocpp/<id>", "http://127.0.0.1:2/metrics", "ws://127.0.0.1:3/ocpp"),
            RelayCounters({}, 0, 0, 3),
            uptime_s=50.0,
            clock=(0.0, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)),
            width=100,
            height=30,
            balance=balance,
        )
    ]
    assert "autonomy   CSMS away for 12 s · 1 stations local, 1 replaying, 11 messages (2.0 kB) kept" in lines
    links = {line.split()[0]: line.split()[2] for line in lines if line.startswith("DEMO-")}
    assert links == {"DEMO-01": "local", "DEMO-02": "replay", "DEMO-03": "up"}
