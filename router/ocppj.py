"""OCPP-J message framing (Part 4 §4), without I/O.

Theory of operation: every websocket text message on an OCPP-J connection is a JSON array whose first
element says what it is (§4.1.3):

    CALL        [2, "<id>", "<Action>", {payload}]
    CALLRESULT  [3, "<id>", {payload}]
    CALLERROR   [4, "<id>", "<errorCode>", "<description>", {details}]

The router relays frames byte-for-byte and only *reads* them through :func:`parse_frame`, to track
which call a reply answers and to let observers see payloads. It writes frames of its own (calls
that the controller originates, errors it must answer) through the ``encode_*`` functions. Nothing
here touches a socket or an event loop.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final


class MessageType(IntEnum):
    """OCPP-J message type numbers (Part 4 §4.1.3)."""

    CALL = 2
    CALLRESULT = 3
    CALLERROR = 4


#: Every action of OCPP 2.0.1 (Part 2, messages). Metrics label actions by these names and fold any
#: other string into ``other``, so a misbehaving peer cannot grow label cardinality.
ACTIONS: Final[frozenset[str]] = frozenset(
    """
    Authorize BootNotification CancelReservation CertificateSigned ChangeAvailability ClearCache
    ClearChargingProfile ClearDisplayMessage ClearVariableMonitoring ClearedChargingLimit CostUpdated
    CustomerInformation DataTransfer DeleteCertificate FirmwareStatusNotification
    Get15118EVCertificate GetBaseReport GetCertificateStatus GetChargingProfiles GetCompositeSchedule
    GetDisplayMessages GetInstalledCertificateIds GetLocalListVersion GetLog GetMonitoringReport
    GetReport GetTransactionStatus GetVariables Heartbeat InstallCertificate LogStatusNotification
    MeterValues NotifyChargingLimit NotifyCustomerInformation NotifyDisplayMessages
    NotifyEVChargingNeeds NotifyEVChargingSchedule NotifyEvent NotifyMonitoringReport NotifyReport
    PublishFirmware PublishFirmwareStatusNotification ReportChargingProfiles RequestStartTransaction
    RequestStopTransaction ReservationStatusUpdate ReserveNow Reset SecurityEventNotification
    SendLocalList SetChargingProfile SetDisplayMessage SetMonitoringBase SetMonitoringLevel
    SetNetworkProfile SetVariableMonitoring SetVariables SignCertificate StatusNotification
    TransactionEvent TriggerMessage UnlockConnector UnpublishFirmware UpdateFirmware
    """.split()
)

#: The RPC framework error codes (Part 4 §4.3).
ERROR_CODES: Final[frozenset[str]] = frozenset(
    {
        "FormatViolation",
        "GenericError",
        "InternalError",
        "MessageTypeNotSupported",
        "NotImplemented",
        "NotSupported",
        "OccurrenceConstraintViolation",
        "PropertyConstraintViolation",
        "ProtocolError",
        "RpcFrameworkError",
        "SecurityError",
        "TypeConstraintViolation",
    }
)

MAX_MESSAGE_ID_CHARS: Final = 36
MAX_ERROR_DESCRIPTION_CHARS: Final = 255

#: Ids of calls the controller originates toward a station start with this prefix, followed by 32
#: hex digits of a random UUID: 35 characters in all, within the 36 allowed (§4.1.4). A CSMS's ids
#: are its own business, but a tilde is not something UUID, counter or timestamp schemes produce, so
#: the two id spaces do not collide (§6.4, point 1). The prefix only makes our ids recognisable (in
#: traces, the demo); the router matches answers to its calls by the exact ids it issued, so a CSMS id
#: that happens to start with it is still relayed.
LC_ID_PREFIX: Final = "lc~"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the router learns from one frame: its type, id and (for a CALL) action and payload.

    ``payload`` is the CALL's or CALLRESULT's payload, or a CALLERROR's details object.
    """

    message_type: MessageType
    message_id: str
    action: str | None = None
    payload: Any = None
    error_code: str | None = None
    error_description: str | None = None


