"""Balancing that stays safe under faults (issue 11): the live loop against fake stations, virtual clock.

Each test pins one defect the review found: an EVSE the site model does not list, a restart inside a
call window, a station that overdraws, profiles that never lapse and an idle default of 0 A for ever,
scheduled limit drops applied late, phases budgeted but not enforced. The fake stations are those of
``test_balancing_loop`` (they validate every payload against the OCA schema and check, whenever a
profile lets an EVSE draw more, that the site stays within its limit, K14.FR.01).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from balancing.allocator import Session, SiteLimits, allocate
from balancing.clearing import LeftoverProfiles
from balancing.loop import Balancer, CallOutcome, LoopSettings
from balancing.overdraw import OverdrawPolicy
from balancing.rollout import EvseApplied, RolloutPolicy, RolloutState, Step, bound_amperes, counted_phases, plan
from balancing.site import SiteConfig
from router.store import Store
from tests.support.schemas import validate_call
from tests.unit.test_balancing_loop import (
    ID_BASE,
    MIN_INTERVAL_S,
    STACK_LEVEL,
    START,
    FakeStations,
    meter_values,
    profiles,
    row,
    running,
    settle,
    status_notification,
    transaction_event,
    wall_clock,
)

GRID_SITE = SiteConfig.model_validate({"grid": {"max_current_amperes": 40}})


def loop_settings(**changes: Any) -> LoopSettings:
    rollout = RolloutPolicy(
        hysteresis_amperes=1.0,
        min_interval_s=changes.pop("min_interval_s", MIN_INTERVAL_S),
        resolution_amperes=0.1,
        idle_current_amperes=changes.pop("idle_current_amperes", 0.0),
    )
    return LoopSettings(stack_level=STACK_LEVEL, profile_id_base=ID_BASE, rollout=rollout, **changes)


@dataclass
class Recording(FakeStations):
    """Fake stations that also keep every payload and answer ClearChargingProfile."""

    payloads: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)

    async def __call__(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        self.payloads.append((station_id, action, payload))
        if action == "ClearChargingProfile":
            validate_call(action, payload)
            return CallOutcome("answered", {"status": "Accepted"})
        return await super().__call__(station_id, action, payload)

    def set_profiles(self, station_id: str | None = None) -> list[dict[str, Any]]:
        return [
            payload["chargingProfile"]
            for station, action, payload in self.payloads
            if action == "SetChargingProfile" and station_id in (None, station)
        ]


async def start_sessions(balancer: Balancer, *stations: str, evse_id: int = 1, **extra: Any) -> None:
    for station_id in stations:
        balancer.station_connected(station_id)
        balancer.station_call(station_id, "StatusNotification", status_notification(evse_id))
        balancer.station_call(
            station_id, "TransactionEvent", transaction_event("Started", f"TX-{station_id}", evse_id, **extra)
        )
    await settle()


def bound_on_l1(balancer: Balancer) -> float:
    return balancer.phase_bounds_amperes()[0]


# --- 11.1: an EVSE the site model does not list ----------------------------------------------------


async def test_an_evse_the_site_model_does_not_list_is_balanced_with_its_stations_values(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Listing EVSE 2 of CS1 (to give it 16 A) must not hide EVSE 1: it is balanced with the station's
    range, gets a TxProfile, and both stay within the 40 A grid together."""
    site = SiteConfig.model_validate(
        {
            "grid": {"max_current_amperes": 40},
            "stations": [{"station_id": "CS1", "evses": [{"evse_id": 2, "max_current_amperes": 16}]}],
        }
    )
    fake = FakeStations(limit_amperes=40.0)
    balancer = Balancer(site, fake.limits_at, fake, loop_settings(min_interval_s=0), wall_clock=wall_clock)
    async with running(balancer):
        balancer.station_connected("CS1")
        for evse_id in (1, 2):
            balancer.station_call("CS1", "StatusNotification", status_notification(evse_id))
            balancer.station_call("CS1", "TransactionEvent", transaction_event("Started", f"TX-{evse_id}", evse_id))
        await settle()
        assert fake.effective(("CS1", 1)) == 24.0  # what EVSE 2's 16 A leaves of 40 A, within its 32 A
        assert fake.effective(("CS1", 2)) == 16.0
        assert row(balancer, "CS1", 1)["transaction_id"] == "TX-1"
        assert bound_on_l1(balancer) <= 40.0


