"""Simulated charging stations for the demo: OCPP 2.0.1 over a real websocket, with EVs coming and going.

Each station has one EVSE with one connector, on three phases or on one. Its life, sped up so that a
newcomer sees something happen within seconds:

* connect (subprotocol ocpp2.0.1), BootNotification, StatusNotification Available, then Heartbeats
  at the interval the CSMS gave and clock-aligned MeterValues;
* EVs arrive (StatusNotification Occupied, Authorize, TransactionEvent Started with the idToken),
  charge with a TransactionEvent Updated carrying the energy register, power and current per phase
  every few seconds, may fill up (SuspendedEV), then leave (TransactionEvent Ended, Available);
* the CSMS's calls are answered: GetVariables from a small device model, GetBaseReport (followed by a
  NotifyReport), SetChargingProfile / ClearChargingProfile (the limit is honoured by the simulated
  current at once: the EV draws the lower of what it can take and what the profiles allow, see
  :mod:`.charging`), UpdateFirmware (the file is downloaded over HTTP, and FirmwareStatusNotification
  reports Downloading, Downloaded, Installing and Installed, L01).

Calls go out one at a time (Part 4 §4.1.1). Timings come from a seeded :class:`random.Random` per
station, so a run is reproducible apart from network latency. Energy follows the simulated current
on the real clock, so the register, the samples and the timestamps agree.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import random
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import trio

from ..transport import ConnectionClosed, HandshakeFailed, connect
from .charging import NOMINAL_VOLTAGE_V, ChargingProfiles
from .clock import WallClock, format_time, utc_now
from .rpc import CallError, CallTimedOut, EndpointClosed, FrameHook, Handler, RpcEndpoint

log = logging.getLogger("ocpp_lc.demo.station")

SUBPROTOCOL: Final = "ocpp2.0.1"
PHASES: Final = 3
EVSE_ID: Final = 1
CONNECTOR_ID: Final = 1
CONNECT_TIMEOUT_S: Final = 10.0
#: A firmware download that takes longer fails (DownloadFailed).
FIRMWARE_DOWNLOAD_TIMEOUT_S: Final = 30.0
#: RFID cards the simulated drivers carry (ISO 14443 UIDs).
ID_TOKENS: Final = ("04A1B2C3D4E5F6", "04B7C8D9E0F1A2", "04C3D4E5F6A7B8", "04D9E0F1A2B3C4", "04E5F6A7B8C9D0")

#: Receives ``(connection label, "sent" | "received", frame text)`` for every frame a station handles.
StationFrameLog = Callable[[str, str, str], None]


@dataclass(frozen=True, slots=True)
class SimTimings:
    """The sped-up clock of EV life (seconds; ranges are drawn uniformly)."""

    connect_spread_s: tuple[float, float] = (0.0, 1.0)
    first_arrival_s: tuple[float, float] = (0.5, 8.0)
    idle_s: tuple[float, float] = (4.0, 15.0)
    session_s: tuple[float, float] = (20.0, 60.0)
    sample_s: tuple[float, float] = (2.0, 5.0)
    aligned_interval_s: float = 15.0
    reconnect_s: tuple[float, float] = (1.0, 3.0)


DEFAULT_TIMINGS: Final = SimTimings()


@dataclass
class StationStats:
    """What one simulated station went through, for the demo's summary."""

    connections: int = 0
    close_codes: Counter[int] = field(default_factory=Counter)


@dataclass
class _Ev:
    """An EV plugged in: what it can draw and when it leaves."""

    max_current_amperes: float
    phases: int
    departs_at_s: float
    full_at_s: float  # math.inf when it leaves before its battery is full


@dataclass
class _Transaction:
    transaction_id: str
    id_token: dict[str, str]
    ev: _Ev
    started_at: datetime.datetime
    charging_state: str = "Charging"
    seq_no: int = 0
    charged_s: float = 0.0

    def next_seq(self) -> int:
        seq = self.seq_no
        self.seq_no += 1
        return seq


