"""A real Mosquitto broker for the MQTT tests (Debian's ``mosquitto``; CI installs it in ``.ci/run``).

:func:`open_broker` starts ``mosquitto -c <temp config>`` on 127.0.0.1 on a free port (Mosquitto cannot
bind port 0 and tell us, so a port is picked and, if another process takes it first, the broker is
started again on another) and returns once the broker says it is running. Nothing of the machine's own
Mosquitto configuration is read. :func:`pub` and :func:`sub` use ``mosquitto_pub`` / ``mosquitto_sub``
(package ``mosquitto-clients``), an MQTT client independent of the controller's.

Tests that need the broker use the ``mosquitto`` mark's skip: they are skipped, loudly, when the
binaries are missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")

needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None or MOSQUITTO_PUB is None or MOSQUITTO_SUB is None,
    reason="MOSQUITTO NOT INSTALLED: apt-get install mosquitto mosquitto-clients (.ci/run does) - MQTT tests skipped",
)
START_S = 10.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Broker:
    """A running broker: where it listens and what it logged."""

    port: int
    config: Path
    process: trio.Process | None = None
    log: list[str] = field(default_factory=list)
    #: Extra client arguments for mosquitto_pub/sub (TLS, credentials).
    client_args: tuple[str, ...] = ()
    nursery: trio.Nursery | None = None

    async def start(self) -> None:
        """Start (or start again, on the same port, with what it persisted) and return once it runs."""
        assert MOSQUITTO is not None and self.nursery is not None
        nursery = self.nursery
        process = await trio.lowlevel.open_process(
            [MOSQUITTO, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.process = process
        running = trio.Event()

        async def drain() -> None:
            assert process.stderr is not None
            buffer = b""
            async for chunk in process.stderr:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    text = line.decode(errors="replace")
                    self.log.append(text)
                    if " running" in text:
                        running.set()
            running.set()  # it ended: start() reports that below

        nursery.start_soon(drain)
        with trio.fail_after(START_S):
            await running.wait()
        if process.poll() is not None:
            raise OSError(f"mosquitto ended at start: {self.log[-3:]}")

    async def stop(self) -> None:
        """Kill the broker (SIGKILL: no goodbye to its clients, nothing saved)."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def terminate(self) -> None:
        """Stop the broker with SIGTERM: it saves its retained messages, then its clients lose it."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


def _config(directory: Path, port: int, extra: Sequence[str]) -> Path:
    path = directory / f"mosquitto-{port}.conf"
    saved = directory / f"mosquitto-{port}.d"
    saved.mkdir(exist_ok=True)
    lines = [
        "per_listener_settings false",
        f"listener {port} 127.0.0.1",
        "log_dest stderr",  # unbuffered: stdout on a pipe would hold the "running" line back
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        # Retained messages survive a terminate() and start() (saved at exit).
        "persistence true",
        f"persistence_location {saved}/",
        f"persistence_file mosquitto-{port}.db",
        *extra,
    ]
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to user "mosquitto", who cannot write in pytest's tmp_path.
        lines.append("user root")
    if not any(line.startswith(("allow_anonymous", "password_file")) for line in extra):
        lines.append("allow_anonymous true")
    path.write_text("\n".join(lines) + "\n")
    return path


@asynccontextmanager
async def open_broker(
    directory: Path, *, extra: Sequence[str] = (), client_args: Sequence[str] = ()
) -> AsyncIterator[Broker]:
    """A broker for the block; ``extra`` lines go into its configuration (listener options follow the listener)."""
    async with trio.open_nursery() as nursery:
        for attempt in range(5):
            port = free_port()
            broker = Broker(port, _config(directory, port, extra), client_args=tuple(client_args), nursery=nursery)
            try:
                await broker.start()
                break
            except OSError:
                if attempt == 4:
                    raise
        try:
            yield broker
        finally:
            await broker.stop()
            nursery.cancel_scope.cancel()


async def pub(broker: Broker, topic: str, payload: str | bytes, *, retain: bool = False, qos: int = 1) -> None:
    """Publish one message with ``mosquitto_pub`` (returns once the broker has it, for QoS 1)."""
    assert MOSQUITTO_PUB is not None
    argv = [MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(broker.port), "-q", str(qos), "-t", topic, *broker.client_args]
    argv += ["-r"] if retain else []
    data = payload.encode() if isinstance(payload, str) else payload
    argv += ["-n"] if not data else ["-s"]
    with trio.fail_after(START_S):
        await trio.run_process(argv, stdin=data if data else b"")


async def sub_one(broker: Broker, topic: str) -> bytes:
    """The first message on ``topic`` (a retained one at once) as ``mosquitto_sub`` received it."""
    assert MOSQUITTO_SUB is not None
    argv = [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(broker.port), "-C", "1", "-t", topic, *broker.client_args]
    with trio.fail_after(START_S):
        done = await trio.run_process(argv, capture_stdout=True)
    return bytes(done.stdout).removesuffix(b"\n")


async def sub_until(broker: Broker, topic: str, condition: Callable[[bytes], bool]) -> bytes:
    """The first message on ``topic`` (the retained one included) that meets ``condition``."""
    assert MOSQUITTO_SUB is not None
    argv = [MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(broker.port), "-t", topic, *broker.client_args]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if condition(line):
                    return line
        raise OSError("mosquitto_sub ended")
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
