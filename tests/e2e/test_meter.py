"""A grid meter end to end (#16): the whole appliance, independent stations and CSMS, a real meter.

Two station peers and the CSMS peer are the PyPI `ocpp` library in subprocesses; the meter is
pymodbus's own Modbus TCP server speaking SunSpec (model 1 + 203) on 127.0.0.1; the appliance runs
in-process from a configuration with ``[[meters]]``, as an installer writes it. What people notice:

* with the building at 10 A on an 80 A connection, both EVs get their 32 A (64 ≤ 80 − 10 − 2);
* the building rises by 40 A: the stations are sent (80 − 50 − 2) / 2 = 14 A each, decreases answered,
  and what the EVs may draw plus the building stays within the connection;
* ``GET /api/v1/status`` and ``/metrics`` show the metered and non-EV load; ``ocpp-lc status`` prints it;
* every frame the controller wrote to the stations validates against the OCA schemas.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx
import trio
from typer.testing import CliRunner

from router.cli import cli
from tests.e2e.conftest import OpenRelay
from tests.e2e.test_balancing import boot_and_start_transactions, profile_answered
from tests.support.modbus_meter import ModbusMeterServer, set_sunspec_currents, sunspec_image
from tests.support.schemas import validate_frames

STATIONS = ("CS1", "CS2")
GRID_AMPERES = 80.0
TIMEOUT_S = 35.0


async def test_a_building_load_rising_by_40_amperes_reaches_the_stations_as_lower_profiles(
    open_relay: OpenRelay,
) -> None:
    image = sunspec_image((10.0, 10.0, 10.0), power_watts=6900)
    meters = [
        {
            "name": "grid-main",
            "host": "127.0.0.1",
            "unit_id": 3,
            "poll_interval_s": 0.25,
            "timeout_s": 1.0,
            "stale_after_s": 5.0,
            "safety_margin_amperes": 2.0,
        }
    ]
    with ModbusMeterServer(image, unit_id=3) as server:
        meters[0]["port"] = server.port
        async with AsyncExitStack() as stack:
            relay = await stack.enter_async_context(
                open_relay(
                    site={"grid": {"max_current_amperes": GRID_AMPERES}},
                    balancing={"min_interval_s": 0, "recompute_interval_s": 1, "idle_current_amperes": 0},
                    meters=meters,
                )
            )
            stations = {s: await stack.enter_async_context(relay.station(s)) for s in STATIONS}
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.app.http_port}", trust_env=False)
            )
            with trio.fail_after(TIMEOUT_S):
                await boot_and_start_transactions(stations)
                for station_id, station in stations.items():
                    await profile_answered(station_id, station, "TxProfile", 32.0)

                set_sunspec_currents(image, (50.0, 50.0, 50.0))
                for station_id, station in stations.items():
                    lowered = await profile_answered(station_id, station, "TxProfile", 14.0)
                    assert lowered.status == "Accepted"
                assert relay.app.balancer is not None
                assert relay.app.balancer.limits.phase_current_amperes == (28.0, 28.0, 28.0)

                status = (await http.get("/api/v1/status")).json()
                (row,) = status["meters"]
                assert row["meter"] == "grid-main" and row["node"] == "grid" and row["fallback"] is False
                assert row["metered_amperes"] == [50.0, 50.0, 50.0]
                assert row["headroom_amperes"] == [28.0, 28.0, 28.0]
                metrics = (await http.get("/metrics")).text
                assert 'ocpp_lc_meter_readings_total{meter="grid-main",outcome="ok"}' in metrics
                assert 'ocpp_lc_meter_current_amperes{meter="grid-main",phase="L1"} 50.0' in metrics
                assert relay.metric("ocpp_lc_meter_power_watts", meter="grid-main") == 6900

                url = f"http://127.0.0.1:{relay.app.http_port}"
                result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(cli, ["status", "--url", url]))
                assert result.exit_code == 0, result.output
                assert "meter grid-main at grid: ok" in result.output
                assert "metered 50.0/50.0/50.0 A" in result.output
                assert "left for EVs 28.0/28.0/28.0 A" in result.output

    for station_id, station in stations.items():
        frames = station.frames(identity=station_id)
        assert any('"SetChargingProfile"' in frame for frame in frames)
        validate_frames(frames)
