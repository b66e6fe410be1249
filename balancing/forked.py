"""Run a pure function of the process's current state in a forked child, and take its answer back.

Theory of operation (issue #17: the relay never waits for the allocator). A balancing round on a large
site is Python work (building sessions, allocating, planning) over the whole loop state. In a worker
thread it still holds the GIL for most of its run, so the relay waits as long as if it had run inline;
copying the state out to another process costs as much as the round. ``fork()`` gives the child a
copy-on-write snapshot of everything for the price of copying page tables (about a millisecond for
a controller of a few hundred MB): the child computes from that snapshot, niced, on the other core,
while the parent's event loop goes on relaying, and sends back only the answer, pickled through a pipe.

The child is a one-shot and touches nothing it shares with the parent: it exits with ``os._exit``
(no atexit handlers, no flushing of inherited buffers, no closing handshake on inherited sockets), has
the collector off (a collection would touch, and so copy, every page), logging off (a record written
from the child would interleave with the parent's), trio's signal wake-up descriptor detached (a
signal there would wake the parent's loop) and SIGINT/SIGTERM back to their defaults. It arms its own
timer (``setitimer``): a child that does not answer within ``timeout_s`` is ended by the kernel, which
works whatever clock the parent's loop runs on. Only the thread that forks exists in the child; the
function must not wait on a lock another thread may hold (the balancing round takes none).

Errors come back as :class:`ChildFailed` with words an operator can act on; the caller decides what
to do instead (the balancing loop computes the round inline).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import trio
import trio.lowlevel

T = TypeVar("T")

#: Whether this platform can fork (Linux and the BSDs; not Windows, and macOS forks badly with threads).
AVAILABLE = hasattr(os, "fork") and sys.platform.startswith("linux")


class ChildFailed(Exception):
    """The forked child gave no usable answer; the message says why."""


async def in_child(function: Callable[[], T], timeout_s: float, *, nice: int = 10) -> T:
    """``function()`` computed in a forked child; the calling task waits, the event loop does not.

    Cancellation kills the child. Raises :class:`ChildFailed` if the child raised, gave no answer within
    ``timeout_s``, or answered with something that cannot be read back.
    """
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except BaseException:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # pragma: no cover - the child (coverage does not follow it)
        os.close(read_fd)
        _child(function, write_fd, timeout_s, nice)
    os.close(write_fd)
    stream = trio.lowlevel.FdStream(read_fd)
    chunks: list[bytes] = []
    try:
        async with stream:
            while chunk := await stream.receive_some(1 << 20):
                chunks.append(chunk)
    except BaseException:
        _kill(pid)
        raise
    finally:
        await _reap(pid)
    if not chunks:
        raise ChildFailed(f"the child ended without an answer (killed after {timeout_s:g} s, or crashed)")
    try:
        outcome, value = pickle.loads(b"".join(chunks))
    except Exception as error:
        raise ChildFailed(f"its answer is unreadable ({type(error).__name__})") from None
    if outcome != "ok":
        raise ChildFailed(str(value))
    return value  # type: ignore[no-any-return]


def _child(function: Callable[[], Any], write_fd: int, timeout_s: float, nice: int) -> None:  # pragma: no cover
    status = 1
    try:
        gc.disable()
        logging.disable(logging.CRITICAL)
        with contextlib.suppress(ValueError):  # not the main thread: trio installed none here
            signal.set_wakeup_fd(-1)
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
            signal.signal(number, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 1e-6))
        if nice:
            os.nice(nice)
        try:
            answer = pickle.dumps(("ok", function()), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            answer = pickle.dumps(("error", f"{type(error).__name__}: {error}"), protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(answer)
        while view:
            view = view[os.write(write_fd, view) :]
        status = 0
    finally:
        os._exit(status)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def _reap(pid: int) -> None:
    """Collect the child's exit status (no zombie), waiting for it without blocking the loop."""
    with trio.CancelScope(shield=True):
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None  # a kernel before 5.3: look every 10 ms (the child is exiting already)
        try:
            while True:
                if pidfd is not None:
                    await trio.lowlevel.wait_readable(pidfd)
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: never blocks
                except ChildProcessError:
                    return
                if done:
                    return
                if pidfd is None:
                    await trio.sleep(0.01)
        finally:
            if pidfd is not None:
                os.close(pidfd)