class FrameError(ValueError):
    """The frame is not a valid OCPP-J message.

    ``message_id`` is the id when it could still be read (so an answer can name it), else None.
    ``message_type`` is the first element when the frame is a JSON array starting with an integer
    (2 for something meant as a CALL), else None. ``kind`` is a short, bounded label for metrics:
    ``json``, ``shape``, ``message_type``, ``id``, ``action``, ``payload``.
    """

    def __init__(self, kind: str, reason: str, message_id: str | None = None, message_type: int | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.message_id = message_id
        self.message_type = message_type


def parse_frame(text: str) -> Envelope:
    """Parse one OCPP-J text frame into an :class:`Envelope`; raise :class:`FrameError` if invalid."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("json", f"not valid JSON: {exc}") from None
    if not isinstance(data, list) or len(data) < 2:
        raise FrameError("shape", "an OCPP-J message is a JSON array of 3 to 5 elements")
    # Type and id are read before anything else is checked, so that even a malformed frame can be
    # matched to the call it answers (or recognised as a call) by whoever relays it.
    message_id = data[1] if isinstance(data[1], str) else None
    kind_number = data[0] if isinstance(data[0], int) and not isinstance(data[0], bool) else None
    if len(data) < 3:
        raise FrameError("shape", "an OCPP-J message is a JSON array of 3 to 5 elements", message_id, kind_number)
    if kind_number is None:
        raise FrameError("message_type", "the message type must be the number 2, 3 or 4", message_id)
    if kind_number not in (2, 3, 4):
        raise FrameError("message_type", f"unknown message type {kind_number}", message_id, kind_number)
    if message_id is None or not message_id or len(message_id) > MAX_MESSAGE_ID_CHARS:
        raise FrameError("id", "the message id must be a string of 1 to 36 characters", None, kind_number)

    def invalid(kind: str, reason: str) -> FrameError:
        return FrameError(kind, reason, message_id, kind_number)

    if kind_number == MessageType.CALL:
        if len(data) != 4:
            raise invalid("shape", "a CALL has exactly 4 elements")
        action, payload = data[2], data[3]
        if not isinstance(action, str) or not action:
            raise invalid("action", "the action must be a non-empty string")
        if not isinstance(payload, dict):
            raise invalid("payload", "the payload must be a JSON object")
        return Envelope(MessageType.CALL, message_id, action, payload)
    if kind_number == MessageType.CALLRESULT:
        if len(data) != 3:
            raise invalid("shape", "a CALLRESULT has exactly 3 elements")
        if not isinstance(data[2], dict):
            raise invalid("payload", "the payload must be a JSON object")
        return Envelope(MessageType.CALLRESULT, message_id, None, data[2])
    if len(data) != 5:
        raise invalid("shape", "a CALLERROR has exactly 5 elements")
    code, description, details = data[2], data[3], data[4]
    if not isinstance(code, str) or not isinstance(description, str) or not isinstance(details, dict):
        raise invalid("payload", "a CALLERROR carries code, description and a details object")
    return Envelope(MessageType.CALLERROR, message_id, None, details, code, description)


def _dump(value: Any) -> str:
    # Compact separators: OCPP is meant for metered links (Part 4 §4.1.5 asks for brevity).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode_call(message_id: str, action: str, payload: dict[str, Any]) -> str:
    """Serialise a CALL."""
    return _dump([int(MessageType.CALL), message_id, action, payload])


def encode_result(message_id: str, payload: dict[str, Any]) -> str:
    """Serialise a CALLRESULT."""
    return _dump([int(MessageType.CALLRESULT), message_id, payload])


def encode_error(message_id: str, code: str, description: str = "", details: dict[str, Any] | None = None) -> str:
    """Serialise a CALLERROR. ``message_id`` is ``"-1"`` when the id could not be read (§4.2.3)."""
    if code not in ERROR_CODES:
        raise ValueError(f"{code!r} is not an OCPP-J error code")
    return _dump(
        [int(MessageType.CALLERROR), message_id, code, description[:MAX_ERROR_DESCRIPTION_CHARS], details or {}]
    )


def error_for(exc: FrameError) -> str:
    """The CALLERROR a receiver answers to a frame it could not accept (§4.1.7, §4.2.3, §4.4)."""
    code = {
        "json": "RpcFrameworkError",
        "shape": "RpcFrameworkError",
        "id": "RpcFrameworkError",
        "message_type": "MessageTypeNotSupported",
        "action": "RpcFrameworkError",
        "payload": "FormatViolation",
    }[exc.kind]
    return encode_error(exc.message_id or "-1", code, exc.reason)


def new_lc_message_id() -> str:
    """A fresh id for a call the controller originates (see :data:`LC_ID_PREFIX`)."""
    return LC_ID_PREFIX + uuid.uuid4().hex


def is_lc_message_id(message_id: str) -> bool:
    """Whether an id has the controller's reserved form (for display: routing matches exact ids)."""
    return message_id.startswith(LC_ID_PREFIX)


def action_label(action: str | None) -> str:
    """A bounded metrics label for an action: its name if OCPP 2.0.1 knows it, else ``other``."""
    return action if action in ACTIONS else "other"
