"""The state store as the appliance sees it: values come back as written, across restarts; damage is
reported with the file and the way out, never papered over; recovery keeps the damaged file."""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from router.store import STATE_FILE, KeyValue, Queue, Store, StoreDamaged, StoreError

VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    -(2**63),
    1.5,
    -0.0,
    float("inf"),
    "",
    "Ladepunkt ⚡ 充电",
    b"",
    bytes(range(256)),
    [],
    [1, [2, [3, None]]],
    {},
    {"limit_amperes": 16.0, "phases": [1, 2, 3], "valid": True, "blob": b"\x00"},
    {1: "integer keys", 2: {"nested": [b"x", None]}},
]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store.open(state_dir) as opened:
        yield opened


def reopen(store: Store) -> Store:
    store.close()
    return Store.open(store.path.parent)


def assert_reported_plainly(error: StoreDamaged, state_dir: Path) -> None:
    """One line an installer can act on: the file, then what to do; no Python internals."""
    message = str(error)
    assert str(state_dir / STATE_FILE) in message
    assert "--recover-state" in message
    assert "\n" not in message
    assert not re.search(r"Traceback|Error\b|sqlite3\.|msgpack\.|<class", message), message
    assert error.path == state_dir / STATE_FILE


# -- values and namespaces ---------------------------------------------------------------------


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_every_msgpack_type_comes_back_as_written_after_a_restart(store: Store, value: Any) -> None:
    store.put("ns", "key", value)
    assert store.get("ns", "key") == value
    store = reopen(store)
    try:
        restored = store.get("ns", "key")
    finally:
        store.close()
    assert restored == value
    assert type(restored) is type(value)


def test_tuples_come_back_as_lists(store: Store) -> None:
    store.put("ns", "pair", (1, "a"))
    assert store.get("ns", "pair") == [1, "a"]


def test_a_value_msgpack_cannot_encode_is_refused_and_nothing_of_the_batch_is_stored(store: Store) -> None:
    with pytest.raises(TypeError, match=r"'bad'.*'ns'"):
        store.put_many("ns", {"good": 1, "bad": object()})
    with pytest.raises(TypeError, match="'huge'"):
        store.put("ns", "huge", 2**70)
    assert store.items("ns") == {}


def test_a_missing_key_gives_the_default(store: Store) -> None:
    assert store.get("ns", "absent") is None
    assert store.get("ns", "absent", {"fallback": 1}) == {"fallback": 1}


def test_namespaces_do_not_see_each_other(store: Store) -> None:
    store.put("balancing", "limit", 32)
    store.put("firmware", "limit", "other")
    assert store.get("balancing", "limit") == 32
    assert store.get("firmware", "limit") == "other"
    assert store.delete("firmware", "limit") is True
    assert store.get("balancing", "limit") == 32
    assert store.items("balancing") == {"limit": 32}
    assert store.items("firmware") == {}


def test_put_replaces_and_delete_says_whether_the_key_was_there(store: Store) -> None:
    store.put("ns", "k", 1)
    store.put("ns", "k", 2)
    assert store.get("ns", "k") == 2
    assert store.delete("ns", "k") is True
    assert store.delete("ns", "k") is False
    assert store.get("ns", "k", "gone") == "gone"


def test_items_survive_a_restart(store: Store) -> None:
    store.put_many("site", {"b": [2], "a": {"x": 1}, "c": None})
    store.delete("site", "c")
    store = reopen(store)
    try:
        assert store.items("site") == {"a": {"x": 1}, "b": [2]}
    finally:
        store.close()


def test_a_component_gets_only_its_own_namespace(store: Store) -> None:
    balancing: KeyValue = store.namespace("balancing")
    balancing.put_many({"ems_limit_watts": 11_000, "profile_ids": [900, 901]})
    balancing.put("failsafe_watts", 4_000)
    store.put("firmware", "ems_limit_watts", "not balancing's")
    assert balancing.get("ems_limit_watts") == 11_000
    assert balancing.items() == {"ems_limit_watts": 11_000, "failsafe_watts": 4_000, "profile_ids": [900, 901]}
    assert balancing.delete("failsafe_watts") is True
    assert store.items("balancing") == {"ems_limit_watts": 11_000, "profile_ids": [900, 901]}


