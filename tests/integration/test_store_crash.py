"""kill -9 never costs the state store anything it said was done, nor its readability.

A writer process appends to an outbox, puts keys and acks the oldest entry in a loop, printing a line
after each call has returned (so a printed line is a promise that the call is durable). The test kills it
with SIGKILL at a random moment, several rounds on the same state directory (seeded, so a failing round
can be replayed), reopens the store and checks every promise: each printed entry is queued, in order,
with no gaps; each printed key is there; the store opens without StoreDamaged. Kill points fall in
start-up (store creation included), between and inside commits, and can fall in WAL checkpoints (the
padding fills the WAL's 1000 pages every hundred or so iterations).

A power cut cannot be simulated here; the module docstring of router/store.py says what guards that.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from router.store import STATE_FILE, Store, StoreDamaged

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED = 20_251_125
ROUNDS = 8
#: Bounds one round on a loaded two-core machine; a round takes well under a second.
ROUND_TIMEOUT_S = 10

WRITER = """
import sys
from pathlib import Path
from router.store import Store

store = Store.open(Path(sys.argv[1]))
outbox = store.outbox("upstream")
n = store.get("progress", "next", 0)
while True:
    seq = outbox.append({"n": n, "pad": "x" * (n % 50 * 60)})
    print("appended", seq, n, flush=True)
    store.put_many("progress", {"next": n + 1, f"k{n}": n})
    print("put", n, flush=True)
    if n % 3 == 2:
        [(oldest, _)] = outbox.peek()
        outbox.ack(oldest)
        print("acked", oldest, flush=True)
    n += 1
"""


@dataclass
class Promises:
    """What the writer has reported durable, over all rounds so far."""

    queued: list[tuple[int, int]] = field(default_factory=list)  # (seq, n) appended and not acked, oldest first
    keys: dict[str, int] = field(default_factory=dict)  # every key a printed put wrote
    next_n: int = 0  # progress "next" as last read back
    highest_seq: int = 0


async def _run_writer_until_killed(state_dir: Path, rng: random.Random, first_round: bool) -> list[list[str]]:
    """Start the writer, SIGKILL it at a random moment; return the complete lines it printed."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", WRITER, str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert process.stdout is not None and process.stderr is not None
    output = bytearray()
    try:
        if first_round:
            # Not a synchronisation: the kill is meant to land anywhere in start-up, store creation included.
            await trio.sleep(rng.uniform(0, 0.3))
        else:
            lines_wanted = rng.randrange(1, 700)
            while output.count(b"\n") < lines_wanted:
                chunk = await process.stdout.receive_some()
                if not chunk:
                    break  # the writer died on its own; the exit status below says how
                output += chunk
        process.send_signal(signal.SIGKILL)
        while chunk := await process.stdout.receive_some():
            output += chunk
        errors = b""
        while chunk := await process.stderr.receive_some():
            errors += chunk
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    assert process.returncode == -signal.SIGKILL, f"the writer ended by itself:\n{errors.decode(errors='replace')}"
    *complete, _partial = output.split(b"\n")  # a line cut by the kill promises nothing
    return [line.decode().split() for line in complete]


def _check_promises(state_dir: Path, lines: list[list[str]], promises: Promises) -> None:
    queued_before = promises.highest_seq
    for line in lines:
        if line[0] == "appended":
            promises.queued.append((int(line[1]), int(line[2])))
        elif line[0] == "put":
            promises.keys[f"k{line[1]}"] = int(line[1])
        else:
            assert promises.queued[0][0] == int(line[1]), "the writer acks the oldest entry"
            del promises.queued[0]
    last_put = max([int(line[1]) for line in lines if line[0] == "put"], default=promises.next_n - 1)
    printed_seqs = [seq for seq, _ in promises.queued]

    try:
        store = Store.open(state_dir)
    except StoreDamaged as damaged:
        raise AssertionError(f"kill -9 left the store unreadable: {damaged}") from None
    with store:
        entries: list[tuple[int, Any]] = store.outbox("upstream").peek(1_000_000)
        progress = store.items("progress")

    seqs = [seq for seq, _ in entries]
    assert seqs == sorted(set(seqs)), "outbox entries come back in the order they were appended"
    by_seq = dict(entries)
    missing = [seq for seq in printed_seqs if seq not in by_seq]
    # Only an ack that committed just before the kill, unprinted, may have removed the oldest entry;
    # any other absence is a promise broken, or a gap in the queue.
    ack_in_flight = bool(lines) and lines[-1][0] == "put" and int(lines[-1][1]) % 3 == 2
    assert missing in ([], printed_seqs[:1] if ack_in_flight else []), f"promised entries lost: {missing}"
    for seq, n in promises.queued:
        assert seq in missing or by_seq[seq]["n"] == n, f"entry {seq} holds {by_seq[seq]} instead of n={n}"
    # Likewise at most one append may have committed unprinted, and it is the newest entry.
    unpromised = [seq for seq in seqs if seq not in set(printed_seqs)]
    assert len(unpromised) <= 1 and all(seq > max([queued_before, *printed_seqs]) for seq in unpromised), seqs
    ns = [entry["n"] for _, entry in entries]
    assert ns == sorted(ns), "items come out first in, first out"

    for key, n in promises.keys.items():
        assert progress.get(key) == n, f"promised key {key} is {progress.get(key)!r}"
    # The put of the next iteration may have committed unprinted, nothing beyond it.
    assert progress.get("next", 0) in (last_put + 1, last_put + 2), (progress.get("next"), last_put)

    promises.queued = [(seq, entry["n"]) for seq, entry in entries]
    promises.next_n = progress.get("next", 0)
    promises.highest_seq = max([promises.highest_seq, *seqs])


async def test_kill_9_at_random_moments_loses_nothing_promised(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    rng = random.Random(SEED)
    promises = Promises()
    for round_number in range(ROUNDS):
        with trio.fail_after(ROUND_TIMEOUT_S):
            lines = await _run_writer_until_killed(state_dir, rng, first_round=round_number == 0)
        _check_promises(state_dir, lines, promises)
    # The rounds did real work: entries were queued, acked and keys written across the kills.
    assert promises.highest_seq > 100 and len(promises.keys) > 100
    assert len(promises.queued) < promises.highest_seq


async def test_a_second_appliance_on_the_same_state_directory_is_refused(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    probe = "import sys, pathlib; from router.store import Store; Store.open(pathlib.Path(sys.argv[1]))"
    with Store.open(state_dir) as store, trio.fail_after(ROUND_TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-c", probe, str(state_dir)], capture_stderr=True, check=False, cwd=REPO_ROOT
        )
        assert result.returncode != 0
        assert f"{state_dir / STATE_FILE} is in use by another process" in result.stderr.decode()
        store.put("ns", "k", 1)  # the first one carries on
        assert store.get("ns", "k") == 1
