"""balancing.forked: a pure function computed in a forked child while the event loop goes on (#17)."""

from __future__ import annotations

import os
import time

import pytest
import trio
import trio.lowlevel

from balancing.forked import AVAILABLE, ChildFailed, in_child

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="needs fork (Linux)")


def _no_zombie_children() -> bool:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True  # no child at all
    return pid == 0  # children exist (pytest's own?) but none has ended unreaped


async def test_the_answer_comes_back_and_the_parent_state_is_untouched() -> None:
    state = {"evses": list(range(1000))}

    def round_() -> int:
        state["evses"].append(-1)  # the child's copy, not ours
        return sum(state["evses"])

    with trio.fail_after(30):
        answer = await in_child(round_, timeout_s=20)
    assert answer == sum(range(1000)) - 1
    assert len(state["evses"]) == 1000
    assert _no_zombie_children()


async def test_an_exception_in_the_child_comes_back_in_words() -> None:
    def broken() -> None:
        raise ValueError("no sessions")

    with trio.fail_after(30), pytest.raises(ChildFailed, match="ValueError: no sessions"):
        await in_child(broken, timeout_s=20)


async def test_a_child_that_hangs_is_ended_at_its_timeout() -> None:
    def hangs() -> None:
        time.sleep(60)

    started = time.monotonic()
    with trio.fail_after(30), pytest.raises(ChildFailed, match="without an answer"):
        await in_child(hangs, timeout_s=0.2)
    assert time.monotonic() - started < 20  # ended by its own timer, not by the 60 s sleep
    assert _no_zombie_children()


async def test_a_child_that_dies_gives_a_clear_failure() -> None:
    def dies() -> None:
        os.kill(os.getpid(), 9)

    with trio.fail_after(30), pytest.raises(ChildFailed, match="without an answer"):
        await in_child(dies, timeout_s=20)


async def test_an_answer_that_cannot_be_sent_back_is_a_failure_not_a_crash() -> None:
    def unpicklable() -> object:
        return lambda: None

    with trio.fail_after(30), pytest.raises(ChildFailed, match=r"PicklingError|AttributeError"):
        await in_child(unpicklable, timeout_s=20)


async def test_the_event_loop_runs_while_the_child_computes() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.005)

    def slow() -> str:
        time.sleep(0.3)  # the parent's loop must go on meanwhile
        return "done"

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            assert await in_child(slow, timeout_s=20) == "done"
            nursery.cancel_scope.cancel()
    assert ticks >= 5


async def test_cancelling_the_wait_kills_the_child() -> None:
    read_fd, write_fd = os.pipe()

    def slow() -> None:
        os.write(write_fd, str(os.getpid()).encode())
        time.sleep(60)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_child, slow, 50)
            async with trio.lowlevel.FdStream(read_fd) as started:
                child_pid = int(await started.receive_some(64))
            nursery.cancel_scope.cancel()
    os.close(write_fd)
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)  # killed and reaped before the wait returned
