"""The seam the link calls while a station is local: the answer leaves only once what it promises is on
disk; a full queue or a failing disk turns into a CALLERROR the station can retry; the replay helpers;
and the ``[autonomy]`` settings an installer writes."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from router.autonomy.auth_cache import AuthCache
from router.autonomy.boot_cache import BootCache
from router.autonomy.local import LocalService
from router.autonomy.queue import ReplayQueue, StationMessage
from router.autonomy.replay import partition_latest, refused_after_local_accept, replay_payload
from router.autonomy.responder import LocalResponder
from router.autonomy.settings import AutonomySettings
from router.store import Store
from tests.support.schemas import validate_call, validate_frame, validate_result

NOW = datetime.datetime(2025, 6, 1, 12, 30, tzinfo=datetime.UTC)
T = "2025-06-01T12:30:00Z"
TOKEN = {"idToken": "AA11", "type": "ISO14443"}


def transaction_event(seq_no: int, event_type: str = "Updated", **extra: Any) -> dict[str, Any]:
    payload = {
        "eventType": event_type,
        "timestamp": T,
        "triggerReason": "MeterValuePeriodic" if event_type == "Updated" else "Authorized",
        "seqNo": seq_no,
        "transactionInfo": {"transactionId": "tx-1"},
        **extra,
    }
    validate_call("TransactionEvent", payload)
    return payload


STATUS = {"timestamp": T, "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store.open(state_dir) as opened:
        yield opened


def service_on(store: Store, max_messages: int = 100) -> LocalService:
    boots = BootCache(store.namespace("autonomy.boot"))
    for station_id in ("CS1", "CS2"):
        boots.learn(station_id, {"status": "Accepted", "interval": 300, "currentTime": T})
    auth = AuthCache(
        store.namespace("autonomy.auth"),
        max_entries=100,
        lifetime_s=86_400,
        unknown_id_tokens="accept",
        wall_clock=lambda: NOW,
    )
    queue = ReplayQueue(store, max_messages_per_station=max_messages, max_bytes=10_000_000)
    return LocalService(LocalResponder(boots, auth, wall_clock=lambda: NOW), queue, wall_clock=lambda: NOW)


def test_a_queued_transaction_event_is_on_disk_when_the_answer_is_handed_back(store: Store, state_dir: Path) -> None:
    service = service_on(store)
    handled = service.handle("CS1", "st-1", "TransactionEvent", transaction_event(0, "Started", idToken=TOKEN))
    assert handled.kept == "queued" and handled.seq is not None
    assert handled.reply.result is not None
    validate_result("TransactionEvent", handled.reply.result)
    store.close()  # as good as a kill -9 here: every call of the store is committed when it returns
    with Store.open(state_dir) as reopened:
        [entry] = ReplayQueue(reopened, max_messages_per_station=100, max_bytes=10_000_000).peek("CS1")
    assert entry.seq == handled.seq
    assert entry.message == StationMessage(
        "TransactionEvent",
        transaction_event(0, "Started", idToken=TOKEN),
        "st-1",
        "2025-06-01T12:30:00.000Z",
        "Accepted",
    )


def test_state_is_kept_as_latest_and_heartbeats_are_not_kept(store: Store) -> None:
    service = service_on(store)
    assert service.handle("CS1", "s1", "StatusNotification", STATUS).kept == "latest"
    assert (
        service.handle("CS1", "s2", "StatusNotification", {**STATUS, "connectorStatus": "Available"}).kept == "latest"
    )
    assert service.handle("CS1", "h1", "Heartbeat", {}).kept == "dropped"
    [latest] = service.queue.latest("CS1")
    assert latest.message.payload["connectorStatus"] == "Available"
    assert service.queue.queued_messages("CS1") == 0


def test_a_station_flooding_its_queue_is_refused_with_a_callerror_and_others_are_unaffected(store: Store) -> None:
    service = service_on(store, max_messages=100)
    for seq_no in range(100):
        assert service.handle("CS1", f"m{seq_no}", "TransactionEvent", transaction_event(seq_no)).kept == "queued"
    refused = service.handle("CS1", "m100", "TransactionEvent", transaction_event(100))
    assert refused.kept == "queue_full"
    assert refused.reply.error_code == "InternalError" and "full" in refused.reply.error_description
    validate_frame(json.dumps([4, "m100", refused.reply.error_code, refused.reply.error_description, {}]))
    assert service.queue.queued_messages("CS1") == 100  # nothing half-stored
    # Calls that keep nothing are still answered; another station's queue still takes its messages.
    assert service.handle("CS1", "h", "Heartbeat", {}).reply.result is not None
    assert service.handle("CS2", "m0", "TransactionEvent", transaction_event(0)).kept == "queued"


def test_a_failing_store_is_a_callerror_not_a_false_promise(store: Store) -> None:
    service = service_on(store)
    store.close()  # the disk is gone: every write fails
    handled = service.handle("CS1", "m0", "TransactionEvent", transaction_event(0))
    assert handled.kept == "store_failed" and handled.reply.error_code == "InternalError"
    assert handled.reply.result is None


# -- replay helpers -----------------------------------------------------------------------------


def kept(action: str, payload: dict[str, Any], local_status: str | None = None) -> StationMessage:
    return StationMessage(action, payload, "m1", T, local_status)


def test_replayed_transaction_events_say_they_happened_offline_and_keep_everything_else() -> None:
    original = transaction_event(4, idToken=TOKEN)
    replayed = replay_payload(kept("TransactionEvent", original))
    validate_call("TransactionEvent", replayed)
    assert replayed == {**original, "offline": True}  # E04.FR.03; seqNo untouched, so a repeat is spotted
    assert replay_payload(kept("TransactionEvent", original), mark_offline=False) == original
    assert replay_payload(kept("StatusNotification", STATUS)) == STATUS


def test_a_token_accepted_locally_and_refused_by_the_csms_names_the_transaction_to_stop() -> None:
    started = kept("TransactionEvent", transaction_event(0, "Started", idToken=TOKEN), "Accepted")
    assert refused_after_local_accept(started, {"idTokenInfo": {"status": "Invalid"}}) == "tx-1"
    assert refused_after_local_accept(started, {"idTokenInfo": {"status": "Accepted"}}) is None
    assert refused_after_local_accept(started, {}) is None
    refused_locally = kept("TransactionEvent", transaction_event(0, "Started", idToken=TOKEN), "Unknown")
    assert refused_after_local_accept(refused_locally, {"idTokenInfo": {"status": "Invalid"}}) is None
    ended = kept("TransactionEvent", transaction_event(5, "Ended", idToken=TOKEN), "Accepted")
    assert refused_after_local_accept(ended, {"idTokenInfo": {"status": "Invalid"}}) is None  # nothing left to stop


def test_a_boot_is_replayed_before_the_queue_and_other_state_after_it(store: Store) -> None:
    service = service_on(store)
    service.handle("CS1", "s1", "StatusNotification", STATUS)
    boot = {"chargingStation": {"model": "M1", "vendorName": "Acme"}, "reason": "PowerUp"}
    service.handle("CS1", "b1", "BootNotification", boot)
    service.handle("CS1", "r1", "ReservationStatusUpdate", {"reservationId": 3, "reservationUpdateStatus": "Expired"})
    before, after = partition_latest(service.queue.latest("CS1"))
    assert [entry.message.action for entry in before] == ["BootNotification"]
    assert [entry.message.action for entry in after] == ["StatusNotification", "ReservationStatusUpdate"]


# -- settings -----------------------------------------------------------------------------------


def test_autonomy_is_on_by_default_with_bounded_disk_use() -> None:
    settings = AutonomySettings()
    assert settings.enabled is True and settings.unknown_id_tokens == "reject"
    assert settings.stop_invalid_transactions is False
    assert settings.queue_max_bytes == 256 * 1024 * 1024


def test_every_setting_has_a_description_with_its_unit_and_bounds() -> None:
    for name, field in AutonomySettings.model_fields.items():
        description = field.description or ""
        assert "(" in description and description.endswith(")"), name
        if field.annotation in (int, float):
            bounds = {type(item).__name__ for item in field.metadata}
            assert {"Ge", "Le"} <= bounds, name


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"unknown_id_tokens": "maybe"}, "unknown_id_tokens"),
        ({"queue_max_bytes": 1000}, "queue_max_bytes"),
        ({"max_offline_s": "3600"}, "max_offline_s"),  # strict: a string is not a number
        ({"reconnect_rate_per_s": 0}, "reconnect_rate_per_s"),
        ({"queue_max_message_per_station": 10}, "queue_max_message_per_station"),  # a typo is an error
    ],
)
def test_a_wrong_setting_is_refused_naming_the_key(table: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        AutonomySettings.model_validate(table)
    assert [error["loc"] for error in refused.value.errors()] == [(field,)]
