"""What a station hears from the controller while its CSMS is unreachable: for every CALL a station sends,
the answer a CSMS would give (checked against the OCA schemas) or the CALLERROR the spec prescribes, and
what is kept for the CSMS (issue #12, errata 4.13 to Part 4 §6.3)."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.autonomy import responder as responder_module
from router.autonomy.auth_cache import AuthCache
from router.autonomy.boot_cache import BootCache
from router.autonomy.responder import SENT_WHILE_PENDING, STATION_ACTIONS, Disposition, LocalReply, LocalResponder
from router.autonomy.settings import UnknownIdTokenPolicy
from router.store import Store
from tests.support.schemas import validate_call, validate_frame, validate_result

NOW = datetime.datetime(2025, 6, 1, 12, 30, 15, 250_000, tzinfo=datetime.UTC)
T = "2025-06-01T12:30:00Z"
TOKEN = {"idToken": "AA11", "type": "ISO14443"}
SCHEDULE = {"id": 1, "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0}]}
PROFILE = {
    "id": 1,
    "stackLevel": 0,
    "chargingProfilePurpose": "TxDefaultProfile",
    "chargingProfileKind": "Absolute",
    "chargingSchedule": [SCHEDULE],
}


def event(trigger: str, component: str = "Connector", variable: str = "Problem") -> dict[str, Any]:
    return {
        "eventId": 1,
        "timestamp": T,
        "trigger": trigger,
        "actualValue": "true",
        "eventNotificationType": "HardWiredMonitor",
        "component": {"name": component},
        "variable": {"name": variable},
    }


#: A typical, schema-valid request of each action, with what the controller keeps of it.
SAMPLES: dict[str, tuple[dict[str, Any], Disposition, str | None]] = {
    "Authorize": ({"idToken": TOKEN}, Disposition.DROP, None),
    "BootNotification": (
        {"chargingStation": {"model": "M1", "vendorName": "Acme"}, "reason": "PowerUp"},
        Disposition.LATEST,
        "BootNotification",
    ),
    "ClearedChargingLimit": ({"chargingLimitSource": "EMS", "evseId": 1}, Disposition.LATEST, "ChargingLimit/EMS/1"),
    "DataTransfer": ({"vendorId": "com.acme", "messageId": "x", "data": "y"}, Disposition.DROP, None),
    "FirmwareStatusNotification": (
        {"status": "Downloading", "requestId": 1},
        Disposition.LATEST,
        "FirmwareStatusNotification",
    ),
    "Get15118EVCertificate": (
        {"iso15118SchemaVersion": "urn:iso:15118:2:2013:MsgDef", "action": "Install", "exiRequest": "gAB="},
        Disposition.DROP,
        None,
    ),
    "GetCertificateStatus": (
        {
            "ocspRequestData": {
                "hashAlgorithm": "SHA256",
                "issuerNameHash": "a1",
                "issuerKeyHash": "b2",
                "serialNumber": "c3",
                "responderURL": "http://ocsp.example",
            }
        },
        Disposition.DROP,
        None,
    ),
    "Heartbeat": ({}, Disposition.DROP, None),
    "LogStatusNotification": ({"status": "Uploading", "requestId": 2}, Disposition.LATEST, "LogStatusNotification"),
    "MeterValues": (
        {"evseId": 1, "meterValue": [{"timestamp": T, "sampledValue": [{"value": 1234.5}]}]},
        Disposition.QUEUE,
        None,
    ),
    "NotifyChargingLimit": (
        {"chargingLimit": {"chargingLimitSource": "EMS"}, "evseId": 1},
        Disposition.LATEST,
        "ChargingLimit/EMS/1",
    ),
    "NotifyCustomerInformation": (
        {"data": "name: J. Doe", "seqNo": 0, "generatedAt": T, "requestId": 3},
        Disposition.QUEUE,
        None,
    ),
    "NotifyDisplayMessages": ({"requestId": 4}, Disposition.QUEUE, None),
    "NotifyEVChargingNeeds": (
        {"evseId": 1, "chargingNeeds": {"requestedEnergyTransfer": "AC_three_phase"}},
        Disposition.DROP,
        None,
    ),
    "NotifyEVChargingSchedule": (
        {"timeBase": T, "evseId": 1, "chargingSchedule": SCHEDULE},
        Disposition.LATEST,
        "NotifyEVChargingSchedule/1",
    ),
    "NotifyEvent": ({"generatedAt": T, "seqNo": 0, "eventData": [event("Alerting")]}, Disposition.QUEUE, None),
    "NotifyMonitoringReport": ({"requestId": 5, "seqNo": 0, "generatedAt": T}, Disposition.QUEUE, None),
    "NotifyReport": ({"requestId": 6, "generatedAt": T, "seqNo": 0}, Disposition.QUEUE, None),
    "PublishFirmwareStatusNotification": (
        {"status": "Published", "location": ["http://lc.local/firmware/f.bin"], "requestId": 7},
        Disposition.LATEST,
        "PublishFirmwareStatusNotification",
    ),
    "ReportChargingProfiles": (
        {"requestId": 8, "chargingLimitSource": "CSO", "evseId": 1, "chargingProfile": [PROFILE]},
        Disposition.QUEUE,
        None,
    ),
    "ReservationStatusUpdate": (
        {"reservationId": 9, "reservationUpdateStatus": "Expired"},
        Disposition.LATEST,
        "ReservationStatusUpdate/9",
    ),
    "SecurityEventNotification": ({"type": "FirmwareUpdated", "timestamp": T}, Disposition.QUEUE, None),
    "SignCertificate": (
        {"csr": "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----"},
        Disposition.LATEST,
        "SignCertificate/-",
    ),
    "StatusNotification": (
        {"timestamp": T, "connectorStatus": "Occupied", "evseId": 1, "connectorId": 2},
        Disposition.LATEST,
        "StatusNotification/1/2",
    ),
    "TransactionEvent": (
        {
            "eventType": "Started",
            "timestamp": T,
            "triggerReason": "Authorized",
            "seqNo": 0,
            "transactionInfo": {"transactionId": "tx-1"},
            "idToken": TOKEN,
            "evse": {"id": 1, "connectorId": 1},
        },
        Disposition.QUEUE,
        None,
    ),
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as opened:
        yield opened


def make_responder(store: Store, policy: UnknownIdTokenPolicy = "reject") -> LocalResponder:
    boots = BootCache(store.namespace("autonomy.boot"))
    boots.learn("CS1", {"status": "Accepted", "interval": 300, "currentTime": T})
    auth = AuthCache(
        store.namespace("autonomy.auth"),
        max_entries=100,
        lifetime_s=86_400,
        unknown_id_tokens=policy,
        wall_clock=lambda: NOW,
    )
    return LocalResponder(boots, auth, wall_clock=lambda: NOW)


def assert_callerror_is_valid(reply: LocalReply) -> None:
    assert reply.result is None and reply.error_code is not None and reply.disposition is Disposition.DROP
    validate_frame(json.dumps([4, "m1", reply.error_code, reply.error_description, {}]))


def test_the_samples_cover_every_call_a_station_sends() -> None:
    assert set(SAMPLES) == STATION_ACTIONS and len(STATION_ACTIONS) == 25


@pytest.mark.parametrize("action", sorted(SAMPLES))
def test_every_station_call_gets_a_schema_valid_answer_and_a_fate(store: Store, action: str) -> None:
    payload, disposition, key = SAMPLES[action]
    validate_call(action, payload)  # the sample is what a real station could send
    reply = make_responder(store).answer("CS1", action, payload)
    assert reply.error_code is None, reply.error_description
    assert reply.result is not None
    validate_result(action, reply.result)
    assert (reply.disposition, reply.latest_key) == (disposition, key)


def _documented_fates() -> dict[str, str]:
    """The 'kept' column of the table in the responder's docstring, per action (its first line)."""
    doc = responder_module.__doc__ or ""
    header = next(line for line in doc.splitlines() if line.startswith("action "))
    column = header.index("kept")
    fates = {}
    for line in doc.splitlines():
        name = line.split(" ", 1)[0]
        if name in STATION_ACTIONS:
            fates[name] = line[column:].split()[0]
    return fates


