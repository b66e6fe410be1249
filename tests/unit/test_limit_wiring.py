"""The limit sources as the appliance wires them (router/app.py ``build_app``), without running anything.

What is checked here is what the pieces cannot show alone: that the limits the balancing loop and the
K08 composite read know when the CSMS's ChargingStationMaxProfile changes (#11.5, #11.7), that a
damaged stored EMS limit is counted where /metrics looks (#11.10), and that a limit resolution the
OCPP schedules cannot carry is refused by check-config (#11.9).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from router.app import App, build_app
from router.config import ConfigError, parse_settings
from router.store import Store
from tests.support.schemas import validate_call, validate_result

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def site_profile(periods: list[tuple[int, float]], start: datetime = NOW, **extra: Any) -> dict[str, Any]:
    return {
        "id": 7,
        "stackLevel": 0,
        "chargingProfilePurpose": "ChargingStationMaxProfile",
        "chargingProfileKind": "Absolute",
        "chargingSchedule": [
            {
                "id": 1,
                "startSchedule": stamp(start),
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": s, "limit": limit} for s, limit in periods],
            }
        ],
        **extra,
    }


def app_with_grid(store: Store, grid_amperes: float = 40.0) -> App:
    settings = parse_settings(
        {"controller": {"connect": False}, "site": {"grid": {"max_current_amperes": grid_amperes}}}
    )
    return build_app(settings, store)


def accept(app: App, profile: dict[str, Any]) -> None:
    request = {"evseId": 0, "chargingProfile": profile}
    validate_call("SetChargingProfile", request)
    answer = app.csms_limits.set_profile(request, NOW)
    validate_result("SetChargingProfile", answer)
    assert answer == {"status": "Accepted"}


def test_the_loop_wakes_when_the_csms_site_profile_changes(tmp_path: Path) -> None:
    """#11.5: the balancing loop sleeps until ``limits.next_change_after``; a CSMS profile dropping to
    10 A at +60 s must wake it then (it was woken only at EMS change points, so the drop reached the
    stations at the next periodic recompute)."""
    with Store.open(tmp_path) as store:
        app = app_with_grid(store)
        accept(app, site_profile([(0, 30.0), (60, 10.0)], validTo=stamp(NOW + timedelta(seconds=600))))
        assert app.limits.next_change_after(NOW) == NOW + timedelta(seconds=60)
        assert app.limits.next_change_after(NOW + timedelta(seconds=60)) == NOW + timedelta(seconds=600)
        assert app.limits.next_change_after(NOW + timedelta(seconds=600)) is None
        # The limit itself does change there, as the loop will find once woken.
        assert app.limits.effective(NOW + timedelta(seconds=60)).phase_current_amperes == (10.0, 10.0, 10.0)


def test_composite_reports_a_csms_limit_that_rises_inside_the_window(tmp_path: Path) -> None:
    """#11.7, K08.FR.02: GetCompositeSchedule (evseId 0) describes the whole window. A CSMS site profile
    of 10 A for 60 s then 30 A under a 40 A grid is 10 A then 30 A (it was 10 A for all 300 s: the
    other sources were sampled only where an EMS limit changed)."""
    with Store.open(tmp_path) as store:
        app = app_with_grid(store)
        accept(app, site_profile([(0, 10.0), (60, 30.0)]))
        request = {"evseId": 0, "duration": 300, "chargingRateUnit": "A"}
        validate_call("GetCompositeSchedule", request)
        answer = app.csms_limits.composite(request, NOW)
        validate_result("GetCompositeSchedule", answer)
        periods = [(p["startPeriod"], p["limit"]) for p in answer["schedule"]["chargingSchedulePeriod"]]
        assert periods == [(0, 10.0), (60, 30.0)]


def test_a_damaged_stored_ems_limit_is_counted_on_the_apps_metrics(tmp_path: Path) -> None:
    """#11.10: the counter of damaged EMS limits is on the registry /metrics serves."""
    with Store.open(tmp_path) as store:
        store.namespace("ems_limits").put("dso", {"unit": "A", "periods": "garbled"})
        app = app_with_grid(store)
        assert app.registry.get_sample_value("ocpp_lc_ems_limits_damaged_total") == 1.0
        assert app.limits.effective().phase_sources == ("failsafe:dso",) * 3


@pytest.mark.parametrize("resolution", [0.01, 0.05, 0.25])
def test_a_resolution_finer_than_one_decimal_is_refused(resolution: float) -> None:
    """#11.9: chargingSchedulePeriod.limit carries at most one decimal (Part 2, ChargingSchedulePeriodType),
    so limits cannot be rounded to a finer step than 0.1 A, nor to one that is not a multiple of it."""
    with pytest.raises(ConfigError) as raised:
        parse_settings({"balancing": {"resolution_amperes": resolution}})
    (problem,) = raised.value.problems
    assert problem.location == "balancing.resolution_amperes"
    assert "0.1" in problem.message and "one decimal" in problem.message


@pytest.mark.parametrize("resolution", [0.1, 0.5, 1.0])
def test_resolutions_of_one_decimal_are_taken(resolution: float) -> None:
    assert parse_settings({"balancing": {"resolution_amperes": resolution}}).balancing.resolution_amperes == resolution
