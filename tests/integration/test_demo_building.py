"""The demo's building behind a grid meter (#16): a heat pump switching on lowers the EVs, then they recover.

The demo runs as the other demo tests run it (the real appliance, the sandbox CSMS and simulated
stations on loopback, on trio's real clock: a pymodbus server thread and the meter service's worker
threads are involved), on a short plan: the heat pump runs from 4 s to 8 s. The meter is pymodbus's own
Modbus TCP server answering SunSpec (model 1 + 203) and the controller reads it through its ``[[meters]]``
entry like any installed meter.
"""

from __future__ import annotations

import datetime
import io
import re

import trio

from router.demo.building_meter import METER_NAME, BuildingPlan, BuildingRecord
from router.demo.runner import demo_main
from router.demo.view import Header, RelayCounters, SiteModel, render_live, site_balance
from tests.integration.test_demo import FAST, RUN_TIMEOUT_S, FrameRecorder
from tests.support.schemas import validate_frames

GRID_AMPERES = 100.0
#: A short story: the heat pump (+40 A per phase) runs from 4 s to 8 s; a falling load is taken in
#: within a few seconds (smoothed: the meter and the EVs' meter values are not read at the same
#: instant), so the EVs have recovered before the end at 13 s.
PLAN = BuildingPlan(heat_pump_on_at_s=4.0, heat_pump_for_s=4.0, poll_interval_s=0.25, fall_time_constant_s=1.0)


async def test_the_heat_pump_switching_on_lowers_the_evs_allocations_and_they_come_back() -> None:
    recorder = FrameRecorder()
    out = io.StringIO()
    with trio.fail_after(RUN_TIMEOUT_S):
        summary = await demo_main(
            6,
            13.0,
            True,
            out,
            frame_log=recorder,
            timings=FAST,
            ems=None,
            outage=None,
            firmware_after_s=None,
            grid_amperes=GRID_AMPERES,
            building=PLAN,
        )
    text = out.getvalue()
    building = summary.building
    assert building is not None and building.heat_pump_ran
    assert summary.errors == 0, text  # no meter warning: every poll was read and used

    # Before, the building takes ~12 A: the EVs were allowed far more than the heat pump leaves them.
    pump_load = max(PLAN.load_amperes(PLAN.heat_pump_on_at_s + 1))
    assert pump_load > 49
    left_with_pump = GRID_AMPERES - pump_load
    assert building.allowed_before_amperes is not None and building.allowed_before_amperes > left_with_pump + 20
    # While it ran (once the controller had followed), the EVs were allowed about what the building left
    # them: a few amperes more at most, while decreases after a poll are on their way (the meter and the
    # EVs' own meter values are not read at the same instant, so the estimate moves by an ampere or two).
    assert building.allowed_during_amperes is not None
    assert building.allowed_during_amperes <= GRID_AMPERES - min(PLAN.load_amperes(PLAN.heat_pump_on_at_s + 1)) + 6
    assert building.allowed_during_amperes < building.allowed_before_amperes - 25
    # Off again, the allocations came back up.
    assert building.allowed_after_amperes is not None
    assert building.allowed_after_amperes > building.allowed_during_amperes + 20

    # What the operator reads: the meter announced, the heat pump's story, and the summary.
    assert re.search(r"building behind a SunSpec grid meter on 127\.0\.0\.1:\d+ \(Modbus TCP\)", text)
    assert "building: the heat pump switches on (+40 A per phase)" in text
    assert re.search(r"building: the heat pump switches off; the EVs were allowed at most \d+ A per phase", text)
    assert re.search(r"^  building +SunSpec meter on the grid, load up to 5\d A per phase$", text, re.MULTILINE)
    assert re.search(
        r"heat pump \+40 A at 4-8 s: EVs allowed up to \d+ A before,\n +at most \d+ A while it ran, up to \d+ A after",
        text,
    )
    # The controller's own calls to the stations under the changing limit are valid OCPP 2.0.1.
    for label in recorder.frames:
        validate_frames(recorder.texts(label))


def test_live_view_shows_the_building_load_and_what_the_meter_leaves() -> None:
    # Pure: the view's line from the controller's meter status while the heat pump runs.
    record = BuildingRecord(PLAN, load_amperes=PLAN.load_amperes(5.0))
    meters = [
        {"meter": METER_NAME, "node": "grid", "fallback": False, "headroom_amperes": [45.1, 48.0, 47.2]},
    ]
    balance = site_balance({}, ems="none", firmware="-", building=record.text(meters, 5.0))
    lines = [
        line.text
        for line in render_live(
            SiteModel(),
            Header("LC-DEMO", "ws://127.0.0.1:1/ocpp/<id>", "http://127.0.0.1:2/metrics", "ws://127.0.0.1:3/ocpp"),
            RelayCounters({}, 0, 0, 0),
            uptime_s=5.0,
            clock=(0.0, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)),
            width=120,
            height=30,
            balance=balance,
        )
    ]
    assert "building   load 52/49/50 A · meter leaves 45/48/47 A for the EVs · heat pump on (+40 A) until 8 s" in lines
    # A meter that cannot be read says so.
    meters[0]["fallback"] = True
    assert "meter FALLBACK" in record.text(meters, 9.0) and "heat pump off" in record.text(meters, 9.0)
