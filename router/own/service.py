"""OwnIdentity: the controller as a charging station without EVSEs, under its own identity.

Theory of operation. :class:`OwnIdentity` builds the parts and runs them under one task:

* the :class:`~router.own.connection.OwnConnection` to ``<csms>/<identity>`` (subprotocol
  ocpp2.0.1, Basic auth when a BasicAuthPassword is set, reconnecting per Part 4 §5.3);
* on every connection: BootNotification until Accepted (:class:`~router.own.boot.Booter`), then the
  heartbeat and the durable outbox side by side;
* the handler table for the CSMS's calls: GetVariables, SetVariables, GetBaseReport, GetReport
  (answered from the :class:`~router.own.device_model.DeviceModel`, reports as NotifyReport after
  the answer), TriggerMessage (BootNotification, Heartbeat, and senders registered later, e.g.
  PublishFirmwareStatusNotification), Reset and DataTransfer. Other parts of the appliance add theirs
  with :meth:`OwnIdentity.add_handler` before :meth:`OwnIdentity.run`.

Security events (A04, :mod:`router.own.security_events`): the start is one (StartupOfTheDevice, or
ResetOrReboot after a reset), queued before the first connection and so sent right after the first
accepted boot; a TLS failure of the own connection is one (InvalidCsmsCertificate, InvalidTLSVersion …,
once per outage), and so is a station leg's refusal that the app hands to :attr:`OwnIdentity.security_events`.

While the CSMS has Rejected the controller every CSMS call is refused with CALLERROR SecurityError
(B03.FR.08). A Reset (OnIdle or Immediate: the controller itself has no transactions) is answered
Accepted; the reason is recorded in the store so that the next start boots with ``RemoteReset``, and
the injected ``request_restart`` is called once the answer is on its way (the app restarts
gracefully; stations reconnect on their own).

Settings: :class:`OwnIdentitySettings`, which the app fills from the configuration file. Values the
CSMS may change (HeartbeatInterval, RetryBackOff*, WebSocketPingInterval …) are only defaults: once
the CSMS has set one, the stored value wins (see :mod:`router.own.device_model`).
"""

from __future__ import annotations

import base64
import datetime
import logging
import random
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal, NotRequired

import trio
from prometheus_client import CollectorRegistry
from pydantic import ConfigDict, Field, TypeAdapter, with_config
from typing_extensions import TypedDict  # pydantic reads TypedDicts from here before Python 3.12

from router.own import device_model as dm
from router.own.boot import BOOT_REASONS, Booter, BootNotificationAnswer, BootState, Heartbeat
from router.own.catalogue import LiveSources, StandardValues, rfc3339, standard_variables
from router.own.connection import (
    SUBPROTOCOL,
    BackoffParams,
    CallErrorReply,
    Dial,
    Dispatcher,
    Handler,
    OwnCallError,
    OwnConnection,
    OwnMetrics,
    Reply,
    Session,
    parse_payload,
)
from router.own.device_model import DeviceModel, Variable, notify_report_parts
from router.own.outbox import UpstreamOutbox
from router.own.security_events import SecurityEvents
from router.store import Store
from router.tls import security_event
from router.transport import HandshakeFailed, WebSocket, connect

log = logging.getLogger("ocpp_lc.own")

#: Store namespace of the device model's values set by the CSMS.
DEVICE_MODEL_NAMESPACE: Final = "device_model"
#: Store namespace of the own identity's other state (the boot reason to give after a restart).
STATE_NAMESPACE: Final = "own_identity"
#: The durable outbox of messages for the CSMS.
OUTBOX_NAME: Final = "upstream"
_BOOT_REASON_KEY: Final = "boot_reason"
#: Boot reasons after which the start is reported as ResetOrReboot rather than StartupOfTheDevice.
_RESET_REASONS: Final = frozenset({"RemoteReset", "LocalReset", "ScheduledReset", "ApplicationReset", "Watchdog"})


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ocpp-lc")
    except Exception:  # not installed as a distribution (a source checkout): still boot
        return "0.0.0"