def test_the_documented_table_says_what_the_responder_does() -> None:
    fates = _documented_fates()
    assert set(fates) == STATION_ACTIONS
    assert {action: fate for action, (_, fate, _) in SAMPLES.items()} == fates


def test_a_known_station_booting_is_accepted_with_the_interval_its_csms_gave(store: Store) -> None:
    reply = make_responder(store).answer("CS1", "BootNotification", SAMPLES["BootNotification"][0])
    assert reply.result == {"currentTime": "2025-06-01T12:30:15.250Z", "interval": 300, "status": "Accepted"}


def test_a_station_the_csms_never_accepted_is_pending_and_may_do_nothing_else(store: Store) -> None:
    responder = make_responder(store)
    boot = responder.answer("NEW1", "BootNotification", SAMPLES["BootNotification"][0])
    assert boot.result == {"currentTime": "2025-06-01T12:30:15.250Z", "interval": 60, "status": "Pending"}  # B02
    assert boot.disposition is Disposition.DROP  # it boots again once the CSMS is back (B02.FR.08)
    validate_result("BootNotification", boot.result)
    for action, (payload, _, _) in SAMPLES.items():
        if (
            action == "BootNotification" or action in SENT_WHILE_PENDING
        ):  # see test_a_station_not_yet_accepted_sending_the_report
            continue
        reply = responder.answer("NEW1", action, payload)
        # B02.FR.09: SecurityError, so no transaction starts through us and the station keeps its message.
        assert reply.error_code == "SecurityError", action
        assert_callerror_is_valid(reply)


