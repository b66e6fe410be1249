"""A test CSMS: OCPP 2.0.1 on the PyPI `ocpp` library, served by `websockets`, driven over stdin/stdout.

Run as `python -m tests.peers.csms --host 127.0.0.1 --port 0`; the protocol (events and commands) is
described in `tests/peers/common.py` and in `tests/support/peers.py`, which drives it from trio.

Every station CALL listed in `CsmsChargePoint` gets a schema-valid canned answer from the library's
routing; `set_response` replaces it. Connections that negotiate `ocpp1.6` get an echo peer that
answers every CALL with an empty CALLRESULT, enough for tests that relay 1.6 traffic; with
`--ocpp16 library` they get `Csms16ChargePoint` instead, a 1.6 Central System on the library's v16
messages (schema-checked both ways), so one CSMS serves a mixed fleet (issue 15). It gives each
StartTransaction the next integer transactionId (from `--first-transaction-id`), unique in the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import urllib.parse
from collections.abc import Iterator
from typing import Any

from ocpp.routing import on
from ocpp.v16 import call_result as call_result16
from ocpp.v201 import call_result
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from tests.peers.common import (
    MAX_MESSAGE_BYTES,
    Behaviour,
    FrameLog,
    Ocpp16Echo,
    Peer16ChargePoint,
    PeerChargePoint,
    configure_logging,
    emit,
    follow_commands,
    run_peer,
    stop_on_signals,
    utc_now,
)

REJECT_BODY = "rejected by test csms"


class CsmsChargePoint(PeerChargePoint):
    """The CSMS end of one station connection, with canned answers for station-initiated CALLs."""

    @on("BootNotification")
    def on_boot_notification(self, **_: Any) -> call_result.BootNotification:
        return call_result.BootNotification(current_time=utc_now(), interval=300, status="Accepted")

    @on("Heartbeat")
    def on_heartbeat(self, **_: Any) -> call_result.Heartbeat:
        return call_result.Heartbeat(current_time=utc_now())

    @on("StatusNotification")
    def on_status_notification(self, **_: Any) -> call_result.StatusNotification:
        return call_result.StatusNotification()

    @on("TransactionEvent")
    def on_transaction_event(self, **kwargs: Any) -> call_result.TransactionEvent:
        # The CSMS must say what it thinks of a token whenever the station reports one.
        if "id_token" in kwargs:
            return call_result.TransactionEvent(id_token_info={"status": "Accepted"})
        return call_result.TransactionEvent()

    @on("MeterValues")
    def on_meter_values(self, **_: Any) -> call_result.MeterValues:
        return call_result.MeterValues()

    @on("Authorize")
    def on_authorize(self, **_: Any) -> call_result.Authorize:
        return call_result.Authorize(id_token_info={"status": "Accepted"})

    @on("NotifyReport")
    def on_notify_report(self, **_: Any) -> call_result.NotifyReport:
        return call_result.NotifyReport()

    @on("NotifyEvent")
    def on_notify_event(self, **_: Any) -> call_result.NotifyEvent:
        return call_result.NotifyEvent()

    @on("NotifyChargingLimit")
    def on_notify_charging_limit(self, **_: Any) -> call_result.NotifyChargingLimit:
        return call_result.NotifyChargingLimit()

    @on("ClearedChargingLimit")
    def on_cleared_charging_limit(self, **_: Any) -> call_result.ClearedChargingLimit:
        return call_result.ClearedChargingLimit()

    @on("ReportChargingProfiles")
    def on_report_charging_profiles(self, **_: Any) -> call_result.ReportChargingProfiles:
        return call_result.ReportChargingProfiles()

    @on("PublishFirmwareStatusNotification")
    def on_publish_firmware_status_notification(self, **_: Any) -> call_result.PublishFirmwareStatusNotification:
        return call_result.PublishFirmwareStatusNotification()

    @on("FirmwareStatusNotification")
    def on_firmware_status_notification(self, **_: Any) -> call_result.FirmwareStatusNotification:
        return call_result.FirmwareStatusNotification()

    @on("SecurityEventNotification")
    def on_security_event_notification(self, **_: Any) -> call_result.SecurityEventNotification:
        return call_result.SecurityEventNotification()

    @on("LogStatusNotification")
    def on_log_status_notification(self, **_: Any) -> call_result.LogStatusNotification:
        return call_result.LogStatusNotification()

    @on("DataTransfer")
    def on_data_transfer(self, **_: Any) -> call_result.DataTransfer:
        return call_result.DataTransfer(status="UnknownVendorId")

    @on("NotifyEVChargingNeeds")
    def on_notify_ev_charging_needs(self, **_: Any) -> call_result.NotifyEVChargingNeeds:
        return call_result.NotifyEVChargingNeeds(status="Accepted")

    @on("NotifyEVChargingSchedule")
    def on_notify_ev_charging_schedule(self, **_: Any) -> call_result.NotifyEVChargingSchedule:
        return call_result.NotifyEVChargingSchedule(status="Accepted")


class Csms16ChargePoint(Peer16ChargePoint):
    """The Central System end of one OCPP 1.6J connection: canned answers for the station's CALLs."""

    def __init__(
        self, identity: str, connection: FrameLog, behaviour: Behaviour, transaction_ids: Iterator[int]
    ) -> None:
        super().__init__(identity, connection, behaviour)
        self.transaction_ids = transaction_ids

    @on("BootNotification")
    def on_boot_notification(self, **_: Any) -> call_result16.BootNotification:
        return call_result16.BootNotification(current_time=utc_now(), interval=300, status="Accepted")

    @on("Heartbeat")
    def on_heartbeat(self, **_: Any) -> call_result16.Heartbeat:
        return call_result16.Heartbeat(current_time=utc_now())

    @on("StatusNotification")
    def on_status_notification(self, **_: Any) -> call_result16.StatusNotification:
        return call_result16.StatusNotification()

    @on("Authorize")
    def on_authorize(self, **_: Any) -> call_result16.Authorize:
        return call_result16.Authorize(id_tag_info={"status": "Accepted"})

    @on("StartTransaction")
    def on_start_transaction(self, **_: Any) -> call_result16.StartTransaction:
        # 1.6: the Central System gives the transaction its (integer) id.
        return call_result16.StartTransaction(
            transaction_id=next(self.transaction_ids), id_tag_info={"status": "Accepted"}
        )

    @on("StopTransaction")
    def on_stop_transaction(self, **_: Any) -> call_result16.StopTransaction:
        return call_result16.StopTransaction(id_tag_info={"status": "Accepted"})

    @on("MeterValues")
    def on_meter_values(self, **_: Any) -> call_result16.MeterValues:
        return call_result16.MeterValues()

    @on("DataTransfer")
    def on_data_transfer(self, **_: Any) -> call_result16.DataTransfer:
        return call_result16.DataTransfer(status="UnknownVendorId")

    @on("FirmwareStatusNotification")
    def on_firmware_status_notification(self, **_: Any) -> call_result16.FirmwareStatusNotification:
        return call_result16.FirmwareStatusNotification()

    @on("DiagnosticsStatusNotification")
    def on_diagnostics_status_notification(self, **_: Any) -> call_result16.DiagnosticsStatusNotification:
        return call_result16.DiagnosticsStatusNotification()


