"""The controller as an installer runs it: ``ocpp-lc run`` in its own process, stopped by a signal."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import trio

from tests.support.peers import open_csms, open_station

RUN = [sys.executable, "-c", "from router.cli import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_sigterm_closes_every_station_with_1001_and_exits_cleanly(tmp_path: Path) -> None:
    station_port = free_port()
    config = tmp_path / "site.toml"
    async with open_csms() as (csms, csms_port):
        config.write_text(
            f"""
[controller]
identity = "LC01"
[stations]
listen = "127.0.0.1:{station_port}"
path = "/ocpp"
[csms]
url = "ws://127.0.0.1:{csms_port}/ocpp"
[http]
listen = "127.0.0.1:0"
[routing]
shutdown_grace_s = 3
[state]
dir = "{tmp_path / "state"}"
"""
        )
        async with trio.open_nursery() as nursery:
            controller = await nursery.start(
                partial(trio.run_process, [*RUN, "run", "--config", str(config)], stderr=subprocess.PIPE, check=False)
            )
            with trio.fail_after(20):
                # Ready when it says so on stderr (its "up:" line names the bound ports).
                log = bytearray()
                assert controller.stderr is not None
                while b" up: " not in log:
                    chunk = await controller.stderr.receive_some()
                    assert chunk, f"controller exited early: {log.decode()}"
                    log += chunk
                nursery.start_soon(_drain, controller.stderr)
                async with open_station(f"ws://127.0.0.1:{station_port}/ocpp", "CS01") as station:
                    event = await station.wait_for_event("boot")
                    assert event["payload"]["status"] == "Accepted"
                    controller.send_signal(signal.SIGTERM)
                    closed = await station.wait_for_event("disconnected")
                await controller.wait()
            # Part 4 §6.3 and the issue: going away, with a reason the station can log.
            assert closed["code"] == 1001
            assert controller.returncode == 0
            await csms.wait_for_event("disconnected", identity="CS01")


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


async def test_check_config_explains_problems_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[csms]\nurl = "http://csms.example.net/ocpp"\n[stations]\nlisten = "9000"\n')
    result = await trio.run_process(
        [*RUN, "check-config", str(config)], capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 2
    text = result.stderr.decode()
    assert "[csms] url" in text and "ws://" in text
    assert "[stations] listen" in text
    assert "Traceback" not in text

    good = tmp_path / "good.toml"
    good.write_text('[csms]\nurl = "ws://csms.example.net:9000/ocpp"\n')
    result = await trio.run_process([*RUN, "check-config", str(good)], capture_stdout=True, check=False)
    assert result.returncode == 0
    assert b"OK" in result.stdout
