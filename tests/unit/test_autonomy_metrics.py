"""What an operator reads on ``/metrics`` through an outage and its replay (issue #12, Operators).

One station behind the appliance's own link and autonomous CSMS leg, over in-memory websockets; the CSMS
leaves and comes back when the test says so. Timers run on trio's virtual clock (``autojump_clock``), so
the offline time and the replay duration are asserted in virtual seconds. The figures are read from the
Prometheus registry, as a scrape would read them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from router import ocppj
from router.link import LinkTimings
from router.metrics import RouterMetrics
from router.store import Store
from router.transport import HandshakeFailed, WebSocket
from tests.support.autonomy_site import TOKEN, T, autonomous_pair, make_autonomy, tx, wait_for_mode
from tests.support.schemas import validate_frame
from tests.unit.test_link import ws_pair

KNOWN = TOKEN
STRANGER = {"idToken": "TAG9", "type": "ISO14443"}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, (name, labels)
    return value


async def test_an_outage_and_its_replay_show_in_the_metrics(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    registry = CollectorRegistry()
    csms_back = trio.Event()
    restored_send, restored = trio.open_memory_channel[WebSocket](1)

    async def connect() -> WebSocket:
        if not csms_back.is_set():
            raise HandshakeFailed("connection refused", kind="unreachable")
        client, server = await ws_pair()
        await restored_send.send(server)
        return client

    with Store.open(tmp_path / "state") as store:
        autonomy = make_autonomy(store, registry, seed=1, reconnect_backoff_max_s=1.0, queue_max_bytes=2_097_152)
        station, lc_station = await ws_pair()
        real, csms = await ws_pair()
        upstream, link = autonomous_pair(
            "CS01",
            lc_station,
            real,
            autonomy=autonomy,
            connect=connect,
            metrics=RouterMetrics(registry),
            timings=LinkTimings(csms_ping_interval_s=0),
        )
        sent: dict[str, str] = {}

        async def station_call(message_id: str, action: str, payload: dict[str, Any]) -> list[Any]:
            sent[message_id] = action
            await station.send_text(ocppj.encode_call(message_id, action, payload))
            return validate_frame(await station.receive_text(), sent)

        with trio.fail_after(600):
            async with trio.open_nursery() as nursery:
                await nursery.start(upstream.run)
                nursery.start_soon(link.run)
                # Nothing is wrong yet: the gauges say so, and the bounds are there for the alert's ratio.
                assert sample(registry, "ocpp_lc_autonomy_offline_longest_seconds") == 0
                assert sample(registry, "ocpp_lc_autonomy_queue_limit_bytes") == 2_097_152
                assert sample(registry, "ocpp_lc_autonomy_queue_limit_messages_per_station") == 20_000
                # Online, the CSMS accepts the station and the token: the caches learn both.
                boot = {"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}}
                for message_id, action, payload, answer in (
                    ("b-0", "BootNotification", boot, {"currentTime": T, "interval": 300, "status": "Accepted"}),
                    ("a-0", "Authorize", {"idToken": KNOWN}, {"idTokenInfo": {"status": "Accepted"}}),
                ):
                    await station.send_text(ocppj.encode_call(message_id, action, payload))
                    assert json.loads(await csms.receive_text())[1] == message_id
                    await csms.send_text(ocppj.encode_result(message_id, answer))
                    await station.receive_text()

                await csms.aclose(1001, "CSMS going down")
                await wait_for_mode(autonomy, "CS01", "local")
                lost_s = trio.current_time()
                assert (await station_call("a-1", "Authorize", {"idToken": KNOWN}))[2]["idTokenInfo"] == {
                    "status": "Accepted"
                }
                assert (await station_call("a-2", "Authorize", {"idToken": STRANGER}))[2]["idTokenInfo"] == {
                    "status": "Unknown"
                }
                assert await station_call("t-1", "TransactionEvent", tx("Updated", 1)) == [3, "t-1", {}]
                assert await station_call("t-2", "TransactionEvent", tx("Updated", 2)) == [3, "t-2", {}]
                await trio.sleep(100)

                # 100 s without the CSMS; two messages wait; the authorisations by how they were decided.
                offline_s = sample(registry, "ocpp_lc_autonomy_offline_longest_seconds")
                assert 100 <= offline_s <= 100 + trio.current_time() - lost_s
                assert sample(registry, "ocpp_lc_autonomy_stations", mode="local") == 1
                assert sample(registry, "ocpp_lc_autonomy_queue_messages") == 2
                assert sample(registry, "ocpp_lc_autonomy_queue_fullest_station_messages") == 2
                assert sample(registry, "ocpp_lc_autonomy_replay_remaining_messages") == 0  # not replaying yet
                authorizations = "ocpp_lc_autonomy_local_authorizations_total"
                assert sample(registry, authorizations, outcome="cached", status="Accepted") == 1
                assert sample(registry, authorizations, outcome="unknown_rejected", status="Unknown") == 1
                assert sample(registry, authorizations, outcome="unknown_accepted", status="Accepted") == 0

                # The CSMS is back: the replay's progress, then its duration.
                csms_back.set()
                again = await restored.receive()
                back_s = trio.current_time()
                first = json.loads(await again.receive_text())
                assert sample(registry, "ocpp_lc_autonomy_stations", mode="replaying") == 1
                assert sample(registry, "ocpp_lc_autonomy_replay_remaining_messages") == 2
                await trio.sleep(3)
                await again.send_text(ocppj.encode_result(first[1], {}))
                second = json.loads(await again.receive_text())
                assert sample(registry, "ocpp_lc_autonomy_replay_remaining_messages") == 1
                await trio.sleep(2)
                await again.send_text(ocppj.encode_result(second[1], {}))
                await wait_for_mode(autonomy, "CS01", "relaying")
                drained_s = trio.current_time() - back_s
                nursery.cancel_scope.cancel()

    assert 5 <= drained_s < 5.1
    duration = "ocpp_lc_autonomy_replay_duration_seconds"
    assert sample(registry, f"{duration}_count") == 1
    assert 5 <= sample(registry, f"{duration}_sum") <= drained_s
    assert sample(registry, f"{duration}_bucket", le="2.5") == 0
    assert sample(registry, f"{duration}_bucket", le="10.0") == 1
    # Relayed again: nothing offline, nothing left.
    assert sample(registry, "ocpp_lc_autonomy_offline_longest_seconds") == 0
    assert sample(registry, "ocpp_lc_autonomy_stations", mode="local") == 0
    assert sample(registry, "ocpp_lc_autonomy_stations", mode="replaying") == 0
    assert sample(registry, "ocpp_lc_autonomy_replay_remaining_messages") == 0
    assert sample(registry, "ocpp_lc_autonomy_replayed_total", outcome="result") == 2