def test_keys_must_be_text(store: Store) -> None:
    with pytest.raises(TypeError, match="str"):
        store.put("ns", 1, "x")  # type: ignore[arg-type]


# -- outboxes ----------------------------------------------------------------------------------


def test_outbox_keeps_order_across_a_restart(store: Store) -> None:
    outbox: Queue = store.outbox("upstream")
    items = [{"action": "NotifyChargingLimit", "n": n} for n in range(5)]
    seqs = [outbox.append(item) for item in items]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    store = reopen(store)
    try:
        outbox = store.outbox("upstream")
        assert outbox.peek(10) == list(zip(seqs, items, strict=True))
        assert len(outbox) == 5
    finally:
        store.close()


def test_peek_does_not_remove_and_ack_removes_only_that_entry(store: Store) -> None:
    outbox = store.outbox("upstream")
    first, second, third = (outbox.append(name) for name in ("first", "second", "third"))
    assert outbox.peek() == [(first, "first")]
    assert outbox.peek() == [(first, "first")]
    outbox.ack(second)
    assert outbox.peek(10) == [(first, "first"), (third, "third")]
    outbox.ack(second)  # acking again (a retried delivery) changes nothing
    outbox.ack(first)
    assert outbox.peek(10) == [(third, "third")]
    assert len(outbox) == 1


def test_outboxes_are_separate(store: Store) -> None:
    limits, firmware = store.outbox("limits"), store.outbox("firmware")
    seq = limits.append("limit")
    firmware.append("status")
    firmware.ack(seq)  # another outbox's entry is not this one's to remove
    assert limits.peek() == [(seq, "limit")]
    assert firmware.peek() == [(seq + 1, "status")]


def test_sequence_numbers_keep_growing_after_the_outbox_was_emptied_and_reopened(store: Store) -> None:
    outbox = store.outbox("upstream")
    last = 0
    for _ in range(3):
        seq = outbox.append("x")
        outbox.ack(seq)
        assert seq > last
        last = seq
    store = reopen(store)
    try:
        assert store.outbox("upstream").append("y") > last
    finally:
        store.close()


def test_peek_needs_a_positive_limit(store: Store) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        store.outbox("upstream").peek(0)


# -- the file on disk --------------------------------------------------------------------------


def test_directory_and_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    state_dir = tmp_path / "deep" / "state"
    previous = os.umask(0)
    try:
        with Store.open(state_dir) as store:
            store.put("ns", "k", "v")  # creates the WAL
            files = {path.name: stat.S_IMODE(path.stat().st_mode) for path in state_dir.iterdir()}
    finally:
        os.umask(previous)
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert files == {STATE_FILE: 0o600, f"{STATE_FILE}-wal": 0o600}


def test_an_empty_file_left_by_a_crash_during_creation_opens_as_a_new_store(state_dir: Path) -> None:
    state_dir.mkdir()
    (state_dir / STATE_FILE).touch()
    with Store.open(state_dir) as store:
        store.put("ns", "k", 1)
        assert store.get("ns", "k") == 1


def test_a_second_opener_of_the_same_state_is_refused(store: Store, state_dir: Path) -> None:
    with pytest.raises(StoreError, match="in use by another process") as caught:
        Store.open(state_dir)
    assert not isinstance(caught.value, StoreDamaged)  # nothing to recover: the file is fine
    store.put("ns", "still", "works")
    assert store.get("ns", "still") == "works"


def test_a_closed_store_says_so(store: Store) -> None:
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("ns", "k")


def test_a_state_directory_that_is_a_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("oops")
    with pytest.raises(StoreError, match=re.escape(str(tmp_path / "state"))):
        Store.open(tmp_path / "state")


# -- damage ------------------------------------------------------------------------------------


def _filled(state_dir: Path) -> Path:
    """A closed store with enough rows for several pages; returns the file."""
    with Store.open(state_dir) as store:
        store.put_many("ns", {f"key{n}": {"n": n, "pad": "x" * 200} for n in range(300)})
        store.outbox("upstream").append("queued")
    return state_dir / STATE_FILE


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _random_bytes(path: Path) -> None:
    path.write_bytes(bytes((n * 7919 + 13) % 256 for n in range(8192)))


def _overwrite_a_page(path: Path) -> None:
    with path.open("r+b") as file:
        file.seek(4096 * 3)
        file.write(b"\xa5" * 4096)


