"""The replay queue an outage leaves behind: in order, bounded, durable through restarts and kill -9,
and damage named like any damaged store (issue #12: "stored durably before the answer leaves")."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from router.autonomy.queue import QueueFull, ReplayQueue, StationMessage
from router.store import RECOVER_HINT, STATE_FILE, Store, StoreDamaged

REPO_ROOT = Path(__file__).resolve().parents[2]


def message(action: str = "TransactionEvent", n: int = 0, pad: int = 0, **payload: Any) -> StationMessage:
    return StationMessage(
        action=action,
        payload={"seqNo": n, "pad": "x" * pad, **payload},
        message_id=f"m{n}",
        received_at="2025-06-01T12:00:00.000Z",
        local_id_token_status="Accepted" if action == "TransactionEvent" else None,
    )


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state_dir: Path) -> Iterator[Store]:
    with Store.open(state_dir) as opened:
        yield opened


def queue_on(store: Store, **bounds: Any) -> ReplayQueue:
    return ReplayQueue(
        store, max_messages_per_station=bounds.get("messages", 100), max_bytes=bounds.get("bytes", 1_000_000)
    )


def test_messages_come_back_in_the_order_they_were_queued_per_station(store: Store) -> None:
    queue = queue_on(store)
    for n in range(5):
        queue.append("CS1", message(n=n))
        queue.append("CS2", message("NotifyReport", n=100 + n))
    assert [entry.message.payload["seqNo"] for entry in queue.peek("CS1", 10)] == [0, 1, 2, 3, 4]
    assert [entry.message.payload["seqNo"] for entry in queue.peek("CS2", 10)] == [100, 101, 102, 103, 104]
    first = queue.peek("CS1")[0]
    assert first.message == message(n=0)  # the station's own payload, untouched
    assert queue.stations() == ["CS1", "CS2"]


def test_ack_removes_only_the_delivered_entry_and_a_second_ack_does_nothing(store: Store) -> None:
    queue = queue_on(store)
    for n in range(3):
        queue.append("CS1", message(n=n, pad=100))
    bytes_before = queue.total_bytes
    oldest = queue.peek("CS1")[0]
    assert queue.ack(oldest) is True
    assert queue.ack(oldest) is False
    assert [entry.message.payload["seqNo"] for entry in queue.peek("CS1", 10)] == [1, 2]
    assert queue.messages("CS1") == 2 and queue.total_bytes == bytes_before - oldest.stored_bytes
    for entry in queue.peek("CS1", 10):
        queue.ack(entry)
    assert queue.stations() == [] and queue.total_bytes == 0 and queue.total_messages == 0


def test_everything_kept_survives_a_restart_with_its_sizes(store: Store, state_dir: Path) -> None:
    queue = queue_on(store)
    seqs = [queue.append("CS1", message(n=n, pad=n * 10)) for n in range(4)]
    queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification", n=7))
    sizes = (queue.total_messages, queue.total_bytes, queue.messages("CS1"))
    store.close()
    with Store.open(state_dir) as reopened:
        again = queue_on(reopened)
        assert [entry.seq for entry in again.peek("CS1", 10)] == seqs
        assert [entry.message.payload["seqNo"] for entry in again.peek("CS1", 10)] == [0, 1, 2, 3]
        assert [entry.key for entry in again.latest("CS1")] == ["StatusNotification/1/1"]
        assert (again.total_messages, again.total_bytes, again.messages("CS1")) == sizes
        # Sizes are the store's own: what SQLite holds is what the bound counts.
        assert (
            reopened.outbox_sizes("autonomy.")["autonomy.queue/CS1"][1]
            + reopened.namespace_sizes("autonomy.")["autonomy.latest/CS1"][1]
            == sizes[1]
        )
        # Versions keep growing after a restart, so an old delivery never acks a newer message.
        assert again.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification", n=8)) > 1


def test_a_station_over_its_bound_is_refused_and_the_others_carry_on(store: Store) -> None:
    queue = queue_on(store, messages=100)
    for n in range(100):
        queue.append("CS1", message(n=n))
    with pytest.raises(QueueFull) as refused:
        queue.append("CS1", message(n=100))
    assert "full" in str(refused.value) and refused.value.station_id == "CS1"
    assert queue.messages("CS1") == 100 and queue.peek("CS1", 200)[-1].message.payload["seqNo"] == 99
    queue.append("CS2", message(n=0))  # another station is not affected
    # Latest entries count too: a new key is refused, but the room a delivered message frees is usable.
    with pytest.raises(QueueFull):
        queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification"))
    queue.ack(queue.peek("CS1")[0])
    queue.append("CS1", message(n=100))


def test_reports_cannot_take_the_room_transactions_need(store: Store) -> None:
    queue = queue_on(store, messages=100)
    for n in range(75):
        queue.append("CS1", message("NotifyReport", n=n))
    with pytest.raises(QueueFull):
        queue.append("CS1", message("NotifyReport", n=75))
    with pytest.raises(QueueFull):
        queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification"))
    for n in range(25):  # the reserved quarter is for transaction data only
        queue.append("CS1", message("TransactionEvent" if n % 2 else "MeterValues", n=n))
    with pytest.raises(QueueFull):
        queue.append("CS1", message(n=99))


def test_the_byte_bound_counts_every_station_together(store: Store) -> None:
    queue = queue_on(store, messages=1000, bytes=20_000)
    queue.append("CS1", message(pad=9_000))
    queue.append("CS2", message(pad=9_000))
    with pytest.raises(QueueFull) as refused:
        queue.append("CS3", message(pad=3_000))
    assert "bytes" in refused.value.bound
    assert queue.stations() == ["CS1", "CS2"] and queue.total_bytes <= 20_000


def test_latest_keeps_only_the_newest_message_per_key(store: Store) -> None:
    queue = queue_on(store)
    queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification", n=1))
    queue.put_latest("CS1", "StatusNotification/2/1", message("StatusNotification", n=2))
    queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification", n=3))
    entries = queue.latest("CS1")
    # In the order last replaced: connector 2 first, then connector 1's newer status.
    assert [(entry.key, entry.message.payload["seqNo"]) for entry in entries] == [
        ("StatusNotification/2/1", 2),
        ("StatusNotification/1/1", 3),
    ]
    assert queue.messages("CS1") == 2


def test_a_latest_entry_replaced_during_its_delivery_is_not_lost(store: Store) -> None:
    queue = queue_on(store)
    queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification", n=1))
    delivering = queue.latest("CS1")[0]
    queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification", n=2))  # arrives meanwhile
    assert queue.ack_latest(delivering) is False
    [newer] = queue.latest("CS1")
    assert newer.message.payload["seqNo"] == 2
    assert queue.ack_latest(newer) is True
    assert queue.latest("CS1") == [] and queue.total_bytes == 0 and queue.stations() == []


# -- damage -------------------------------------------------------------------------------------


def _raw(path: Path, sql: str, *args: Any) -> None:
    db = sqlite3.connect(path)
    db.execute(sql, args)
    db.commit()
    db.close()


def _filled(state_dir: Path) -> Path:
    with Store.open(state_dir) as store:
        queue = queue_on(store)
        for n in range(3):
            queue.append("CS1", message(n=n))
        queue.put_latest("CS1", "StatusNotification/1/1", message("StatusNotification"))
    return state_dir / STATE_FILE


def test_a_queue_row_that_is_not_msgpack_stops_the_start_naming_the_row(state_dir: Path) -> None:
    path = _filled(state_dir)
    _raw(path, "UPDATE outbox SET item = x'c1' WHERE seq = 2")
    with pytest.raises(StoreDamaged) as damaged:
        Store.open(state_dir)
    assert "entry 2 of outbox 'autonomy.queue/CS1'" in str(damaged.value) and RECOVER_HINT in str(damaged.value)


@pytest.mark.parametrize(
    ("sql", "where"),
    [
        ("UPDATE outbox SET item = ? WHERE seq = 3", "entry 3 of outbox 'autonomy.queue/CS1'"),
        ("UPDATE kv SET value = ?", "key 'StatusNotification/1/1' of namespace 'autonomy.latest/CS1'"),
    ],
    ids=["queue row", "latest row"],
)
def test_a_row_that_is_not_a_station_message_is_reported_with_the_row_named(
    state_dir: Path, sql: str, where: str
) -> None:
    path = _filled(state_dir)
    _raw(path, sql, msgpack.packb({"action": 7}))
    with Store.open(state_dir) as store, pytest.raises(StoreDamaged) as damaged:
        queue_on(store)
    text = str(damaged.value)
    assert where in text and str(path) in text and RECOVER_HINT in text


# -- kill -9 ------------------------------------------------------------------------------------

WRITER = """
import sys
from pathlib import Path
from router.store import Store
from router.autonomy.queue import ReplayQueue, StationMessage