@dataclass(frozen=True)
class OwnIdentitySettings:
    """What the own identity needs from the configuration (the app maps it from Settings).

    Back-off defaults: Part 4 §5.3 leaves the numbers to us. The controller is one connection, but it
    fronts a whole site: after a CSMS outage it should be back soon (site limits, firmware commands
    arrive here), yet a CSMS restarting under many controllers must not see them all at once. So the
    first retry comes after 5-15 s (``WaitMinimum`` 5 s plus up to 10 s of jitter, which spreads a
    fleet over 10 s), and the fixed part doubles five times at most: 5, 10, 20, 40, 80, 160 s, so
    even a long outage is noticed within about three minutes of its end.
    """

    identity: str
    csms_host: str
    csms_port: int
    #: The CSMS URL path that ``/<identity>`` is appended to ('' or e.g. '/ocpp').
    csms_path: str = ""
    ssl_context: ssl.SSLContext | None = None
    #: Initial BasicAuthPassword (security profiles 1 and 2); one set by the CSMS (A01) wins.
    basic_auth_password: str | None = field(default=None, repr=False)  # never in a log line
    security_profile: int = 1
    connect_timeout_s: float = 10.0
    message_timeout_s: int = 30
    heartbeat_interval_s: int = 300
    websocket_ping_interval_s: int = 60
    ping_timeout_s: float = 30.0
    retry_wait_minimum_s: int = 5
    retry_random_range_s: int = 10
    retry_repeat_times: int = 5
    #: Wait before retrying a BootNotification that got no usable answer, or interval 0 (B02.FR.07).
    boot_retry_s: float = 60.0
    max_message_bytes: int = 1_048_576
    vendor_name: str = "ocpp-lc"
    model: str = "ocpp-lc"
    serial_number: str | None = None
    firmware_version: str = ""
    items_per_message_get_report: int = 100
    bytes_per_message_get_report: int = 65_536
    items_per_message_get_variables: int = 50
    bytes_per_message_get_variables: int = 65_536
    items_per_message_set_variables: int = 50
    bytes_per_message_set_variables: int = 65_536
    limit_change_significance_percent: float = 5.0
    profile_stack_level: int = 8
    periods_per_schedule: int = 24
    #: The most site profiles the controller keeps (the CSMS-limit book's bound).
    max_charging_profiles: int = 16

    def standard_values(self) -> StandardValues:
        """The device model's defaults and constants from these settings."""
        return StandardValues(
            identity=self.identity,
            vendor_name=self.vendor_name,
            model=self.model,
            firmware_version=self.firmware_version or _version(),
            serial_number=self.serial_number,
            security_profile=self.security_profile,
            basic_auth_password=self.basic_auth_password,
            heartbeat_interval_s=self.heartbeat_interval_s,
            websocket_ping_interval_s=self.websocket_ping_interval_s,
            retry_wait_minimum_s=self.retry_wait_minimum_s,
            retry_random_range_s=self.retry_random_range_s,
            retry_repeat_times=self.retry_repeat_times,
            message_timeout_s=self.message_timeout_s,
            limit_change_significance_percent=self.limit_change_significance_percent,
            profile_stack_level=self.profile_stack_level,
            periods_per_schedule=self.periods_per_schedule,
            items_per_message_get_report=self.items_per_message_get_report,
            bytes_per_message_get_report=self.bytes_per_message_get_report,
            items_per_message_get_variables=self.items_per_message_get_variables,
            bytes_per_message_get_variables=self.bytes_per_message_get_variables,
            items_per_message_set_variables=self.items_per_message_set_variables,
            bytes_per_message_set_variables=self.bytes_per_message_set_variables,
            max_charging_profiles=self.max_charging_profiles,
        )

    def installed_certificates(self) -> int:
        """Certificates the own connection has installed: the CA certificates it trusts, and under
        security profile 3 its own client certificate (SecurityCtrlr.CertificateEntries)."""
        if self.ssl_context is None:
            return 0
        own_certificate = 1 if self.security_profile == 3 else 0
        return len(self.ssl_context.get_ca_certs()) + own_certificate


