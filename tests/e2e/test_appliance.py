"""The whole appliance as a station of its own: relayed stations and the controller's own identity side by
side, a Reset from the CSMS that restarts `ocpp-lc run` in place, and a damaged state store.

Peers are the independent ones of `tests/peers/` (the PyPI `ocpp` library, in subprocesses). The first
test runs the appliance in-process (`run_app`, through the `open_relay` fixture with the own connection
turned on); the others run `ocpp-lc run` as an installer does, in its own process, because a restart
and an exit code are things only the command has. Every frame the controller wrote under its own
identity is checked against the OCA schemas.
"""

from __future__ import annotations

import base64
import datetime
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from router.store import STATE_FILE
from tests.e2e.conftest import OpenRelay
from tests.support.peers import Event, Peer, open_csms, open_station
from tests.support.schemas import validate_frames

RUN = [sys.executable, "-c", "from router.cli import main; main()"]
IDENTITY = "LC01"
#: Generous for several Python subprocesses on a loaded two-core machine; a pass takes a few seconds.
TIMEOUT_S = 30.0
PASSWORD = "lc01-Site:password-2026"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def own_request(action: str, **payload: Any) -> Any:
    """A predicate: the CSMS received ``action`` from the controller's own identity (with these fields)."""

    def matches(event: Event) -> bool:
        return (
            event.get("event") == "request"
            and event.get("identity") == IDENTITY
            and event.get("action") == action
            and all(event["payload"].get(key) == value for key, value in payload.items())
        )

    return matches


def get_variable(component: str, variable: str) -> dict[str, Any]:
    return {"getVariableData": [{"component": {"name": component}, "variable": {"name": variable}}]}


async def connected_stations(csms: Peer) -> str:
    """LocalController.ChargingStation, as the CSMS reads it from the controller."""
    answer = await csms.call(
        identity=IDENTITY, action="GetVariables", payload=get_variable("LocalController", "ChargingStation")
    )
    assert answer["event"] == "result", answer
    result = answer["payload"]["getVariableResult"][0]
    assert result["attributeStatus"] == "Accepted", result
    value: str = result["attributeValue"]
    return value