store = Store.open(Path(sys.argv[1]))
queue = ReplayQueue(store, max_messages_per_station=1_000_000, max_bytes=1_000_000_000)
n = queue.messages("CS1")
while True:
    seq = queue.append("CS1", StationMessage("TransactionEvent", {"seqNo": n}, f"m{n}", "2025-06-01T12:00:00Z"))
    print("appended", seq, n, flush=True)  # a printed line is the answer the station was given
    n += 1
"""


@pytest.mark.parametrize("lines_before_kill", [1, 37, 400])
async def test_kill_9_loses_nothing_a_station_was_answered_for(state_dir: Path, lines_before_kill: int) -> None:
    promised: list[tuple[int, int]] = []
    for _round in range(2):  # the second writer carries on the same queue after the first was killed
        with trio.fail_after(30):
            promised += await _append_until_killed(state_dir, lines_before_kill)
        with Store.open(state_dir) as store:
            entries = queue_on(store, messages=1_000_000, bytes=1_000_000_000).peek("CS1", 1_000_000)
        kept = [(entry.seq, entry.message.payload["seqNo"]) for entry in entries]
        assert kept[: len(promised)] == promised, "every answered message is there, in order"
        assert len(kept) - len(promised) <= 1, "at most the append the kill cut short before it printed"
        promised = kept  # an unprinted append that committed is kept: the next writer numbers after it


async def _append_until_killed(state_dir: Path, lines_wanted: int) -> list[tuple[int, int]]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", WRITER, str(state_dir)], stdout=subprocess.PIPE, cwd=REPO_ROOT
    )
    assert process.stdout is not None
    output = bytearray()
    try:
        while output.count(b"\n") < lines_wanted:
            chunk = await process.stdout.receive_some()
            assert chunk, "the writer died on its own"
            output += chunk
        process.send_signal(signal.SIGKILL)
        while chunk := await process.stdout.receive_some():
            output += chunk
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    assert process.returncode == -signal.SIGKILL
    *complete, _cut = output.split(b"\n")
    return [(int(seq), int(n)) for _, seq, n in (line.decode().split() for line in complete)]
