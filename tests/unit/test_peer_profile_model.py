"""The station peer's own profile model (tests/peers/profiles.py): the yardstick of the balancing
end-to-end tests must itself read profiles the way Part 2 K01 says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.peers.profiles import OWN_DEFAULT, ProfileModel

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def profile(
    profile_id: int, purpose: str, limit: float, *, stack_level: int = 8, valid_to: datetime | None = None, **extra: Any
) -> dict[str, Any]:
    found: dict[str, Any] = {
        "id": profile_id,
        "stackLevel": stack_level,
        "chargingProfilePurpose": purpose,
        "chargingProfileKind": "Relative",
        "chargingSchedule": [
            {"id": 1, "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}]}
        ],
        **extra,
    }
    if valid_to is not None:
        found["validTo"] = stamp(valid_to)
    return found


def test_a_tx_profile_governs_only_its_running_transaction_and_a_lapsed_profile_no_longer_applies() -> None:
    model = ProfileModel()
    model.install(1, profile(3, "TxDefaultProfile", 6.0, valid_to=T0 + timedelta(seconds=100)), T0)
    model.install(1, profile(2, "TxProfile", 16.0, valid_to=T0 + timedelta(seconds=60), transactionId="TX"), T0)
    assert model.limit(1, T0).profile_id == 3  # K01.FR.04: no such transaction runs (yet)
    model.transaction_started(1, "TX", T0)
    assert (model.limit(1, T0).limit, model.limit(1, T0).profile_id) == (16.0, 2)  # TxProfile over TxDefaultProfile
    assert model.next_change(T0) == T0 + timedelta(seconds=60)
    # K01.FR.37: valid while now < validTo; at validTo the default profile governs, then nothing of ours.
    assert model.limit(1, T0 + timedelta(seconds=60)).profile_id == 3
    assert model.next_change(T0 + timedelta(seconds=60)) == T0 + timedelta(seconds=100)
    assert model.limit(1, T0 + timedelta(seconds=100)) == OWN_DEFAULT


def test_the_higher_stack_level_wins_the_same_id_replaces_and_a_clear_by_id_removes() -> None:
    model = ProfileModel()
    model.install(1, profile(10, "TxDefaultProfile", 10.0, stack_level=1), T0)
    model.install(1, profile(11, "TxDefaultProfile", 8.0, stack_level=2), T0)
    assert model.limit(1, T0).limit == 8.0  # K01.FR.17
    model.install(1, profile(11, "TxDefaultProfile", 4.0, stack_level=2), T0)  # K01.FR.05
    assert model.limit(1, T0).limit == 4.0
    assert model.clear({"chargingProfileId": 11}) == [11]
    assert model.limit(1, T0).limit == 10.0
    assert model.clear({"chargingProfileId": 99}) == []
    model.install(0, profile(20, "ChargingStationMaxProfile", 7.0, stack_level=0), T0)
    assert model.limit(1, T0).limit == 7.0  # the station's maximum caps the EVSE


def test_a_tx_profile_goes_with_its_transaction() -> None:
    model = ProfileModel()
    model.transaction_started(1, "TX", T0)
    model.install(1, profile(2, "TxProfile", 16.0, transactionId="TX"), T0)
    model.transaction_ended("TX")
    assert model.limit(1, T0) == OWN_DEFAULT
    assert model.profiles == {}
