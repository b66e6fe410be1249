"""The authorization cache a site answers from during an outage: what the CSMS said (C10), how long that
holds, what an unknown token gets (the installer's policy), and that it survives a restart."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.autonomy.auth_cache import AuthCache
from router.autonomy.boot_cache import BootCache
from router.autonomy.settings import UnknownIdTokenPolicy
from router.store import STATE_FILE, Store
from tests.support.schemas import validate_result

START = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=datetime.UTC)
DAY_S = 86_400


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += datetime.timedelta(seconds=seconds)


def token(value: str, kind: str = "ISO14443") -> dict[str, Any]:
    return {"idToken": value, "type": kind}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store.open(state_dir) as opened:
        yield opened


@pytest.fixture
def clock() -> Clock:
    return Clock()


def cache_on(store: Store, clock: Clock, policy: UnknownIdTokenPolicy = "reject", max_entries: int = 100) -> AuthCache:
    return AuthCache(
        store.namespace("autonomy.auth"),
        max_entries=max_entries,
        lifetime_s=30 * DAY_S,
        unknown_id_tokens=policy,
        wall_clock=clock,
    )


def answered(cache: AuthCache, value: str, station_id: str = "CS1") -> dict[str, Any]:
    info = cache.authorize(station_id, token(value)).id_token_info
    validate_result("Authorize", {"idTokenInfo": info})
    return info


def test_a_token_the_csms_accepted_is_accepted_with_its_group_and_priority(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock)
    cache.learn_from_exchange(
        "CS1",
        "Authorize",
        {"idToken": token("AA11")},
        {
            "idTokenInfo": {
                "status": "Accepted",
                "groupIdToken": token("FLEET", "Central"),
                "chargingPriority": 3,
                "personalMessage": {"format": "UTF8", "content": "balance 12.30 EUR"},
            }
        },
    )
    local = cache.authorize("CS2", token("AA11"))  # learned at one station, good at any (a site cache)
    assert local.outcome == "cached" and local.status == "Accepted"
    assert local.id_token_info == {
        "status": "Accepted",
        "groupIdToken": token("FLEET", "Central"),
        "chargingPriority": 3,
    }
    # C10.FR.09: nothing tariff-like (the personal message could carry a balance) is kept.
    assert "personalMessage" not in local.id_token_info


def test_transaction_event_answers_teach_the_cache_too(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock)
    request = {"eventType": "Started", "idToken": token("BB22")}
    cache.learn_from_exchange("CS1", "TransactionEvent", request, {"idTokenInfo": {"status": "Blocked"}})  # C10.FR.05
    cache.learn_from_exchange("CS1", "Heartbeat", {"idToken": token("CC33")}, {"idTokenInfo": {"status": "Accepted"}})
    cache.learn_from_exchange("CS1", "TransactionEvent", {"idToken": token("DD44")}, {})  # no idTokenInfo: nothing
    assert answered(cache, "BB22") == {"status": "Blocked"}  # C10.FR.01: whatever the status
    assert answered(cache, "CC33") == {"status": "Unknown"}
    assert answered(cache, "DD44") == {"status": "Unknown"}


def test_a_newer_verdict_replaces_the_old_one(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock)
    cache.learn("CS1", token("AA11"), {"status": "Accepted"})
    cache.learn("CS1", token("AA11"), {"status": "Blocked"})
    assert answered(cache, "AA11") == {"status": "Blocked"}
    assert len(cache) == 1


@pytest.mark.parametrize(
    ("policy", "expected", "outcome"),
    [
        ("reject", {"status": "Unknown"}, "unknown_rejected"),
        ("accept", {"status": "Accepted", "cacheExpiryDateTime": "2025-06-01T12:00:00.000Z"}, "unknown_accepted"),
    ],
)
def test_an_unknown_token_gets_the_installers_policy(
    store: Store, clock: Clock, policy: UnknownIdTokenPolicy, expected: dict[str, Any], outcome: str
) -> None:
    cache = cache_on(store, clock, policy)
    local = cache.authorize("CS1", token("NEVER-SEEN"))
    assert local.id_token_info == expected and local.outcome == outcome
    validate_result("Authorize", {"idTokenInfo": local.id_token_info})
    assert len(cache) == 0  # a local verdict is not the CSMS's: nothing learned (C15.FR.01)


@pytest.mark.parametrize("kind", ["NoAuthorization", "Central"])
def test_tokens_nobody_checks_or_the_csms_issued_are_accepted(store: Store, clock: Clock, kind: str) -> None:
    local = cache_on(store, clock).authorize("CS1", token("" if kind == "NoAuthorization" else "REMOTE-1", kind))
    assert local.status == "Accepted" and local.outcome == "exempt"


def test_an_entry_expires_at_the_csmss_cache_expiry(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock)
    cache.learn("CS1", token("AA11"), {"status": "Accepted", "cacheExpiryDateTime": "2025-06-01T13:00:00Z"})
    clock.advance(3599)
    assert answered(cache, "AA11")["status"] == "Accepted"
    clock.advance(1)
    assert answered(cache, "AA11") == {"status": "Unknown"}  # C10.FR.13, C10.FR.10: removed, now unknown
    assert len(cache) == 0 and store.items("autonomy.auth") == {}


def test_without_an_expiry_an_entry_lasts_its_lifetime_after_it_was_last_seen(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock)
    cache.learn("CS1", token("AA11"), {"status": "Accepted"})
    clock.advance(29 * DAY_S)
    assert answered(cache, "AA11")["status"] == "Accepted"  # seen: the lifetime starts again (C10.FR.08)
    clock.advance(29 * DAY_S)
    assert answered(cache, "AA11")["status"] == "Accepted"
    clock.advance(30 * DAY_S + 1)
    assert answered(cache, "AA11") == {"status": "Unknown"}


def test_an_evse_bound_verdict_holds_only_at_the_station_it_came_from(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock)
    cache.learn("CS1", token("AA11"), {"status": "Accepted", "evseId": [2]})
    assert answered(cache, "AA11", "CS1") == {"status": "Accepted", "evseId": [2]}
    assert answered(cache, "AA11", "CS2") == {"status": "Unknown"}


def test_the_cache_survives_a_restart(store: Store, clock: Clock, state_dir: Path) -> None:
    cache = cache_on(store, clock)
    cache.learn("CS1", token("AA11"), {"status": "Accepted", "groupIdToken": token("G1")})
    cache.learn("CS1", token("BB22"), {"status": "Invalid"})
    store.close()
    with Store.open(state_dir) as reopened:
        again = cache_on(reopened, clock)
        assert answered(again, "AA11") == {"status": "Accepted", "groupIdToken": token("G1")}
        assert answered(again, "BB22") == {"status": "Invalid"}


def test_no_id_token_is_written_in_clear(store: Store, clock: Clock, state_dir: Path) -> None:
    cache = cache_on(store, clock)
    cache.learn("CS1", token("04A2B3C4D5E6F7"), {"status": "Accepted"})
    store.close()
    stored = b"".join(path.read_bytes() for path in state_dir.iterdir() if path.name.startswith(STATE_FILE))
    assert b"04A2B3C4D5E6F7" not in stored  # C10.FR.12
    with Store.open(state_dir) as reopened:
        assert answered(cache_on(reopened, clock), "04A2B3C4D5E6F7")["status"] == "Accepted"


def test_a_full_cache_forgets_the_least_recently_seen_token(store: Store, clock: Clock, state_dir: Path) -> None:
    cache = cache_on(store, clock, "accept", max_entries=3)
    for value in ("A", "B", "C"):
        cache.learn("CS1", token(value), {"status": "Accepted"})
        clock.advance(60)
    answered(cache, "A")  # seen again: now the most recent
    cache.learn("CS1", token("D"), {"status": "Accepted"})  # C10.FR.07: room is made, the new one is kept
    assert len(cache) == 3
    assert cache.authorize("CS1", token("B")).outcome == "unknown_accepted"
    assert all(cache.authorize("CS1", token(value)).outcome == "cached" for value in ("A", "C", "D"))
    store.close()
    with Store.open(state_dir) as reopened:  # the order of use survives a restart
        again = cache_on(reopened, clock, "accept", max_entries=3)
        again.learn("CS1", token("E"), {"status": "Accepted"})
        assert again.authorize("CS1", token("A")).outcome == "unknown_accepted"


def test_when_unknown_tokens_are_rejected_refusals_are_forgotten_first(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock, "reject", max_entries=2)
    cache.learn("CS1", token("A"), {"status": "Accepted"})
    clock.advance(60)
    cache.learn("CS1", token("BLOCKED"), {"status": "Blocked"})  # newer than A, yet it goes first
    clock.advance(60)
    cache.learn("CS1", token("B"), {"status": "Accepted"})
    assert answered(cache, "A")["status"] == answered(cache, "B")["status"] == "Accepted"
    assert answered(cache, "BLOCKED") == {"status": "Unknown"}  # refused either way


def test_a_cache_of_size_zero_knows_nothing(store: Store, clock: Clock) -> None:
    cache = cache_on(store, clock, max_entries=0)
    cache.learn("CS1", token("A"), {"status": "Accepted"})
    assert answered(cache, "A") == {"status": "Unknown"}


# -- boot cache ---------------------------------------------------------------------------------


def test_the_boot_cache_remembers_the_csmss_last_verdict_per_station(store: Store, state_dir: Path) -> None:
    boots = BootCache(store.namespace("autonomy.boot"))
    boots.learn("CS1", {"status": "Accepted", "interval": 300, "currentTime": "2025-06-01T12:00:00Z"})
    boots.learn("CS2", {"status": "Accepted", "interval": 60, "currentTime": "2025-06-01T12:00:00Z"})
    boots.learn("CS2", {"status": "Rejected", "interval": 600, "currentTime": "2025-06-01T12:00:00Z"})
    boots.learn("CS1", {"status": "Accepted"})  # not a usable answer: what was known stands
    assert boots.accepted_interval("CS1") == 300
    assert boots.accepted_interval("CS2") is None  # the CSMS's last word was not Accepted
    assert boots.accepted_interval("CS3") is None
    store.close()
    with Store.open(state_dir) as reopened:
        again = BootCache(reopened.namespace("autonomy.boot"))
        assert again.accepted_interval("CS1") == 300 and again.accepted_interval("CS2") is None