# --- 11.2: a restart trusts stale installed limits -------------------------------------------------


async def test_a_restart_with_an_increase_in_flight_counts_the_evse_at_its_maximum(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """The controller dies while an increase from 20 A to 32 A is unanswered (the station may already
    apply it). After the restart the EVSE counts at its maximum until its station accepts again, and
    what it is offered then never exceeds what it may have installed."""
    fake = FakeStations(limit_amperes=40.0)
    with Store.open(tmp_path) as store:
        first = Balancer(
            GRID_SITE, fake.limits_at, fake, loop_settings(min_interval_s=0), state=store.namespace("balancing")
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            await start_sessions(first, "CS1", "CS2")
            assert fake.effective(("CS1", 1)) == 20.0
            fake.delay_s["CS1"] = 10.0  # the increase to come waits for its answer
            first.station_call("CS2", "TransactionEvent", transaction_event("Ended", "TX-CS2", 1, seq_no=1))
            await trio.sleep(1.0)
            assert row(first, "CS1")["profile_in_flight"] is True
            nursery.cancel_scope.cancel()  # kill: the answer never arrives

    with Store.open(tmp_path) as store:
        second = Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(), state=store.namespace("balancing"))
        # Counted at its maximum (32 A) plus CS2's idle EVSE at its maximum: never at the stale 20 A.
        assert bound_on_l1(second) == 64.0
        assert row(second, "CS1")["unconfirmed_since_restart"] is True
        assert row(second, "CS1")["compliant"] is False
        fake.delay_s.clear()
        sent_before = len(fake.calls)
        async with running(second):
            second.station_connected("CS1")
            second.station_connected("CS2")
            await settle()
            retries = [call for call in fake.calls[sent_before:] if call.station_id == "CS1"]
            assert retries and all(call.limit_amperes <= 32.0 for call in retries)
            assert row(second, "CS1")["unconfirmed_since_restart"] is False
            assert bound_on_l1(second) <= 40.0


async def test_a_csms_profile_above_ours_is_remembered_across_a_restart(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    """A CSMS TxDefaultProfile above our stack level governs CS1's EVSE; after a restart it still does:
    nothing of ours is sent there and it is counted at its maximum, not at our stale profile."""
    fake = FakeStations(limit_amperes=40.0)
    csms_request = {
        "evseId": 1,
        "chargingProfile": {
            "id": 7,
            "stackLevel": STACK_LEVEL + 1,
            "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute",
            "chargingSchedule": [
                {
                    "id": 1,
                    "startSchedule": START.isoformat(),
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 32.0}],
                }
            ],
        },
    }
    with Store.open(tmp_path) as store:
        first = Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(), state=store.namespace("balancing"))
        async with running(first):
            first.station_connected("CS1")
            first.station_call("CS1", "StatusNotification", status_notification(1))
            await settle()
            first.station_answer("CS1", "SetChargingProfile", {"status": "Accepted"}, csms_request)
            await settle()
    with Store.open(tmp_path) as store:
        second = Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(), state=store.namespace("balancing"))
        sent_before = len(fake.calls)
        async with running(second):
            second.station_connected("CS1")
            await settle()
            await trio.sleep(100)
            assert [call for call in fake.calls[sent_before:] if call.station_id == "CS1"] == []
            assert bound_on_l1(second) == 32.0


# --- 11.3: overdraw --------------------------------------------------------------------------------


