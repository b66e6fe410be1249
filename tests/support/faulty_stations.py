"""The physical side of the faulty-fleet simulation (tests/unit/test_fleet_faults.py): the site, the
CSMS's scheduled grid limit, and the stations, EVSEs and EVs as OCPP 2.0.1 describes them, written
independently of the controller. Pure data and arithmetic; the trio side is :mod:`tests.support.faulty_fleet`.
"""

from __future__ import annotations

import bisect
import math
import os
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import trio

from balancing.allocator import SiteLimits
from balancing.site import GRID_NODE_ID, SiteConfig, StationConfig
from tests.unit.test_fleet_balancer import ROTATIONS

SEEDS = range(20)
# Per seed (OCPP_LC_FLEET_EVENTS for a longer run by hand): 1,000 take ~115 s for 20 seeds on this 2-core box,
# nearly all of it the loop's own reallocations.
EVENTS = int(os.environ.get("OCPP_LC_FLEET_EVENTS", "500"))
MEAN_GAP_S = 3.0
VOLTAGE = 230.0
CALL_TIMEOUT_S = 5.0
HOP_MAX_S = 1.0
LEAD_S = 30.0
MIN_INTERVAL_S = 30.0
METER_INTERVAL_S = 20.0
GRACE_S = 40.0
MARGIN_AMPERES = 2.0
VALIDITY_S = 900.0
IDLE_AMPERES = 6.0
MAX_FAULTY = 2
COOLDOWN_S = 60.0
DOWN_MAX_S = 45.0
RECONNECT_MAX_S = 10.0
GRID_FLOOR_AMPERES = 80.0  # above the worst two faulty stations on one phase (S01's 40 A + S08's 32 A)
POWER_FLOOR_WATTS = 50_000.0  # above two 3-phase 32 A stations (44.2 kW)
#: The controller's reaction once it knows: a decrease under way at an EVSE (a call timeout at worst),
#: then the decrease itself and a second round should that one fail (two round trips).
REACT_S = CALL_TIMEOUT_S + 2 * (2 * HOP_MAX_S)
#: Overdraw: the first sample above comes within a meter interval, the clock runs ``GRACE_S`` (a multiple
#: of the interval, so detection is at a sample), then the others are lowered (REACT_S).
OVERDRAW_WINDOW_S = METER_INTERVAL_S + GRACE_S + REACT_S
#: Waiting (115 s): an EV drawing less than offered gives the rest back once the allocator has seen it do
#: so for ``UNDERDRAW_GRACE_S`` (plus a meter interval for the sample); a retry goes out at most once per
#: ``MIN_INTERVAL_S`` per station (a station just back, or one whose first answer was lost, needs up to
#: two); increases wait until every decrease under way is answered (a call timeout each, three rounds).
UNDERDRAW_GRACE_S = 20.0
UNDERDRAW_HEADROOM_AMPERES = 2.0
WAIT_LIMIT_S = UNDERDRAW_GRACE_S + METER_INTERVAL_S + 2 * MIN_INTERVAL_S + 3 * CALL_TIMEOUT_S
TOLERANCE_AMPERES = 1e-6
EPOCH = datetime(2026, 1, 5, 6, 0, tzinfo=UTC)
FAULTS = ("rejecting", "ignoring", "flaky", "offline", "overdraw")
FAULT_SPAN_S = {"rejecting": (20, 150), "ignoring": (10, 60), "flaky": (30, 150), "offline": (5, 120)}
FAULT_SPAN_S["overdraw"] = (60, 240)


def wall_at(now_s: float) -> datetime:
    return EPOCH + timedelta(seconds=now_s)


def seconds_of(wall: datetime) -> float:
    return (wall - EPOCH).total_seconds()


