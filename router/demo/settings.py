"""The demo's site and the appliance's settings for it: the simulated stations as wired, and the
configuration ``ocpp-lc run`` would read for such a site, all on loopback.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ..config import Settings, parse_settings

#: Seeds the stations' and the CSMS's random choices: the same seed gives the same story.
DEFAULT_SEED: Final = 2024
CONTROLLER_IDENTITY: Final = "LC-DEMO"
OCPP_PATH: Final = "/ocpp"
#: How long the appliance may take to close every station on shutdown.
SHUTDOWN_GRACE_S: Final = 3.0
#: Events buffered for the view, per station. The view reads them as they come, but at start-up every
#: station connects and boots at once, and the view's task then gets the CPU only now and then.
OBSERVER_CAPACITY_PER_STATION: Final = 50
OBSERVER_CAPACITY_MIN: Final = 1000
#: The grid connection's limit per phase: well under what a dozen stations could draw (12 × 32 A).
DEMO_GRID_AMPERES: Final = 100.0
#: The vendor's firmware file the sandbox CSMS has the controller publish.
FIRMWARE_NAME: Final = "demo-fw-1.1.0.bin"
#: The station the sandbox CSMS updates from the published file.
FIRMWARE_TARGET: Final = "DEMO-01"
#: Stations wired on one phase, with their phase rotation (Part 2 §2.13.5): they load grid S and T,
#: not R, which the other stations' 1-phase EVs load (RST rotation).
ONE_PHASE_STATIONS: Final = {4: "STR", 9: "TRS"}


@dataclass(frozen=True, slots=True)
class StationSpec:
    """One simulated station, as wired on the site (and so as ``[site.stations]`` describes it)."""

    identity: str
    phases: int
    phase_rotation: str
    max_current_amperes: float


def _per_phase(amperes: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.0f}" for value in amperes) + " A"


def station_specs(count: int, seed: int = DEFAULT_SEED) -> list[StationSpec]:
    """The demo's stations: mostly 3-phase 16 or 32 A, two 1-phase 32 A ones with their own rotation."""
    width = max(2, len(str(count)))
    specs = []
    for number in range(1, count + 1):
        rotation = ONE_PHASE_STATIONS.get(number)
        rating = random.Random(f"{seed}-rating-{number}").choice((16.0, 32.0, 32.0))
        specs.append(
            StationSpec(
                identity=f"DEMO-{number:0{width}d}",
                phases=1 if rotation else 3,
                phase_rotation=rotation or "RST",
                max_current_amperes=32.0 if rotation else rating,
            )
        )
    return specs


def demo_settings(
    csms_port: int,
    state_dir: Path,
    stations: list[StationSpec] | None = None,
    *,
    grid_amperes: float | None = None,
    meter: dict[str, object] | None = None,
    other_load_amperes: float | None = None,
) -> Settings:
    """The appliance's settings for the demo: everything on loopback, ports chosen by the OS, state in
    ``state_dir`` (a throw-away folder: the demo never touches an installed controller's state).

    With ``grid_amperes`` the site has that grid limit and ``stations`` are described in ``[site]``;
    balancing runs either way, tuned for a demo whose sessions last seconds, not hours: reallocation
    every second, increases at most every 2 s per station, an EV that takes less than it is given
    handing the rest on after 5 s. ``meter`` is a ``[[meters]]`` entry (the simulated building's grid
    meter, which needs ``grid_amperes``), ``other_load_amperes`` what the site assumes for the building
    while that meter cannot be read.
    """
    site: dict[str, object] = {
        "stations": [
            {
                "station_id": spec.identity,
                "phases": spec.phases,
                "phase_rotation": spec.phase_rotation,
                "evse_max_current_amperes": spec.max_current_amperes,
            }
            for spec in stations or []
        ],
        "policy": {"underdraw_grace_s": 5.0, "rotation_period_s": 20.0},
    }
    if grid_amperes is not None:
        site["grid"] = {"max_current_amperes": grid_amperes}
    if other_load_amperes is not None:
        site["other_load_amperes"] = other_load_amperes
    return parse_settings(
        {
            "meters": [] if meter is None else [meter],
            "controller": {"identity": CONTROLLER_IDENTITY},
            "state": {"dir": str(state_dir)},
            "stations": {"listen": "127.0.0.1:0", "path": OCPP_PATH},
            "csms": {"url": f"ws://127.0.0.1:{csms_port}{OCPP_PATH}"},
            "routing": {"shutdown_grace_s": SHUTDOWN_GRACE_S},
            "http": {"listen": "127.0.0.1:0"},
            # One attempt a second: the local "vendor" server is up from the start.
            "firmware": {"retry_interval_s": 1},
            "site": site,
            "balancing": {"recompute_interval_s": 1.0, "min_interval_s": 2.0, "hysteresis_amperes": 1.0},
            # The outage lasts seconds, not hours: stations try the CSMS again at least every 2 s.
            "autonomy": {"reconnect_backoff_max_s": 2.0},
        },
        source="<demo>",
    )