def identity_of(path: str) -> str:
    """The station identity: the percent-decoded last segment of the request path."""
    return urllib.parse.unquote(urllib.parse.urlsplit(path).path.rsplit("/", 1)[-1])


def headers_as_dict(headers: Headers) -> dict[str, str]:
    """Lower-cased header names; repeated headers joined the HTTP way, with ", "."""
    joined: dict[str, str] = {}
    for name, value in headers.raw_items():
        key = name.lower()
        joined[key] = f"{joined[key]}, {value}" if key in joined else value
    return joined


class Csms:
    """The server: handshake policy, the live sessions by identity and the command dispatch."""

    def __init__(
        self,
        subprotocols: list[str],
        reject_status: int | None,
        path_prefix: str,
        reject_headers: list[tuple[str, str]] | None = None,
        ocpp16: str = "echo",
        first_transaction_id: int = 1,
    ) -> None:
        self.subprotocols = subprotocols
        self.reject_status = reject_status
        self.reject_headers = reject_headers or []
        self.path_prefix = path_prefix.rstrip("/")
        self.behaviour = Behaviour()
        #: How `ocpp1.6` connections are served: "echo" (Ocpp16Echo) or "library" (Csms16ChargePoint).
        self.ocpp16 = ocpp16
        self.transaction_ids = itertools.count(first_transaction_id)
        # The latest connection of each identity; calls go there.
        self.sessions: dict[str, PeerChargePoint] = {}

    def select_subprotocol(self, _: ServerConnection, offered: Any) -> Subprotocol | None:
        # Unlike websockets' default (HTTP 400), OCPP-J wants the handshake completed without a
        # subprotocol when none is shared; `handle` then closes the connection.
        for subprotocol in self.subprotocols:
            if subprotocol in offered:
                return Subprotocol(subprotocol)
        return None

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        status: int | None = None
        if self.reject_status is not None:
            status, body = self.reject_status, REJECT_BODY
        elif not urllib.parse.urlsplit(request.path).path.startswith(self.path_prefix + "/"):
            status, body = 404, "unknown path"
        if status is None:
            return None
        emit({"event": "refused", "path": request.path, "status": status})
        response = connection.respond(status, body)
        for name, value in self.reject_headers:
            response.headers[name] = value
        return response

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None and ws.response is not None  # set once the handshake is done
        headers = headers_as_dict(ws.request.headers)
        identity = identity_of(ws.request.path)
        emit(
            {
                "event": "connected",
                "identity": identity,
                "path": ws.request.path,
                "subprotocol": ws.subprotocol,
                "authorization": headers.get("authorization"),
                "extensions": headers_as_dict(ws.response.headers).get("sec-websocket-extensions"),
                "headers": headers,
            }
        )
        try:
            if ws.subprotocol is None:
                await ws.close(1002, "no common OCPP subprotocol")
                return
            session: PeerChargePoint
            if ws.subprotocol == "ocpp1.6" and self.ocpp16 == "library":
                session = Csms16ChargePoint(identity, FrameLog(ws, identity), self.behaviour, self.transaction_ids)
            else:
                session_type = Ocpp16Echo if ws.subprotocol == "ocpp1.6" else CsmsChargePoint
                session = session_type(identity, FrameLog(ws, identity), self.behaviour)
            self.sessions[identity] = session
            try:
                await session.serve()
            finally:
                if self.sessions.get(identity) is session:
                    del self.sessions[identity]
        finally:
            emit({"event": "disconnected", "identity": identity, "code": ws.close_code, "reason": ws.close_reason})

    def session_of(self, cmd: dict[str, Any]) -> PeerChargePoint | None:
        return self.sessions.get(str(cmd.get("identity")))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.csms", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--subprotocols", default="ocpp2.0.1", help="comma-separated, in order of preference")
    parser.add_argument("--reject-status", type=int, default=None, help="answer every handshake with this HTTP status")
    parser.add_argument(
        "--reject-header", action="append", default=[], help="'Name: value' added to that refusal (repeatable)"
    )
    parser.add_argument("--no-deflate", action="store_true", help="refuse permessage-deflate")
    parser.add_argument("--path-prefix", default="", help="refuse (HTTP 404) paths that are not <prefix>/<identity>")
    parser.add_argument("--ping-interval", type=float, default=20.0, help="seconds; 0 disables")
    parser.add_argument(
        "--ocpp16",
        choices=("echo", "library"),
        default="echo",
        help="serve ocpp1.6 connections with an echo ({} to every CALL) or the ocpp library's 1.6 Central System",
    )
    parser.add_argument("--first-transaction-id", type=int, default=1, help="the first 1.6 transactionId given")
    parser.add_argument(
        "--set-response",
        action="append",
        default=[],
        help="a set_response command as JSON, applied before the first connection (repeatable)",
    )
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    split = (header.partition(":") for header in args.reject_header)
    reject_headers = [(name.strip(), value.strip()) for name, _, value in split]
    csms = Csms(
        [p for p in args.subprotocols.split(",") if p],
        args.reject_status,
        args.path_prefix,
        reject_headers,
        args.ocpp16,
        args.first_transaction_id,
    )
    for command in args.set_response:
        csms.behaviour.apply({"cmd": "set_response", **json.loads(command)})
    stop = asyncio.Event()
    stop_on_signals(stop)
    async with serve(
        csms.handle,
        args.host,
        args.port,
        subprotocols=[Subprotocol(p) for p in csms.subprotocols],
        select_subprotocol=csms.select_subprotocol,
        process_request=csms.process_request,
        compression=None if args.no_deflate else "deflate",
        max_size=MAX_MESSAGE_BYTES,
        ping_interval=args.ping_interval or None,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        emit({"event": "listening", "port": port})
        commands = asyncio.create_task(follow_commands(csms.behaviour, csms.session_of, stop))
        try:
            await stop.wait()
        finally:
            commands.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await commands
        # Leaving `serve` closes every connection (1001) and waits for the handlers, which print
        # their `disconnected` events.
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    return run_peer(amain(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
