"""A grid meter and power limits (#16.4): the building's load comes off a node's power limit too.

On the autojump clock with the meter tests' site (tests/unit/test_meter_balancing.py): a 100 A grid
connection, a 2 A safety margin, three 3-phase stations; the building draws 30 A on every phase.
Power limits become a limit on the sum of the phase currents at the site's nominal voltage (230 V),
as the allocator converts them.
"""

from __future__ import annotations

from datetime import datetime

import pytest
import trio
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.site import NodeLimits
from tests.support.modbus_meter import ImageReader
from tests.unit.test_balancing_loop import FakeStations
from tests.unit.test_meter_balancing import (
    GRID_AMPERES,
    MARGIN_AMPERES,
    Site,
    make_site,
    meter_settings,
    metered_site,
    start_sessions,
    steady,
)

VOLTS = 230.0
BUILDING_AMPERES = 30.0


async def test_a_contracted_power_below_the_fuses_is_shared_after_the_metered_building_load(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The grid carries 100 A per phase but only 40 kW are contracted. The building takes 3 × 30 A ×
    230 V = 20.7 kW, so the EVs may have 40 000 − 230 × (90 + 3 × 2) = 17 920 W (26 A per phase, 8.6 A
    each), not the whole 40 kW: building and EVs together stay within the contract."""
    power_watts = 40_000.0
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=BUILDING_AMPERES)
    site_config = make_site(grid=NodeLimits(max_current_amperes=GRID_AMPERES, max_power_watts=power_watts))
    registry = CollectorRegistry()
    async with metered_site(site_config, meter_settings(), ImageReader(site.image), fake, registry) as (
        balancer,
        service,
    ):
        await start_sessions(balancer)
        await steady(site, balancer)
        room_watts = power_watts - VOLTS * 3 * (BUILDING_AMPERES + MARGIN_AMPERES)
        assert balancer.limits.power_watts == pytest.approx(room_watts)
        assert VOLTS * 3 * (BUILDING_AMPERES + fake.total_drawable()) <= power_watts - VOLTS * 3 * MARGIN_AMPERES
        assert fake.total_drawable() == pytest.approx(room_watts / VOLTS / 3, abs=0.3)
        assert service.status()[0]["power_headroom_watts"] == pytest.approx(room_watts)
        assert registry.get_sample_value("ocpp_lc_meter_power_headroom_watts", {"meter": "grid-main"}) == pytest.approx(
            room_watts
        )


async def test_an_ems_power_limit_caps_the_evs_and_the_meter_does_not_lower_it_again(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An EMS limit in W is on what the charging stations together draw (K14.FR.01), not on the building:
    15 kW for the EVs (21.7 A per phase) while the meter leaves them 100 − 30 − 2 = 68 A per phase; the
    EMS limit binds as it is, converted at the nominal voltage."""
    ems_watts = 15_000.0
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=BUILDING_AMPERES)

    def outside(now: datetime) -> SiteLimits:
        return SiteLimits(power_watts=ems_watts)

    registry = CollectorRegistry()
    async with metered_site(make_site(), meter_settings(), ImageReader(site.image), fake, registry, outside) as (
        balancer,
        _,
    ):
        await start_sessions(balancer)
        await steady(site, balancer)
        assert balancer.limits.power_watts == ems_watts
        assert balancer.limits.phase_current_amperes == pytest.approx((68.0, 68.0, 68.0))
        assert fake.total_drawable() == pytest.approx(ems_watts / VOLTS / 3, abs=0.3)
