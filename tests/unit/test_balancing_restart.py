"""The balancing loop keeps what it knows of the stations across a restart of the controller.

After a restart the stations keep the profiles they accepted (K01: installed charging profiles
persist), so the controller must take back the same picture: the EVSEs, their transactions and the
limits they accepted. Otherwise every session would be cut to its minimum and ramped up again, and
idle EVSEs would go uncounted until they speak.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from balancing.allocator import SiteLimits
from balancing.loop import Balancer, CallOutcome, LoopSettings
from balancing.rollout import RolloutPolicy
from balancing.site import SiteConfig
from router.store import Store

SITE = SiteConfig.model_validate({"grid": {"max_current_amperes": 40}})
SETTINGS = LoopSettings(rollout=RolloutPolicy(min_interval_s=0))


class Stations:
    """Stations that accept every profile after 50 ms and remember what they were sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        await trio.sleep(0.05)
        self.sent.append((station_id, payload))
        return CallOutcome("answered", {"status": "Accepted"})


def started(transaction_id: str) -> dict[str, Any]:
    return {
        "eventType": "Started",
        "timestamp": "2026-11-25T12:00:00Z",
        "triggerReason": "CablePluggedIn",
        "seqNo": 0,
        "transactionInfo": {"transactionId": transaction_id, "chargingState": "Charging"},
        "evse": {"id": 1, "connectorId": 1},
    }


def limits(_: Any) -> SiteLimits:
    return SiteLimits()


async def run_until_quiet(balancer: Balancer, body: Any) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        await body()
        await trio.sleep(5)  # virtual time: every answer and reallocation is done long before
        nursery.cancel_scope.cancel()


def limit_of(payload: Mapping[str, Any]) -> float:
    return float(payload["chargingProfile"]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"])


async def test_a_restarted_controller_takes_back_sessions_and_installed_limits(
    autojump_clock: Any, tmp_path: Any
) -> None:
    stations = Stations()
    with Store.open(tmp_path) as store:
        first = Balancer(SITE, limits, stations, SETTINGS, state=store.namespace("balancing"))

        async def two_sessions() -> None:
            for station_id in ("A", "B"):
                first.station_connected(station_id)
                first.station_call(station_id, "TransactionEvent", started(f"tx-{station_id}"))

        await run_until_quiet(first, two_sessions)
        before = {row["station_id"]: row for row in first.evse_rows()}
    assert before["A"]["installed_amperes"] == before["B"]["installed_amperes"] == 20.0

    # The restart: a new loop on the same state file; the stations reconnect and say nothing more.
    stations.sent.clear()
    with Store.open(tmp_path) as store:
        second = Balancer(SITE, limits, stations, SETTINGS, state=store.namespace("balancing"))

        async def reconnect() -> None:
            for station_id in ("A", "B"):
                second.station_connected(station_id)

        await run_until_quiet(second, reconnect)
        after = {row["station_id"]: row for row in second.evse_rows()}

    assert after["A"]["transaction_id"] == "tx-A"
    assert after["B"]["transaction_id"] == "tx-B"
    assert after["A"]["installed_amperes"] == after["B"]["installed_amperes"] == 20.0
    # Issue 11.2: each EVSE was counted at its maximum until its station confirmed, by accepting the
    # limit it had before once more; no session was cut back to its minimum and ramped up again.
    assert sorted((station_id, limit_of(payload)) for station_id, payload in stations.sent) == [
        ("A", 20.0),
        ("B", 20.0),
    ]
    assert after["A"]["unconfirmed_since_restart"] is after["B"]["unconfirmed_since_restart"] is False


async def test_an_unreadable_stored_station_is_learned_again_not_fatal(autojump_clock: Any, tmp_path: Any) -> None:
    with Store.open(tmp_path) as store:
        store.namespace("balancing").put("A", {"evses": {"one": {"installed": "lots"}}})
        store.namespace("balancing").put("B", {"evses": {"1": {"default": 0.0, "installed": 0.0}}})
        balancer = Balancer(SITE, limits, Stations(), SETTINGS, state=store.namespace("balancing"))

    rows = balancer.evse_rows()
    # B is taken back, unconfirmed until its station accepts a profile again (issue 11.2).
    assert [(row["station_id"], row["evse_id"], row["unconfirmed_since_restart"]) for row in rows] == [("B", 1, True)]
