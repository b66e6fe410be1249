"""Site meters over real Modbus TCP: pymodbus's own server on 127.0.0.1 port 0 as the meter.

The controller's side is the meter service with its pymodbus client in a worker thread
(meters/modbus.py) and the balancing loop over the loop tests' FakeStations (schema-checked profiles,
installed limits kept per EVSE). The clock is real (a thread and a socket are involved), so every
wait is for an event, inside ``fail_after``; "within one poll" is counted in polls, not seconds.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import pytest
import trio
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.loop import Balancer, LoopSettings
from balancing.rollout import RolloutPolicy
from balancing.site import NodeLimits, SiteConfig
from meters.service import MeterService
from meters.settings import MeterSettings, RegisterMap
from tests.support.modbus_meter import ModbusMeterServer, plain_image, set_sunspec_currents, sunspec_image
from tests.unit.test_balancing_loop import ID_BASE, STACK_LEVEL, FakeStations, status_notification, transaction_event

IO_TIMEOUT_S = 15.0
GRID_AMPERES = 100.0
STATIONS = ("CS1", "CS2", "CS3")
UNIT_ID = 7
PLAIN = RegisterMap(
    table="input",
    data_type="float32",
    word_order="little",
    current_l1=0x0C00,
    current_l2=0x0C02,
    current_l3=0x0C04,
    power=0x0C10,
)


def meter(port: int, **overrides: object) -> MeterSettings:
    values: dict[str, object] = {
        "name": "grid-main",
        "host": "127.0.0.1",
        "port": port,
        "unit_id": UNIT_ID,
        "poll_interval_s": 0.2,
        "timeout_s": 0.5,
        "stale_after_s": 1.0,
        "safety_margin_amperes": 2.0,
        "fall_time_constant_s": 0.0,
    } | overrides
    return MeterSettings.model_validate(values)


def readings(registry: CollectorRegistry, outcome: str) -> float:
    return registry.get_sample_value("ocpp_lc_meter_readings_total", {"meter": "grid-main", "outcome": outcome}) or 0


@asynccontextmanager
async def balanced(
    settings: MeterSettings, registry: CollectorRegistry, *, site: SiteConfig | None = None
) -> AsyncIterator[tuple[Balancer, MeterService, FakeStations]]:
    """Three sessions on a 100 A grid under the meter, the loop running, the stations answering."""
    site = site or SiteConfig(grid=NodeLimits(max_current_amperes=GRID_AMPERES))
    fake = FakeStations(limit_amperes=GRID_AMPERES)
    service = MeterService((settings,), site, registry)

    def outside(now: datetime) -> SiteLimits:
        return fake.limits_at(now)

    loop_settings = LoopSettings(
        stack_level=STACK_LEVEL,
        profile_id_base=ID_BASE,
        recompute_interval_s=5.0,
        rollout=RolloutPolicy(hysteresis_amperes=1.0, min_interval_s=0.0, resolution_amperes=0.1),
    )
    balancer = Balancer(site, service.limits_at(outside), fake, loop_settings, wall_clock=lambda: datetime.now(UTC))
    service.attach(balancer)
    async with trio.open_nursery() as nursery:
        await nursery.start(balancer.run)
        await nursery.start(service.run)
        for index, station_id in enumerate(STATIONS):
            balancer.station_connected(station_id)
            balancer.station_call(station_id, "StatusNotification", status_notification(1))
            balancer.station_call(station_id, "TransactionEvent", transaction_event("Started", f"TX-{index}"))
        yield balancer, service, fake
        nursery.cancel_scope.cancel()


async def until(balancer: Balancer, service: MeterService, predicate: Callable[[], bool]) -> None:
    """Wait, re-checking after every poll and every reallocation, until ``predicate`` holds."""
    while not predicate():
        async with trio.open_nursery() as nursery:
            polled, reallocated = service.polled, balancer.reallocated

            async def wait(event: trio.Event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, polled)
            nursery.start_soon(wait, reallocated)


def installed(fake: FakeStations) -> list[float | None]:
    return [fake.effective((station_id, 1)) for station_id in STATIONS]


@pytest.mark.parametrize("kind", ["sunspec", "plain"])
async def test_a_building_load_rising_by_40_amperes_lowers_the_evs_within_one_poll(kind: str) -> None:
    """Building 10 A: the EVs share 100 − 10 − 2 = 88 A (29.3 A each). It rises by 40 A: the next poll's
    reading lowers the limit to 48 A, and the stations are sent 16 A each; over SunSpec (model 1 + 203,
    found from the 'SunS' marker) and over a plain float32 map with swapped words in input registers."""
    if kind == "sunspec":
        image = sunspec_image((10.0, 10.0, 10.0), power_watts=6900)
        settings_overrides: dict[str, object] = {}
    else:
        image = plain_image(PLAIN, (10.0, 10.0, 10.0), power_watts=6900)
        settings_overrides = {"registers": PLAIN.model_dump()}
    registry = CollectorRegistry()
    with ModbusMeterServer(image, unit_id=UNIT_ID) as server, trio.fail_after(IO_TIMEOUT_S):
        async with balanced(meter(server.port, **settings_overrides), registry) as (balancer, service, fake):
            await until(balancer, service, lambda: installed(fake) == [29.3, 29.3, 29.3])
            assert registry.get_sample_value("ocpp_lc_meter_power_watts", {"meter": "grid-main"}) == 6900
            polls_before = readings(registry, "ok")
            if kind == "sunspec":
                set_sunspec_currents(image, (50.0, 50.0, 50.0))
            else:
                image.update(plain_image(PLAIN, (50.0, 50.0, 50.0)))
            await until(balancer, service, lambda: balancer.limits.phase_current_amperes == (48.0, 48.0, 48.0))
            # The poll under way when the load rose may have read the old value; the one after cannot.
            assert readings(registry, "ok") - polls_before <= 2
            await until(balancer, service, lambda: installed(fake) == [16.0, 16.0, 16.0])
            assert 50.0 + fake.total_drawable() <= GRID_AMPERES


async def test_a_meter_that_stops_answering_times_out_and_the_fallback_holds(caplog: pytest.LogCaptureFixture) -> None:
    """The meter takes requests and never answers: each read times out (counted; logged once), then
    after stale_after_s the EVs fall back to [site] other_load_amperes: (100 − 40 − 2) / 3 = 19.3 A."""
    caplog.set_level(logging.WARNING, logger="ocpp_lc.meters")
    registry = CollectorRegistry()
    site = SiteConfig(grid=NodeLimits(max_current_amperes=GRID_AMPERES), other_load_amperes=40.0)
    with ModbusMeterServer(sunspec_image((10.0, 10.0, 10.0)), unit_id=UNIT_ID) as server, trio.fail_after(IO_TIMEOUT_S):
        async with balanced(meter(server.port), registry, site=site) as (balancer, service, fake):
            await until(balancer, service, lambda: installed(fake) == [29.3, 29.3, 29.3])
            server.silent = True
            await until(balancer, service, lambda: readings(registry, "timeout") >= 1)
            assert installed(fake) == [29.3, 29.3, 29.3]  # one missed reading changes nothing
            await until(balancer, service, lambda: installed(fake) == [19.3, 19.3, 19.3])
            assert any("reading not used (timeout" in record.getMessage() for record in caplog.records)
            assert registry.get_sample_value("ocpp_lc_meter_fallback", {"meter": "grid-main"}) == 1


@pytest.mark.parametrize(
    ("image", "outcome"),
    [
        (sunspec_image((5.0, 5.0, 5.0), model_id=101), "wrong_model"),  # an inverter, no meter model
        ({0: 1, 1: 2}, "not_sunspec"),  # a Modbus device without the 'SunS' marker
    ],
)
async def test_a_device_that_is_no_sunspec_meter_is_counted_and_leaves_the_failsafe(
    image: dict[int, int], outcome: str
) -> None:
    """Never read: the EVs at the grid get the failsafe current (0 A here), not unlimited."""
    registry = CollectorRegistry()
    with ModbusMeterServer(image, unit_id=UNIT_ID) as server, trio.fail_after(IO_TIMEOUT_S):
        async with balanced(meter(server.port), registry) as (balancer, service, fake):
            await until(balancer, service, lambda: readings(registry, outcome) >= 2)
            await until(balancer, service, lambda: installed(fake) == [0.0, 0.0, 0.0])
            assert balancer.limits.phase_current_amperes == (0.0, 0.0, 0.0)


async def test_a_meter_nobody_listens_for_is_unreachable() -> None:
    """A port with nothing behind it: 'unreachable', counted on every poll, the failsafe in force."""
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        registry = CollectorRegistry()
        with trio.fail_after(IO_TIMEOUT_S):
            async with balanced(meter(port), registry) as (balancer, service, fake):
                await until(balancer, service, lambda: readings(registry, "unreachable") >= 2)
                await until(balancer, service, lambda: installed(fake) == [0.0, 0.0, 0.0])
