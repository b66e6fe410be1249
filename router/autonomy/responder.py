"""The local responder: what the controller answers a station's CALL while that station's CSMS leg is gone.

Theory of operation: sans-IO. :meth:`LocalResponder.answer` takes one CALL (station id, action, payload)
and returns a :class:`LocalReply`: the CALLRESULT payload a CSMS would send (schema-valid for the action),
or the CALLERROR the spec prescribes, and what must become of the message (:class:`Disposition`):

* ``queue``  — the CSMS must still learn it, every one, in order: kept durably before the answer leaves
  and replayed on restore (:mod:`router.autonomy.queue`);
* ``latest`` — state: only the newest per ``latest_key`` matters; kept and sent once on restore;
* ``drop``   — nothing for the CSMS: a heartbeat, or a request-response exchange that is over.

It reads only what it needs of a payload (the fields below) and answers a missing or mistyped one with
the OCPP-J error for it (Part 4 §4.3); everything else is kept as the station sent it, for the CSMS to
judge on replay. A station whose last BootNotification the CSMS did not accept (:mod:`.boot_cache`) is
answered Pending on boot and SecurityError on anything else (B02.FR.09, B01.FR.10): it may not start a
transaction through us. SecurityError also means it keeps such a message itself (B02.FR.03), so nothing
is lost; we queue nothing of it. Except a NotifyReport (:data:`SENT_WHILE_PENDING`): it only ever answers
the CSMS's GetBaseReport or GetReport (B07.FR.03, B08.FR.03), which a station not yet accepted must
answer (B02.FR.01, B02.FR.02) and the CSMS must not refuse (B02.FR.09): it is answered and queued.

================================= ================================ ====== ======================================
action                            answer                           kept   why
================================= ================================ ====== ======================================
Authorize                         idTokenInfo from the cache, or   drop   C10/C12; the TransactionEvent carries
                                  the unknown-token policy                the token to the CSMS
BootNotification                  Accepted + the CSMS's last       latest B01.FR.03: the CSMS must learn of the
                                  interval; Pending if it never           reboot (replayed first); a Pending
                                  accepted the station (B02)       (drop) station boots again itself (B02.FR.08)
ClearedChargingLimit              {}                               latest K13: limit state per source and EVSE,
                                                                          one key with NotifyChargingLimit
DataTransfer                      status UnknownVendorId           drop   P02.FR.06: we implement no vendor
                                                                          extension; the station knows it
FirmwareStatusNotification        {}                               latest L01: progress of the one update
Get15118EVCertificate             Failed, empty exiResponse        drop   M01/M02 need the contract certificate
                                                                          pool behind the CSMS
GetCertificateStatus              Failed                           drop   M06.FR.04: no OCSP status obtained
Heartbeat                         currentTime (injected clock)     drop   G02: liveness only
LogStatusNotification             {}                               latest N01: upload progress
MeterValues                       {}                               queue  J01: each one lost is a gap in the
                                                                          CSMS's measurements
NotifyChargingLimit               {}                               latest K12: see ClearedChargingLimit
NotifyCustomerInformation         {}                               queue  N09: parts of a requested report
NotifyDisplayMessages             {}                               queue  O04: parts of a requested report
NotifyEVChargingNeeds             Rejected                         drop   K15.FR.04: no schedule can be given;
                                                                          a replayed need would be stale
NotifyEVChargingSchedule          Accepted                         latest K15/K17: the EV's plan per EVSE
NotifyEvent                       {}                               queue  N07.FR.04: a station queues monitor
                                                                          events when offline; all-Periodic
                                                                   latest ones are state (per variable set)
NotifyMonitoringReport            {}                               queue  N02: parts of a requested report
NotifyReport                      {}                               queue  B07/B08: parts of a requested report,
                                                                          even while Pending (B02.FR.02)
PublishFirmwareStatusNotification {}                               latest L03: progress of one publication
ReportChargingProfiles            {}                               queue  K09: parts of a requested report
ReservationStatusUpdate           {}                               latest H01: how each reservation ended
                                                                          (one key per reservationId)
SecurityEventNotification         {}                               queue  A04.FR.02: guaranteed delivery
SignCertificate                   Accepted                         latest A02.FR.11: the CSR reaches the CSMS
                                                                          on restore; a newer CSR of the same
                                                                          type supersedes it (A02.FR.17)
StatusNotification                {}                               latest G01: state per (EVSE, connector)
TransactionEvent                  {}, + idTokenInfo from the cache queue  E04.FR.01/02, C15.FR.02: every event,
                                  if it carries an idToken                in seqNo order
any other action                  NotSupported (an OCPP action a   drop   Part 4 §4.3
                                  station never sends) or
                                  NotImplemented (no such action)
================================= ================================ ====== ======================================

Restore order (see :func:`router.autonomy.replay.replay_order`): the latest BootNotification first (B01.FR.08:
nothing before the boot), then the queue in order, then the other latest entries, oldest change first.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from router.ocppj import ACTIONS
from router.own.catalogue import rfc3339

from .auth_cache import AuthCache, LocalAuthorization
from .boot_cache import BootCache

log = logging.getLogger("ocpp_lc.autonomy.responder")

#: Every CALL a charging station sends in OCPP 2.0.1 (Part 2): the responder answers each of them.
STATION_ACTIONS: Final = frozenset(
    """
    Authorize BootNotification ClearedChargingLimit DataTransfer FirmwareStatusNotification
    Get15118EVCertificate GetCertificateStatus Heartbeat LogStatusNotification MeterValues
    NotifyChargingLimit NotifyCustomerInformation NotifyDisplayMessages NotifyEVChargingNeeds
    NotifyEVChargingSchedule NotifyEvent NotifyMonitoringReport NotifyReport
    PublishFirmwareStatusNotification ReportChargingProfiles ReservationStatusUpdate
    SecurityEventNotification SignCertificate StatusNotification TransactionEvent
    """.split()
)
#: The latest key of a BootNotification (replayed before anything else).
BOOT_KEY: Final = "BootNotification"
#: Why a request that needs the CSMS behind us failed (StatusInfoType.reasonCode is free text, ≤ 20).
_CSMS_UNREACHABLE: Final = {"reasonCode": "CSMSUnreachable", "additionalInfo": "answered by the local controller"}
#: What a station the CSMS has not accepted may still send: what the CSMS asked for (B02.FR.02). Of the
#: three kinds B02.FR.09 exempts, only a NotifyReport can be told from what a station sends unbidden: it
#: exists only to answer GetBaseReport / GetReport (B07.FR.03, B08.FR.03); TriggerMessage's can not.
SENT_WHILE_PENDING: Final = frozenset({"NotifyReport"})
#: How long a Pending station waits before it boots again (B02.FR.08), unless told otherwise.
DEFAULT_PENDING_INTERVAL_S: Final = 60


class Disposition(StrEnum):
    """What becomes of a message answered locally (see the module docstring)."""

    QUEUE = "queue"
    LATEST = "latest"
    DROP = "drop"


@dataclass(frozen=True)
class LocalReply:
    """The answer to one CALL: ``result`` (a CALLRESULT payload) or ``error_code`` + ``error_description``.

    ``disposition`` and ``latest_key`` say what to keep for the CSMS; ``authorization`` is the local
    idToken verdict when the CALL carried a token (for metrics, and kept with a queued TransactionEvent).
    """

    result: dict[str, Any] | None
    disposition: Disposition
    latest_key: str | None = None
    error_code: str | None = None
    error_description: str = ""
    authorization: LocalAuthorization | None = None

    @classmethod
    def error(cls, code: str, description: str) -> LocalReply:
        """A CALLERROR; nothing is kept."""
        return cls(None, Disposition.DROP, error_code=code, error_description=description[:255])


class _BadPayload(Exception):
    def __init__(self, code: str, description: str) -> None:
        self.code = code
        self.description = description
        super().__init__(code, description)


_Handler = Callable[[str, Mapping[str, Any]], LocalReply]


class LocalResponder:
    """Answers the CALLs of stations whose CSMS is unreachable, from the boot and authorization caches."""

    def __init__(
        self,
        boots: BootCache,
        auth: AuthCache,
        *,
        wall_clock: Callable[[], datetime.datetime],
        pending_interval_s: int = DEFAULT_PENDING_INTERVAL_S,
    ) -> None:
        self._boots = boots
        self._auth = auth
        self._wall_clock = wall_clock
        self._pending_interval_s = pending_interval_s
        self._handlers: dict[str, _Handler] = {
            "Authorize": self._authorize,
            "BootNotification": self._boot,
            "ClearedChargingLimit": self._cleared_charging_limit,
            "DataTransfer": self._data_transfer,
            "FirmwareStatusNotification": self._single_latest("FirmwareStatusNotification", "status"),
            "Get15118EVCertificate": self._ev_certificate,
            "GetCertificateStatus": self._certificate_status,
            "Heartbeat": self._heartbeat,
            "LogStatusNotification": self._single_latest("LogStatusNotification", "status"),
            "MeterValues": self._meter_values,
            "NotifyChargingLimit": self._notify_charging_limit,
            "NotifyCustomerInformation": self._report_part,
            "NotifyDisplayMessages": self._report_part,
            "NotifyEVChargingNeeds": self._ev_charging_needs,
            "NotifyEVChargingSchedule": self._ev_charging_schedule,
            "NotifyEvent": self._notify_event,
            "NotifyMonitoringReport": self._report_part,
            "NotifyReport": self._report_part,
            "PublishFirmwareStatusNotification": self._single_latest("PublishFirmwareStatusNotification", "status"),
            "ReportChargingProfiles": self._report_part,
            "ReservationStatusUpdate": self._reservation_status,
            "SecurityEventNotification": self._security_event,
            "SignCertificate": self._sign_certificate,
            "StatusNotification": self._status_notification,
            "TransactionEvent": self._transaction_event,
        }
        assert set(self._handlers) == STATION_ACTIONS

    def answer(self, station_id: str, action: str, payload: Mapping[str, Any]) -> LocalReply:
        """The reply to ``station_id``'s CALL of ``action``, and what to keep of it (see the module docstring)."""
        handler = self._handlers.get(action)
        if handler is None:
            code = "NotSupported" if action in ACTIONS else "NotImplemented"
            log.warning("station %s sent %s, which a CSMS does not answer: %s", station_id, action[:40], code)
            return LocalReply.error(code, f"{action[:40]} is not a request a charging station sends")
        not_accepted = self._boots.accepted_interval(station_id) is None
        if action != "BootNotification" and action not in SENT_WHILE_PENDING and not_accepted:
            # B02.FR.09 / B01.FR.10: not accepted by the CSMS, so it may send nothing but a boot (and what
            # the CSMS asked for: SENT_WHILE_PENDING).
            log.info("station %s: %s refused locally, the CSMS has not accepted the station", station_id, action)
            return LocalReply.error("SecurityError", "the CSMS has not accepted this charging station yet (B02)")
        try:
            return handler(station_id, payload)
        except _BadPayload as bad:
            log.warning(
                "station %s: bad %s answered locally with %s: %s", station_id, action, bad.code, bad.description
            )
            return LocalReply.error(bad.code, f"{action}: {bad.description}")

    # -- handlers ---------------------------------------------------------------------------------

    def _now(self) -> str:
        return rfc3339(self._wall_clock())

    @staticmethod
    def _empty(disposition: Disposition, key: str | None = None) -> LocalReply:
        return LocalReply({}, disposition, key)

    def _single_latest(self, key: str, status_field: str) -> _Handler:
        def handle(station_id: str, payload: Mapping[str, Any]) -> LocalReply:
            _text(payload, status_field, max_chars=50)
            return self._empty(Disposition.LATEST, key)

        return handle

    def _authorize(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        verdict = self._auth.authorize(station_id, _id_token(payload, required=True) or {})
        return LocalReply({"idTokenInfo": verdict.id_token_info}, Disposition.DROP, authorization=verdict)

    def _boot(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _object(payload, "chargingStation")
        _text(payload, "reason", max_chars=50)
        interval = self._boots.accepted_interval(station_id)
        if interval is None:
            log.info("station %s booted while the CSMS is unreachable and was never accepted: Pending", station_id)
            answer = {"currentTime": self._now(), "interval": self._pending_interval_s, "status": "Pending"}
            return LocalReply(answer, Disposition.DROP)
        answer = {"currentTime": self._now(), "interval": interval, "status": "Accepted"}
        return LocalReply(answer, Disposition.LATEST, BOOT_KEY)

    def _cleared_charging_limit(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        source = _text(payload, "chargingLimitSource", max_chars=50)
        return self._empty(Disposition.LATEST, _limit_key(source, payload))

    def _notify_charging_limit(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        source = _text(_object(payload, "chargingLimit"), "chargingLimitSource", max_chars=50)
        return self._empty(Disposition.LATEST, _limit_key(source, payload))

    def _data_transfer(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _text(payload, "vendorId", max_chars=255)
        return LocalReply({"status": "UnknownVendorId"}, Disposition.DROP)

    def _ev_certificate(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _text(payload, "exiRequest", max_chars=5600)
        answer = {"status": "Failed", "exiResponse": "", "statusInfo": dict(_CSMS_UNREACHABLE)}
        return LocalReply(answer, Disposition.DROP)

    def _certificate_status(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _object(payload, "ocspRequestData")
        return LocalReply({"status": "Failed", "statusInfo": dict(_CSMS_UNREACHABLE)}, Disposition.DROP)

    def _heartbeat(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        return LocalReply({"currentTime": self._now()}, Disposition.DROP)

    def _meter_values(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _integer(payload, "evseId")
        _array(payload, "meterValue")
        return self._empty(Disposition.QUEUE)

    def _report_part(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _integer(payload, "requestId")
        return self._empty(Disposition.QUEUE)

    def _ev_charging_needs(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _integer(payload, "evseId")
        _object(payload, "chargingNeeds")
        return LocalReply({"status": "Rejected", "statusInfo": dict(_CSMS_UNREACHABLE)}, Disposition.DROP)

    def _ev_charging_schedule(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        evse_id = _integer(payload, "evseId")
        _object(payload, "chargingSchedule")
        return LocalReply({"status": "Accepted"}, Disposition.LATEST, f"NotifyEVChargingSchedule/{evse_id}")

    def _notify_event(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        events = _array(payload, "eventData")
        triggers, variables = set(), []
        for event in events:
            if not isinstance(event, Mapping):
                raise _BadPayload("TypeConstraintViolation", "eventData holds something other than objects")
            triggers.add(_text(event, "trigger", max_chars=20))
            variables.append(
                [_object(event, "component"), _object(event, "variable"), event.get("variableMonitoringId")]
            )
        if triggers == {"Periodic"}:
            # Periodic reports are state: the newest per set of monitored variables is what counts.
            digest = hashlib.sha256(json.dumps(variables, sort_keys=True).encode()).hexdigest()[:24]
            return self._empty(Disposition.LATEST, f"NotifyEvent/{digest}")
        return self._empty(Disposition.QUEUE)

    def _reservation_status(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        reservation_id = _integer(payload, "reservationId")
        _text(payload, "reservationUpdateStatus", max_chars=20)
        return self._empty(Disposition.LATEST, f"ReservationStatusUpdate/{reservation_id}")

    def _security_event(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _text(payload, "type", max_chars=50)
        _text(payload, "timestamp", max_chars=40)
        return self._empty(Disposition.QUEUE)

    def _sign_certificate(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _text(payload, "csr", max_chars=5500)
        kind = payload.get("certificateType", "-")
        if not isinstance(kind, str):
            raise _BadPayload("TypeConstraintViolation", "certificateType must be text")
        return LocalReply({"status": "Accepted"}, Disposition.LATEST, f"SignCertificate/{kind[:40]}")

    def _status_notification(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        evse_id, connector_id = _integer(payload, "evseId"), _integer(payload, "connectorId")
        _text(payload, "connectorStatus", max_chars=20)
        return self._empty(Disposition.LATEST, f"StatusNotification/{evse_id}/{connector_id}")

    def _transaction_event(self, station_id: str, payload: Mapping[str, Any]) -> LocalReply:
        _text(payload, "eventType", max_chars=20)
        _integer(payload, "seqNo")
        _text(_object(payload, "transactionInfo"), "transactionId", max_chars=36)
        id_token = _id_token(payload, required=False)
        if id_token is None:
            return self._empty(Disposition.QUEUE)
        verdict = self._auth.authorize(station_id, id_token)
        return LocalReply({"idTokenInfo": verdict.id_token_info}, Disposition.QUEUE, authorization=verdict)


def _limit_key(source: str, payload: Mapping[str, Any]) -> str:
    evse_id = _integer(payload, "evseId", required=False)
    return f"ChargingLimit/{source}/{'-' if evse_id is None else evse_id}"


# -- reading payloads (only what the responder needs) ----------------------------------------------


def _field(payload: Mapping[str, Any], name: str, required: bool) -> Any:
    if name not in payload:
        if required:
            raise _BadPayload("OccurrenceConstraintViolation", f"{name} is missing")
        return None
    return payload[name]


def _text(payload: Mapping[str, Any], name: str, *, max_chars: int) -> str:
    value = _field(payload, name, required=True)
    if not isinstance(value, str):
        raise _BadPayload("TypeConstraintViolation", f"{name} must be text")
    if len(value) > max_chars:
        raise _BadPayload("PropertyConstraintViolation", f"{name} is longer than {max_chars} characters")
    return value


def _integer(payload: Mapping[str, Any], name: str, *, required: bool = True) -> int | None:
    value = _field(payload, name, required)
    if value is None and not required:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadPayload("TypeConstraintViolation", f"{name} must be an integer")
    return value


def _object(payload: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = _field(payload, name, required=True)
    if not isinstance(value, Mapping):
        raise _BadPayload("TypeConstraintViolation", f"{name} must be an object")
    return value


def _array(payload: Mapping[str, Any], name: str) -> list[Any]:
    value = _field(payload, name, required=True)
    if not isinstance(value, list):
        raise _BadPayload("TypeConstraintViolation", f"{name} must be an array")
    if not value:
        raise _BadPayload("OccurrenceConstraintViolation", f"{name} must not be empty")
    return value


def _id_token(payload: Mapping[str, Any], *, required: bool) -> Mapping[str, Any] | None:
    if "idToken" not in payload and not required:
        return None
    token = _object(payload, "idToken")
    _text(token, "idToken", max_chars=36)
    _text(token, "type", max_chars=20)
    return token