# -- requests handled here (the device model's are in device_model) ------------------------------


@with_config(ConfigDict(extra="forbid"))
class _EvseRef(TypedDict):
    id: int
    connectorId: NotRequired[int]
    customData: NotRequired[dict[str, Any]]


MessageTrigger = Literal[
    "BootNotification",
    "LogStatusNotification",
    "FirmwareStatusNotification",
    "Heartbeat",
    "MeterValues",
    "SignChargingStationCertificate",
    "SignV2GCertificate",
    "StatusNotification",
    "TransactionEvent",
    "SignCombinedCertificate",
    "PublishFirmwareStatusNotification",
]


@with_config(ConfigDict(extra="forbid"))
class TriggerMessageRequest(TypedDict):
    """TriggerMessageRequest."""

    requestedMessage: MessageTrigger
    evse: NotRequired[_EvseRef]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class ResetRequest(TypedDict):
    """ResetRequest."""

    type: Literal["Immediate", "OnIdle"]
    evseId: NotRequired[int]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class DataTransferRequest(TypedDict):
    """DataTransferRequest."""

    vendorId: Annotated[str, Field(max_length=255)]
    messageId: NotRequired[Annotated[str, Field(max_length=50)]]
    data: NotRequired[Any]
    customData: NotRequired[dict[str, Any]]


_TRIGGER: Final = TypeAdapter(TriggerMessageRequest)
_RESET: Final = TypeAdapter(ResetRequest)
_DATA_TRANSFER: Final = TypeAdapter(DataTransferRequest)

#: Sends one triggered message on the session (F06); registered per requestedMessage.
TriggerSender = Callable[[Session], Awaitable[None]]
#: Answers DataTransfer for one vendorId with the DataTransferResponse payload.
DataTransferHandler = Callable[[DataTransferRequest], dict[str, Any]]


def utc_now() -> datetime.datetime:
    """The wall clock, for OCPP timestamps only."""
    return datetime.datetime.now(datetime.UTC)


#: RFC 3339 in UTC with milliseconds, as OCPP wants it.
ocpp_timestamp: Final = rfc3339


class _DeviceModelPolicy:
    """The connection's timings, read from the device model at the moment they are needed."""

    def __init__(self, model: DeviceModel) -> None:
        self._model = model

    def backoff(self) -> BackoffParams:
        comm = "OCPPCommCtrlr"
        return BackoffParams(
            wait_minimum_s=self._model.float_value(comm, "RetryBackOffWaitMinimum"),
            random_range_s=self._model.float_value(comm, "RetryBackOffRandomRange"),
            repeat_times=self._model.int_value(comm, "RetryBackOffRepeatTimes"),
        )

    def message_timeout_s(self) -> float:
        return self._model.float_value("OCPPCommCtrlr", "MessageTimeout", "Default")

    def ping_interval_s(self) -> float:
        return self._model.float_value("OCPPCommCtrlr", "WebSocketPingInterval")