def _raw(path: Path, sql: str, *args: Any) -> None:
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def _garbage_value(path: Path) -> None:
    _raw(path, "UPDATE kv SET value = ? WHERE key = 'key7'", b"\xc1\xc1")


def _value_cut_short(path: Path) -> None:
    _raw(path, "UPDATE kv SET value = ? WHERE key = 'key8'", msgpack.packb({"n": 8, "pad": "x" * 200})[:-10])


def _garbage_outbox_item(path: Path) -> None:
    _raw(path, "UPDATE outbox SET item = ?", b"\x92\x01")


def _foreign_database(path: Path) -> None:
    path.unlink()
    _raw(path, "CREATE TABLE photos (id INTEGER PRIMARY KEY, jpeg BLOB)")


def _newer_schema(path: Path) -> None:
    _raw(path, "UPDATE schema_version SET version = 99")


DAMAGE = {
    "truncated": (_truncate, "malformed"),
    "random bytes": (_random_bytes, "not a database"),
    "overwritten page": (_overwrite_a_page, "malformed|inconsistent"),
    "garbage msgpack": (_garbage_value, "key 'key7' of namespace 'ns' is not a readable msgpack value"),
    "msgpack cut short": (_value_cut_short, "key 'key8' of namespace 'ns'"),
    "garbage outbox item": (_garbage_outbox_item, "entry 1 of outbox 'upstream'"),
    "foreign database": (_foreign_database, "not an ocpp-lc state store"),
    "newer schema": (_newer_schema, "newer ocpp-lc .*schema 99"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_store_is_reported_with_the_file_and_the_way_out(state_dir: Path, damage: Any) -> None:
    spoil, reason = damage
    spoil(_filled(state_dir))
    with pytest.raises(StoreDamaged) as caught:
        Store.open(state_dir)
    assert_reported_plainly(caught.value, state_dir)
    assert re.search(reason, caught.value.reason), caught.value.reason


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_recovery_moves_the_damaged_file_aside_and_starts_empty(
    state_dir: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spoil, _ = damage
    path = _filled(state_dir)
    spoil(path)
    damaged_bytes = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="ocpp_lc.store"), Store.open(state_dir, recover=True) as store:
        assert store.items("ns") == {}
        assert len(store.outbox("upstream")) == 0
        store.put("ns", "fresh", 1)
    asides = [name for name in os.listdir(state_dir) if name != STATE_FILE]
    assert len(asides) == 1 and re.fullmatch(rf"{STATE_FILE}\.damaged-\d{{8}}T\d{{6}}Z", asides[0]), asides
    assert (state_dir / asides[0]).read_bytes() == damaged_bytes  # kept for a post-mortem, unchanged
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert asides[0] in caplog.text and "started empty" in caplog.text
    with Store.open(state_dir) as store:
        assert store.items("ns") == {"fresh": 1}


def test_recovering_twice_keeps_both_damaged_files(state_dir: Path) -> None:
    for _ in range(2):
        _random_bytes(_filled(state_dir))
        Store.open(state_dir, recover=True).close()
    assert len([name for name in os.listdir(state_dir) if ".damaged-" in name]) == 2


def test_recover_on_a_sound_store_keeps_everything(state_dir: Path) -> None:
    _filled(state_dir)
    with Store.open(state_dir, recover=True) as store:
        assert store.get("ns", "key299") == {"n": 299, "pad": "x" * 200}
        assert store.outbox("upstream").peek() == [(1, "queued")]
    assert os.listdir(state_dir) == [STATE_FILE]


def test_a_value_that_goes_bad_while_running_is_reported_on_read(store: Store, state_dir: Path) -> None:
    store.put("ns", "k", {"ok": True})
    store.outbox("upstream").append("queued")
    # Bit rot after the start-up check; only the store's own connection can write while it is open.
    assert store._db is not None
    store._db.execute("UPDATE kv SET value = x'c1'")
    store._db.execute("UPDATE outbox SET item = x'c1'")
    for read in (lambda: store.get("ns", "k"), lambda: store.items("ns"), lambda: store.outbox("upstream").peek()):
        with pytest.raises(StoreDamaged) as caught:
            read()
        assert_reported_plainly(caught.value, state_dir)
