"""EMS limits over MQTT end to end (#16, K14): the whole appliance, independent stations and CSMS, a real broker.

Two station peers and the CSMS peer are the PyPI `ocpp` library in subprocesses; the broker is
Debian's Mosquitto and the EMS is ``mosquitto_pub`` (tests/support/mosquitto.py); the appliance runs
in-process from a configuration with ``[mqtt]``, as an installer writes it. What people notice:

* a limit the EMS published (QoS 1, retained) before the controller started is in force once it
  connects: on a 64 A connection, 20 A from the EMS gives each of the two EVs 10 A;
* a live limit of 30 A raises them to 15 A; a payload that is not JSON changes nothing;
* ``<prefix>/status`` carries the limit in force and each EVSE's allocation; ``ocpp-lc status``
  prints the MQTT connection;
* every frame the controller wrote to the stations validates against the OCA schemas.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from typer.testing import CliRunner

from router.cli import cli
from tests.e2e.conftest import OpenRelay
from tests.e2e.test_balancing import boot_and_start_transactions, profile_answered
from tests.support.mosquitto import Broker, needs_mosquitto, open_broker, pub, sub_until
from tests.support.schemas import validate_frames

pytestmark = needs_mosquitto

STATIONS = ("CS1", "CS2")
TIMEOUT_S = 40.0
PREFIX = "home/lc"


async def status_where(broker: Broker, condition: Any) -> dict[str, Any]:
    """The first status document (the retained one included) that meets ``condition``."""
    text = await sub_until(broker, f"{PREFIX}/status", lambda line: condition(json.loads(line)))
    document: dict[str, Any] = json.loads(text)
    return document


async def test_an_ems_limit_over_mqtt_reaches_the_stations_and_the_status_topic(
    open_relay: OpenRelay, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with open_broker(tmp_path) as broker, AsyncExitStack() as stack:
            limit = json.dumps({"unit": "A", "limit": 20, "valid_for_s": 600})
            await pub(broker, f"{PREFIX}/ems/hems/limit", limit, retain=True)
            relay = await stack.enter_async_context(
                open_relay(
                    site={"grid": {"max_current_amperes": 64}},
                    balancing={"min_interval_s": 0, "recompute_interval_s": 1, "idle_current_amperes": 0},
                    mqtt={
                        "host": "127.0.0.1",
                        "port": broker.port,
                        "topic_prefix": PREFIX,
                        "status_min_interval_s": 0.2,
                    },
                )
            )
            stations = {s: await stack.enter_async_context(relay.station(s)) for s in STATIONS}
            await boot_and_start_transactions(stations)
            for station_id, station in stations.items():
                assert (await profile_answered(station_id, station, "TxProfile", 10.0)).status == "Accepted"
            assert relay.metric("ocpp_lc_mqtt_messages_total", outcome="applied") == 1

            document = await status_where(
                broker, lambda d: [row["allocated_amperes"] for row in d["evses"]] == [10.0, 10.0]
            )
            assert document["limit"]["phases"]["L1"] == {"limit_amperes": 20.0, "source": "ems:hems"}
            assert document["nodes"][0]["node"] == "grid"
            assert [row["station_id"] for row in document["evses"]] == list(STATIONS)

            await pub(broker, f"{PREFIX}/ems/hems/limit", "{not json")
            await pub(broker, f"{PREFIX}/ems/hems/limit", json.dumps({"unit": "A", "limit": 30, "valid_for_s": 600}))
            for station_id, station in stations.items():
                assert (await profile_answered(station_id, station, "TxProfile", 15.0)).status == "Accepted"
            assert relay.metric("ocpp_lc_mqtt_messages_total", outcome="not_json") == 1
            await status_where(broker, lambda d: [row["allocated_amperes"] for row in d["evses"]] == [15.0, 15.0])
            url = f"http://127.0.0.1:{relay.app.http_port}"
            result = await trio.to_thread.run_sync(lambda: CliRunner().invoke(cli, ["status", "--url", url]))
            assert result.exit_code == 0, result.output
            assert f"mqtt 127.0.0.1:{broker.port}: connected" in result.output

    for station_id, station in stations.items():
        frames = station.frames(identity=station_id)
        assert any('"SetChargingProfile"' in frame for frame in frames)
        validate_frames(frames)