class SimulatedStation:
    """One station: connects to the controller, lives its life, answers the CSMS, reconnects if dropped."""

    def __init__(
        self,
        identity: str,
        *,
        host: str,
        port: int,
        path: str,
        rng: random.Random,
        stopping: trio.Event,
        timings: SimTimings = DEFAULT_TIMINGS,
        clock: WallClock = utc_now,
        frame_log: StationFrameLog | None = None,
        phases: int = PHASES,
        max_current_amperes: float | None = None,
    ) -> None:
        self.identity = identity
        self.phases = phases
        self._host = host
        self._port = port
        self._target = f"{path}/{identity}"
        self._rng = rng
        self._stopping = stopping
        self._timings = timings
        self._clock = clock
        self._frame_log = frame_log
        self.stats = StationStats()
        # Measurement noise has its own generator, so that answering the CSMS (which may re-sample the
        # current) does not shift the seeded sequence of arrivals and departures.
        self._noise = random.Random(rng.random())
        rated = float(rng.choice((16, 32)))  # drawn either way: the seeded sequence stays the same
        self.max_current_amperes = rated if max_current_amperes is None else max_current_amperes
        self.model = f"Demo AC {round(self.max_current_amperes * phases * NOMINAL_VOLTAGE_V / 1000)} kW"
        self.profiles = ChargingProfiles()
        #: The last UpdateFirmware request, and how the update went (FirmwareStatusNotification status).
        self.firmware_request: dict[str, Any] | None = None
        self.firmware_status: str | None = None
        self.firmware_version = "1.0.0"
        #: Size and MD5 of the last file downloaded.
        self.firmware_downloaded: tuple[int, str] | None = None
        # Meter register (Wh) and the current drawn per phase (A) since the last integration.
        self._register_wh = float(rng.randrange(100_000, 5_000_000))
        self._currents_amperes = [0.0] * phases
        self._integrated_at_s = trio.current_time()
        self._target_amperes = 0.0
        self._transaction: _Transaction | None = None
        #: Why the next TransactionEvent Updated is sent, when something other than the sample period.
        self._pending_trigger: str | None = None
        #: Set when a new limit changed the current: the change is reported at once, not at the next sample.
        self._report_now: trio.Event | None = None
        self._heartbeat_interval_s = 60

    # -- lifetime ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, live, and reconnect after a drop, until the demo is stopping."""
        await trio.sleep(self._rng.uniform(*self._timings.connect_spread_s))
        while not self._stopping.is_set():
            try:
                await self._connect_and_live()
            except Exception:
                # One broken station must not end the demo; the summary counts it.
                log.exception("[%s] simulated station failed", self.identity)
            with trio.move_on_after(self._rng.uniform(*self._timings.reconnect_s)):
                await self._stopping.wait()

    async def _connect_and_live(self) -> None:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                websocket = await connect(self._host, self._port, self._target, subprotocols=[SUBPROTOCOL])
        except (HandshakeFailed, trio.TooSlowError) as exc:
            if not self._stopping.is_set():
                log.warning("[%s] cannot connect to the controller: %s", self.identity, exc)
            return
        self.stats.connections += 1
        label = f"{self.identity}#{self.stats.connections}"
        on_frame: FrameHook | None = None
        if self._frame_log is not None:
            frame_log = self._frame_log

            def on_frame(direction: str, text: str) -> None:
                frame_log(label, direction, text)

        closed: ConnectionClosed | None = None
        try:
            async with trio.open_nursery() as nursery:
                # The handlers get the endpoint they serve lazily: GetBaseReport's report goes out through it.
                rpc = RpcEndpoint(websocket, self._handlers(nursery, lambda: rpc), on_frame=on_frame)
                nursery.start_soon(self._live, rpc, nursery)
                closed = await rpc.serve()
                nursery.cancel_scope.cancel()
            if closed is not None:  # None: the station gave up on this connection itself
                self.stats.close_codes[closed.code] += 1
                log.info("[%s] connection closed: %d %s", self.identity, closed.code, closed.reason)
        finally:
            await websocket.aclose()
            self._end_connection()

    def _end_connection(self) -> None:
        # Without a connection the simulated EV leaves quietly; the next connection boots afresh.
        self._advance()
        self._currents_amperes = [0.0] * self.phases
        if self._transaction is not None:
            self.profiles.end_transaction(self._transaction.transaction_id)
            self._transaction = None

    async def _live(self, rpc: RpcEndpoint, nursery: trio.Nursery) -> None:
        try:
            await self._boot(rpc)
            await self._status(rpc, "Available")
            nursery.start_soon(self._heartbeats, rpc)
            nursery.start_soon(self._aligned_meter_values, rpc)
            await trio.sleep(self._rng.uniform(*self._timings.first_arrival_s))
            while True:
                await self._ev_session(rpc)
                await trio.sleep(self._rng.uniform(*self._timings.idle_s))
        except EndpointClosed:
            return  # the reader reports how the connection ended
        except (CallError, CallTimedOut) as exc:
            # The CSMS refused or ignored a call this life depends on: drop the connection and start over.
            log.warning("[%s] %s; reconnecting", self.identity, exc)
            nursery.cancel_scope.cancel()

    async def _boot(self, rpc: RpcEndpoint) -> None:
        while True:
            reply = await rpc.call(
                "BootNotification",
                {
                    "reason": "PowerUp",
                    "chargingStation": {
                        "model": self.model,
                        "vendorName": "ocpp-lc demo",
                        "serialNumber": self.identity,
                        "firmwareVersion": self.firmware_version,
                    },
                },
            )
            if reply["status"] == "Accepted":
                self._heartbeat_interval_s = max(int(reply["interval"]), 1)
                return
            # Pending or Rejected: try again after the interval the CSMS asked for (B02, B03).
            await trio.sleep(max(int(reply["interval"]), 1))

    async def _heartbeats(self, rpc: RpcEndpoint) -> None:
        while True:
            await trio.sleep(self._heartbeat_interval_s)
            await self._quietly(rpc, "Heartbeat", {})

    async def _aligned_meter_values(self, rpc: RpcEndpoint) -> None:
        interval_s = self._timings.aligned_interval_s
        while True:
            # Clock-aligned: on the wall clock's multiples of the interval (J01).
            await trio.sleep(interval_s - self._clock().timestamp() % interval_s)
            self._advance()
            sample = self._sample("Sample.Clock")
            await self._quietly(rpc, "MeterValues", {"evseId": EVSE_ID, "meterValue": [sample]})

    async def _quietly(self, rpc: RpcEndpoint, action: str, payload: dict[str, Any]) -> None:
        """A call whose outcome does not change the station's state: a refusal is only noted, and a
        closed connection is left for the reader to report (the connection's tasks are cancelled next).
        """
        try:
            await rpc.call(action, payload)
        except EndpointClosed:
            await trio.sleep_forever()
        except (CallError, CallTimedOut) as exc:
            log.warning("[%s] %s: %s", self.identity, action, exc)

    async def _status(self, rpc: RpcEndpoint, status: str) -> None:
        await rpc.call(
            "StatusNotification",
            {
                "timestamp": format_time(self._clock()),
                "connectorStatus": status,
                "evseId": EVSE_ID,
                "connectorId": CONNECTOR_ID,
            },
        )

    # -- an EV's visit -------------------------------------------------------------------------

    async def _ev_session(self, rpc: RpcEndpoint) -> None:
        rng, timings = self._rng, self._timings
        now_s = trio.current_time()
        stay_s = rng.uniform(*timings.session_s)
        # About a third of the EVs fill up before they leave and sit there in SuspendedEV.
        full_at_s = now_s + stay_s * rng.uniform(0.6, 0.85) if rng.random() < 0.35 else math.inf
        one_phase = rng.random() < 0.25
        ev = _Ev(
            max_current_amperes=float(rng.choice((16, 32) if one_phase else (10, 16, 16, 32))),
            phases=1 if one_phase else self.phases,
            departs_at_s=now_s + stay_s,
            full_at_s=full_at_s,
        )
        id_token = {"idToken": rng.choice(ID_TOKENS), "type": "ISO14443"}
        await self._status(rpc, "Occupied")
        authorized = await rpc.call("Authorize", {"idToken": id_token})
        if authorized["idTokenInfo"]["status"] != "Accepted":
            await trio.sleep_until(ev.departs_at_s)
            await self._status(rpc, "Available")
            return
        transaction = _Transaction(
            transaction_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            id_token=id_token,
            ev=ev,
            started_at=self._clock(),
        )
        self._advance()
        self._transaction = transaction
        self._pending_trigger = None
        self._set_currents()
        started = self._transaction_event("Started", "Authorized", "Transaction.Begin")
        started |= {"idToken": id_token, "evse": {"id": EVSE_ID, "connectorId": CONNECTOR_ID}}
        started["numberOfPhasesUsed"] = ev.phases
        await rpc.call("TransactionEvent", started)

        while True:
            wake_s = min(trio.current_time() + rng.uniform(*timings.sample_s), ev.departs_at_s)
            if transaction.charging_state != "SuspendedEV":
                wake_s = min(wake_s, ev.full_at_s)  # say at once when the battery is full
            self._report_now = trio.Event()
            with trio.move_on_at(wake_s):
                await self._report_now.wait()
            now_s = trio.current_time()
            if now_s >= ev.departs_at_s:
                break
            self._advance()
            if now_s >= ev.full_at_s and transaction.charging_state != "SuspendedEV":
                transaction.charging_state = "SuspendedEV"
                self._pending_trigger = "ChargingStateChanged"
            if self._set_currents():
                self._pending_trigger = "ChargingStateChanged"
            trigger = self._pending_trigger or "MeterValuePeriodic"
            self._pending_trigger = None
            context = "Sample.Periodic" if trigger == "MeterValuePeriodic" else "Trigger"
            await rpc.call("TransactionEvent", self._transaction_event("Updated", trigger, context))

        self._advance()
        transaction.charging_state = "Idle"
        self._currents_amperes = [0.0] * self.phases
        ended = self._transaction_event("Ended", "EVDeparted", "Transaction.End")
        ended["transactionInfo"]["stoppedReason"] = "EVDisconnected"
        ended["transactionInfo"]["timeSpentCharging"] = round(transaction.charged_s)
        self._transaction = None
        self.profiles.end_transaction(transaction.transaction_id)
        await rpc.call("TransactionEvent", ended)
        await self._status(rpc, "Available")

    def _transaction_event(self, event_type: str, trigger: str, context: str) -> dict[str, Any]:
        transaction = self._transaction
        assert transaction is not None
        return {
            "eventType": event_type,
            "timestamp": format_time(self._clock()),
            "triggerReason": trigger,
            "seqNo": transaction.next_seq(),
            "transactionInfo": {
                "transactionId": transaction.transaction_id,
                "chargingState": transaction.charging_state,
            },
            "meterValue": [self._sample(context)],
        }

    # -- the simulated meter -------------------------------------------------------------------

    @property
    def currents_amperes(self) -> tuple[float, ...]:
        """What the EV draws now on each of the station's phases (its L1 first): what a grid meter sees."""
        return tuple(self._currents_amperes)

    def limit_amperes(self) -> float | None:
        """The per-phase limit that the installed charging profiles impose now."""
        transaction = self._transaction
        return self.profiles.limit_amperes(
            self._clock(),
            transaction_id=transaction.transaction_id if transaction else None,
            transaction_started=transaction.started_at if transaction else None,
        )

    def _advance(self) -> None:
        """Add the energy drawn since the last call to the register (the current was constant since)."""
        now_s = trio.current_time()
        elapsed_s = now_s - self._integrated_at_s
        self._register_wh += NOMINAL_VOLTAGE_V * sum(self._currents_amperes) * elapsed_s / 3600
        if self._transaction is not None and any(self._currents_amperes):
            self._transaction.charged_s += elapsed_s
        self._integrated_at_s = now_s

    def _set_currents(self) -> bool:
        """Set what the EV draws from now on; return whether the charging state changed.

        The EV draws its own maximum within the station's rating and the charging profiles' limit. An
        AC EV cannot charge below 6 A (IEC 61851-1), so a lower limit suspends charging (SuspendedEVSE).
        """
        transaction = self._transaction
        changed = False
        self._target_amperes = 0.0
        if transaction is not None and transaction.charging_state in ("Charging", "SuspendedEVSE"):
            ev = transaction.ev
            target = min(ev.max_current_amperes, self.max_current_amperes)
            limit = self.limit_amperes()
            if limit is not None:
                target = min(target, limit) if limit >= 6 else 0.0
            state = "Charging" if target > 0 else "SuspendedEVSE"
            changed = state != transaction.charging_state
            transaction.charging_state = state
            self._target_amperes = target
        phases = transaction.ev.phases if transaction is not None else 0
        self._currents_amperes = [
            round(self._target_amperes * self._noise.uniform(0.96, 1.0), 1) if phase < phases else 0.0
            for phase in range(self.phases)
        ]
        return changed

    def _sample(self, context: str) -> dict[str, Any]:
        power_w = NOMINAL_VOLTAGE_V * sum(self._currents_amperes)
        sampled: list[dict[str, Any]] = [
            {
                "value": round(self._register_wh, 1),
                "context": context,
                "measurand": "Energy.Active.Import.Register",
                "unitOfMeasure": {"unit": "Wh"},
            },
            {
                "value": round(power_w),
                "context": context,
                "measurand": "Power.Active.Import",
                "unitOfMeasure": {"unit": "W"},
            },
        ]
        sampled += [
            {
                "value": current,
                "context": context,
                "measurand": "Current.Import",
                "phase": f"L{phase}",
                "unitOfMeasure": {"unit": "A"},
            }
            for phase, current in enumerate(self._currents_amperes, start=1)
        ]
        return {"timestamp": format_time(self._clock()), "sampledValue": sampled}

    # -- answering the CSMS --------------------------------------------------------------------

    def _device_model(self) -> dict[tuple[str, str], str]:
        """A few variables of the device model (Part 2 appendices), as GetVariables reads them."""
        transaction = self._transaction
        return {
            ("ChargingStation", "Model"): self.model,
            ("ChargingStation", "VendorName"): "ocpp-lc demo",
            ("ChargingStation", "AvailabilityState"): "Occupied" if transaction else "Available",
            ("ChargingStation", "SupplyPhases"): str(self.phases),
            ("OCPPCommCtrlr", "HeartbeatInterval"): str(self._heartbeat_interval_s),
            ("SampledDataCtrlr", "TxUpdatedInterval"): str(round(sum(self._timings.sample_s) / 2)),
            ("AlignedDataCtrlr", "Interval"): str(round(self._timings.aligned_interval_s)),
            ("SmartChargingCtrlr", "Enabled"): "true",
            ("SmartChargingCtrlr", "LimitChangeSignificance"): "0.1",
            ("SecurityCtrlr", "SecurityProfile"): "1",
        }

    def _handlers(self, nursery: trio.Nursery, rpc: Callable[[], RpcEndpoint]) -> dict[str, Handler]:
        def get_variables(request: dict[str, Any]) -> dict[str, Any]:
            model = self._device_model()
            components = {component for component, _ in model}
            results = []
            for wanted in request["getVariableData"]:
                component, variable = wanted["component"], wanted["variable"]
                key = (component["name"], variable["name"])
                result: dict[str, Any] = {"component": component, "variable": variable}
                if wanted.get("attributeType", "Actual") != "Actual":
                    result["attributeStatus"] = "NotSupportedAttributeType"
                elif key in model:
                    result |= {"attributeStatus": "Accepted", "attributeValue": model[key]}
                else:
                    result["attributeStatus"] = "UnknownVariable" if key[0] in components else "UnknownComponent"
                results.append(result)
            return {"getVariableResult": results}

        def get_base_report(request: dict[str, Any]) -> dict[str, Any]:
            # The report follows the answer, as a call of the station's own (B07).
            nursery.start_soon(self._send_report, rpc(), int(request["requestId"]))
            return {"status": "Accepted"}

        def set_charging_profile(request: dict[str, Any]) -> dict[str, Any]:
            transaction = self._transaction
            status = self.profiles.install(
                int(request["evseId"]),
                request["chargingProfile"],
                self._clock(),
                transaction.transaction_id if transaction else None,
            )
            if status == "Accepted" and transaction is not None:
                self._retarget()
            profile = request["chargingProfile"]
            if status == "Rejected" and profile["chargingProfilePurpose"] == "TxProfile" and transaction is None:
                # No transaction here (it may have just ended): say so, as a station does (K01.FR.09).
                return {"status": status, "statusInfo": {"reasonCode": "TxNotFound"}}
            return {"status": status}

        def clear_charging_profile(request: dict[str, Any]) -> dict[str, Any]:
            status = self.profiles.clear(request)
            if status == "Accepted":
                self._retarget()
            return {"status": status}

        def update_firmware(request: dict[str, Any]) -> dict[str, Any]:
            # The download follows the answer, as calls of the station's own (L01.FR.01).
            self.firmware_request = request
            nursery.start_soon(self._update_firmware, rpc(), request)
            return {"status": "Accepted"}

        return {
            "GetVariables": get_variables,
            "GetBaseReport": get_base_report,
            "SetChargingProfile": set_charging_profile,
            "ClearChargingProfile": clear_charging_profile,
            "UpdateFirmware": update_firmware,
        }

    async def _update_firmware(self, rpc: RpcEndpoint, request: dict[str, Any]) -> None:
        """Download the file and report each step (L01). Installing needs no reboot in the demo: the new
        version is what the next BootNotification reports."""
        request_id = int(request["requestId"])
        location = str(request["firmware"]["location"])
        await self._firmware_step(rpc, "Downloading", request_id)
        try:
            # trust_env=False: the file is on the site network; a proxy in the environment would miss it.
            async with httpx.AsyncClient(timeout=FIRMWARE_DOWNLOAD_TIMEOUT_S, trust_env=False) as client:
                response = await client.get(location)
                response.raise_for_status()
        except httpx.HTTPError as exc:
            log.warning("[%s] firmware download from %s failed: %s", self.identity, location, exc)
            await self._firmware_step(rpc, "DownloadFailed", request_id)
            return
        content = response.content
        self.firmware_downloaded = (len(content), hashlib.md5(content, usedforsecurity=False).hexdigest())
        await self._firmware_step(rpc, "Downloaded", request_id)
        await trio.sleep(self._noise.uniform(0.5, 1.5))  # checking and writing the image takes a moment
        await self._firmware_step(rpc, "Installing", request_id)
        await trio.sleep(self._noise.uniform(0.5, 1.5))
        self.firmware_version = "1.1.0"
        await self._firmware_step(rpc, "Installed", request_id)

    async def _firmware_step(self, rpc: RpcEndpoint, status: str, request_id: int) -> None:
        self.firmware_status = status
        await self._quietly(rpc, "FirmwareStatusNotification", {"status": status, "requestId": request_id})

    def _retarget(self) -> None:
        """Honour a changed limit at once (K01.FR.07), and say so at once: the controller balancing the
        site reads the new draw from the meter values."""
        before = self._target_amperes
        self._advance()
        if self._set_currents():
            self._pending_trigger = "ChargingStateChanged"
        elif self._target_amperes != before and self._pending_trigger is None:
            self._pending_trigger = "ChargingRateChanged"
        if self._pending_trigger is not None and self._report_now is not None:
            self._report_now.set()

    async def _send_report(self, rpc: RpcEndpoint, request_id: int) -> None:
        report = [
            {
                "component": {"name": component},
                "variable": {"name": variable},
                "variableAttribute": [{"type": "Actual", "value": value, "mutability": "ReadOnly"}],
            }
            for (component, variable), value in self._device_model().items()
        ]
        payload = {
            "requestId": request_id,
            "generatedAt": format_time(self._clock()),
            "seqNo": 0,
            "tbc": False,
            "reportData": report,
        }
        await self._quietly(rpc, "NotifyReport", payload)
