"""A sandbox CSMS for the demo: accepts any station identity and answers like a friendly backend.

It listens on 127.0.0.1 (port 0), takes any ``<path>/<identity>`` offering ``ocpp2.0.1``, and answers
every station call with a valid OCPP 2.0.1 response: BootNotification Accepted with a heartbeat
interval, Heartbeat with the time, Authorize and TransactionEvent with an Accepted idToken, empty
answers to StatusNotification, MeterValues, NotifyReport and the like. It also calls the stations
itself, to show calls travelling CSMS → controller → station: a GetBaseReport once a station has
booted, then now and then a GetVariables. Unknown actions get a NotImplemented CALLERROR.

Firmware (L03 then L01), when a :class:`FirmwarePlan` is given: once the controller's own identity
has booted, the CSMS asks it to publish the vendor's file (PublishFirmware with the file's MD5); when
the controller reports Published with the URLs it serves the file at, the CSMS sends UpdateFirmware
to one station, pointing at the controller's URL, so the station downloads from the site controller
and not from the internet. What happened is kept in :attr:`SandboxCsms.firmware` for the demo's view.

Outages: :meth:`SandboxCsms.go_away` stops it listening and drops every connection, as a failed WAN link
would; :meth:`SandboxCsms.come_back` listens again on the same port. A station whose connection comes
back without a new boot is taken as booted (a CSMS remembers its stations).

Every connection is handled in its own task under the server's nursery and always closed.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

import trio

from ..transport import HandshakeFailed, WebSocket, read_handshake
from .clock import WallClock, format_time, utc_now
from .rpc import CallError, CallTimedOut, EndpointClosed, FrameHook, Handler, RpcEndpoint

log = logging.getLogger("ocpp_lc.demo.csms")

SUBPROTOCOL: Final = "ocpp2.0.1"
HANDSHAKE_TIMEOUT_S: Final = 10.0
MAX_MESSAGE_BYTES: Final = 1_048_576
#: The heartbeat interval given to every station (s).
HEARTBEAT_INTERVAL_S: Final = 30

#: Receives ``(connection label, "sent" | "received", frame text)`` for every frame the CSMS handles.
CsmsFrameLog = Callable[[str, str, str], None]

#: Variables the CSMS asks stations for now and then (component, variable).
_POLLED_VARIABLES: Final = (
    ("ChargingStation", "AvailabilityState"),
    ("OCPPCommCtrlr", "HeartbeatInterval"),
    ("SampledDataCtrlr", "TxUpdatedInterval"),
    ("SmartChargingCtrlr", "Enabled"),
    ("ChargingStation", "Model"),
)


@dataclass(frozen=True, slots=True)
class FirmwarePlan:
    """What to publish through the controller and which station to update from it."""

    controller_identity: str
    location: str
    md5: str
    target_station: str
    #: After the controller's boot: a newcomer first sees stations arrive, then the firmware.
    publish_after_s: float = 5.0
    publish_request_id: int = 1
    update_request_id: int = 2


@dataclass
class FirmwareProgress:
    """The firmware story as the CSMS heard it (for the demo's view and summary)."""

    publish_answer: str | None = None  # PublishFirmwareResponse status
    publish_status: str | None = None  # last PublishFirmwareStatusNotification status
    published_urls: tuple[str, ...] = ()
    update_station: str | None = None
    update_answer: str | None = None  # UpdateFirmwareResponse status
    #: The last FirmwareStatusNotification status of each station.
    station_status: dict[str, str] = field(default_factory=dict)


#: Receives one sentence per notable firmware event, for the line-by-line output.
EventLog = Callable[[str], None]


class SandboxCsms:
    """The demo's CSMS. Run with ``port = await nursery.start(csms.serve)``."""

    def __init__(
        self,
        *,
        path: str = "/ocpp",
        seed: int = 0,
        poll_interval_s: tuple[float, float] = (8.0, 20.0),
        clock: WallClock = utc_now,
        frame_log: CsmsFrameLog | None = None,
        firmware: FirmwarePlan | None = None,
        on_event: EventLog | None = None,
    ) -> None:
        self.path = path
        self.firmware_plan = firmware
        self.firmware = FirmwareProgress()
        self._on_event = on_event
        #: The booted connection of each identity (the newest one).
        self._sessions: dict[str, _StationSession] = {}
        self._nursery: trio.Nursery | None = None
        self._publish_started = False
        self._update_sent = False
        self._seed = seed
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._frame_log = frame_log
        self._connections = 0
        #: Cancelled while the CSMS is away (see :meth:`serve`).
        self._up = trio.CancelScope()
        self._back = trio.Event()
        #: Calls received from stations, by action (bounded by the set of OCPP actions).
        self.calls_received: Counter[str] = Counter()
        #: Calls the CSMS made of its own, by action and outcome.
        self.calls_sent: Counter[tuple[str, str]] = Counter()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (a free port) until cancelled; report the port once listening.

        Between :meth:`go_away` and :meth:`come_back` nothing listens (connections are refused) and the
        connections that were open are dropped, as when a site's WAN link fails; then it listens again
        on the same port.
        """
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port: int = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(port)
            while True:
                with self._up:
                    # serve_listeners closes the listeners and cancels every connection when it ends.
                    await trio.serve_listeners(self._handle, listeners)
                await self._back.wait()
                listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
                self._up = trio.CancelScope()

    @property
    def away(self) -> bool:
        """Whether the CSMS is gone (between :meth:`go_away` and :meth:`come_back`)."""
        return self._up.cancel_called

    def go_away(self) -> None:
        """Stop listening and drop every connection, until :meth:`come_back`."""
        if not self.away:
            self._back = trio.Event()
            self._up.cancel()

    def come_back(self) -> None:
        """Listen again on the same port (after :meth:`go_away`)."""
        self._back.set()

    # -- firmware ------------------------------------------------------------------------------

    def _event(self, sentence: str) -> None:
        if self._on_event is not None:
            self._on_event(sentence)

    def _booted(self, session: _StationSession) -> None:
        self._sessions[session.identity] = session
        plan = self.firmware_plan
        if plan is None or self._nursery is None:
            return
        if session.identity == plan.controller_identity and not self._publish_started:
            self._publish_started = True
            self._nursery.start_soon(self._publish, session, plan)
        elif session.identity == plan.target_station and self.firmware.published_urls:
            self._start_update()  # published before the station was there (or while it reconnected)

    async def _publish(self, session: _StationSession, plan: FirmwarePlan) -> None:
        await trio.sleep(plan.publish_after_s)
        request = {"location": plan.location, "checksum": plan.md5, "requestId": plan.publish_request_id}
        self._event(f"sandbox CSMS asks controller {plan.controller_identity} to publish {plan.location}")
        reply = await session.call("PublishFirmware", request)
        if reply is None:
            self._publish_started = False  # not answered: ask again when the controller is back
        else:
            self.firmware.publish_answer = str(reply.get("status"))
            self._event(f"controller {plan.controller_identity} answered PublishFirmware: {reply.get('status')}")

    def _publish_status(self, identity: str, request: dict[str, Any]) -> None:
        plan = self.firmware_plan
        if plan is None or identity != plan.controller_identity:
            return
        status = str(request.get("status"))
        self.firmware.publish_status = status
        urls = tuple(str(url) for url in request.get("location", []))
        self._event(f"controller {identity} firmware publish: {status}" + (f" at {', '.join(urls)}" if urls else ""))
        if status == "Published" and urls:
            self.firmware.published_urls = urls
            self._start_update()

    def _start_update(self) -> None:
        plan = self.firmware_plan
        session = None if plan is None else self._sessions.get(plan.target_station)
        if plan is None or session is None or self._update_sent or self._nursery is None:
            return  # the station's boot starts it
        self._update_sent = True
        self._nursery.start_soon(self._update, session, plan, self.firmware.published_urls[0])

    async def _update(self, session: _StationSession, plan: FirmwarePlan, url: str) -> None:
        request = {
            "requestId": plan.update_request_id,
            "firmware": {"location": url, "retrieveDateTime": self.now()},
        }
        self.firmware.update_station = session.identity
        self._event(f"sandbox CSMS sends UpdateFirmware to {session.identity}: download from {url}")
        reply = await session.call("UpdateFirmware", request)
        if reply is None:
            self._update_sent = False  # not answered: try again when the station is back
            return
        self.firmware.update_answer = str(reply.get("status"))

    def _firmware_status(self, identity: str, request: dict[str, Any]) -> None:
        status = str(request.get("status"))
        self.firmware.station_status[identity] = status
        self._event(f"{identity} firmware update: {status}")

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await self._handle_connection(stream)
        except Exception:
            # One confused connection must not take the sandbox down.
            log.exception("sandbox CSMS: error on a connection")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                incoming = await read_handshake(stream, max_message_bytes=MAX_MESSAGE_BYTES)
        except (HandshakeFailed, trio.TooSlowError):
            return
        prefix = self.path + "/"
        raw_identity = incoming.target.split("?", 1)[0].removeprefix(prefix)
        if not incoming.target.startswith(prefix) or not raw_identity or "/" in raw_identity:
            await incoming.reject(404, f"stations connect to {prefix}<identity>")
            return
        if SUBPROTOCOL not in incoming.subprotocols:
            await incoming.reject(400, f"this sandbox speaks {SUBPROTOCOL} only")
            return
        identity = unquote(raw_identity)
        websocket = await incoming.accept(SUBPROTOCOL)
        self._connections += 1
        session = _StationSession(
            self,
            identity,
            random.Random(f"{self._seed}-csms-{identity}"),
            label=f"{identity}#csms{self._connections}",
        )
        if identity in self._sessions:
            # Booted on an earlier connection (a connection restored after an outage sends no new
            # boot): the CSMS goes on as with a booted station.
            session.resume()
        try:
            await session.run(websocket)
        finally:
            await websocket.aclose()

    # -- answers -------------------------------------------------------------------------------

    def now(self) -> str:
        """The CSMS's current time as an OCPP dateTime."""
        return format_time(self._clock())


class _StationSession:
    """One station's connection at the sandbox CSMS."""

    def __init__(self, csms: SandboxCsms, identity: str, rng: random.Random, *, label: str) -> None:
        self._csms = csms
        self.identity = identity
        self._rng = rng
        self._label = label
        self._booted = trio.Event()
        self._request_id = 0
        self._rpc: RpcEndpoint | None = None
        self._resumed = False

    def resume(self) -> None:
        """Take the station as booted (on an earlier connection): calls resume, without a new base report."""
        self._resumed = True
        self._booted.set()
        self._csms._booted(self)

    async def run(self, websocket: WebSocket) -> None:
        on_frame: FrameHook | None = None
        frame_log = self._csms._frame_log
        if frame_log is not None:
            label = self._label

            def on_frame(direction: str, text: str) -> None:
                frame_log(label, direction, text)

        rpc = self._rpc = RpcEndpoint(websocket, self._handlers(), on_frame=on_frame)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._call_now_and_then, rpc)
            await rpc.serve()
            nursery.cancel_scope.cancel()

    def _handlers(self) -> dict[str, Handler]:
        csms = self._csms

        def counted(action: str, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> Handler:
            def handler(request: dict[str, Any]) -> dict[str, Any]:
                csms.calls_received[action] += 1
                return answer(request)

            return handler

        def boot_notification(request: dict[str, Any]) -> dict[str, Any]:
            self._booted.set()
            csms._booted(self)
            return {"currentTime": csms.now(), "interval": HEARTBEAT_INTERVAL_S, "status": "Accepted"}

        def id_token_accepted(request: dict[str, Any]) -> dict[str, Any]:
            return {"idTokenInfo": {"status": "Accepted"}}

        def transaction_event(request: dict[str, Any]) -> dict[str, Any]:
            # idTokenInfo answers an idToken the station sent; otherwise there is nothing to say.
            return {"idTokenInfo": {"status": "Accepted"}} if "idToken" in request else {}

        def empty(request: dict[str, Any]) -> dict[str, Any]:
            return {}

        def publish_status(request: dict[str, Any]) -> dict[str, Any]:
            csms._publish_status(self.identity, request)
            return {}

        def firmware_status(request: dict[str, Any]) -> dict[str, Any]:
            csms._firmware_status(self.identity, request)
            return {}

        answers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "BootNotification": boot_notification,
            "Heartbeat": lambda request: {"currentTime": csms.now()},
            "Authorize": id_token_accepted,
            "TransactionEvent": transaction_event,
            "PublishFirmwareStatusNotification": publish_status,
            "FirmwareStatusNotification": firmware_status,
        }
        for action in (
            "StatusNotification",
            "MeterValues",
            "NotifyReport",
            "NotifyEvent",
            "SecurityEventNotification",
            "LogStatusNotification",
            "NotifyChargingLimit",
            "ClearedChargingLimit",
            "ReportChargingProfiles",
        ):
            answers[action] = empty
        return {action: counted(action, answer) for action, answer in answers.items()}

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """A call of the CSMS's own on this connection; None when it was refused, unanswered or the
        connection is gone (logged)."""
        rpc = self._rpc
        if rpc is None:
            return None
        try:
            reply = await rpc.call(action, payload)
        except (CallError, CallTimedOut, EndpointClosed) as exc:
            self._csms.calls_sent[action, "error"] += 1
            log.warning("[%s] sandbox CSMS: %s not answered: %s", self.identity, action, exc)
            return None
        self._csms.calls_sent[action, "result"] += 1
        return reply

    async def _call_now_and_then(self, rpc: RpcEndpoint) -> None:
        """The CSMS's own calls: a base report after boot, then GetVariables now and then."""
        try:
            await self._make_calls(rpc)
        except EndpointClosed:
            return  # the reader reports how the connection ended

    async def _make_calls(self, rpc: RpcEndpoint) -> None:
        await self._booted.wait()
        if not self._resumed:
            await trio.sleep(self._rng.uniform(1.0, 3.0))
            self._request_id += 1
            await self._call(
                rpc, "GetBaseReport", {"requestId": self._request_id, "reportBase": "ConfigurationInventory"}
            )
        while True:
            await trio.sleep(self._rng.uniform(*self._csms._poll_interval_s))
            picked = self._rng.sample(_POLLED_VARIABLES, k=self._rng.randint(1, 2))
            request = {
                "getVariableData": [
                    {"component": {"name": component}, "variable": {"name": variable}} for component, variable in picked
                ]
            }
            await self._call(rpc, "GetVariables", request)

    async def _call(self, rpc: RpcEndpoint, action: str, payload: dict[str, Any]) -> None:
        try:
            await rpc.call(action, payload)
        except (CallError, CallTimedOut) as exc:
            self._csms.calls_sent[action, "error"] += 1
            log.warning("[%s] sandbox CSMS: %s answered with %s", self.identity, action, exc)
            return
        self._csms.calls_sent[action, "result"] += 1