class OwnIdentity:
    """The controller's own identity toward the CSMS (see the module docstring)."""

    def __init__(
        self,
        settings: OwnIdentitySettings,
        *,
        store: Store,
        registry: CollectorRegistry,
        connected_stations: Callable[[], Iterable[str]],
        request_restart: Callable[[str], None],
        wall_clock: Callable[[], datetime.datetime] = utc_now,
        rng: random.Random | None = None,
        dial: Dial | None = None,
        charging_profiles: Callable[[], int] = lambda: 0,
        count_security_event: Callable[[str, str], None] | None = None,
    ) -> None:
        """``charging_profiles`` counts the site profiles the controller holds (none unless the app
        wires the CSMS-limit book in); ``count_security_event(event, leg)`` counts a TLS failure of the
        own connection on the appliance's security-event counter (leg ``own``)."""
        self.settings = settings
        self.metrics = OwnMetrics(registry)
        self._request_restart = request_restart
        self._wall_clock = wall_clock
        self._state = store.namespace(STATE_NAMESPACE)
        values = settings.standard_values()
        sources = LiveSources(
            connected_stations,
            installed_certificates=settings.installed_certificates,
            charging_profiles=charging_profiles,
            wall_clock=wall_clock,
        )
        self.device_model = DeviceModel(standard_variables(values, sources), store.namespace(DEVICE_MODEL_NAMESPACE))
        self.device_model.on_change(self._on_variable_changed)
        reason = self._state.get(_BOOT_REASON_KEY)
        charging_station: dict[str, Any] = {
            "model": settings.model[:20],
            "vendorName": settings.vendor_name[:50],
            "firmwareVersion": values.firmware_version[:50],
        }
        if settings.serial_number:
            charging_station["serialNumber"] = settings.serial_number[:25]
        self.boot = Booter(
            BootState(
                reason if isinstance(reason, str) and reason in BOOT_REASONS else "PowerUp", settings.boot_retry_s
            ),
            charging_station,
            self.metrics,
            self._on_boot_accepted,
        )
        self.heartbeat = Heartbeat(lambda: self.device_model.float_value("OCPPCommCtrlr", "HeartbeatInterval"))
        self.outbox = UpstreamOutbox(store.outbox(OUTBOX_NAME), self.metrics)
        #: Security events (A04): logged, counted and, when critical, queued in the outbox, rate-limited.
        self.security_events = SecurityEvents(self.outbox.enqueue, registry, wall_clock=wall_clock)
        self._count_security_event = count_security_event
        self._triggers: dict[str, TriggerSender] = {"Heartbeat": self.heartbeat.beat}
        self._data_transfer: dict[str, DataTransferHandler] = {}
        handlers: dict[str, Handler] = {
            "GetVariables": self._on_get_variables,
            "SetVariables": self._on_set_variables,
            "GetBaseReport": self._on_get_base_report,
            "GetReport": self._on_get_report,
            "TriggerMessage": self._on_trigger_message,
            "Reset": self._on_reset,
            "DataTransfer": self._on_data_transfer,
        }
        self.connection = OwnConnection(
            dial=dial or self._dial,
            dispatcher=Dispatcher(handlers, refuse=self._refuse_when_rejected),
            policy=_DeviceModelPolicy(self.device_model),
            metrics=self.metrics,
            rng=rng or random.Random(),
            connect_timeout_s=settings.connect_timeout_s,
            ping_timeout_s=settings.ping_timeout_s,
            on_dial_failed=self._on_dial_failed,
        )

    # -- what other parts of the appliance use ------------------------------------------------------

    def add_handler(self, action: str, handler: Handler) -> None:
        """Answer the CSMS's ``action`` calls on the own identity with ``handler`` (e.g. PublishFirmware)."""
        self.connection.dispatcher.add(action, handler)

    def add_trigger(self, requested_message: str, sender: TriggerSender) -> None:
        """Send ``sender``'s message when the CSMS asks for ``requested_message`` with TriggerMessage."""
        self._triggers[requested_message] = sender

    def add_data_transfer(self, vendor_id: str, handler: DataTransferHandler) -> None:
        """Answer DataTransfer for ``vendor_id`` (all others get UnknownVendorId, P01.FR.05)."""
        self._data_transfer[vendor_id] = handler

    async def send(self, action: str, payload: dict[str, Any]) -> None:
        """Queue a message for the CSMS in the durable outbox; it is delivered in order once accepted.

        Returns when the message is stored (it then survives a restart); StoreError if it could not be.
        """
        self.outbox.enqueue(action, payload)

    @property
    def boot_status(self) -> str | None:
        """The status of the CSMS's last BootNotification answer; None before any."""
        return self.boot.status

    @property
    def link_up(self) -> bool:
        """Whether the own connection is open."""
        return self.connection.session is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the own identity connected and booted until cancelled.

        First of all the start is a security event (StartupOfTheDevice, or ResetOrReboot when the
        controller restarts after a reset): queued, it goes once the CSMS has accepted the boot.
        """
        reason = self.boot.state.reason
        if reason in _RESET_REASONS:
            self.security_events.report("ResetOrReboot", f"ocpp-lc started again after a reset (boot reason {reason})")
        else:
            version = self.device_model.value("LocalController", "FirmwareVersion")
            self.security_events.report("StartupOfTheDevice", f"ocpp-lc {version} started (boot reason {reason})")
        async with trio.open_nursery() as nursery:
            await nursery.start(self.security_events.run)
            await nursery.start(self.connection.run, self._on_session)
            task_status.started()

    # -- per connection ------------------------------------------------------------------------

    async def _dial(self) -> WebSocket:
        settings = self.settings
        headers: list[tuple[str, str]] = []
        password = self.device_model.value("SecurityCtrlr", "BasicAuthPassword")
        if password:  # A00.FR.203: user name = identity, on every connection
            token = base64.b64encode(f"{settings.identity}:{password}".encode()).decode("ascii")
            headers.append(("Authorization", f"Basic {token}"))
        return await connect(
            settings.csms_host,
            settings.csms_port,
            f"{settings.csms_path}/{urllib.parse.quote(settings.identity, safe='')}",
            subprotocols=[SUBPROTOCOL],
            extra_headers=headers,
            ssl_context=settings.ssl_context,
            max_message_bytes=settings.max_message_bytes,
        )

    def _on_dial_failed(self, failure: HandshakeFailed) -> None:
        if failure.kind == "tls":
            # A00.FR.310/.316/.323 (and .413/.419/.426 under profile 3): the CSMS's certificate or TLS.
            event = security_event(failure, "csms")
            if self._count_security_event is not None:
                self._count_security_event(event, "own")
            self.security_events.connection_failed(event, f"own connection to the CSMS: {failure.reason}")
        elif failure.status == 401:
            self.security_events.connection_failed(
                "FailedToAuthenticateAtCsms", "the CSMS refused the own connection's credentials (HTTP 401)"
            )

    async def _on_session(self, session: Session) -> None:
        self.security_events.connected()
        await self.boot.until_accepted(session)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.heartbeat.run, session)
            nursery.start_soon(self.outbox.deliver, session.call)

    def _on_boot_accepted(self, answer: BootNotificationAnswer) -> None:
        interval_s = self.boot.state.heartbeat_interval_s
        if interval_s is not None:
            try:
                self.device_model.set_internal("OCPPCommCtrlr", "HeartbeatInterval", str(interval_s))
            except ValueError:
                log.warning("own identity: heartbeat interval %d s from the CSMS is out of range; ignored", interval_s)
        # Only this boot was due to the reset; the next start (a power cut, say) is a PowerUp again.
        self._state.delete(_BOOT_REASON_KEY)

    def _on_variable_changed(self, variable: Variable, value: str) -> None:
        if variable.component == "OCPPCommCtrlr" and variable.name == "HeartbeatInterval":
            self.heartbeat.interval_changed()
        elif variable.name == "BasicAuthPassword":
            # A01.FR.11/12: the change is a security-relevant event; the password itself never goes to a log.
            self.security_events.report(
                "ReconfigurationOfSecurityParameters",
                "BasicAuthPassword changed by the CSMS; used from the next connection",
            )

    def _refuse_when_rejected(self, action: str) -> CallErrorReply | None:
        if self.boot.status == "Rejected":  # B03.FR.08
            return CallErrorReply("SecurityError", "the CSMS has rejected this Local Controller's boot")
        return None

    async def _call_requested(self, session: Session, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A call the CSMS asked for (a report, a triggered message): allowed while Pending (B02.FR.02)."""
        if not self.boot.state.may_send(action, requested=True):
            raise OwnCallError(f"{action} may not be sent while the boot status is {self.boot.status}")
        return await session.call(action, payload)

    # -- handlers (synchronous: they never block the reader; follow-ups run after the answer) ---

    def _on_get_variables(self, payload: dict[str, Any]) -> Reply:
        request = parse_payload(dm.GET_VARIABLES, payload)
        self._check_items(len(request["getVariableData"]), "GetVariables")
        return Reply(self.device_model.get_variables(request))

    def _on_set_variables(self, payload: dict[str, Any]) -> Reply:
        request = parse_payload(dm.SET_VARIABLES, payload)
        self._check_items(len(request["setVariableData"]), "SetVariables")
        return Reply(self.device_model.set_variables(request))

    def _check_items(self, count: int, message: str) -> None:
        limit = self.device_model.int_value("DeviceDataCtrlr", "ItemsPerMessage", message)
        if count > limit:  # B06.FR.16, B08.FR.17 (and the same for SetVariables)
            raise CallErrorReply("OccurrenceConstraintViolation", f"more than ItemsPerMessage{message} ({limit}) items")

    def _on_get_base_report(self, payload: dict[str, Any]) -> Reply:
        request = parse_payload(dm.GET_BASE_REPORT, payload)
        report = self.device_model.base_report(request["reportBase"])
        return Reply({"status": "Accepted"}, then=self._report_sender(request["requestId"], report))

    def _on_get_report(self, payload: dict[str, Any]) -> Reply:
        request = parse_payload(dm.GET_REPORT, payload)
        self._check_items(len(request.get("componentVariable", [])), "GetReport")
        report = self.device_model.custom_report(request)
        if not report:
            return Reply({"status": "EmptyResultSet"})  # B08.FR.15
        return Reply({"status": "Accepted"}, then=self._report_sender(request["requestId"], report))

    def _report_sender(self, request_id: int, report: list[dict[str, Any]]) -> Callable[[Session], Awaitable[None]]:
        # The report is taken when the request is answered; it is sent once the answer is out (B07, B08).
        model = self.device_model
        parts = notify_report_parts(
            report,
            request_id=request_id,
            generated_at=ocpp_timestamp(self._wall_clock()),
            items_per_message=model.int_value("DeviceDataCtrlr", "ItemsPerMessage", "GetReport"),
            bytes_per_message=model.int_value("DeviceDataCtrlr", "BytesPerMessage", "GetReport"),
        )

        async def send_report(session: Session) -> None:
            for part in parts:
                await self._call_requested(session, "NotifyReport", part)

        return send_report

    def _on_trigger_message(self, payload: dict[str, Any]) -> Reply:
        request = parse_payload(_TRIGGER, payload)
        requested = request["requestedMessage"]
        if requested == "BootNotification":
            if self.boot.status == "Accepted":
                return Reply({"status": "Rejected"})  # F06.FR.17

            async def boot_now(session: Session) -> None:
                self.boot.trigger()

            return Reply({"status": "Accepted"}, then=boot_now)
        sender = self._triggers.get(requested)
        if sender is None:
            return Reply({"status": "NotImplemented"})  # F06.FR.08
        return Reply({"status": "Accepted"}, then=sender)  # F06.FR.04: the answer goes first

    def _on_reset(self, payload: dict[str, Any]) -> Reply:
        request = parse_payload(_RESET, payload)
        if "evseId" in request:
            return Reply({"status": "Rejected", "statusInfo": {"reasonCode": "UnknownEvse"}})  # B11.FR.09

        async def restart(session: Session) -> None:
            # Recorded before the restart begins, so that the next boot says why (B01.FR.09).
            self._state.put(_BOOT_REASON_KEY, "RemoteReset")
            log.warning("own identity: Reset (%s) from the CSMS; restarting", request["type"])
            self._request_restart("RemoteReset")

        return Reply({"status": "Accepted"}, then=restart)  # B11.FR.03, B12.FR.02

    def _on_data_transfer(self, payload: dict[str, Any]) -> Reply:
        request = parse_payload(_DATA_TRANSFER, payload)
        handler = self._data_transfer.get(request["vendorId"])
        if handler is None:
            return Reply({"status": "UnknownVendorId"})  # P01.FR.05
        return Reply(handler(request))
