"""The CSMS's site limit (K03) on the controller's own identity, against an independent CSMS (the PyPI
`ocpp` library in its own process): SetChargingProfile, GetCompositeSchedule, GetChargingProfiles with
its ReportChargingProfiles, ClearChargingProfile, and the profile surviving a restart (K01.FR.27).

Only the own identity runs here, started as the app starts it, with the site-limit book registered on
it and a real state store in a temporary directory. Every frame the controller wrote is checked
against the OCA schemas at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from balancing.csms_limits import CsmsLimitBook
from balancing.schedules import PeriodLimit
from router.own.charging_handlers import register_csms_limits
from router.own.service import OwnIdentity, OwnIdentitySettings, utc_now
from router.store import Store
from tests.support.peers import Peer, open_csms
from tests.support.schemas import validate_frames

IDENTITY = "LC01"
#: Generous for a Python subprocess on a loaded two-core machine; a pass takes a few seconds.
TIMEOUT_S = 20
GRID = PeriodLimit(250.0, "A", 3)


@asynccontextmanager
async def controller_with_limits(port: int, state_dir: Path) -> AsyncIterator[CsmsLimitBook]:
    """The own identity of a controller with the CSMS site-limit book, state in ``state_dir``."""
    settings = OwnIdentitySettings(
        identity=IDENTITY,
        csms_host="127.0.0.1",
        csms_port=port,
        csms_path="/ocpp",
        connect_timeout_s=5.0,
        message_timeout_s=5,
        retry_wait_minimum_s=1,
        retry_random_range_s=0,
        retry_repeat_times=0,
        boot_retry_s=1.0,
        websocket_ping_interval_s=0,
    )
    with Store.open(state_dir) as store:
        async with trio.open_nursery() as nursery:
            own = OwnIdentity(
                settings,
                store=store,
                registry=CollectorRegistry(),
                connected_stations=lambda: [],
                request_restart=lambda reason: None,
            )
            book = CsmsLimitBook(
                store.namespace("csms_limits"),
                grid_limit=GRID,
                max_stack_level=settings.profile_stack_level,
                max_periods=settings.periods_per_schedule,
            )
            register_csms_limits(own, book, utc_now)
            await nursery.start(own.run)
            yield book
            nursery.cancel_scope.cancel()


async def wait_boots(csms: Peer, count: int) -> None:
    await csms.wait_for(
        lambda e: (
            len([x for x in csms.events if x.get("event") == "request" and x.get("action") == "BootNotification"])
            >= count
        )
    )


async def call(csms: Peer, action: str, payload: dict[str, Any]) -> dict[str, Any]:
    answer = await csms.call(identity=IDENTITY, action=action, payload=payload)
    assert answer["event"] == "result", answer
    result: dict[str, Any] = answer["payload"]
    return result


def site_profile(start: datetime) -> dict[str, Any]:
    return {
        "id": 11,
        "stackLevel": 2,
        "chargingProfilePurpose": "ChargingStationMaxProfile",
        "chargingProfileKind": "Absolute",
        "chargingSchedule": [
            {
                "id": 1,
                "startSchedule": start.isoformat().replace("+00:00", "Z"),
                "duration": 3 * 3600,
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [
                    {"startPeriod": 0, "limit": 100.0},
                    {"startPeriod": 3600, "limit": 80.0},
                    {"startPeriod": 7200, "limit": 120.0, "numberPhases": 3},
                ],
            }
        ],
    }


def limits(answer: dict[str, Any]) -> list[float]:
    return [period["limit"] for period in answer["schedule"]["chargingSchedulePeriod"]]


async def test_site_limit_set_answered_reported_survives_restart_and_cleared(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    async with open_csms() as (csms, port):
        async with controller_with_limits(port, state_dir) as book:
            with trio.fail_after(TIMEOUT_S):
                await wait_boots(csms, 1)
                set_answer = await call(
                    csms, "SetChargingProfile", {"evseId": 0, "chargingProfile": site_profile(start)}
                )
                assert set_answer == {"status": "Accepted"}
                assert book.limit_at(datetime.now(UTC)) == PeriodLimit(100.0, "A", None)

                composite = await call(
                    csms, "GetCompositeSchedule", {"evseId": 0, "duration": 3 * 3600, "chargingRateUnit": "A"}
                )
                assert composite["status"] == "Accepted"
                assert composite["schedule"]["evseId"] == 0
                periods = composite["schedule"]["chargingSchedulePeriod"]
                assert limits(composite) == [100.0, 80.0, 120.0, 250.0]  # then the grid connection
                # Counted from the moment of receipt (K08.FR.02), a few seconds after startSchedule.
                assert 3600 - 5 - TIMEOUT_S <= periods[1]["startPeriod"] <= 3600 - 5

                tx_profile = {**site_profile(start), "id": 12, "chargingProfilePurpose": "TxProfile"}
                tx_profile["transactionId"] = "TX1"
                refused = await call(csms, "SetChargingProfile", {"evseId": 0, "chargingProfile": tx_profile})
                assert refused["status"] == "Rejected"  # K01.FR.16: the controller has no EVSE
                assert [p.id for p in book.profiles] == [11]

                malformed = await csms.call(
                    identity=IDENTITY,
                    action="GetCompositeSchedule",
                    payload={"evseId": 0, "duration": "an hour"},
                    validate=False,
                )
                assert malformed["event"] == "error" and malformed["code"] == "TypeConstraintViolation"

                listed = await call(csms, "GetChargingProfiles", {"requestId": 42, "chargingProfile": {}})
                assert listed == {"status": "Accepted"}
                report = await csms.wait_for(
                    lambda e: e.get("event") == "request" and e.get("action") == "ReportChargingProfiles"
                )
                assert report["payload"]["requestId"] == 42  # K09.FR.01
                assert report["payload"]["evseId"] == 0 and not report["payload"].get("tbc", False)
                assert [p["id"] for p in report["payload"]["chargingProfile"]] == [11]

        # The controller restarts on the same state directory: the CSMS's limit is still in force.
        async with controller_with_limits(port, state_dir) as book:
            with trio.fail_after(TIMEOUT_S):
                await wait_boots(csms, 2)
                assert [p.id for p in book.profiles] == [11]
                again = await call(
                    csms, "GetCompositeSchedule", {"evseId": 0, "duration": 600, "chargingRateUnit": "W"}
                )
                assert again["schedule"]["chargingRateUnit"] == "W"
                assert limits(again) == [69_000.0]  # 100 A × 230 V × 3 phases

                cleared = await call(csms, "ClearChargingProfile", {"chargingProfileId": 11})
                assert cleared == {"status": "Accepted"}
                assert book.limit_at(datetime.now(UTC)) is None
                unknown = await call(csms, "ClearChargingProfile", {"chargingProfileId": 11})
                assert unknown == {"status": "Unknown"}  # K10.FR.01
                empty = await call(csms, "GetChargingProfiles", {"requestId": 43, "chargingProfile": {}})
                assert empty == {"status": "NoProfiles"}
                grid_only = await call(csms, "GetCompositeSchedule", {"evseId": 0, "duration": 300})
                assert limits(grid_only) == [250.0]
    # Every frame on the connection but the CSMS's deliberately malformed call (its CALLERROR answer is checked).
    validate_frames(frame for frame in csms.frames(identity=IDENTITY) if '"an hour"' not in frame)