def faults_site() -> SiteConfig:
    """12 stations, 16 EVSEs: grid 150 A / 90 kW, circuit A 70 A, B 50 A / 25 kW with B1 48 A below it."""
    rows = [  # id, circuit, phases, EVSE max, extra
        ("S00", GRID_NODE_ID, 3, 32.0, {}),
        ("S01", GRID_NODE_ID, 1, 32.0, {"two": True, "max_current_amperes": 40.0}),
        ("S02", GRID_NODE_ID, 3, 16.0, {}),
        ("S03", GRID_NODE_ID, 1, 32.0, {}),
        ("S04", "A", 3, 32.0, {}),
        ("S05", "A", 3, 32.0, {"max_power_watts": 11_000.0}),
        ("S06", "A", 1, 32.0, {"two": True, "max_current_amperes": 32.0}),
        ("S07", "B", 3, 16.0, {}),
        ("S08", "B", 1, 32.0, {}),
        ("S09", "B1", 3, 16.0, {}),
        ("S10", "B1", 1, 32.0, {"two": True, "max_current_amperes": 32.0}),
        ("S11", GRID_NODE_ID, 3, 32.0, {}),
    ]
    stations = []
    for index, (station_id, circuit, phases, maximum, extra) in enumerate(rows):
        station: dict[str, Any] = {
            "station_id": station_id,
            "circuit_id": circuit,
            "phases": phases,
            "phase_rotation": ROTATIONS[index % 6],
            "evse_min_current_amperes": 6.0,
            "evse_max_current_amperes": maximum,
        }
        if extra.pop("two", False):
            station["evses"] = [{"evse_id": 1}, {"evse_id": 2, "max_current_amperes": 16.0}]
        stations.append(station | extra)
    return SiteConfig.model_validate(
        {
            "nominal_voltage_volts": VOLTAGE,
            "grid": {"max_current_amperes": 150.0, "max_power_watts": 90_000.0},
            "circuits": [
                {"circuit_id": "A", "max_current_amperes": 70.0},
                {"circuit_id": "B", "max_current_amperes": 50.0, "max_power_watts": 25_000.0},
                {"circuit_id": "B1", "parent_id": "B", "max_current_amperes": 48.0},
            ],
            "stations": stations,
            "policy": {
                "rotation_period_s": 300.0,
                "underdraw_grace_s": UNDERDRAW_GRACE_S,
                "underdraw_headroom_amperes": UNDERDRAW_HEADROOM_AMPERES,
            },
        }
    )


# --- the CSMS's scheduled site limit -----------------------------------------------------------------


class Schedule:
    """The grid limit as periods starting at whole seconds (a CSMS profile with future periods)."""

    def __init__(self) -> None:
        self.starts: list[float] = [0.0]
        self.limits: list[SiteLimits] = [SiteLimits()]

    def at(self, now_s: float) -> SiteLimits:
        return self.limits[bisect.bisect_right(self.starts, now_s) - 1]

    def limits_at(self, wall: datetime) -> SiteLimits:
        return self.at(seconds_of(wall))

    def next_change(self, wall: datetime) -> datetime | None:
        index = bisect.bisect_right(self.starts, seconds_of(wall))
        return wall_at(self.starts[index]) if index < len(self.starts) else None

    def lowest(self, start_s: float, end_s: float) -> SiteLimits:
        found = self.at(start_s)
        for at_s, limits in zip(self.starts, self.limits, strict=True):
            if start_s < at_s <= end_s:
                found = found.tighter(limits)
        return found

    def drops_in(self, start_s: float, end_s: float) -> list[float]:
        """The instants in ``[start_s, end_s]`` where the limit drops somewhere (a phase or power)."""
        return [
            self.starts[i]
            for i in range(1, len(self.starts))
            if start_s <= self.starts[i] <= end_s
            and any(a < b for a, b in zip(vector(self.limits[i]), vector(self.limits[i - 1]), strict=True))
        ]

    def add(self, at_s: float, limits: SiteLimits) -> None:
        index = bisect.bisect_right(self.starts, at_s)
        if self.starts[index - 1] == at_s:
            self.limits[index - 1] = limits
        else:
            self.starts.insert(index, at_s)
            self.limits.insert(index, limits)


def vector(limits: SiteLimits) -> tuple[float, float, float, float]:
    phases = limits.phase_current_amperes or (math.inf, math.inf, math.inf)
    return (*phases, math.inf if limits.power_watts is None else limits.power_watts / VOLTAGE)


# --- the physical stations -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    limit_amperes: float
    phases: int | None
    valid_to_s: float
    transaction_id: str | None = None