def test_heartbeat_tells_the_time_of_the_injected_clock(store: Store) -> None:
    assert make_responder(store).answer("CS1", "Heartbeat", {}).result == {"currentTime": "2025-06-01T12:30:15.250Z"}


@pytest.mark.parametrize(
    ("action", "code"), [("Reset", "NotSupported"), ("GetVariables", "NotSupported"), ("MakeCoffee", "NotImplemented")]
)
def test_a_call_a_station_does_not_send_gets_the_rpc_error_for_it(store: Store, action: str, code: str) -> None:
    reply = make_responder(store).answer("CS1", action, {})
    assert reply.error_code == code
    assert_callerror_is_valid(reply)


@pytest.mark.parametrize(
    ("action", "payload", "code"),
    [
        ("StatusNotification", {"timestamp": T, "connectorStatus": "Occupied", "evseId": 1}, "OccurrenceConstraint"),
        ("StatusNotification", {"connectorStatus": "Occupied", "evseId": "1", "connectorId": 1}, "TypeConstraint"),
        ("TransactionEvent", {**SAMPLES["TransactionEvent"][0], "idToken": "AA11"}, "TypeConstraint"),
        ("TransactionEvent", {**SAMPLES["TransactionEvent"][0], "transactionInfo": {}}, "OccurrenceConstraint"),
        ("Authorize", {"idToken": {"idToken": "A" * 37, "type": "ISO14443"}}, "PropertyConstraint"),
        ("Authorize", {}, "OccurrenceConstraint"),
        ("MeterValues", {"evseId": 1, "meterValue": []}, "OccurrenceConstraint"),
        ("NotifyEvent", {"generatedAt": T, "seqNo": 0, "eventData": ["x"]}, "TypeConstraint"),
        ("BootNotification", {"reason": "PowerUp"}, "OccurrenceConstraint"),
    ],
)
def test_a_bad_payload_gets_the_ocpp_j_error_for_it(store: Store, action: str, payload: Any, code: str) -> None:
    reply = make_responder(store).answer("CS1", action, payload)
    assert reply.error_code == f"{code}Violation"
    assert_callerror_is_valid(reply)
    assert re.match(rf"{action}: ", reply.error_description)


