"""A test charging station: OCPP 2.0.1 on the PyPI `ocpp` library over a `websockets` client.

Run as `python -m tests.peers.station --url ws://127.0.0.1:PORT/ocpp --identity CS01`. It connects
once to `<url>/<percent-encoded identity>`, boots (unless `--no-boot`), answers CSMS CALLs with
schema-valid canned responses, and exits when the connection ends. Events and commands are described
in `tests/peers/common.py` and `tests/support/peers.py`.

UpdateFirmware is answered Accepted and then acted on, as a real station would (Part 2 L01): the
station sends FirmwareStatusNotification Downloading, GETs `firmware.location` (stdlib urllib in a
thread, no proxies, certificates verified against the system trust for https), then sends Downloaded
or DownloadFailed, all with the request's `requestId`. It downloads at once (`retrieveDateTime` is not
waited for) and installs nothing. Extra events:
  {"event":"firmware_download","requestId":N,"url":..,"status":<HTTP status>,"bytes":N,"md5":"<hex>"}
  {"event":"firmware_download_failed","requestId":N,"url":..,"status":<HTTP status>|null,"error":".."}
  {"event":"firmware_status_failed","requestId":N,"status":..,"error":..}  (the notification got no answer)
A test that overrides the UpdateFirmware answer (`set_response`) gets no download.

With `--model-profiles` the station keeps its own model of the charging profiles it accepted
(`tests/peers/profiles.py`, on the station's clock) and reports what governs each EVSE whenever that
changes, with a timer at the next validity boundary:
  {"event":"profile_set","evseId":N,"id":N,"purpose":..,"stackLevel":N,"validTo":..|null,"wall":<time.time()>,"t":..}
  {"event":"profile_cleared","ids":[..],"request":{..},"wall":..,"t":..}
  {"event":"limit","evseId":N,"limit":X|null,"unit":..,"numberPhases":N|null,"source":"profile"|"own-default",
   "profileId":N|null,"purpose":..,"stationTime":"<RFC 3339>","wall":..,"t":..}
and takes {"cmd":"advance_clock","seconds":S} (the station's clock jumps ahead, as after a time sync),
answered with {"event":"clock","offsetS":S,"stationTime":..} once the model has looked again. The answers
it sends are the same as without the option. `--stay-offline` keeps the station running (and its model
ticking) after its connection ends, until it is told to stop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import hashlib
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ocpp.messages import Call
from ocpp.routing import after, on
from ocpp.v201 import call_result
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from tests.peers.common import (
    MAX_MESSAGE_BYTES,
    Behaviour,
    CallFailed,
    ExtraCommands,
    FrameLog,
    Ocpp16Echo,
    PeerChargePoint,
    close_on,
    configure_logging,
    emit,
    follow_commands,
    race,
    run_peer,
    stop_on_signals,
)
from tests.peers.profiles import OWN_DEFAULT, Limit, ProfileModel


def _failed(request_id: int, url: str, status: int | None, error: str) -> dict[str, Any]:
    return {
        "event": "firmware_download_failed",
        "requestId": request_id,
        "url": url,
        "status": status,
        "error": error,
    }


def _variable_result(item: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Echo the component/variable/attribute type of a requested variable into its result."""
    result = {"component": item["component"], "variable": item["variable"], **extra}
    if "attribute_type" in item:
        result["attribute_type"] = item["attribute_type"]
    return result


#: Socket timeout of a firmware download (connect, and each read): a stalled source fails it.
FIRMWARE_TIMEOUT_S = 30.0
_CHUNK_BYTES = 65536


class DownloadStopped(Exception):
    """The station is shutting down: the download thread gives up between two reads."""


