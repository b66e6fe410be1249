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
from typing import Any, NamedTuple, TypeVar

import trio
import trio.lowlevel

T = TypeVar("T")

#: Whether this platform can fork (Linux and the BSDs; not Windows, and macOS forks badly with threads).
AVAILABLE = hasattr(os, "fork") and sys.platform.startswith("linux")


class ChildFailed(Exception):
    """The forked child gave no usable answer; the message says why."""


class Afterwards(NamedTuple):
    """A second answer from the same child: ``compute()`` runs there once the first answer is sent, and the
    parent hands its result to ``deliver`` (``None`` if the child gave none) from a task in ``nursery``."""

    compute: Callable[[], Any]
    deliver: Callable[[Any], None]
    nursery: trio.Nursery


async def in_child(
    function: Callable[[], T], timeout_s: float, *, nice: int = 10, afterwards: Afterwards | None = None
) -> T:
    """``function()`` computed in a forked child; the calling task waits, the event loop does not.

    Cancellation kills the child. Raises :class:`ChildFailed` if the child raised, gave no answer within
    ``timeout_s``, or answered with something that cannot be read back. With ``afterwards``, the child goes
    on to compute a second answer (within the same ``timeout_s``), delivered when it comes.
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
        _child(function, write_fd, timeout_s, nice, None if afterwards is None else afterwards.compute)
    os.close(write_fd)
    frames = _Frames(trio.lowlevel.FdStream(read_fd))
    handed_on = False
    try:
        first = await frames.next()
        if first is None:
            raise ChildFailed(f"the child ended without an answer (killed after {timeout_s:g} s, or crashed)")
        value = _value(first)
        if afterwards is not None:
            afterwards.nursery.start_soon(_second, frames, pid, afterwards.deliver)
            handed_on = True
    except BaseException:
        _kill(pid)
        raise
    finally:
        if not handed_on:
            await frames.close()
            await _reap(pid)
    return value  # type: ignore[no-any-return]


def _value(frame: bytes) -> Any:
    try:
        outcome, value = pickle.loads(frame)
    except Exception as error:
        raise ChildFailed(f"its answer is unreadable ({type(error).__name__})") from None
    if outcome != "ok":
        raise ChildFailed(str(value))
    return value


async def _second(frames: _Frames, pid: int, deliver: Callable[[Any], None]) -> None:
    value = None
    try:
        frame = await frames.next()
        if frame is not None:
            with contextlib.suppress(ChildFailed):
                value = _value(frame)
    except BaseException:
        _kill(pid)
        raise
    finally:
        await frames.close()
        await _reap(pid)
    deliver(value)


class _Frames:
    """The child's answers on the pipe: each a pickle behind its length (8 bytes, big-endian)."""

    def __init__(self, stream: trio.lowlevel.FdStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> bytes | None:
        """The next frame; ``None`` if the pipe ended before one was complete."""
        while True:
            if len(self._buffer) >= 8:
                size = int.from_bytes(self._buffer[:8], "big")
                if len(self._buffer) >= 8 + size:
                    frame = bytes(self._buffer[8 : 8 + size])
                    del self._buffer[: 8 + size]
                    return frame
            chunk = await self._stream.receive_some(1 << 20)
            if not chunk:
                return None
            self._buffer += chunk

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()


def _child(  # pragma: no cover - runs in the child
    function: Callable[[], Any], write_fd: int, timeout_s: float, nice: int, then: Callable[[], Any] | None
) -> None:
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
        for compute in (function,) if then is None else (function, then):
            failed = False
            try:
                answer = pickle.dumps(("ok", compute()), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as error:
                answer = pickle.dumps(("error", f"{type(error).__name__}: {error}"), protocol=pickle.HIGHEST_PROTOCOL)
                failed = True
            view = memoryview(len(answer).to_bytes(8, "big") + answer)
            while view:
                view = view[os.write(write_fd, view) :]
            if failed:
                break
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
