"""``ocpp-lc run`` under systemd's Type=notify: READY once it serves, the watchdog fed, STOPPING at the end."""

from __future__ import annotations

import os
import signal
import socket
import sys
from functools import partial
from pathlib import Path

import trio

RUN = [sys.executable, "-c", "from router.cli import main; main()"]


async def test_run_tells_systemd_ready_feeds_the_watchdog_and_says_stopping(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(notify_path))
    config = tmp_path / "site.toml"
    config.write_text(
        f"""
[controller]
connect = false
[stations]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
[state]
dir = "{tmp_path / "state"}"
"""
    )
    # A 1 s watchdog: the controller must ping every half of it (sd_watchdog_enabled semantics).
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="1000000")
    messages: list[str] = []
    with sock, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            process = await nursery.start(
                partial(trio.run_process, [*RUN, "run", "--config", str(config)], env=env, check=False)
            )
            while sum(message.startswith("WATCHDOG=1") for message in messages) < 3:
                messages.append((await sock.recv(4096)).decode())
            process.send_signal(signal.SIGTERM)
            while not messages[-1].startswith("STOPPING=1"):
                messages.append((await sock.recv(4096)).decode())
        assert process.returncode == 0
    assert messages[0].startswith("READY=1")
    assert "serving: stations on port" in messages[0]  # STATUS= for `systemctl status`
    assert all(message.startswith(("READY=1", "WATCHDOG=1", "STATUS=", "STOPPING=1")) for message in messages)
