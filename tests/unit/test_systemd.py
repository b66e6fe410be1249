"""What systemd hears from the controller (``Type=notify``, ``WatchdogSec=``): read from a real socket.

Each test binds the unix datagram socket systemd would (in ``tmp_path``, or in the abstract namespace)
and points ``NOTIFY_SOCKET`` at it, so the bytes asserted on are the bytes systemd would parse. The
watchdog runs on trio's autojump clock: the times asserted are exact virtual seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path

import pytest
import trio
import trio.testing

from router.systemd import SystemdNotifier

#: Virtual seconds: the clock jumps whenever every task waits.
TEST_TIMEOUT_S = 1_000


async def bound_socket(address: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(address)
    return sock


async def receive(sock: trio.socket.SocketType) -> list[str]:
    """The next message, as its KEY=value lines."""
    data = await sock.recv(4096)
    return data.decode().split("\n")


async def test_ready_then_watchdog_every_half_period_then_stopping(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    # WatchdogSec=20s: systemd kills the service after 20 s without a ping, so it pings every 10 s.
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    received: list[tuple[float, list[str]]] = []
    with await bound_socket(str(path)) as sock, trio.fail_after(TEST_TIMEOUT_S):
        notifier = SystemdNotifier.from_environment()
        assert notifier.watchdog_interval_s == 10.0
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            assert notifier.ready("serving: stations on port 9000\nHTTP on port 8080")
            nursery.start_soon(notifier.feed_watchdog)
            while len(received) < 5:
                message = await receive(sock)
                received.append((trio.current_time() - start, message))
            await trio.sleep_until(start + 35)
            assert notifier.stopping("shutting down: closing 3 station connections")
            message = await receive(sock)
            received.append((trio.current_time() - start, message))
            nursery.cancel_scope.cancel()
    assert received == [
        # The status stays one line: a newline would start a new assignment.
        (0, ["READY=1", "STATUS=serving: stations on port 9000 HTTP on port 8080"]),
        (0, ["WATCHDOG=1"]),
        (10, ["WATCHDOG=1"]),
        (20, ["WATCHDOG=1"]),
        (30, ["WATCHDOG=1"]),
        (35, ["STOPPING=1", "STATUS=shutting down: closing 3 station connections"]),
    ]


async def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ocpp-lc-test-{uuid.uuid4().hex}"
    # systemd writes an abstract socket's leading NUL byte as '@'.
    monkeypatch.setenv("NOTIFY_SOCKET", f"@{name}")
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with await bound_socket(f"\0{name}") as sock, trio.fail_after(5):
        notifier = SystemdNotifier.from_environment()
        assert notifier.reloading("restarting after RemoteReset")
        assert notifier.ready("serving again")
        reloading = await receive(sock)
        ready = await receive(sock)
    assert reloading[0] == "RELOADING=1"
    assert reloading[1].startswith("MONOTONIC_USEC=") and int(reloading[1].split("=")[1]) > 0
    assert reloading[2] == "STATUS=restarting after RemoteReset"
    assert ready == ["READY=1", "STATUS=serving again"]


async def test_watchdog_meant_for_another_process_is_not_fed(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "notify"
    # WATCHDOG_PID names the process systemd watches; a child that inherited the variables is not it.
    environ = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    with await bound_socket(str(path)) as sock, trio.fail_after(TEST_TIMEOUT_S):
        notifier = SystemdNotifier.from_environment(environ)
        assert notifier.watchdog_interval_s is None
        with trio.move_on_after(100):
            await notifier.feed_watchdog()
        notifier.ready("up")
        # Nothing was queued before READY=1.
        assert await receive(sock) == ["READY=1", "STATUS=up"]


async def test_without_notify_socket_nothing_is_sent_and_nothing_fails(autojump_clock: trio.testing.MockClock) -> None:
    # Started from a terminal or in a container: no NOTIFY_SOCKET.
    notifier = SystemdNotifier.from_environment({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled
    assert not notifier.ready("up")
    assert not notifier.stopping("down")
    start = trio.current_time()
    with trio.move_on_after(100):
        await notifier.feed_watchdog()
    assert trio.current_time() - start == 100


def test_systemd_gone_is_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(str(tmp_path / "no-such-socket"), watchdog_usec=2_000_000)
    with caplog.at_level(logging.WARNING, logger="ocpp_lc.systemd"):
        assert not notifier.notify("WATCHDOG=1")
    assert "could not notify systemd (WATCHDOG)" in caplog.text