def download(url: str, stop: threading.Event) -> tuple[int, int, str]:
    """GET ``url`` (blocking); return (HTTP status, byte count, MD5 hex). Raises OSError or DownloadStopped.

    No proxies from the environment: the tests' traffic stays on loopback whatever the machine says.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    digest = hashlib.md5(usedforsecurity=False)
    count = 0
    with opener.open(url, timeout=FIRMWARE_TIMEOUT_S) as response:
        while chunk := response.read(_CHUNK_BYTES):
            if stop.is_set():
                raise DownloadStopped
            digest.update(chunk)
            count += len(chunk)
        return int(response.status), count, digest.hexdigest()


def _timestamp(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ProfileWatch:
    """The station's profile model on the station's own clock, reporting each change of an EVSE's limit."""

    def __init__(self, identity: str) -> None:
        self.identity = identity
        self.model = ProfileModel()
        self.offset = datetime.timedelta(0)
        self._reported: dict[int, Limit] = {}
        self._timer: asyncio.TimerHandle | None = None

    def now(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + self.offset

    def _emit(self, event: dict[str, Any]) -> None:
        emit({**event, "identity": self.identity, "wall": time.time(), "t": time.monotonic()})

    def set_profile(self, payload: dict[str, Any]) -> None:
        """A SetChargingProfile the station is about to accept (raw camelCase payload)."""
        evse_id, profile = int(payload["evseId"]), payload["chargingProfile"]
        self.model.install(evse_id, profile, self.now())
        self._emit(
            {
                "event": "profile_set",
                "evseId": evse_id,
                "id": profile["id"],
                "purpose": profile["chargingProfilePurpose"],
                "stackLevel": profile["stackLevel"],
                "validTo": profile.get("validTo"),
            }
        )
        self.evaluate()

    def clear_profiles(self, payload: dict[str, Any]) -> None:
        self._emit({"event": "profile_cleared", "ids": self.model.clear(payload), "request": payload})
        self.evaluate()

    def transaction_event(self, payload: dict[str, Any]) -> None:
        """A TransactionEvent the station is about to send: the transaction runs, or is over."""
        info = payload.get("transactionInfo") or {}
        transaction_id = info.get("transactionId")
        if not isinstance(transaction_id, str):
            return
        if payload.get("eventType") == "Ended":
            self.model.transaction_ended(transaction_id)
        elif isinstance(payload.get("evse"), dict):
            self.model.transaction_started(int(payload["evse"]["id"]), transaction_id, self.now())
        self.evaluate()

    def advance_clock(self, cmd: dict[str, Any]) -> None:
        self.offset += datetime.timedelta(seconds=float(cmd["seconds"]))
        self.evaluate()
        emit({"event": "clock", "offsetS": self.offset.total_seconds(), "stationTime": _timestamp(self.now())})

    def evaluate(self) -> None:
        """Report every EVSE whose limit changed, and look again at the next moment it may change."""
        now = self.now()
        for evse_id in sorted({*self.model.evse_ids(), *self._reported}):
            limit = self.model.limit(evse_id, now)
            if self._reported.get(evse_id, OWN_DEFAULT) != limit:
                self._reported[evse_id] = limit
                self._emit({"event": "limit", "evseId": evse_id, **limit.as_event(), "stationTime": _timestamp(now)})
        self.cancel()
        upcoming = self.model.next_change(now)
        if upcoming is not None:
            # A millisecond late rather than early: at the boundary itself the old answer may still hold.
            delay_s = (upcoming - now).total_seconds() + 0.001
            self._timer = asyncio.get_running_loop().call_later(delay_s, self.evaluate)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class StationChargePoint(PeerChargePoint):
    """The station end: canned answers for CSMS-initiated CALLs (the handlers see snake_case keys)."""

    def __init__(self, identity: str, connection: FrameLog, behaviour: Behaviour) -> None:
        super().__init__(identity, connection, behaviour)
        #: Where work that outlives a CALL (firmware downloads) runs; set by `amain`, None: none is done.
        self.tasks: asyncio.TaskGroup | None = None
        self.firmware_tasks: set[asyncio.Task[None]] = set()
        #: The station's own model of its profiles (`--model-profiles`); None: not kept.
        self.profiles: ProfileWatch | None = None

    async def answer_by_default(self, msg: Call) -> Any:
        # The built-in answers to these are Accepted: the model takes the profile in before the answer
        # leaves, as a station applies a profile and then says so.
        if self.profiles is not None and msg.action == "SetChargingProfile":
            self.profiles.set_profile(msg.payload)
        elif self.profiles is not None and msg.action == "ClearChargingProfile":
            self.profiles.clear_profiles(msg.payload)
        return await super().answer_by_default(msg)

    async def call_raw(self, action: str, payload: dict[str, Any], **options: Any) -> dict[str, Any]:
        if self.profiles is not None and action == "TransactionEvent":
            self.profiles.transaction_event(payload)
        return await super().call_raw(action, payload, **options)

    @on("GetVariables")
    def on_get_variables(self, get_variable_data: list[dict[str, Any]], **_: Any) -> call_result.GetVariables:
        return call_result.GetVariables(
            get_variable_result=[
                _variable_result(item, attribute_status="Accepted", attribute_value="42") for item in get_variable_data
            ]
        )

    @on("SetVariables")
    def on_set_variables(self, set_variable_data: list[dict[str, Any]], **_: Any) -> call_result.SetVariables:
        return call_result.SetVariables(
            set_variable_result=[_variable_result(item, attribute_status="Accepted") for item in set_variable_data]
        )

    @on("RequestStartTransaction")
    def on_request_start_transaction(self, **_: Any) -> call_result.RequestStartTransaction:
        return call_result.RequestStartTransaction(status="Accepted")

    @on("RequestStopTransaction")
    def on_request_stop_transaction(self, **_: Any) -> call_result.RequestStopTransaction:
        return call_result.RequestStopTransaction(status="Accepted")

    @on("SetChargingProfile")
    def on_set_charging_profile(self, **_: Any) -> call_result.SetChargingProfile:
        return call_result.SetChargingProfile(status="Accepted")

    @on("ClearChargingProfile")
    def on_clear_charging_profile(self, **_: Any) -> call_result.ClearChargingProfile:
        return call_result.ClearChargingProfile(status="Accepted")

    @on("GetChargingProfiles")
    def on_get_charging_profiles(self, **_: Any) -> call_result.GetChargingProfiles:
        return call_result.GetChargingProfiles(status="NoProfiles")

    @on("GetCompositeSchedule")
    def on_get_composite_schedule(self, **_: Any) -> call_result.GetCompositeSchedule:
        return call_result.GetCompositeSchedule(status="Rejected")

    @on("Reset")
    def on_reset(self, **_: Any) -> call_result.Reset:
        return call_result.Reset(status="Accepted")

    @on("TriggerMessage")
    def on_trigger_message(self, **_: Any) -> call_result.TriggerMessage:
        return call_result.TriggerMessage(status="Accepted")

    @on("UpdateFirmware")
    def on_update_firmware(self, **_: Any) -> call_result.UpdateFirmware:
        return call_result.UpdateFirmware(status="Accepted")

    @after("UpdateFirmware")
    def after_update_firmware(self, request_id: int, firmware: dict[str, Any], **_: Any) -> None:
        # Runs once the Accepted answer is sent, so the CSMS sees it before the first status.
        if self.tasks is None:
            return
        task = self.tasks.create_task(self.update_firmware(request_id, str(firmware["location"])))
        self.firmware_tasks.add(task)
        task.add_done_callback(self.firmware_tasks.discard)

    async def update_firmware(self, request_id: int, url: str) -> None:
        """Download ``url`` and report it, as events and as FirmwareStatusNotifications (L01)."""
        await self.firmware_status("Downloading", request_id)
        stop = threading.Event()
        try:
            status, count, md5 = await asyncio.to_thread(download, url, stop)
        except urllib.error.HTTPError as exc:
            emit(_failed(request_id, url, exc.code, f"HTTP {exc.code} {exc.reason}"))
        except (OSError, ValueError, DownloadStopped) as exc:
            emit(_failed(request_id, url, None, f"{type(exc).__name__}: {exc}"))
        except asyncio.CancelledError:
            stop.set()  # the thread cannot be cancelled; it stops at its next read
            raise
        else:
            emit(
                {
                    "event": "firmware_download",
                    "requestId": request_id,
                    "url": url,
                    "status": status,
                    "bytes": count,
                    "md5": md5,
                }
            )
            await self.firmware_status("Downloaded", request_id)
            return
        await self.firmware_status("DownloadFailed", request_id)

    async def firmware_status(self, status: str, request_id: int) -> None:
        try:
            await self.call_raw("FirmwareStatusNotification", {"status": status, "requestId": request_id})
        except CallFailed as exc:
            emit({"event": "firmware_status_failed", "requestId": request_id, "status": status, **exc.event})

    @on("ChangeAvailability")
    def on_change_availability(self, **_: Any) -> call_result.ChangeAvailability:
        return call_result.ChangeAvailability(status="Accepted")

    @on("UnlockConnector")
    def on_unlock_connector(self, **_: Any) -> call_result.UnlockConnector:
        return call_result.UnlockConnector(status="Unlocked")

    @on("GetBaseReport")
    def on_get_base_report(self, **_: Any) -> call_result.GetBaseReport:
        return call_result.GetBaseReport(status="Accepted")

    @on("DataTransfer")
    def on_data_transfer(self, **_: Any) -> call_result.DataTransfer:
        return call_result.DataTransfer(status="UnknownVendorId")


async def boot(station: PeerChargePoint, args: argparse.Namespace) -> None:
    """Send the BootNotification; with --heartbeat, then send Heartbeats at the interval granted."""
    try:
        answer = await station.call_raw(
            "BootNotification",
            {
                "reason": "PowerUp",
                "chargingStation": {"model": args.model, "vendorName": args.vendor},
            },
        )
    except CallFailed as exc:
        emit({"event": "boot", **exc.event})
        return
    emit({"event": "boot", "payload": answer})
    if not args.heartbeat or answer.get("status") != "Accepted":
        return
    interval_s = float(answer.get("interval") or 300)
    while True:
        await asyncio.sleep(interval_s)
        try:
            await station.call_raw("Heartbeat", {})
        except CallFailed as exc:
            emit({"event": "heartbeat_failed", **exc.event})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.station", description=__doc__)
    parser.add_argument("--url", required=True, help="CSMS URL without the identity, e.g. ws://h:p/ocpp")
    parser.add_argument("--identity", required=True)
    parser.add_argument(
        "--subprotocols", default="ocpp2.0.1", help="comma-separated, in order of preference; empty offers none"
    )
    parser.add_argument(
        "--basic-auth-password", default=None, help="send HTTP Basic auth with user <identity> (security profile 1)"
    )
    parser.add_argument("--no-deflate", action="store_true", help="do not offer permessage-deflate")
    parser.add_argument("--no-boot", action="store_true", help="do not send BootNotification")
    parser.add_argument(
        "--heartbeat", action="store_true", help="after an accepted boot, send Heartbeat at the interval granted"
    )
    parser.add_argument("--model", default="TestModel")
    parser.add_argument("--vendor", default="TestVendor")
    parser.add_argument("--ping-interval", type=float, default=20.0, help="seconds; 0 disables")
    parser.add_argument("--open-timeout", type=float, default=10.0, help="seconds for the handshake")
    parser.add_argument(
        "--header", action="append", default=[], help="'Name: value' sent in the handshake (repeatable)"
    )
    parser.add_argument("--query", default="", help="query string appended to the connection URL (without '?')")
    parser.add_argument(
        "--model-profiles", action="store_true", help="keep a model of the profiles held; report limit changes"
    )
    parser.add_argument(
        "--stay-offline", action="store_true", help="keep running after the connection ends, until stopped"
    )
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    url = args.url.rstrip("/") + "/" + urllib.parse.quote(args.identity, safe="")
    if args.query:
        url += "?" + args.query
    headers: dict[str, str] = {}
    for header in args.header:
        name, _, value = header.partition(":")
        headers[name.strip()] = value.strip()
    if args.basic_auth_password is not None:
        credentials = f"{args.identity}:{args.basic_auth_password}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode("ascii")

    async def open_connection() -> ClientConnection:
        return await connect(
            url,
            subprotocols=[Subprotocol(p) for p in args.subprotocols.split(",") if p] or None,
            additional_headers=headers,
            compression=None if args.no_deflate else "deflate",
            max_size=MAX_MESSAGE_BYTES,
            ping_interval=args.ping_interval or None,
            open_timeout=args.open_timeout,
        )

    try:
        stopped, ws = await race(stop, open_connection)
    except InvalidStatus as exc:
        emit(
            {
                "event": "rejected",
                "status": exc.response.status_code,
                "body": bytes(exc.response.body).decode(errors="replace"),
                "headers": [[name.lower(), value] for name, value in exc.response.headers.raw_items()],
            }
        )
        return 0
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        emit({"event": "connect_failed", "error": f"{type(exc).__name__}: {exc}"})
        return 0
    if stopped:
        return 0
    assert isinstance(ws, ClientConnection) and ws.response is not None
    emit(
        {
            "event": "connected",
            "subprotocol": ws.subprotocol,
            "extensions": ws.response.headers.get("Sec-WebSocket-Extensions"),
        }
    )

    station_type = Ocpp16Echo if ws.subprotocol == "ocpp1.6" else StationChargePoint
    station = station_type(args.identity, FrameLog(ws, args.identity), Behaviour())
    extra: ExtraCommands = {}
    if args.model_profiles and isinstance(station, StationChargePoint):
        station.profiles = ProfileWatch(args.identity)
        extra = {"advance_clock": station.profiles.advance_clock}
    async with asyncio.TaskGroup() as tasks:
        if isinstance(station, StationChargePoint):
            station.tasks = tasks
        helpers = [
            tasks.create_task(follow_commands(station.behaviour, lambda _: station, stop, extra)),
            tasks.create_task(close_on(stop, ws)),
        ]
        if not args.no_boot:
            helpers.append(tasks.create_task(boot(station, args)))
        try:
            try:
                await station.serve()
            finally:
                closed = {"code": ws.close_code, "reason": ws.close_reason}
                emit({"event": "disconnected", "identity": args.identity, **closed})
            if args.stay_offline:
                await stop.wait()  # offline: the profiles it holds still govern it, on its own clock
        finally:
            firmware_tasks = station.firmware_tasks if isinstance(station, StationChargePoint) else set()
            for task in [*helpers, *firmware_tasks]:
                task.cancel()
            if isinstance(station, StationChargePoint) and station.profiles is not None:
                station.profiles.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    return run_peer(amain(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