def test_a_transaction_is_answered_from_the_authorization_cache(store: Store) -> None:
    responder = make_responder(store)
    started = SAMPLES["TransactionEvent"][0]
    assert responder.answer("CS1", "TransactionEvent", started).result == {"idTokenInfo": {"status": "Unknown"}}
    responder._auth.learn("CS9", TOKEN, {"status": "Accepted", "groupIdToken": {"idToken": "G", "type": "Central"}})
    reply = responder.answer("CS1", "TransactionEvent", started)
    assert reply.result == {"idTokenInfo": {"status": "Accepted", "groupIdToken": {"idToken": "G", "type": "Central"}}}
    assert reply.authorization is not None and reply.authorization.outcome == "cached"
    assert reply.disposition is Disposition.QUEUE
    updated = {**started, "eventType": "Updated", "seqNo": 1, "triggerReason": "MeterValuePeriodic"}
    del updated["idToken"]
    no_token = responder.answer("CS1", "TransactionEvent", updated)
    assert no_token.result == {} and no_token.authorization is None  # no idToken: no idTokenInfo (E01.FR.12)


def test_unknown_tokens_follow_the_policy_in_authorize_and_transactions(store: Store) -> None:
    responder = make_responder(store, "accept")
    for action in ("Authorize", "TransactionEvent"):
        reply = responder.answer("CS1", action, SAMPLES[action][0])
        assert reply.result is not None and reply.result["idTokenInfo"]["status"] == "Accepted"
        validate_result(action, reply.result)


def test_state_messages_are_kept_per_connector_limit_and_monitored_variable(store: Store) -> None:
    responder = make_responder(store)

    def key(action: str, payload: dict[str, Any]) -> str | None:
        reply = responder.answer("CS1", action, payload)
        assert reply.result is not None
        validate_result(action, reply.result)
        return reply.latest_key if reply.disposition is Disposition.LATEST else reply.disposition.value

    status = SAMPLES["StatusNotification"][0]
    assert key("StatusNotification", status) != key("StatusNotification", {**status, "connectorId": 1})
    # A limit notified then cleared: one key, so only the newest of the two reaches the CSMS.
    assert key("NotifyChargingLimit", {"chargingLimit": {"chargingLimitSource": "SO"}}) == key(
        "ClearedChargingLimit", {"chargingLimitSource": "SO"}
    )
    periodic = {"generatedAt": T, "seqNo": 0, "eventData": [event("Periodic")]}
    first = key("NotifyEvent", periodic)
    assert first is not None and first.startswith("NotifyEvent/")
    assert key("NotifyEvent", {**periodic, "generatedAt": "2025-06-01T12:45:00Z"}) == first
    assert key("NotifyEvent", {**periodic, "eventData": [event("Periodic", variable="Temperature")]}) != first
    mixed = {**periodic, "eventData": [event("Periodic"), event("Delta")]}
    assert key("NotifyEvent", mixed) == "queue"  # a change of state is an event the CSMS must see (N07.FR.04)


@pytest.mark.parametrize("verdict", [None, "Pending"])
def test_a_station_not_yet_accepted_sending_the_report_the_csms_asked_for_gets_it_answered_and_kept(
    store: Store, verdict: str | None
) -> None:
    # #12 leftover B. B02.FR.02: a station not yet accepted may still send what the CSMS asked for with
    # GetBaseReport or GetReport, and B02.FR.09 / B01.FR.10 exempt exactly those from the CSMS's
    # SecurityError. A NotifyReport is only ever sent in answer to one of them (B07.FR.03, B08.FR.03), so
    # refusing it would make the station drop a part of the report the CSMS is waiting for.
    if verdict is not None:  # told Pending by the CSMS itself before it went (else: never seen by it)
        BootCache(store.namespace("autonomy.boot")).learn("NEW1", {"status": verdict, "interval": 30})
    responder = make_responder(store)  # its boot cache reads the store
    assert responder.answer("NEW1", "BootNotification", SAMPLES["BootNotification"][0]).result["status"] == "Pending"
    payload, disposition, _ = SAMPLES["NotifyReport"]
    validate_call("NotifyReport", payload)
    reply = responder.answer("NEW1", "NotifyReport", payload)
    assert reply.error_code is None, reply.error_description
    assert reply.result is not None
    validate_result("NotifyReport", reply.result)
    assert reply.disposition is disposition is Disposition.QUEUE  # the CSMS gets the part on restore