async def test_the_csms_sees_the_relayed_station_and_the_controller_under_its_own_identity(
    open_relay: OpenRelay,
) -> None:
    controller = {
        "connect": True,
        "vendor_name": "Acme Energy",
        "model": "LC-7",
        "serial_number": "SN-0042",
        "basic_auth_password": PASSWORD,
    }
    async with open_relay(controller=controller) as relay, relay.station("CS01") as station:
        csms = relay.csms
        with trio.fail_after(TIMEOUT_S):
            booted = await station.wait_for_event("boot")
            assert booted["payload"]["status"] == "Accepted"
            relayed = await csms.wait_for_event("connected", identity="CS01")
            own = await csms.wait_for_event("connected", identity=IDENTITY)
            own_boot = await csms.wait_for(own_request("BootNotification"))

            # Two identities on two connections: the station's, relayed, and the controller's own.
            assert relayed["path"] == "/ocpp/CS01"
            assert (own["path"], own["subprotocol"]) == ("/ocpp/LC01", "ocpp2.0.1")
            # A00.FR.203/204: Basic auth with the identity as user name and the configured password.
            credentials = base64.b64encode(f"{IDENTITY}:{PASSWORD}".encode()).decode()
            assert own["authorization"] == f"Basic {credentials}"
            assert own_boot["payload"]["reason"] == "PowerUp"
            charging_station = own_boot["payload"]["chargingStation"]
            assert {key: charging_station[key] for key in ("vendorName", "model", "serialNumber")} == {
                "vendorName": "Acme Energy",
                "model": "LC-7",
                "serialNumber": "SN-0042",
            }

            assert await connected_stations(csms) == "CS01"

            # Something only an accepted controller sends (B02.FR.02): after it, /healthz says Accepted.
            app_own = relay.app.own
            assert app_own is not None
            event = {"type": "StartupOfTheDevice", "timestamp": "2026-11-25T10:00:00Z"}
            await app_own.send("SecurityEventNotification", event)
            await csms.wait_for(own_request("SecurityEventNotification", type="StartupOfTheDevice"))
            async with httpx.AsyncClient(trust_env=False) as client:
                health = (await client.get(f"http://127.0.0.1:{relay.app.http_port}/healthz")).json()
            assert health["stations_connected"] == 1
            assert health["own_identity"] == {"connect": True, "link_up": True, "boot_status": "Accepted"}

            # K03: the CSMS's site profile on the controller is taken in, and the composite answers it.
            profile = {
                "id": 501,
                "stackLevel": 0,
                "chargingProfilePurpose": "ChargingStationMaxProfile",
                "chargingProfileKind": "Absolute",
                "chargingSchedule": [
                    {
                        "id": 1,
                        "startSchedule": "2026-01-01T00:00:00Z",
                        "chargingRateUnit": "A",
                        "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 125.0, "numberPhases": 3}],
                    }
                ],
            }
            answer = await csms.call(
                identity=IDENTITY, action="SetChargingProfile", payload={"evseId": 0, "chargingProfile": profile}
            )
            assert answer["payload"]["status"] == "Accepted"
            composite = await csms.call(
                identity=IDENTITY,
                action="GetCompositeSchedule",
                payload={"duration": 600, "evseId": 0, "chargingRateUnit": "A"},
            )
            periods = composite["payload"]["schedule"]["chargingSchedulePeriod"]
            assert composite["payload"]["status"] == "Accepted" and periods[0]["limit"] == 125.0
            # ... and it is the site limit in force (the lowest of configuration, CSMS and EMS).
            effective = relay.app.limits.effective(datetime.datetime.now(datetime.UTC))
            assert effective.phase_current_amperes == (125.0, 125.0, 125.0)
            assert effective.phase_sources == ("csms", "csms", "csms")
    validate_frames(csms.frames(identity=IDENTITY))


class Output:
    """What a controller process writes on stderr, kept whole, with a way to wait for a piece of it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ended = False
        self._changed = trio.Event()

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        async for chunk in stream:
            self.data += chunk
            self._notify()
        self.ended = True
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def wait_for(self, needle: str, count: int = 1) -> None:
        """Return once ``needle`` has been written ``count`` times; fail if the process ends first."""
        while self.text.count(needle) < count:
            assert not self.ended, f"the controller exited first; it wrote:\n{self.text}"
            await self._changed.wait()


@asynccontextmanager
async def controller_process(*args: str) -> AsyncIterator[tuple[trio.Process, Output]]:
    """``ocpp-lc <args>`` in its own process, with its stderr; killed if the test leaves it running."""
    output = Output()
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, [*RUN, *args], stderr=subprocess.PIPE, check=False)
        )
        assert process.stderr is not None
        nursery.start_soon(output.pump, process.stderr)
        yield process, output
        nursery.cancel_scope.cancel()  # run_process kills the process should it still run


def write_config(path: Path, *, station_port: int, csms_port: int, state_dir: Path, connect: bool = True) -> Path:
    path.write_text(
        f"""
