"""A test charging station speaking OCPP 1.6J: the PyPI `ocpp` library's v16 messages over `websockets`.

Run as `python -m tests.peers.station16 --url ws://127.0.0.1:PORT/ocpp --identity CS16`. A sibling of
`tests/peers/station.py`, driven the same way (events and commands of `tests/peers/common.py`, from
trio through `tests/support/peers.py`): it connects once, offering `ocpp1.6`, sends its
BootNotification (unless `--no-boot`), answers the Central System's CALLs with schema-valid answers
(the library's 1.6 routing and schemas), and exits when the connection ends. A test makes it send
StatusNotification, Authorize, StartTransaction, StopTransaction or MeterValues with `call`.

Smart charging is modelled from the 1.6 specification (§3.13, §5.16, §5.3), as the station's own
reading, not the controller's: a csChargingProfiles it accepts goes into the station's profile model
(`tests/peers/profiles.py`, connector N standing where 2.0.1 has EVSE N; connector 0 is the whole
station; ChargePointMaxProfile caps like ChargingStationMaxProfile), so a test can ask the *station*
what it may draw. A TxProfile is rejected unless a transaction runs on its connector (§3.13.4), one
for another transaction too. The transaction is the station's from the StartTransaction.conf that
gives it an id until its StopTransaction. Events, besides the shared ones:
  {"event":"profile_set","evseId":<connector>,"id":..,"purpose":..,"stackLevel":..,"validTo":..}  (accepted)
  {"event":"profile_cleared","ids":[..],"request":{..}}   {"event":"limit","evseId":..,"limit":X|null,..}
  {"event":"profile_refused","connectorId":..,"status":..,"why":..}
  {"event":"transaction","connectorId":N,"transactionId":N}  (StartTransaction.conf accepted)
  {"event":"meter","connectorId":N,"amperes":X,"limit":X|null}  (answer to a `meter` command)
Extra commands: {"cmd":"advance_clock","seconds":S} as for station.py, and
  {"cmd":"meter","connectorId":N,"demand":A}: the EV on that connector wants A per phase; the station
  draws the least of that, its limit in force and `--max-current`, and reports it in a MeterValues
  (Current.Import on L1, L2 and L3, text values with unit A, the running transactionId).

`--delay ACTION=SECONDS` delays its answers to that CALL from the start (a `set_delay` in force before
the first CALL arrives); `--answer ACTION=JSON` likewise answers it with that payload, unchecked.
`--no-smart-charging` makes it a station whose SupportedFeatureProfiles lack SmartCharging: it answers
SetChargingProfile, ClearChargingProfile and GetCompositeSchedule with a NotSupported CALLERROR (and
says `profile_refused`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse
from typing import Any

from ocpp.exceptions import NotSupportedError
from ocpp.messages import Call
from ocpp.routing import on
from ocpp.v16 import call_result
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from tests.peers.common import (
    MAX_MESSAGE_BYTES,
    Behaviour,
    CallFailed,
    FrameLog,
    Peer16ChargePoint,
    close_on,
    configure_logging,
    emit,
    follow_commands,
    race,
    run_peer,
    stop_on_signals,
    utc_now,
)
from tests.peers.station import ProfileWatch

WITH_SMART_CHARGING = "Core,FirmwareManagement,LocalAuthListManagement,Reservation,SmartCharging,RemoteTrigger"
WITHOUT_SMART_CHARGING = "Core,FirmwareManagement,LocalAuthListManagement,Reservation,RemoteTrigger"


def as_201_profile(connector_id: int, profile: dict[str, Any]) -> dict[str, Any]:
    """A 1.6 csChargingProfiles in the shape the profile model reads (its 2.0.1 counterpart, §3.13)."""
    purpose = profile["chargingProfilePurpose"]
    converted: dict[str, Any] = {
        "id": profile["chargingProfileId"],
        "stackLevel": profile["stackLevel"],
        "chargingProfilePurpose": "ChargingStationMaxProfile" if purpose == "ChargePointMaxProfile" else purpose,
        "chargingProfileKind": profile["chargingProfileKind"],
        "chargingSchedule": [profile["chargingSchedule"]],
    }
    for key in ("validFrom", "validTo", "recurrencyKind"):
        if key in profile:
            converted[key] = profile[key]
    if "transactionId" in profile:
        converted["transactionId"] = str(profile["transactionId"])
    return {"evseId": connector_id, "chargingProfile": converted}


def as_201_clear(request: dict[str, Any]) -> dict[str, Any]:
    """A 1.6 ClearChargingProfile.req as the profile model reads it (by id, else by its criteria)."""
    if "id" in request:
        return {"chargingProfileId": request["id"]}
    criteria: dict[str, Any] = {}
    if "connectorId" in request:
        criteria["evseId"] = request["connectorId"]
    if "chargingProfilePurpose" in request:
        purpose = request["chargingProfilePurpose"]
        criteria["chargingProfilePurpose"] = (
            "ChargingStationMaxProfile" if purpose == "ChargePointMaxProfile" else purpose
        )
    if "stackLevel" in request:
        criteria["stackLevel"] = request["stackLevel"]
    return {"chargingProfileCriteria": criteria}


class Station16ChargePoint(Peer16ChargePoint):
    """The station end of an OCPP 1.6J connection (the handlers see snake_case keys)."""

    def __init__(self, identity: str, connection: FrameLog, behaviour: Behaviour, args: argparse.Namespace) -> None:
        super().__init__(identity, connection, behaviour)
        self.smart_charging = not args.no_smart_charging
        self.connectors = int(args.connectors)
        self.max_current = float(args.max_current)
        self.profiles = ProfileWatch(identity)
        #: connectorId -> the running transaction's id (from its StartTransaction.conf)
        self.transactions: dict[int, int] = {}
        #: The answers decided from the raw request (before the library's check turns numbers into Decimals).
        self._statuses: dict[str, str] = {}

    # -- what the Central System asks -------------------------------------------------------------

    async def answer_by_default(self, msg: Call) -> Any:
        if msg.action == "SetChargingProfile" and self.smart_charging:
            self._statuses[msg.unique_id] = self.set_profile(msg.payload)
        elif msg.action == "ClearChargingProfile" and self.smart_charging:
            self._statuses[msg.unique_id] = self.clear_profiles(msg.payload)
        try:
            return await super().answer_by_default(msg)
        finally:
            self._statuses.pop(msg.unique_id, None)

    def set_profile(self, payload: dict[str, Any]) -> str:
        """Take a SetChargingProfile.req in (before the answer leaves, as a station applies it first)."""
        connector_id = payload.get("connectorId")
        profile = payload.get("csChargingProfiles")
        if not isinstance(connector_id, int) or not isinstance(profile, dict):
            return "Rejected"  # the library's schema check answers it first
        why = self._refusal(connector_id, profile)
        if why is not None:
            emit({"event": "profile_refused", "identity": self.identity, "connectorId": connector_id, "why": why})
            return "Rejected"
        self.profiles.set_profile(as_201_profile(connector_id, profile))
        return "Accepted"

    def _refusal(self, connector_id: int, profile: dict[str, Any]) -> str | None:
        if not 0 <= connector_id <= self.connectors:
            return f"no connector {connector_id}"
        purpose = profile.get("chargingProfilePurpose")
        if purpose == "ChargePointMaxProfile" and connector_id != 0:
            return "a ChargePointMaxProfile is for connector 0"
        if purpose == "TxProfile":
            running = self.transactions.get(connector_id)
            if running is None:
                return "no transaction on the connector"  # §3.13.4
            if "transactionId" in profile and profile["transactionId"] != running:
                return f"transaction {profile['transactionId']} is not the one running ({running})"
        return None

    def clear_profiles(self, payload: dict[str, Any]) -> str:
        before = set(self.profiles.model.profiles)
        self.profiles.clear_profiles(as_201_clear(payload))
        return "Accepted" if set(self.profiles.model.profiles) != before else "Unknown"

    def _not_supported(self, action: str) -> NotSupportedError:
        emit({"event": "profile_refused", "identity": self.identity, "action": action, "why": "no SmartCharging"})
        return NotSupportedError(description=f"{action}: the SmartCharging feature profile is not supported")

    @on("SetChargingProfile")
    def on_set_charging_profile(self, call_unique_id: str, **_: Any) -> call_result.SetChargingProfile:
        if not self.smart_charging:
            raise self._not_supported("SetChargingProfile")
        return call_result.SetChargingProfile(status=self._statuses.get(call_unique_id, "Rejected"))

    @on("ClearChargingProfile")
    def on_clear_charging_profile(self, call_unique_id: str, **_: Any) -> call_result.ClearChargingProfile:
        if not self.smart_charging:
            raise self._not_supported("ClearChargingProfile")
        return call_result.ClearChargingProfile(status=self._statuses.get(call_unique_id, "Unknown"))

    @on("GetCompositeSchedule")
    def on_get_composite_schedule(self, **_: Any) -> call_result.GetCompositeSchedule:
        if not self.smart_charging:
            raise self._not_supported("GetCompositeSchedule")
        return call_result.GetCompositeSchedule(status="Rejected")

    @on("GetConfiguration")
    def on_get_configuration(self, key: list[str] | None = None, **_: Any) -> call_result.GetConfiguration:
        known = {
            "SupportedFeatureProfiles": WITH_SMART_CHARGING if self.smart_charging else WITHOUT_SMART_CHARGING,
            "NumberOfConnectors": str(self.connectors),
        }
        if self.smart_charging:
            known |= {
                "ChargeProfileMaxStackLevel": "100",
                "ChargingScheduleAllowedChargingRateUnit": "Current",
                "ChargingScheduleMaxPeriods": "10",
                "MaxChargingProfilesInstalled": "20",
            }
        wanted = key or list(known)
        found = [{"key": name, "readonly": True, "value": known[name]} for name in wanted if name in known]
        unknown = [name for name in wanted if name not in known]
        return call_result.GetConfiguration(configuration_key=found or None, unknown_key=unknown or None)

    @on("ChangeConfiguration")
    def on_change_configuration(self, **_: Any) -> call_result.ChangeConfiguration:
        return call_result.ChangeConfiguration(status="Rejected")

    @on("ChangeAvailability")
    def on_change_availability(self, **_: Any) -> call_result.ChangeAvailability:
        return call_result.ChangeAvailability(status="Accepted")

    @on("Reset")
    def on_reset(self, **_: Any) -> call_result.Reset:
        return call_result.Reset(status="Accepted")

    @on("ClearCache")
    def on_clear_cache(self, **_: Any) -> call_result.ClearCache:
        return call_result.ClearCache(status="Accepted")

    @on("RemoteStartTransaction")
    def on_remote_start_transaction(self, **_: Any) -> call_result.RemoteStartTransaction:
        return call_result.RemoteStartTransaction(status="Rejected")

    @on("RemoteStopTransaction")
    def on_remote_stop_transaction(self, **_: Any) -> call_result.RemoteStopTransaction:
        return call_result.RemoteStopTransaction(status="Rejected")

    @on("UnlockConnector")
    def on_unlock_connector(self, **_: Any) -> call_result.UnlockConnector:
        return call_result.UnlockConnector(status="NotSupported")

    @on("DataTransfer")
    def on_data_transfer(self, **_: Any) -> call_result.DataTransfer:
        return call_result.DataTransfer(status="UnknownVendorId")

    # -- what the station says --------------------------------------------------------------------

    async def call_raw(self, action: str, payload: dict[str, Any], **options: Any) -> dict[str, Any]:
        if action == "StopTransaction" and isinstance(payload.get("transactionId"), int):
            # Over once it is said to be: its TxProfiles go with it (§3.13.4).
            for connector_id, running in list(self.transactions.items()):
                if running == payload["transactionId"]:
                    del self.transactions[connector_id]
            self.profiles.transaction_event(
                {"eventType": "Ended", "transactionInfo": {"transactionId": str(payload["transactionId"])}}
            )
        answer = await super().call_raw(action, payload, **options)
        if action == "StartTransaction":
            self._started(payload, answer)
        return answer

    def _started(self, request: dict[str, Any], answer: dict[str, Any]) -> None:
        connector_id, transaction_id = request.get("connectorId"), answer.get("transactionId")
        if not isinstance(connector_id, int) or not isinstance(transaction_id, int):
            return
        if (answer.get("idTagInfo") or {}).get("status") != "Accepted":
            return  # StopTransactionOnInvalidId: the test stops it as a station would
        self.transactions[connector_id] = transaction_id
        emit(
            {
                "event": "transaction",
                "identity": self.identity,
                "connectorId": connector_id,
                "transactionId": transaction_id,
            }
        )
        self.profiles.transaction_event(
            {
                "eventType": "Started",
                "transactionInfo": {"transactionId": str(transaction_id)},
                "evse": {"id": connector_id},
            }
        )

    async def meter(self, connector_id: int, demand: float) -> None:
        """Draw what the EV wants within what the station may (its own model) and report it in a MeterValues."""
        limit = self.profiles.model.limit(connector_id, self.profiles.now())
        amperes = min(demand, self.max_current)
        if limit.limit is not None and limit.unit == "A":
            amperes = min(amperes, limit.limit)
        amperes = max(0.0, amperes)
        samples = [
            {"value": f"{amperes:.1f}", "measurand": "Current.Import", "phase": phase, "unit": "A"}
            for phase in ("L1", "L2", "L3")
        ]
        payload: dict[str, Any] = {
            "connectorId": connector_id,
            "meterValue": [{"timestamp": utc_now(), "sampledValue": samples}],
        }
        if connector_id in self.transactions:
            payload["transactionId"] = self.transactions[connector_id]
        emit(
            {
                "event": "meter",
                "identity": self.identity,
                "connectorId": connector_id,
                "amperes": amperes,
                "limit": limit.limit,
            }
        )
        try:
            await self.call_raw("MeterValues", payload)
        except CallFailed as exc:
            emit({"event": "meter_failed", "identity": self.identity, "connectorId": connector_id, **exc.event})


async def boot(station: Station16ChargePoint, args: argparse.Namespace) -> None:
    """Send the BootNotification (1.6 shape) and report the answer."""
    try:
        answer = await station.call_raw(
            "BootNotification", {"chargePointVendor": args.vendor, "chargePointModel": args.model}
        )
    except CallFailed as exc:
        emit({"event": "boot", **exc.event})
        return
    emit({"event": "boot", "payload": answer})


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.station16", description=__doc__)
    parser.add_argument("--url", required=True, help="Central System URL without the identity, e.g. ws://h:p/ocpp")
    parser.add_argument("--identity", required=True)
    parser.add_argument("--subprotocols", default="ocpp1.6", help="comma-separated, in order of preference")
    parser.add_argument("--no-deflate", action="store_true", help="do not offer permessage-deflate")
    parser.add_argument("--no-boot", action="store_true", help="do not send BootNotification")
    parser.add_argument("--no-smart-charging", action="store_true", help="SupportedFeatureProfiles without it")
    parser.add_argument("--connectors", type=int, default=1, help="NumberOfConnectors")
    parser.add_argument("--max-current", type=float, default=32.0, help="per phase, A: the most a connector draws")
    parser.add_argument(
        "--delay", action="append", default=[], help="ACTION=SECONDS: answer that CALL so much later (repeatable)"
    )
    parser.add_argument(
        "--answer",
        action="append",
        default=[],
        help="ACTION=JSON: answer that CALL with this payload, as given (a set_response from the start; repeatable)",
    )
    parser.add_argument("--model", default="TestModel16")
    parser.add_argument("--vendor", default="TestVendor")
    parser.add_argument("--ping-interval", type=float, default=20.0, help="seconds; 0 disables")
    parser.add_argument("--open-timeout", type=float, default=10.0, help="seconds for the handshake")
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    stop_on_signals(stop)
    url = args.url.rstrip("/") + "/" + urllib.parse.quote(args.identity, safe="")

    async def open_connection() -> ClientConnection:
        return await connect(
            url,
            subprotocols=[Subprotocol(p) for p in args.subprotocols.split(",") if p] or None,
            compression=None if args.no_deflate else "deflate",
            max_size=MAX_MESSAGE_BYTES,
            ping_interval=args.ping_interval or None,
            open_timeout=args.open_timeout,
        )

    try:
        stopped, ws = await race(stop, open_connection)
    except InvalidStatus as exc:
        emit({"event": "rejected", "status": exc.response.status_code})
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
    if ws.subprotocol != "ocpp1.6":
        await ws.close(1000, "this station speaks OCPP 1.6 only")
        emit({"event": "disconnected", "identity": args.identity, "code": ws.close_code, "reason": ws.close_reason})
        return 0
    behaviour = Behaviour()
    for delay in args.delay:  # in force before the first CALL can arrive, unlike a set_delay command
        action, _, seconds = delay.partition("=")
        behaviour.apply({"cmd": "set_delay", "action": action, "seconds": seconds})
    for answer in args.answer:
        action, _, payload = answer.partition("=")
        behaviour.apply({"cmd": "set_response", "action": action, "payload": json.loads(payload)})
    station = Station16ChargePoint(args.identity, FrameLog(ws, args.identity), behaviour, args)
    async with asyncio.TaskGroup() as tasks:

        def meter(cmd: dict[str, Any]) -> None:
            tasks.create_task(station.meter(int(cmd["connectorId"]), float(cmd["demand"])))

        extra = {"advance_clock": station.profiles.advance_clock, "meter": meter}
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
        finally:
            for task in helpers:
                task.cancel()
            station.profiles.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    return run_peer(amain(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