async def test_a_station_drawing_above_what_it_accepted_is_counted_at_its_draw(
    autojump_clock: trio.abc.Clock,
) -> None:
    """CS1 accepted 20 A and draws 32 A for longer than the grace period: it is flagged, counted at its
    draw, and CS2 is lowered so that both fit the 40 A grid; once CS1 draws within its limit again, CS2
    gets its share back."""
    fake = FakeStations(limit_amperes=40.0)
    registry = CollectorRegistry()
    settings = loop_settings(overdraw=OverdrawPolicy(margin_amperes=2.0, grace_s=60.0))
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, settings, wall_clock=wall_clock, registry=registry)
    async with running(balancer):
        await start_sessions(balancer, "CS1", "CS2")
        assert fake.effective(("CS1", 1)) == fake.effective(("CS2", 1)) == 20.0
        for _ in range(3):  # 0 s, 35 s, 70 s: past the 60 s grace
            balancer.station_call("CS1", "MeterValues", meter_values(1, 32.0))
            balancer.station_call("CS2", "MeterValues", meter_values(1, 20.0))
            await settle()
            if _ < 2:
                assert row(balancer, "CS1")["overdrawing"] is False
                await trio.sleep(35)
        assert row(balancer, "CS1")["overdrawing"] is True
        assert row(balancer, "CS1")["compliant"] is False
        assert registry.get_sample_value("ocpp_lc_balancing_overdraws_total") == 1.0
        assert registry.get_sample_value("ocpp_lc_balancing_overdrawing_evses") == 1.0
        assert fake.effective(("CS2", 1)) == 8.0  # 40 A less CS1's 32 A
        assert bound_on_l1(balancer) <= 40.0
        balancer.station_call("CS1", "MeterValues", meter_values(1, 19.5))
        await settle()
        assert row(balancer, "CS1")["overdrawing"] is False
        await trio.sleep(MIN_INTERVAL_S + 1)
        await settle()
        assert fake.effective(("CS2", 1)) == 20.0


# --- 11.4: bounded validity, the idle current, clearing ------------------------------------------------


