"""Publishing firmware end to end (L03, L04): an `ocpp`-library CSMS, the whole appliance, a station behind it.

The CSMS (PyPI `ocpp`, its own process) sends PublishFirmware to the controller's own identity; the
controller downloads from a firmware source on loopback, verifies the MD5, publishes on its HTTP face
and reports each status through its durable outbox. The CSMS then sends UpdateFirmware with the
published URL to an `ocpp`-library station relayed by the controller; that peer accepts, downloads
the URL it received (its own HTTP client, in its own process), reports Downloading and Downloaded to
the CSMS in FirmwareStatusNotifications, and tells the test the MD5 of what it got. Every frame the
controller wrote under its own identity, and every frame relayed for the station, is validated
against the OCA schemas.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import trio
import trio.testing

from tests.e2e.conftest import OpenRelay
from tests.integration.test_firmware_cache import held, honest, source, status
from tests.support.peers import Peer
from tests.support.schemas import validate_frames

IDENTITY = "LC01"
TIMEOUT_S = 30
FIRMWARE = bytes(range(256)) * 4096  # 1 MiB
FIRMWARE_MD5 = hashlib.md5(FIRMWARE).hexdigest()
CONTROLLER = {"connect": True, "retry_wait_minimum_s": 1, "retry_random_range_s": 0}


FINAL = {"Published", "DownloadFailed", "InvalidChecksum", "PublishFailed", "Idle"}


def statuses(csms: Peer) -> list[dict[str, Any]]:
    """PublishFirmwareStatusNotification payloads the CSMS received from the controller, in order."""
    return [
        e["payload"]
        for e in csms.events
        if e.get("event") == "request"
        and e.get("identity") == IDENTITY
        and e.get("action") == "PublishFirmwareStatusNotification"
    ]


def firmware_statuses(csms: Peer, identity: str) -> list[dict[str, Any]]:
    """FirmwareStatusNotification payloads the CSMS received from one station, in order."""
    return [
        e["payload"]
        for e in csms.events
        if e.get("event") == "request"
        and e.get("identity") == identity
        and e.get("action") == "FirmwareStatusNotification"
    ]


async def wait_final(csms: Peer, request_id: int) -> list[dict[str, Any]]:
    await csms.wait_for(
        lambda e: any(p["status"] in FINAL and p.get("requestId") == request_id for p in statuses(csms))
    )
    return [p for p in statuses(csms) if p.get("requestId") == request_id]


async def booted(csms: Peer) -> None:
    await csms.wait_for(
        lambda e: e.get("event") == "request" and e.get("identity") == IDENTITY and e["action"] == "BootNotification"
    )


async def test_publish_then_a_station_updates_from_the_controller(open_relay: OpenRelay) -> None:
    async with (
        source(honest(FIRMWARE)) as firmware_source,
        open_relay(controller=CONTROLLER, firmware={"retry_interval_s": 0}) as relay,
        relay.station("CS01") as station,
    ):
        csms = relay.csms
        with trio.fail_after(TIMEOUT_S):
            await booted(csms)
            request = {"location": firmware_source.url("cs-fw-2.0.bin"), "checksum": FIRMWARE_MD5, "requestId": 501}
            reply = await csms.call(identity=IDENTITY, action="PublishFirmware", payload=request)
            assert reply["event"] == "result" and reply["payload"] == {"status": "Accepted"}
            sent = await wait_final(csms, 501)
            # TC_L_17: the statuses in order, one requestId, every URL in location.
            assert [p["status"] for p in sent] == ["Downloading", "Downloaded", "ChecksumVerified", "Published"]
            url = f"http://127.0.0.1:{relay.app.http_port}/firmware/{FIRMWARE_MD5}/cs-fw-2.0.bin"
            assert sent[-1]["location"] == [url]

            # L03 step 6: the CSMS points a station behind the controller at the published URL.
            await station.wait_for_event("boot")
            update = {
                "requestId": 77,
                "firmware": {"location": url, "retrieveDateTime": "2026-01-01T00:00:00Z"},
            }
            answer = await csms.call(identity="CS01", action="UpdateFirmware", payload=update)
            assert answer["event"] == "result" and answer["payload"]["status"] == "Accepted"
            received = await station.wait_for_event("request", action="UpdateFirmware")
            assert received["payload"]["firmware"]["location"] == url
            # The station downloads from the controller on its own (L01) and says what it got.
            download = await station.wait_for(
                lambda e: e.get("event") in ("firmware_download", "firmware_download_failed") and e["requestId"] == 77
            )
            assert download["event"] == "firmware_download", download
            assert (download["url"], download["status"], download["bytes"]) == (url, 200, len(FIRMWARE))
            assert download["md5"] == FIRMWARE_MD5
            assert relay.metric("ocpp_lc_firmware_served_bytes_total") == len(FIRMWARE)
            # Its FirmwareStatusNotifications reach the CSMS through the controller, with its requestId.
            await csms.wait_for(lambda e: "Downloaded" in [p["status"] for p in firmware_statuses(csms, "CS01")])
            assert firmware_statuses(csms, "CS01") == [
                {"status": "Downloading", "requestId": 77},
                {"status": "Downloaded", "requestId": 77},
            ]

            # The station has its bytes and has hung up; the controller (in this process) ends its side of
            # the transfer a moment later (about a millisecond; more on a busy machine). Wait until every
            # task has been idle for 0.1 s, or L04 below could still, rightly, answer DownloadOngoing.
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            assert relay.metric("ocpp_lc_firmware_station_downloads") == 0

            # L04: unpublished once no station downloads it; then there is nothing left to unpublish.
            gone = await csms.call(identity=IDENTITY, action="UnpublishFirmware", payload={"checksum": FIRMWARE_MD5})
            assert gone["payload"] == {"status": "Unpublished"}
            again = await csms.call(identity=IDENTITY, action="UnpublishFirmware", payload={"checksum": FIRMWARE_MD5})
            assert again["payload"] == {"status": "NoFirmware"}
            # A station sent there now finds nothing, and says so to the CSMS.
            stale = {**update, "requestId": 78}
            assert (await csms.call(identity="CS01", action="UpdateFirmware", payload=stale))["event"] == "result"
            failed = await station.wait_for(
                lambda e: e.get("event") in ("firmware_download", "firmware_download_failed") and e["requestId"] == 78
            )
            assert (failed["event"], failed["status"]) == ("firmware_download_failed", 404)
            await csms.wait_for(
                lambda e: {"status": "DownloadFailed", "requestId": 78} in firmware_statuses(csms, "CS01")
            )

            # L03.FR.10: after Published, a triggered status is Idle.
            trigger = {"requestedMessage": "PublishFirmwareStatusNotification"}
            triggered = await csms.call(identity=IDENTITY, action="TriggerMessage", payload=trigger)
            assert triggered["payload"]["status"] == "Accepted"
            await csms.wait_for(lambda e: any(p["status"] == "Idle" for p in statuses(csms)))
    validate_frames(csms.frames(identity=IDENTITY))
    validate_frames(csms.frames(identity="CS01"))


async def test_failure_paths_report_in_order_with_one_request_id(open_relay: OpenRelay) -> None:
    other = b"a different file" * 1000
    async with (
        source(status("404 Not Found")) as missing,
        source(honest(other)) as wrong,
        open_relay(controller=CONTROLLER, firmware={"retry_interval_s": 0}) as relay,
    ):
        csms = relay.csms
        with trio.fail_after(TIMEOUT_S):
            await booted(csms)
            failed = {"location": missing.url(), "checksum": FIRMWARE_MD5, "requestId": 601, "retries": 0}
            assert (await csms.call(identity=IDENTITY, action="PublishFirmware", payload=failed))["payload"] == {
                "status": "Accepted"
            }
            assert [p["status"] for p in await wait_final(csms, 601)] == ["Downloading", "DownloadFailed"]  # TC_L_24
            invalid = {"location": wrong.url(), "checksum": FIRMWARE_MD5, "requestId": 602, "retries": 0}
            await csms.call(identity=IDENTITY, action="PublishFirmware", payload=invalid)
            assert [p["status"] for p in await wait_final(csms, 602)] == [
                "Downloading",
                "Downloaded",
                "InvalidChecksum",
            ]  # TC_L_19
            rejected = {"location": "ftp://192.0.2.1/fw.bin", "checksum": FIRMWARE_MD5, "requestId": 603}
            answer = await csms.call(identity=IDENTITY, action="PublishFirmware", payload=rejected)
            assert answer["payload"]["status"] == "Rejected"
            assert answer["payload"]["statusInfo"]["reasonCode"] == "UnsupportedScheme"
            # L03.FR.11: not Published last, so a trigger repeats the last status with its requestId.
            trigger = {"requestedMessage": "PublishFirmwareStatusNotification"}
            await csms.call(identity=IDENTITY, action="TriggerMessage", payload=trigger)
            await csms.wait_for(lambda e: len([p for p in statuses(csms) if p.get("requestId") == 602]) == 4)
            assert statuses(csms)[-1] == {"status": "InvalidChecksum", "requestId": 602}
    frames = csms.frames(identity=IDENTITY)
    validate_frames(frames)
    # One requestId per process, never mixed.
    for frame in frames:
        message = json.loads(frame)
        if message[0] == 2 and message[2] == "PublishFirmwareStatusNotification":
            assert message[3]["requestId"] in (601, 602)


async def test_unpublish_while_the_controller_downloads_stops_the_download(open_relay: OpenRelay) -> None:
    release, sent = trio.Event(), trio.Event()
    async with (
        source(held(FIRMWARE, release, 100_000, sent)) as firmware_source,
        open_relay(controller=CONTROLLER, firmware={"retry_interval_s": 0}) as relay,
    ):
        csms = relay.csms
        with trio.fail_after(TIMEOUT_S):
            await booted(csms)
            request = {"location": firmware_source.url(), "checksum": FIRMWARE_MD5, "requestId": 701}
            assert (await csms.call(identity=IDENTITY, action="PublishFirmware", payload=request))["payload"] == {
                "status": "Accepted"
            }
            await sent.wait()
            # L04.FR.03: nothing is published yet; the controller's own download is stopped, not finished.
            unpublish = {"checksum": FIRMWARE_MD5}
            answer = await csms.call(identity=IDENTITY, action="UnpublishFirmware", payload=unpublish)
            assert answer["payload"] == {"status": "NoFirmware"}
            release.set()
            assert [p["status"] for p in await wait_final(csms, 701)] == ["Downloading", "Idle"]
            await trio.testing.wait_all_tasks_blocked(cushion=0.1)
            assert relay.metric("ocpp_lc_firmware_downloads_total", outcome="unpublished") == 1
            assert relay.metric("ocpp_lc_firmware_cached_files") == 0
    assert [p["status"] for p in statuses(csms)] == ["Downloading", "Idle"]  # never Published
    validate_frames(csms.frames(identity=IDENTITY))