@dataclass
class Ev:
    max_amperes: float
    phases: int


@dataclass
class SimEvse:
    evse_id: int
    max_amperes: float
    min_amperes: float
    default: Installed | None = None
    tx: Installed | None = None
    transaction_id: str | None = None
    ev: Ev | None = None
    reported_phases: int | None = None
    overdrawing: bool = False  # its EV draws its maximum whatever the profile says
    #: While overdrawing: since when it is above its limit by more than the margin (None: it is not).
    visible_since_s: float | None = None
    priority: int = 0
    trusted: bool = False  # the controller's view as the stations see it (for the waiting rule only)
    waiting_since_s: float | None = None

    def governing(self, now_s: float) -> Installed | None:
        tx = self.tx
        if tx is not None and tx.transaction_id == self.transaction_id and now_s < tx.valid_to_s:
            return tx
        default = self.default
        return default if default is not None and now_s < default.valid_to_s else None

    def limit_amperes(self, now_s: float) -> float:
        found = self.governing(now_s)
        return self.max_amperes if found is None else min(found.limit_amperes, self.max_amperes)

    def phases_used(self, station_phases: int, now_s: float) -> int:
        found = self.governing(now_s)
        allowed = 3 if found is None or found.phases is None else found.phases
        return 0 if self.ev is None else min(self.ev.phases, station_phases, allowed)

    def update_overdraw(self, now_s: float, *, down: bool = False, restarted: bool = False) -> None:
        """Open the window of an overdraw the controller can see: above the limit by more than the margin.
        While the controller is down nothing can be compensated (the window stays open, ``inf``); a new
        controller knows nothing of it: the window opens again once its stations are back."""
        above = self.overdrawing and self.draw_amperes(now_s) > self.limit_amperes(now_s) + MARGIN_AMPERES
        if not above:
            self.visible_since_s = None
        elif down:
            self.visible_since_s = math.inf
        elif restarted:
            self.visible_since_s = now_s + RECONNECT_MAX_S
        elif self.visible_since_s is None:
            self.visible_since_s = now_s

    def excused(self, now_s: float) -> bool:
        """Whether its overdraw is one the controller cannot have compensated yet: within the margin (the
        overdraw policy tolerates that much) or inside its window."""
        since = self.visible_since_s
        return self.overdrawing and (since is None or since == math.inf or now_s <= since + OVERDRAW_WINDOW_S)

    def draw_amperes(self, now_s: float, compliant: bool = False) -> float:
        """What its EV draws per phase (``compliant``: an excused overdraw at the limit instead)."""
        if self.ev is None:
            return 0.0
        if self.overdrawing and not (compliant and self.excused(now_s)):
            return min(self.ev.max_amperes, self.max_amperes)
        return min(self.ev.max_amperes, self.limit_amperes(now_s))


@dataclass(eq=False)
class Frame:
    payload: dict[str, Any]
    sent_at_s: float
    done: trio.Event = field(default_factory=trio.Event)
    answer: dict[str, Any] | None = None
    gone: bool = False  # the link dropped: no answer will come
    lost: bool = False  # ...and it never arrived
    arrives_at_s: float = math.inf

    def order(self) -> tuple[float, int, str]:
        return (self.sent_at_s, int(self.payload["evseId"]), str(self.payload["chargingProfile"]["id"]))


@dataclass(eq=False)
class SimStation:
    config: StationConfig
    evses: dict[int, SimEvse]
    nodes: list[str]
    rng: random.Random
    meter_in_tx: bool
    connected: bool = False
    fault: str | None = None
    healthy_from_s: float = 0.0
    queue: list[Frame] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)
    current: Frame | None = None
    seq_no: int = 0
    transactions: int = 0

    @property
    def station_id(self) -> str:
        return self.config.station_id

    def grid_phases(self, count: int) -> tuple[int, ...]:
        """Written out from the wiring (station Lk -> the k-th letter of its rotation), not the site model."""
        return self.wiring[count]

    def __post_init__(self) -> None:
        rotation = self.config.phase_rotation
        self.wiring = [tuple("RST".index(letter) for letter in rotation[:count]) for count in range(4)]