def valid_to(profile: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(profile["validTo"].replace("Z", "+00:00"))


async def test_every_profile_carries_a_validity_and_is_renewed_before_it_lapses(
    autojump_clock: trio.abc.Clock,
) -> None:
    """validTo is profile_validity_s ahead (the station falls back to its own default once we are gone);
    at half of it the same limit is sent again with a new validTo, and renewing does not hold back an
    increase (it changes nothing the station draws)."""
    fake = Recording(limit_amperes=40.0)
    registry = CollectorRegistry()
    settings = loop_settings(profile_validity_s=600.0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, settings, wall_clock=wall_clock, registry=registry)
    async with running(balancer):
        await start_sessions(balancer, "CS1")
        await trio.sleep(MIN_INTERVAL_S + 1)  # the first current, then its increase to 32 A
        tx = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxProfile"]
        assert tx[-1]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 32.0
        sent_at = wall_clock()
        assert sent_at - timedelta(seconds=2) <= valid_to(tx[-1]) - timedelta(seconds=600) <= sent_at
        before = len(tx)
        await trio.sleep(290)  # not yet half of its validity
        assert len([p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxProfile"]) == before
        await trio.sleep(20)
        await settle()
        renewed = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxProfile"]
        assert len(renewed) == before + 1
        assert renewed[-1]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["limit"] == 32.0
        assert valid_to(renewed[-1]) > valid_to(tx[-1])
        assert profiles(registry, "renew", "accepted") == 1.0
        assert row(balancer, "CS1")["installed_amperes"] == 32.0
        assert row(balancer, "CS1")["compliant"] is True


async def test_an_idle_evse_offers_the_idle_current_where_the_sessions_leave_room(
    autojump_clock: trio.abc.Clock,
) -> None:
    """With idle_current_amperes 6, an idle EVSE's TxDefaultProfile offers 6 A while the sessions leave
    room for it (it is counted), and 0 A once they need the room (lowered before anyone is raised)."""
    fake = FakeStations(limit_amperes=40.0)
    settings = loop_settings(idle_current_amperes=6.0, min_interval_s=0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, settings, wall_clock=wall_clock)
    async with running(balancer):
        balancer.station_connected("IDLE")
        balancer.station_call("IDLE", "StatusNotification", status_notification(1))
        await settle()
        assert fake.effective(("IDLE", 1)) == 6.0
        await start_sessions(balancer, "CS1")
        assert fake.effective(("CS1", 1)) == 32.0  # 40 A less the 6 A held for IDLE leaves 34 A
        assert fake.effective(("IDLE", 1)) == 6.0
        await start_sessions(balancer, "CS2")
        assert fake.effective(("IDLE", 1)) == 0.0
        assert fake.effective(("CS1", 1)) == fake.effective(("CS2", 1)) == 20.0
        assert bound_on_l1(balancer) <= 40.0


async def test_release_clears_every_profile_of_ours_and_sends_nothing_more(autojump_clock: trio.abc.Clock) -> None:
    """Before the controller is removed: ClearChargingProfile by each of our ids on every connected
    station, and no SetChargingProfile afterwards, whatever happens."""
    fake = Recording(limit_amperes=40.0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(), wall_clock=wall_clock)
    async with running(balancer):
        await start_sessions(balancer, "CS1", "CS2")
        results = await balancer.release()
        assert [(r.station_id, r.cleared, r.failed) for r in results] == [
            ("CS1", (ID_BASE + 2, ID_BASE + 3), ()),
            ("CS2", (ID_BASE + 2, ID_BASE + 3), ()),
        ]
        sent = len(fake.set_profiles())
        balancer.station_call("CS3", "TransactionEvent", transaction_event("Started", "TX-3"))
        balancer.station_connected("CS3")
        await trio.sleep(100)
        assert len(fake.set_profiles()) == sent
        assert balancer.status()["released"] is True


async def test_with_balancing_off_the_profiles_an_earlier_run_left_are_cleared_on_connection(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    fake = Recording(limit_amperes=40.0)
    with Store.open(tmp_path) as store:
        state = store.namespace("balancing")
        balancer = Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(), state=state)
        async with running(balancer):
            await start_sessions(balancer, "CS1", evse_id=2)
        leftovers = LeftoverProfiles(state, fake, ID_BASE)
        assert leftovers.pending == ["CS1"]
        async with trio.open_nursery() as nursery:
            leftovers.connected("CS1", nursery)
        clears = [payload for station, action, payload in fake.payloads if action == "ClearChargingProfile"]
        assert clears == [{"chargingProfileId": ID_BASE + 4}, {"chargingProfileId": ID_BASE + 5}]
        assert leftovers.pending == []
        assert state.items() == {}


# --- 11.5: scheduled limits ---------------------------------------------------------------------------


async def test_a_scheduled_drop_is_in_force_at_the_stations_when_it_comes(autojump_clock: trio.abc.Clock) -> None:
    """The limit drops from 40 A to 20 A at t = 100 s (a schedule, known in advance). Stations answer in
    2 s; with a 15 s lead the decreases are accepted before the instant of the drop."""
    drop_at = START + timedelta(seconds=100)

    def limits_at(now: datetime) -> SiteLimits:
        return SiteLimits.uniform(40.0 if now < drop_at else 20.0)

    def next_change(now: datetime) -> datetime | None:
        return drop_at if now < drop_at else None

    fake = FakeStations(limit_amperes=40.0)
    balancer = Balancer(
        GRID_SITE,
        limits_at,
        fake,
        loop_settings(decrease_lead_s=15.0),
        next_limit_change=next_change,
        wall_clock=wall_clock,
    )
    async with running(balancer):
        await start_sessions(balancer, "CS1", "CS2")
        await trio.sleep(5)
        assert fake.effective(("CS1", 1)) == 20.0
        fake.delay_s.update(CS1=2.0, CS2=2.0)
        await trio.sleep_until(110)
        decreases = [call for call in fake.calls if call.limit_amperes == 10.0]
        assert sorted(call.station_id for call in decreases) == ["CS1", "CS2"]
        assert all(call.answered_at_s is not None and call.answered_at_s <= 100.0 for call in decreases)


# --- 11.6: phases budgeted and enforced ----------------------------------------------------------------


async def test_a_session_budgeted_on_one_phase_gets_number_phases_in_its_profile(
    autojump_clock: trio.abc.Clock,
) -> None:
    """K01.FR.49: without numberPhases a station assumes 3, so a 1-phase budget must say so; when the EV
    goes to 3 phases it is counted on all three at once and its profile no longer restricts it to one."""
    fake = Recording(limit_amperes=40.0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(min_interval_s=0), wall_clock=wall_clock)
    async with running(balancer):
        await start_sessions(balancer, "CS1", numberOfPhasesUsed=1)
        tx = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxProfile"]
        assert tx[-1]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["numberPhases"] == 1
        assert balancer.phase_bounds_amperes() == (32.0, 0.0, 0.0)
        balancer.station_call(
            "CS1", "TransactionEvent", transaction_event("Updated", "TX-CS1", 1, seq_no=1, numberOfPhasesUsed=3)
        )
        assert balancer.phase_bounds_amperes() == (32.0, 32.0, 32.0)  # counted at once, before any answer
        await settle()
        tx = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxProfile"]
        assert "numberPhases" not in tx[-1]["chargingSchedule"][0]["chargingSchedulePeriod"][0]


async def test_an_ev_going_to_one_phase_is_counted_on_three_until_its_station_enforces_one(
    autojump_clock: trio.abc.Clock,
) -> None:
    fake = Recording(limit_amperes=40.0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(min_interval_s=0), wall_clock=wall_clock)
    async with running(balancer):
        await start_sessions(balancer, "CS1")
        fake.delay_s["CS1"] = 5.0
        balancer.station_call(
            "CS1", "TransactionEvent", transaction_event("Updated", "TX-CS1", 1, seq_no=1, numberOfPhasesUsed=1)
        )
        await trio.sleep(1)
        # Its installed profile still allows 3 phases: it stays counted on all three.
        assert balancer.phase_bounds_amperes() == (32.0, 32.0, 32.0)
        await trio.sleep(10)
        await settle()
        tx = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxProfile"]
        assert tx[-1]["chargingSchedule"][0]["chargingSchedulePeriod"][0]["numberPhases"] == 1
        assert balancer.phase_bounds_amperes() == (32.0, 0.0, 0.0)


async def test_the_default_under_a_long_transaction_is_renewed_and_holds_when_it_ends(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Our TxDefaultProfile under a running TxProfile governs again when the transaction ends: it is
    renewed beside the TxProfile (a 1-phase station's with numberPhases 1), so a transaction longer
    than the validity ends on a known limit, not on the station's own default."""
    site = SiteConfig.model_validate(
        {"grid": {"max_current_amperes": 40}, "stations": [{"station_id": "CS1", "phases": 1}]}
    )
    fake = Recording(limit_amperes=40.0)
    settings = loop_settings(profile_validity_s=600.0, idle_current_amperes=6.0, min_interval_s=0)
    balancer = Balancer(site, fake.limits_at, fake, settings, wall_clock=wall_clock)
    async with running(balancer):
        balancer.station_connected("CS1")
        balancer.station_call("CS1", "StatusNotification", status_notification(1))
        await settle()
        balancer.station_call("CS1", "TransactionEvent", transaction_event("Started", "TX-1"))
        await settle()
        await trio.sleep(1000)  # beyond the first TxDefaultProfile's validity
        defaults = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxDefaultProfile"]
        assert len(defaults) >= 3
        assert all(p["chargingSchedule"][0]["chargingSchedulePeriod"][0]["numberPhases"] == 1 for p in defaults)
        assert valid_to(defaults[-1]) > wall_clock()
        balancer.station_call("CS1", "TransactionEvent", transaction_event("Ended", "TX-1", seq_no=1))
        assert row(balancer, "CS1")["installed_amperes"] == 6.0  # known at once: no count at its maximum
        assert row(balancer, "CS1")["compliant"] is True


def default_period(profile: dict[str, Any]) -> dict[str, Any]:
    period: dict[str, Any] = profile["chargingSchedule"][0]["chargingSchedulePeriod"][0]
    return period


async def test_the_default_under_a_one_phase_transaction_is_counted_on_its_phases_and_narrowed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Found by the faulty-fleet run at 1,000 events (seed 10): our TxDefaultProfile of 6 A on three phases
    stayed under a 1-phase EV's TxProfile, so when that transaction ended the station could load the two
    phases the session was not counted on (K02.FR.05: the default governs at once). It is counted on its
    own phases until it is narrowed to the session's phase (K01.FR.49 numberPhases 1), never above the
    transaction's share."""
    fake = Recording(limit_amperes=40.0)
    settings = loop_settings(idle_current_amperes=6.0, min_interval_s=0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, settings, wall_clock=wall_clock)
    async with running(balancer):
        await one_phase_transaction_over_the_idle_default(balancer, fake)
        tx = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxProfile"]
        assert default_period(tx[-1]) == {"startPeriod": 0, "limit": 32.0, "numberPhases": 1}
        assert balancer.phase_bounds_amperes() == (32.0, 0.0, 0.0)


async def one_phase_transaction_over_the_idle_default(balancer: Balancer, fake: Recording) -> None:
    """CS1 idle with our 6 A TxDefaultProfile on every phase, then a 1-phase EV's transaction: the default
    under it is narrowed to numberPhases 1."""
    balancer.station_connected("CS1")
    balancer.station_call("CS1", "StatusNotification", status_notification(1))
    await settle()
    (first,) = fake.set_profiles("CS1")
    assert "numberPhases" not in default_period(first)  # idle: any EV may come, on every phase
    balancer.station_call("CS1", "TransactionEvent", transaction_event("Started", "TX-1", numberOfPhasesUsed=1))
    await settle()
    defaults = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxDefaultProfile"]
    assert default_period(defaults[-1]) == {"startPeriod": 0, "limit": 6.0, "numberPhases": 1}


async def test_a_default_narrowed_under_a_transaction_is_counted_narrowed_once_it_ends(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Found by the demo under load (an EMS limit of 12 A read as 18 A committed): once a 1-phase EV's
    transaction ended, the EVSE was counted at its TxDefaultProfile on every phase of its station, while
    the default the station holds had been narrowed to one phase (numberPhases 1, K01.FR.49) and governs
    as it is (K02.FR.05). The phases it loads are those of the default installed, until a wider one is
    accepted."""
    fake = Recording(limit_amperes=40.0)
    settings = loop_settings(idle_current_amperes=6.0, min_interval_s=0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, settings, wall_clock=wall_clock)
    async with running(balancer):
        await one_phase_transaction_over_the_idle_default(balancer, fake)
        fake.delay_s["CS1"] = 5.0  # what follows the end is not answered yet
        balancer.station_call("CS1", "TransactionEvent", transaction_event("Ended", "TX-1", seq_no=1))
        assert balancer.phase_bounds_amperes() == (6.0, 0.0, 0.0)
        assert row(balancer, "CS1")["compliant"] is True
        await trio.sleep(10)
        await settle()
        # Idle, it is offered its idle current on every phase again (any EV may come).
        defaults = [p for p in fake.set_profiles("CS1") if p["chargingProfilePurpose"] == "TxDefaultProfile"]
        assert default_period(defaults[-1]) == {"startPeriod": 0, "limit": 6.0}
        assert balancer.phase_bounds_amperes() == (6.0, 6.0, 6.0)


def test_a_default_under_a_transaction_counts_on_its_own_phases_and_at_its_own_limit() -> None:
    """The rollout's bound (pure): our TxDefaultProfile under a running TxProfile raises what the EVSE is
    counted at to its limit, and widens the phases counted to its numberPhases, until it is narrowed."""
    station = GRID_SITE.station("CS1")
    session = EvseApplied("CS1", 1, accepted_amperes=4.0, in_session=True, phases_used=1, accepted_phases=1)
    assert (bound_amperes(station, session), counted_phases(station, session)) == (4.0, 1)
    under = replace(session, fallback_amperes=6.0)  # 6 A on every phase
    assert (bound_amperes(station, under), counted_phases(station, under)) == (6.0, 3)
    narrowed = replace(session, fallback_amperes=4.0, fallback_phases=1)
    assert (bound_amperes(station, narrowed), counted_phases(station, narrowed)) == (4.0, 1)
    assert counted_phases(station, replace(session, fallback_amperes=0.0)) == 1  # 0 A loads no phase


def test_a_retry_while_the_site_stays_over_its_limit_asks_for_nothing() -> None:
    """Found by the mixed fleet run: an unreliable station that rejected (counted at its maximum, retried
    only every min_interval_s) was retried at what it last accepted while the others still counted at
    their maximum kept the grid over a limit that had just dropped; once trusted again it was above its
    share for one more round trip. With every due retry accepted the path would still be over, so the
    retry asks for 0 (its share comes as an increase). Where the retries together fit (a restart: all
    counted at their maximum, each retried at what it had) they keep what they had."""
    site = SiteConfig.model_validate(
        {
            "grid": {"max_current_amperes": 48},
            "stations": [{"station_id": s, "evse_max_current_amperes": 16.0} for s in ("A", "B", "C")],
        }
    )
    state = RolloutState()
    for station_id, accepted in (("A", 16.0), ("B", 9.3), ("C", 16.0)):
        state.add_evse(station_id, 1, accepted)
        state.session_started((station_id, 1), 3)
        state.rejected(Step(station_id, 1, accepted, "decrease"))  # untrusted: counted at 16 A
    state.last_change_s.update({"A": 100.0, "C": 100.0})  # retried a moment ago; B is due
    sessions = [Session(station_id=s, evse_id=1, transaction_id=f"tx-{s}", phases_used=3) for s in "ABC"]
    limits = SiteLimits.uniform(34.0)
    allocation = allocate(site, limits, state.allocator_sessions(sessions), 110.0)
    steps = plan(site, limits, allocation, state, 110.0, RolloutPolicy(min_interval_s=30.0))
    assert [(s.station_id, s.current_amperes, s.kind) for s in steps.retries] == [("B", 0.0, "retry")]

    state.last_change_s.clear()  # all due: A 16 + B 9.3 + C 16 = 41.3 A still over 34 A: all ask for 0
    steps = plan(site, limits, allocation, state, 110.0, RolloutPolicy(min_interval_s=30.0))
    assert [s.current_amperes for s in steps.retries] == [0.0, 0.0, 0.0]

    roomy = SiteLimits.uniform(48.0)  # no limit below the grid's 48 A: together they fit, each at what it had
    allocation = allocate(site, roomy, state.allocator_sessions(sessions), 110.0)
    steps = plan(site, roomy, allocation, state, 110.0, RolloutPolicy(min_interval_s=30.0))
    assert [s.current_amperes for s in steps.retries] == [16.0, 9.3, 16.0]


async def test_a_tx_profile_refused_because_the_transaction_just_ended_is_no_warning(
    autojump_clock: trio.abc.Clock, caplog: Any
) -> None:
    """Found by the demo (it counts warnings as errors): a station whose transaction ends while our TxProfile
    is on its way refuses it with TxNotFound (K01.FR.09) before its TransactionEvent Ended reaches the
    loop. That is no fault: logged as information, counted at its maximum until the Ended comes."""
    fake = Recording(limit_amperes=40.0)

    async def caller(station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        if payload["chargingProfile"]["chargingProfilePurpose"] == "TxProfile":
            return CallOutcome("answered", {"status": "Rejected", "statusInfo": {"reasonCode": "TxNotFound"}})
        return await fake(station_id, action, payload)

    balancer = Balancer(GRID_SITE, fake.limits_at, caller, loop_settings(), wall_clock=wall_clock)
    with caplog.at_level("INFO", logger="ocpp_lc.balancing"):
        async with running(balancer):
            await start_sessions(balancer, "CS1")
            assert row(balancer, "CS1")["compliant"] is False  # counted at its maximum meanwhile
            balancer.station_call("CS1", "TransactionEvent", transaction_event("Ended", "TX-CS1", seq_no=1))
            await trio.sleep(60)  # past the retry interval: the idle EVSE takes a TxDefaultProfile again
            await settle()
            assert row(balancer, "CS1")["compliant"] is True
    assert not [r for r in caplog.records if r.levelname == "WARNING"], [r.getMessage() for r in caplog.records]
    assert any("transaction has ended there" in r.getMessage() for r in caplog.records)
