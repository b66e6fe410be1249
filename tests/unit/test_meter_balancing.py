"""A site meter steering the balancing loop (meters/service.py + balancing/loop.py), on the autojump clock.

The meter is a SunSpec register image served in-process (tests/support/modbus_meter.py ImageReader;
the same images go over real sockets to pymodbus's server in tests/integration/test_meters.py). The
stations are the loop tests' FakeStations: they validate every profile against the OCA schema and
keep what each EVSE has installed. Physics is kept by hand: an EV draws what its station last let it
and reports that in MeterValues; the grid meter measures the building's load plus that.

Site: a 100 A grid connection, a 2 A safety margin, three 3-phase stations of 6–32 A.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

import pytest
import trio
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.loop import Balancer, LoopSettings
from balancing.rollout import RolloutPolicy
from balancing.site import AllocationPolicy, CircuitConfig, NodeLimits, SiteConfig, StationConfig
from meters.service import MeterService
from meters.settings import MeterSettings
from tests.integration.test_meters import until
from tests.support.modbus_meter import ImageReader, sunspec_image, sunspec_model_address
from tests.unit.test_balancing_loop import (
    ID_BASE,
    STACK_LEVEL,
    FakeStations,
    meter_values,
    settle,
    status_notification,
    transaction_event,
    wall_clock,
)

GRID_AMPERES = 100.0
MARGIN_AMPERES = 2.0
POLL_S = 1.0
STATIONS = ("CS1", "CS2", "CS3")
DEADLINE_S = 5_000.0  # virtual seconds


class Site:
    """The building's load, the EVs' draw, and the meter image that sums them."""

    def __init__(self, fake: FakeStations, building_amperes: float, model_id: int = 203) -> None:
        self.fake = fake
        self.building_amperes = building_amperes
        self.model_id = model_id
        self.ev_draw: dict[str, float] = {}
        #: Set to override what the meter registers say (garbage).
        self.override: dict[int, int] = {}

    def image(self) -> dict[int, int]:
        total = self.building_amperes + sum(self.ev_draw.values())
        image = sunspec_image((total, total, total), model_id=self.model_id)
        image.update(self.override)
        return image

    def draw(self, balancer: Balancer) -> None:
        """Every EV draws what its station lets it, and says so in MeterValues."""
        for station_id in STATIONS:
            amperes = self.fake.effective((station_id, 1)) or 0.0
            self.ev_draw[station_id] = amperes
            balancer.station_call(station_id, "MeterValues", meter_values(1, amperes))


def meter_settings(**overrides: object) -> MeterSettings:
    values: dict[str, object] = {
        "name": "grid-main",
        "host": "meter.invalid",
        "poll_interval_s": POLL_S,
        "timeout_s": 0.5,
        "stale_after_s": 5.0,
        "safety_margin_amperes": MARGIN_AMPERES,
        "fall_time_constant_s": 30.0,
    } | overrides
    return MeterSettings.model_validate(values)


def make_site(**overrides: object) -> SiteConfig:
    values: dict[str, object] = {
        "grid": NodeLimits(max_current_amperes=GRID_AMPERES),
        # EVs report their draw exactly: no underdraw capping muddles the arithmetic here.
        "policy": AllocationPolicy(underdraw_grace_s=86_400),
    } | overrides
    return SiteConfig.model_validate(values)


@asynccontextmanager
async def metered_site(
    site_config: SiteConfig,
    meter: MeterSettings,
    reader: ImageReader,
    fake: FakeStations,
    registry: CollectorRegistry,
    outside: Callable[[datetime], SiteLimits] | None = None,
) -> AsyncIterator[tuple[Balancer, MeterService]]:
    """The loop and the meter service over ``fake``; ``outside``: the CSMS/EMS limits (default: the fake's)."""
    service = MeterService((meter,), site_config, registry, readers={meter.name: reader})
    settings = LoopSettings(
        stack_level=STACK_LEVEL,
        profile_id_base=ID_BASE,
        recompute_interval_s=10.0,
        rollout=RolloutPolicy(hysteresis_amperes=1.0, min_interval_s=30.0, resolution_amperes=0.1),
    )

    balancer = Balancer(
        site_config, service.limits_at(outside or fake.limits_at), fake, settings, wall_clock=wall_clock
    )
    service.attach(balancer)
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            await nursery.start(service.run)
            yield balancer, service
            nursery.cancel_scope.cancel()


async def start_sessions(balancer: Balancer) -> None:
    for index, station_id in enumerate(STATIONS):
        balancer.station_connected(station_id)
        balancer.station_call(station_id, "StatusNotification", status_notification(1))
        balancer.station_call(station_id, "TransactionEvent", transaction_event("Started", f"TX-{index}"))
    await settle()


async def steady(site: Site, balancer: Balancer, seconds: float = 120.0) -> None:
    """Let the EVs follow their limits (and the meter see it) for a while."""
    end_s = trio.current_time() + seconds
    while trio.current_time() < end_s:
        site.draw(balancer)
        await trio.sleep(POLL_S)


def installed(fake: FakeStations) -> list[float | None]:
    return [fake.effective((station_id, 1)) for station_id in STATIONS]


def readings(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("ocpp_lc_meter_readings_total", {"meter": "grid-main", "outcome": outcome}) or 0


async def test_a_building_load_rising_by_40_amperes_lowers_the_evs_within_one_poll(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Building 10 A → the EVs share 100 − 10 − 2 = 88 A, their own 88 A of draw on the meter not counted
    against them; the building rises to 50 A → within one poll interval (and the decreases' round trip)
    every EV is down to (100 − 50 − 2) / 3 = 16 A, and building plus what the EVs may draw stays ≤ 100 A."""
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=10.0)
    registry = CollectorRegistry()
    reader = ImageReader(site.image)
    async with metered_site(make_site(), meter_settings(), reader, fake, registry) as (balancer, service):
        await start_sessions(balancer)
        await steady(site, balancer)
        assert installed(fake) == [29.3, 29.3, 29.3]
        assert sum(site.ev_draw.values()) == pytest.approx(87.9)  # the meter sees 97.9 A, EVs included
        assert balancer.limits.phase_current_amperes == pytest.approx((88.0, 88.0, 88.0))

        site.building_amperes += 40.0
        # Within one poll interval of virtual time (the stations' answers take none here).
        with trio.fail_after(POLL_S * 1.01):
            await until(balancer, service, lambda: installed(fake) == [16.0, 16.0, 16.0])
        assert site.building_amperes + fake.total_drawable() <= GRID_AMPERES - MARGIN_AMPERES
        assert readings(registry, "ok") >= 100
        assert registry.get_sample_value(
            "ocpp_lc_meter_other_load_amperes", {"meter": "grid-main", "phase": "L2"}
        ) == pytest.approx(50.0, abs=0.5)


async def test_a_falling_building_load_gives_current_back_only_slowly(autojump_clock: trio.abc.Clock) -> None:
    """Building 50 A → 10 A: the other load estimate decays with τ = 30 s, so the EVs do not get the
    40 A back at the next poll, but within a few time constants."""
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=50.0)
    registry = CollectorRegistry()
    async with metered_site(make_site(), meter_settings(), ImageReader(site.image), fake, registry) as (balancer, _):
        await start_sessions(balancer)
        await steady(site, balancer)
        assert installed(fake) == [16.0, 16.0, 16.0]
        site.building_amperes = 10.0
        await steady(site, balancer, seconds=5.0)
        # 4–5 s of decay on, the estimate is 10 + 40·e^(−t/30) ≈ 44–45 A, nowhere near 10 A.
        limit = balancer.limits.phase_current_amperes
        assert limit is not None and 100 - 45.5 - 2 < limit[0] < 100 - 43.5 - 2
        assert all(value is not None and value < 19.0 for value in installed(fake))
        await steady(site, balancer, seconds=300.0)
        # Back to 88 A / 3 = 29.3 A each, give or take the loop's 1 A hysteresis on increases.
        assert all(value is not None and 28.3 <= value <= 29.3 for value in installed(fake))


async def test_a_silent_meter_holds_the_limit_then_falls_back_to_the_static_other_load(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The meter stops answering: every poll times out (logged once, counted each time) and the limit in
    force stays as it was until stale_after_s (5 s); then [site] other_load_amperes (60 A) holds:
    (100 − 60 − 2) / 3 = 12.6 A each. Never unlimited."""
    caplog.set_level(logging.WARNING, logger="ocpp_lc.meters")
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=10.0)
    reader = ImageReader(site.image)
    registry = CollectorRegistry()
    site_config = make_site(other_load_amperes=60.0)
    async with metered_site(site_config, meter_settings(), reader, fake, registry) as (balancer, _):
        await start_sessions(balancer)
        await steady(site, balancer)
        assert installed(fake) == [29.3, 29.3, 29.3]
        reader.silent = True
        await steady(site, balancer, seconds=4.0)
        assert installed(fake) == [29.3, 29.3, 29.3]
        assert readings(registry, "timeout") >= 3
        await steady(site, balancer, seconds=2.0)
        assert installed(fake) == [12.6, 12.6, 12.6]
        assert registry.get_sample_value("ocpp_lc_meter_fallback", {"meter": "grid-main"}) == 1
        timeouts = [r for r in caplog.records if "reading not used (timeout" in r.getMessage()]
        assert len(timeouts) == 1  # once, not once a poll
        assert any("fall back" in r.getMessage() for r in caplog.records)
        # The meter answers again: its reading takes over.
        reader.silent = False
        await steady(site, balancer, seconds=120.0)
        assert installed(fake) == [29.3, 29.3, 29.3]
        assert registry.get_sample_value("ocpp_lc_meter_fallback", {"meter": "grid-main"}) == 0


@pytest.mark.parametrize(
    ("garbage", "outcome"),
    [
        ("negative", "negative"),
        ("implausible", "implausible"),
        ("wrong_model", "wrong_model"),
        ("scale_factor", "garbage"),
    ],
)
async def test_nonsense_from_the_meter_leaves_the_limit_then_falls_back_to_the_failsafe(
    autojump_clock: trio.abc.Clock, garbage: str, outcome: str
) -> None:
    """Negative currents, 500 A on a 100 A connection, an inverter model where the meter model was, a
    scale factor of 10^20: counted by outcome, the limit in force unchanged for stale_after_s, then —
    with no [site] other_load_amperes — the failsafe current ([ems] failsafe_current_amperes, 0 here)."""
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=10.0)
    registry = CollectorRegistry()
    async with metered_site(make_site(), meter_settings(), ImageReader(site.image), fake, registry) as (balancer, _):
        await start_sessions(balancer)
        await steady(site, balancer)
        before = balancer.limits
        data = sunspec_model_address() + 2
        if garbage == "negative":
            site.override = {data + 1: 0xFF00}  # AphA = -256 × 0.1 A
        elif garbage == "implausible":
            site.override = {data + 1: 5000}  # 500 A
        elif garbage == "wrong_model":
            site.model_id = 103
        else:
            site.override = {data + 4: 20}
        await steady(site, balancer, seconds=4.0)
        assert readings(registry, outcome) >= 3
        assert balancer.limits == before
        assert installed(fake) == [29.3, 29.3, 29.3]
        await steady(site, balancer, seconds=2.0)
        assert balancer.limits.phase_current_amperes == (0.0, 0.0, 0.0)
        assert installed(fake) == [0.0, 0.0, 0.0]


async def test_a_circuit_meter_limits_the_evs_on_that_circuit_only(autojump_clock: trio.abc.Clock) -> None:
    """A 40 A feeder with CS1 and CS2 under a meter whose building load there is 20 A: they share
    40 − 20 − 2 = 18 A, at the most loaded phase (here all); CS3 on the grid is not held back."""
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=20.0)
    site_config = make_site(
        circuits=(CircuitConfig(circuit_id="feeder", max_current_amperes=40.0),),
        stations=(
            StationConfig(station_id="CS1", circuit_id="feeder"),
            StationConfig(station_id="CS2", circuit_id="feeder"),
        ),
    )

    def feeder_image() -> dict[int, int]:
        total = site.building_amperes + site.ev_draw.get("CS1", 0.0) + site.ev_draw.get("CS2", 0.0)
        return sunspec_image((total, total, total))

    registry = CollectorRegistry()
    meter = meter_settings(node="feeder")
    async with metered_site(site_config, meter, ImageReader(feeder_image), fake, registry) as (balancer, _):
        await start_sessions(balancer)
        await steady(site, balancer)
        assert installed(fake) == [9.0, 9.0, 32.0]
        assert balancer.site.node_limits("feeder").max_current_amperes == pytest.approx(18.0)


async def test_stale_ev_meter_values_do_not_talk_the_building_load_down(autojump_clock: trio.abc.Clock) -> None:
    """EV meter values come every minute or so, the grid meter every second. After the building rises
    and the EVs are lowered to 16 A, their last meter values still say 29.3 A: taken at face value, the
    building would seem to have shrunk by the 40 A the EVs gave up, and the EVs would be raised again
    over the connection. What the controller subtracts for an EV is at most what it may draw (the limit
    it accepted), so the estimate stays at the 50 A the building really draws."""
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    site = Site(fake, building_amperes=10.0)

    def physical_image() -> dict[int, int]:  # the meter sees what the EVs really draw: what they may
        total = site.building_amperes + sum(fake.drawable((station_id, 1)) for station_id in STATIONS)
        return sunspec_image((total, total, total))

    registry = CollectorRegistry()
    reader = ImageReader(physical_image)
    async with metered_site(make_site(), meter_settings(), reader, fake, registry) as (balancer, service):
        await start_sessions(balancer)
        await steady(site, balancer)
        # Near their 29.3 A share: the meter sees an increase the moment it goes out, the EVs report it
        # later, so the estimate of the building errs high for a while (the safe side).
        assert all(value is not None and value >= 27.0 for value in installed(fake)), installed(fake)
        site.building_amperes += 40.0  # and from now on the EVs send no meter values
        with trio.fail_after(POLL_S * 1.01):
            await until(balancer, service, lambda: installed(fake) == [16.0, 16.0, 16.0])
        for _ in range(120):
            await trio.sleep(POLL_S / 2)
            drawn = site.building_amperes + fake.total_drawable()
            assert drawn <= GRID_AMPERES - MARGIN_AMPERES + 1e-6, (trio.current_time(), installed(fake))
        assert installed(fake) == [16.0, 16.0, 16.0]
