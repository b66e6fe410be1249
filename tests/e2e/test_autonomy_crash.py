"""Site autonomy survives a crash of the controller itself (issue #12, Done-when 2).

The controller runs as ``ocpp-lc run`` in its own process, between independent peers (the PyPI `ocpp`
library in subprocesses). The CSMS is killed (SIGKILL) during a session; the station goes on reporting,
answered locally; then the *controller* is killed with SIGKILL too, and started again while the CSMS is
still away. The station reconnects, is served locally again, and ends its session. When the CSMS returns,
it receives every TransactionEvent the station was told had been received, exactly once, in seqNo order:
what was answered before the kill was on disk before the answer left.
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import trio

from router.store import Store
from tests.e2e.conftest import OCPP_PATH
from tests.e2e.test_autonomy import PHASE_S, TOKEN, call, requests, tx_event
from tests.e2e.test_readme_installer import UP_LINE, ocpp_lc
from tests.support.peers import Peer, open_csms, open_station
from tests.support.schemas import validate_frames


def controller_config(csms_port: int, state_dir: Path) -> str:
    return f"""
[controller]
connect = false
[stations]
listen = "127.0.0.1:0"
path = "{OCPP_PATH}"
[csms]
url = "ws://127.0.0.1:{csms_port}{OCPP_PATH}"
[http]
listen = "127.0.0.1:0"
[state]
dir = "{state_dir}"
[balancing]
enabled = false
[autonomy]
reconnect_backoff_max_s = 1
reconnect_rate_per_s = 50
"""


async def _collect(stream: trio.abc.ReceiveStream, log: bytearray) -> None:
    while chunk := await stream.receive_some():
        log += chunk


async def start_controller(nursery: trio.Nursery, config: Path, log: bytearray) -> tuple[trio.Process, str]:
    """``ocpp-lc run`` in its own process; its process and the URL stations connect to, once it serves."""
    process: trio.Process = await nursery.start(
        partial(trio.run_process, [*ocpp_lc(), "run", "--config", str(config)], stderr=subprocess.PIPE, check=False)
    )
    assert process.stderr is not None
    start = len(log)
    while (up := UP_LINE.search(log, start)) is None:
        chunk = await process.stderr.receive_some()
        assert chunk, f"the controller exited before serving:\n{log.decode()}"
        log += chunk
    nursery.start_soon(_collect, process.stderr, log)
    return process, f"ws://127.0.0.1:{int(up.group(1))}{OCPP_PATH}"


async def test_a_controller_killed_during_an_outage_loses_nothing_it_acknowledged(tmp_path: Path) -> None:
    config = tmp_path / "lc.toml"
    log = bytearray()
    sent: list[dict[str, Any]] = []
    stations: list[Peer] = []
    async with open_csms("--path-prefix", OCPP_PATH) as (first_csms, csms_port):
        config.write_text(controller_config(csms_port, tmp_path / "state"), encoding="utf-8")
        async with trio.open_nursery() as nursery:
            with trio.fail_after(PHASE_S):
                controller, url = await start_controller(nursery, config, log)
            async with open_station(url, "CS1") as station:
                stations.append(station)
                with trio.fail_after(PHASE_S):
                    assert (await station.wait_for_event("boot"))["payload"]["status"] == "Accepted"
                    sent.append(tx_event("CS1", "Started", 0, "Authorized", idToken=TOKEN))
                    assert (await call(station, "TransactionEvent", sent[-1]))["idTokenInfo"]["status"] == "Accepted"
                first_csms.kill()
                with trio.fail_after(PHASE_S):
                    await first_csms.wait_exited()
                    for seq_no in (1, 2):
                        sent.append(tx_event("CS1", "Updated", seq_no, "MeterValuePeriodic"))
                        assert await call(station, "TransactionEvent", sent[-1]) == {}  # acknowledged
                controller.kill()  # SIGKILL: a power cut, as far as the controller can tell
                with trio.fail_after(PHASE_S):
                    await controller.wait()
                    await station.wait_for_event("disconnected")
            with trio.fail_after(PHASE_S):
                controller, url = await start_controller(nursery, config, log)
            # The station comes back (no reboot) while the CSMS is still away: served locally again.
            async with open_station(url, "CS1", "--no-boot") as station:
                stations.append(station)
                with trio.fail_after(PHASE_S):
                    await station.wait_for_event("connected")
                    sent.append(tx_event("CS1", "Updated", 3, "ChargingStateChanged"))
                    assert await call(station, "TransactionEvent", sent[-1]) == {}
                    sent.append(tx_event("CS1", "Ended", 4, "EVCommunicationLost"))
                    assert await call(station, "TransactionEvent", sent[-1]) == {}
                async with open_csms("--path-prefix", OCPP_PATH, "--port", str(csms_port)) as (second_csms, _):
                    with trio.fail_after(PHASE_S):
                        await second_csms.wait_until(
                            lambda: any(
                                p["eventType"] == "Ended" for p in requests([second_csms], "CS1", "TransactionEvent")
                            )
                        )
                    received = requests([first_csms, second_csms], "CS1", "TransactionEvent")
                    assert received == [sent[0]] + [{**payload, "offline": True} for payload in sent[1:]]
                    for csms in (first_csms, second_csms):
                        validate_frames(csms.frames(identity="CS1"))
            controller.terminate()
            with trio.fail_after(PHASE_S):
                await controller.wait()
    for station in stations:
        validate_frames(station.frames(identity="CS1"))
    assert b"Traceback" not in bytes(log), log.decode()


async def test_a_damaged_queue_row_stops_the_start_like_a_damaged_store(tmp_path: Path) -> None:
    """Done-when 5 (second half): a row of the replay queue that is not one of ours is reported by name."""
    state_dir = tmp_path / "state"
    with Store.open(state_dir) as store:
        store.outbox("autonomy.queue/CS1").append({"action": "TransactionEvent", "payload": "not an object"})
    config = tmp_path / "lc.toml"
    config.write_text(controller_config(9, state_dir), encoding="utf-8")
    with trio.fail_after(PHASE_S):
        refused = await trio.run_process(
            [*ocpp_lc(), "run", "--config", str(config)], capture_stdout=True, capture_stderr=True, check=False
        )
    message = refused.stderr.decode()
    assert refused.returncode == 3, message
    assert "is damaged" in message and "autonomy.queue/CS1" in message, message
    assert "--recover-state" in message
    assert "Traceback" not in message
