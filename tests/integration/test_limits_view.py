"""What operators and EMS vendors see of the metered headroom (#16.3): ``GET /api/v1/limits`` and
``ocpp-lc status`` report per node the limit in force, its source (config, EMS, meter) and the meter.

The whole appliance (``run_app``) on loopback, two meters that are pymodbus's own Modbus TCP server
speaking SunSpec: one at the grid (the building takes 30 A per phase), one at the car-park circuit.
No station is connected, so all metered current is non-EV load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from router.app import App, run_app
from router.cli import cli
from tests.integration.conftest import IO_TIMEOUT_S, settings_for
from tests.support.modbus_meter import ModbusMeterServer, sunspec_image

CSMS_URL = "ws://127.0.0.1:9/ocpp"  # the own identity is off; nobody listens here


def meter(name: str, port: int, node: str) -> dict[str, Any]:
    return {
        "name": name,
        "host": "127.0.0.1",
        "port": port,
        "node": node,
        "poll_interval_s": 0.2,
        "timeout_s": 1.0,
        "stale_after_s": 5.0,
        "safety_margin_amperes": 2.0,
        "fall_time_constant_s": 0.0,
    }


async def read_both(app: App) -> None:
    """Until both meters have been read."""
    assert app.meters is not None
    while any(task.state.fallback for task in app.meters.tasks):
        await app.meters.polled.wait()


async def test_the_limits_view_shows_per_node_the_limit_in_force_its_source_and_the_meter(tmp_path: Path) -> None:
    site = {
        "grid": {"max_current_amperes": 100.0, "max_power_watts": 60_000.0},
        "circuits": [{"circuit_id": "carpark", "max_current_amperes": 40.0}],
    }
    with (
        ModbusMeterServer(sunspec_image((30.0, 30.0, 30.0))) as grid_meter,
        ModbusMeterServer(sunspec_image((10.0, 20.0, 15.0))) as carpark_meter,
    ):
        meters = [meter("grid-main", grid_meter.port, "grid"), meter("carpark", carpark_meter.port, "carpark")]
        settings = settings_for(CSMS_URL, state_dir=tmp_path, site=site, meters=meters)
        with trio.fail_after(IO_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                app: App = await nursery.start(run_app, settings, CollectorRegistry())
                base_url = f"http://127.0.0.1:{app.http_port}"
                async with httpx.AsyncClient(base_url=base_url, trust_env=False) as client:
                    await read_both(app)
                    # An EMS limit above what the meter leaves: the meter binds at the grid.
                    put = await client.put("/api/v1/limits/pv", json={"unit": "A", "limit": 80, "valid_for_s": 600})
                    assert put.status_code == 200, put.text
                    above = (await client.get("/api/v1/limits")).json()
                    status = await trio.to_thread.run_sync(
                        lambda: CliRunner().invoke(cli, ["status", "--url", base_url])
                    )
                    # Below it: the EMS binds.
                    await client.put("/api/v1/limits/pv", json={"unit": "A", "limit": 50, "valid_for_s": 600})
                    below = (await client.get("/api/v1/limits")).json()
                app.request_shutdown()
                await app.stopped.wait()
                nursery.cancel_scope.cancel()

    # The site limit outside systems impose is as before; the nodes add what the meters leave.
    assert above["phases"]["L1"] == {"limit_amperes": 80.0, "source": "ems:pv"}
    grid, carpark = above["nodes"]
    assert grid["node"] == "grid"
    assert grid["phases"] == {name: {"limit_amperes": 68.0, "source": "meter:grid-main"} for name in ("L1", "L2", "L3")}
    assert grid["binding_sources"] == ["meter:grid-main"]
    # 60 kW contracted less the building's 3 × (30 + 2) A at 230 V.
    assert grid["power"] == {"limit_watts": 60_000.0 - 230.0 * 96, "source": "meter:grid-main"}
    assert grid["meter"]["meter"] == "grid-main" and grid["meter"]["fallback"] is False
    assert grid["meter"]["other_load_amperes"] == [30.0, 30.0, 30.0]
    assert grid["meter"]["headroom_amperes"] == [68.0, 68.0, 68.0]
    # The circuit: 40 A less its most loaded phase (20 A) and the margin, on every phase (as balancing
    # holds it); its configured limit and no power limit.
    assert carpark["node"] == "carpark"
    assert {row["limit_amperes"] for row in carpark["phases"].values()} == {18.0}
    assert carpark["binding_sources"] == ["meter:carpark"]
    assert carpark["power"] == {"limit_watts": None, "source": None}
    assert carpark["meter"]["other_load_amperes"] == [10.0, 20.0, 15.0]
    # The EMS's lower limit binds at the grid; the circuit is unchanged.
    grid, carpark = below["nodes"]
    assert grid["phases"]["L2"] == {"limit_amperes": 50.0, "source": "ems:pv"}
    assert grid["binding_sources"] == ["ems:pv"]
    assert carpark["binding_sources"] == ["meter:carpark"]

    # ocpp-lc status prints the same.
    assert status.exit_code == 0, status.output
    assert "limit in force per node (the lowest of config, CSMS, EMS and the node's meter):" in status.output
    assert (
        "  at grid: L1 68 A (meter:grid-main), L2 68 A (meter:grid-main), L3 68 A (meter:grid-main), "
        "power 37920 W (meter:grid-main)" in status.output
    )
    assert "    meter grid-main (ok): non-EV load 30.0/30.0/30.0 A, left for EVs 68.0/68.0/68.0 A" in status.output
    assert "  at carpark: L1 18 A (meter:carpark), L2 18 A (meter:carpark), L3 18 A (meter:carpark)" in status.output