[controller]
identity = "{IDENTITY}"
connect = {str(connect).lower()}
retry_wait_minimum_s = 1
retry_random_range_s = 0
[stations]
listen = "127.0.0.1:{station_port}"
path = "/ocpp"
[csms]
url = "ws://127.0.0.1:{csms_port}/ocpp"
connect_timeout_s = 5
[http]
listen = "127.0.0.1:0"
[routing]
shutdown_grace_s = 3
[state]
dir = "{state_dir}"
""",
        encoding="utf-8",
    )
    return path


async def test_a_reset_from_the_csms_restarts_the_appliance_in_place_and_stations_reconnect(tmp_path: Path) -> None:
    station_port = free_port()
    async with open_csms("--path-prefix", "/ocpp") as (csms, csms_port):
        config = write_config(
            tmp_path / "site.toml", station_port=station_port, csms_port=csms_port, state_dir=tmp_path / "state"
        )
        station_url = f"ws://127.0.0.1:{station_port}/ocpp"
        async with controller_process("run", "--config", str(config)) as (controller, output):
            with trio.fail_after(TIMEOUT_S):
                await output.wait_for(" up: ")
                async with open_station(station_url, "CS01") as station:
                    assert (await station.wait_for_event("boot"))["payload"]["status"] == "Accepted"
                    await csms.wait_for(own_request("BootNotification", reason="PowerUp"))
                    assert await connected_stations(csms) == "CS01"

                    reset = await csms.call(identity=IDENTITY, action="Reset", payload={"type": "Immediate"})
                    assert reset["payload"] == {"status": "Accepted"}  # B11.FR.03, answered before restarting
                    # A graceful restart: the station is told the controller is going away (Part 4 §6.3).
                    closed = await station.wait_for_event("disconnected")
                    assert closed["code"] == 1001
                own_closed = await csms.wait_for_event("disconnected", identity=IDENTITY)
                assert own_closed["code"] == 1001

                # The same process starts the appliance again and boots, saying why (B01.FR.09, B11.FR.04).
                await csms.wait_for(own_request("BootNotification", reason="RemoteReset"))
                await output.wait_for(" up: ", count=2)
                assert controller.returncode is None
                assert "restarting the appliance after RemoteReset" in output.text

                # The station reconnects on its own (a new peer: the test station exits when closed).
                async with open_station(station_url, "CS01") as station:
                    assert (await station.wait_for_event("boot"))["payload"]["status"] == "Accepted"
                    relayed = [e for e in csms.events if e.get("event") == "connected" and e["identity"] == "CS01"]
                    assert len(relayed) == 2
                    assert await connected_stations(csms) == "CS01"

                controller.send_signal(signal.SIGTERM)
                await controller.wait()
        assert controller.returncode == 0, output.text
        boots = [e["payload"]["reason"] for e in csms.events if own_request("BootNotification")(e)]
        assert boots == ["PowerUp", "RemoteReset"]
    assert "Traceback" not in output.text
    validate_frames(csms.frames(identity=IDENTITY))


async def test_a_damaged_state_store_stops_the_start_with_exit_3_until_recovered(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_file = state_dir / STATE_FILE
    state_file.write_bytes(b"this is not what ocpp-lc wrote here\n" * 200)
    config = write_config(
        tmp_path / "site.toml", station_port=0, csms_port=free_port(), state_dir=state_dir, connect=False
    )

    with trio.fail_after(TIMEOUT_S):
        refused = await trio.run_process(
            [*RUN, "run", "--config", str(config)], capture_stdout=True, capture_stderr=True, check=False
        )
    message = refused.stderr.decode()
    assert refused.returncode == 3, message
    assert f"state store {state_file} is damaged" in message
    assert "--recover-state" in message
    assert "Traceback" not in message
    assert state_file.read_bytes().startswith(b"this is not what ocpp-lc wrote")  # nothing touched without asking

    async with controller_process("run", "--config", str(config), "--recover-state") as (controller, output):
        with trio.fail_after(TIMEOUT_S):
            await output.wait_for(" up: ")
            assert "moved it aside" in output.text
            aside = [path.name for path in state_dir.iterdir() if path.name.startswith(f"{STATE_FILE}.damaged-")]
            assert len(aside) == 1, sorted(path.name for path in state_dir.iterdir())

            # A second controller on the same state directory is refused in words, not corrupted into.
            second = await trio.run_process(
                [*RUN, "run", "--config", str(config)], capture_stdout=True, capture_stderr=True, check=False
            )
            assert second.returncode == 3
            assert "in use by another process" in second.stderr.decode()
            assert "Traceback" not in second.stderr.decode()

            controller.send_signal(signal.SIGTERM)
            await controller.wait()
    assert controller.returncode == 0, output.text
