"""The live balancing loop (balancing/loop.py) against fake stations, on trio's autojump clock.

The stations are modelled by :class:`FakeStations`, the loop's Caller: it answers each
SetChargingProfile as the test configured that station (Accepted, Rejected, a CALLERROR, no answer,
link gone; optionally after a delay), keeps one call per station outstanding like the router's link
does (Part 4 §4.1.1), validates every payload against the OCA schema and keeps, per EVSE, what the
station has installed. From that record it checks the rollout's promise whenever a profile goes out
that lets an EVSE draw more: the sum of what every EVSE may draw (an EVSE whose limit is unknown at its
maximum, an increase from the moment it is sent) stays within the grid limit in force (K14.FR.01).

Times are virtual: ``settle()`` returns once the loop and every call have nothing left to do now, and
``trio.sleep`` lets virtual time pass for the rate limit, timeouts, grace periods and forgetting.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from balancing.allocator import SiteLimits
from balancing.loop import Balancer, CallOutcome, LoopSettings
from balancing.rollout import RolloutPolicy
from balancing.site import AllocationPolicy, SiteConfig
from tests.support.schemas import validate_call, validate_result

START = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
STACK_LEVEL = 7
ID_BASE = 500_000
EVSE_MAX_AMPERES = 32.0  # the site defaults: 6..32 A, 3 phases
MIN_INTERVAL_S = 30.0
TEST_DEADLINE_S = 5_000.0  # virtual seconds: far beyond any scenario here

Behaviour = Literal["accept", "reject", "error", "timeout", "gone"]
Key = tuple[str, int]


def wall_clock() -> datetime:
    return START + timedelta(seconds=trio.current_time())


def timestamp() -> str:
    return wall_clock().isoformat().replace("+00:00", "Z")


@dataclass
class Call:
    """One SetChargingProfile as the fake station saw it."""

    station_id: str
    evse_id: int
    purpose: str
    limit_amperes: float
    transaction_id: str | None
    sent_at_s: float
    #: What the EVSE could draw just before (its installed limit, unknown = maximum).
    drawable_before_amperes: float
    answered_at_s: float | None = None
    outcome: str | None = None

    @property
    def key(self) -> Key:
        return (self.station_id, self.evse_id)

    @property
    def raises(self) -> bool:
        return self.limit_amperes > self.drawable_before_amperes + 1e-9

    @property
    def lowers(self) -> bool:
        return self.limit_amperes < self.drawable_before_amperes - 1e-9


@dataclass
class FakeStations:
    """The Caller handed to the Balancer; see the module docstring."""

    limit_amperes: float
    evses: list[Key] = field(default_factory=list)
    behaviour: dict[str, Behaviour] = field(default_factory=dict)
    delay_s: dict[str, float] = field(default_factory=dict)
    timeout_s: float = 20.0
    calls: list[Call] = field(default_factory=list)
    #: Per EVSE, the profiles the station holds: purpose -> limit.
    installed: dict[Key, dict[str, float]] = field(default_factory=dict)
    in_flight: dict[Key, float] = field(default_factory=dict)
    #: Over-limit moments seen (when ``raise_on_violation`` is off, for a test that expects some).
    violations: list[str] = field(default_factory=list)
    raise_on_violation: bool = True
    _locks: dict[str, trio.Lock] = field(default_factory=dict)

    def limits_at(self, now: datetime) -> SiteLimits:
        return SiteLimits.uniform(self.limit_amperes)

    def effective(self, key: Key) -> float | None:
        """The limit the station applies to the EVSE (None: none of ours, it may draw its maximum)."""
        profiles = self.installed.get(key, {})
        return profiles.get("TxProfile", profiles.get("TxDefaultProfile"))

    def drawable(self, key: Key) -> float:
        value = self.effective(key)
        value = EVSE_MAX_AMPERES if value is None else value
        flight = self.in_flight.get(key)
        return value if flight is None else max(value, flight)

    def total_drawable(self) -> float:
        return sum(self.drawable(key) for key in self.evses)

    def end_transaction(self, key: Key) -> None:
        """The station drops the TxProfile when the transaction ends (K01: it belongs to it)."""
        self.installed.get(key, {}).pop("TxProfile", None)

    def clear(self, station_id: str) -> None:
        """A ClearChargingProfile without criteria: every profile of the station is gone."""
        for key in self.installed:
            if key[0] == station_id:
                self.installed[key] = {}

    def to(self, station_id: str) -> list[Call]:
        return [call for call in self.calls if call.station_id == station_id]

    async def __call__(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        assert action == "SetChargingProfile"
        validate_call(action, payload)
        profile = payload["chargingProfile"]
        evse_id = payload["evseId"]
        purpose = profile["chargingProfilePurpose"]
        # K03.FR.08 / K14.FR.06: never ChargingStationExternalConstraints.
        assert purpose in ("TxProfile", "TxDefaultProfile"), payload
        assert evse_id >= 1
        assert profile["id"] == ID_BASE + 2 * evse_id + (1 if purpose == "TxDefaultProfile" else 0)
        assert profile["stackLevel"] == STACK_LEVEL
        assert profile["chargingProfileKind"] == "Relative"
        (schedule,) = profile["chargingSchedule"]
        assert schedule["chargingRateUnit"] == "A"
        (period,) = schedule["chargingSchedulePeriod"]
        assert period["startPeriod"] == 0
        if purpose == "TxProfile":
            assert isinstance(profile.get("transactionId"), str), "K01.FR.03: a TxProfile names its transaction"
        else:
            assert "transactionId" not in profile
        key = (station_id, evse_id)
        if key not in self.evses:
            self.evses.append(key)
        lock = self._locks.setdefault(station_id, trio.Lock())
        async with lock:  # the link keeps one call of ours outstanding per station
            call = Call(
                station_id,
                evse_id,
                purpose,
                float(period["limit"]),
                profile.get("transactionId"),
                trio.current_time(),
                self.drawable(key),
            )
            self.calls.append(call)
            behaviour = self.behaviour.get(station_id, "accept")
            if behaviour != "gone":
                # A station may apply an increase before it answers: it counts from now.
                self.in_flight[key] = call.limit_amperes
                total = self.total_drawable()
                if call.raises and total > self.limit_amperes + 1e-6:
                    violation = f"K14.FR.01: {call} lets the site draw {total} A over the limit {self.limit_amperes} A"
                    self.violations.append(violation)
                    assert not self.raise_on_violation, violation
            try:
                outcome = await self._answer(station_id, behaviour, key, call)
            finally:
                self.in_flight.pop(key, None)
            call.answered_at_s = trio.current_time()
            call.outcome = outcome.status if outcome.payload is None else outcome.payload["status"]
            return outcome

    async def _answer(self, station_id: str, behaviour: Behaviour, key: Key, call: Call) -> CallOutcome:
        delay_s = self.delay_s.get(station_id, 0.0)
        if delay_s:
            await trio.sleep(delay_s)
        if behaviour == "gone":
            return CallOutcome("gone", detail="link closed")
        if behaviour == "error":
            return CallOutcome("error", detail="InternalError: boom")
        if behaviour == "reject":
            return CallOutcome("answered", {"status": "Rejected", "statusInfo": {"reasonCode": "NoEVSE"}})
        # Accepted, or applied with the answer lost (a timeout): installed either way.
        self.installed.setdefault(key, {})[call.purpose] = call.limit_amperes
        if behaviour == "timeout":
            await trio.sleep(self.timeout_s)
            return CallOutcome("timeout", detail="no answer in time")
        return CallOutcome("answered", {"status": "Accepted"})


def make_balancer(
    fake: FakeStations,
    *,
    registry: CollectorRegistry | None = None,
    policy: AllocationPolicy | None = None,
    forget_after_s: float = 3600.0,
) -> Balancer:
    site = SiteConfig(policy=policy or AllocationPolicy())
    settings = LoopSettings(
        stack_level=STACK_LEVEL,
        profile_id_base=ID_BASE,
        recompute_interval_s=10.0,
        forget_disconnected_after_s=forget_after_s,
        rollout=RolloutPolicy(hysteresis_amperes=1.0, min_interval_s=MIN_INTERVAL_S, resolution_amperes=0.1),
    )
    return Balancer(site, fake.limits_at, fake, settings, wall_clock=wall_clock, registry=registry)


@asynccontextmanager
async def running(balancer: Balancer) -> AsyncIterator[None]:
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(balancer.run)
            yield
            nursery.cancel_scope.cancel()


async def settle() -> None:
    """Until the loop waits for its next tick and no call can make progress without time passing."""
    await trio.testing.wait_all_tasks_blocked()


def status_notification(evse_id: int) -> dict[str, Any]:
    return {"timestamp": timestamp(), "connectorStatus": "Available", "evseId": evse_id, "connectorId": 1}


TRIGGER_REASONS = {"Started": "CablePluggedIn", "Ended": "EVCommunicationLost"}


def transaction_event(
    event_type: str, transaction_id: str, evse_id: int | None = 1, *, seq_no: int = 0, **extra: Any
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "eventType": event_type,
        "timestamp": timestamp(),
        "triggerReason": TRIGGER_REASONS.get(event_type, "MeterValuePeriodic"),
        "seqNo": seq_no,
        "transactionInfo": {"transactionId": transaction_id, "chargingState": "Charging"},
        **extra,
    }
    if evse_id is not None:
        payload["evse"] = {"id": evse_id, "connectorId": 1}
    return payload


def meter_values(evse_id: int, current_amperes: float) -> dict[str, Any]:
    samples = [
        {"value": current_amperes, "measurand": "Current.Import", "phase": phase, "unitOfMeasure": {"unit": "A"}}
        for phase in ("L1", "L2", "L3")
    ]
    return {"evseId": evse_id, "meterValue": [{"timestamp": timestamp(), "sampledValue": samples}]}


def row(balancer: Balancer, station_id: str, evse_id: int = 1) -> dict[str, Any]:
    (found,) = [r for r in balancer.evse_rows() if (r["station_id"], r["evse_id"]) == (station_id, evse_id)]
    return found


def profiles(registry: CollectorRegistry, kind: str, outcome: str) -> float:
    return registry.get_sample_value("ocpp_lc_balancing_profiles_total", {"kind": kind, "outcome": outcome}) or 0.0


async def two_sessions(balancer: Balancer, fake: FakeStations, stations: tuple[str, ...] = ("CS1", "CS2")) -> None:
    """Every station boots (StatusNotification), then a transaction starts on each but the last idle ones."""
    for station_id in stations:
        balancer.station_connected(station_id)
        balancer.station_call(station_id, "StatusNotification", status_notification(1))
    await settle()
    for index, station_id in enumerate(stations[:2]):
        balancer.station_call(station_id, "TransactionEvent", transaction_event("Started", f"TX-{index}"))
    await settle()


# --- profiles and their shape ------------------------------------------------------------------------


async def test_evse_from_status_notification_gets_default_profile_of_zero(autojump_clock: trio.abc.Clock) -> None:
    """A new EVSE gets our TxDefaultProfile of 0 A (an EV arriving finds no current it was not given),
    at the configured stack level, id profile_id_base + 2 × evse + 1; never ExternalConstraints (K03.FR.08)."""
    fake = FakeStations(limit_amperes=40.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        balancer.station_connected("CS1")
        balancer.station_call("CS1", "StatusNotification", status_notification(2))
        await settle()
        (call,) = fake.calls
        assert (call.station_id, call.evse_id, call.purpose, call.limit_amperes) == ("CS1", 2, "TxDefaultProfile", 0.0)
        assert fake.effective(("CS1", 2)) == 0.0
        assert row(balancer, "CS1", 2)["installed_amperes"] == 0.0
        assert row(balancer, "CS1", 2)["compliant"] is True
        assert profiles(registry, "retry", "accepted") == 1.0
        # Nothing more to say while the EVSE stays idle, tick after tick.
        await trio.sleep(100)
        assert len(fake.calls) == 1


async def test_started_transactions_share_the_limit_fairly(autojump_clock: trio.abc.Clock) -> None:
    """TransactionEvent Started → TxProfile with that transactionId (K01.FR.03) at the allocated current;
    two sessions on a 40 A grid get 20 A each and the sum never exceeds the limit (K14.FR.01)."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake)
        tx_calls = [call for call in fake.calls if call.purpose == "TxProfile"]
        assert sorted((c.station_id, c.transaction_id, c.limit_amperes) for c in tx_calls) == [
            ("CS1", "TX-0", 20.0),
            ("CS2", "TX-1", 20.0),
        ]
        assert fake.effective(("CS1", 1)) == fake.effective(("CS2", 1)) == 20.0
        assert row(balancer, "CS1")["allocated_amperes"] == 20.0
        assert row(balancer, "CS2")["installed_amperes"] == 20.0


async def test_lowering_the_limit_sends_decreases_first(autojump_clock: trio.abc.Clock) -> None:
    """K14.FR.05: a lower limit reaches every station whose profile changes; every decrease is answered
    before any increase goes out, so the site never may draw more than the limit because of an increase."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake, ("CS1", "CS2", "CS3"))
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2", "CS3")] == [20.0, 20.0, 0.0]
        fake.delay_s = {"CS1": 2.0, "CS2": 3.0}  # slow answers make the order observable
        lowered_at_s = trio.current_time()
        first_after = len(fake.calls)
        fake.limit_amperes = 24.0
        balancer.station_call("CS3", "TransactionEvent", transaction_event("Started", "TX-2"))
        balancer.wake()
        await trio.sleep(60)
        after = fake.calls[first_after:]
        decreases = [call for call in after if call.lowers]
        increases = [call for call in after if call.raises]
        assert sorted((c.station_id, c.limit_amperes) for c in decreases) == [("CS1", 8.0), ("CS2", 8.0)]
        assert [(c.station_id, c.limit_amperes) for c in increases] == [("CS3", 8.0)]
        last_answer_s = max(c.answered_at_s or float("inf") for c in decreases)
        assert last_answer_s == lowered_at_s + 3.0
        assert increases[0].sent_at_s >= last_answer_s
        assert fake.total_drawable() <= 24.0
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2", "CS3")] == [8.0, 8.0, 8.0]


async def test_increase_waits_for_decreases_even_with_room_to_spare(autojump_clock: trio.abc.Clock) -> None:
    """Decreases are sent and accepted before any increase is sent, even when the headroom left now would
    already allow part of the increase: the new session gets its full share in one step, after them."""
    fake = FakeStations(limit_amperes=76.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake, ("CS1", "CS2", "CS3"))
        # Both at their 32 A maximum: 12 A of the 76 A unused.
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2", "CS3")] == [32.0, 32.0, 0.0]
        fake.delay_s = {"CS1": 2.0, "CS2": 3.0}
        lowered_at_s = trio.current_time()
        first_after = len(fake.calls)
        fake.limit_amperes = 72.0  # 8 A of room remain, enough for a minimum of 6 A
        balancer.station_call("CS3", "TransactionEvent", transaction_event("Started", "TX-2"))
        balancer.wake()
        await trio.sleep(60)
        after = fake.calls[first_after:]
        assert sorted((c.sent_at_s - lowered_at_s, c.station_id, c.limit_amperes) for c in after) == [
            (0.0, "CS1", 24.0),
            (0.0, "CS2", 24.0),
            (3.0, "CS3", 24.0),
        ]
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2", "CS3")] == [24.0, 24.0, 24.0]


# --- stations that do not comply ---------------------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "outcome"), [("reject", "rejected"), ("error", "error")])
async def test_rejecting_station_counts_at_maximum_and_is_retried(
    autojump_clock: trio.abc.Clock, behaviour: Behaviour, outcome: str
) -> None:
    """A station that rejects (or answers with a CALLERROR) is counted at its maximum: the other session
    gets what is left; it is retried every min_interval_s, and once it accepts both get their share."""
    fake = FakeStations(limit_amperes=48.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        for station_id in ("CS1", "CS2"):
            balancer.station_connected(station_id)
            balancer.station_call(station_id, "StatusNotification", status_notification(1))
        await settle()
        fake.behaviour["CS2"] = behaviour
        first_started = len(fake.calls)
        for index, station_id in enumerate(("CS1", "CS2")):
            balancer.station_call(station_id, "TransactionEvent", transaction_event("Started", f"TX-{index}"))
        await settle()
        assert profiles(registry, "increase", outcome) == 1.0
        assert row(balancer, "CS2")["compliant"] is False
        assert row(balancer, "CS2")["installed_amperes"] is None
        # 48 A less CS2 at its 32 A maximum leaves 16 A.
        assert row(balancer, "CS1")["allocated_amperes"] == 16.0
        assert fake.effective(("CS1", 1)) == 16.0
        assert balancer.status()["phases"]["L1"]["committed_amperes"] == 48.0
        await trio.sleep(MIN_INTERVAL_S * 2 + 5)
        retries = [call for call in fake.calls[first_started:] if call.station_id == "CS2"]
        # The increase at 0 s, then a retry per interval (30 s, 60 s), each sending no more than it last accepted.
        assert [(c.sent_at_s, c.limit_amperes) for c in retries] == [(0.0, 24.0), (30.0, 0.0), (60.0, 0.0)]
        assert profiles(registry, "retry", outcome) >= 2.0
        fake.behaviour["CS2"] = "accept"
        await trio.sleep(MIN_INTERVAL_S * 4)
        assert profiles(registry, "retry", "accepted") >= 1.0
        assert row(balancer, "CS2")["compliant"] is True
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [24.0, 24.0]
        assert [row(balancer, s)["installed_amperes"] for s in ("CS1", "CS2")] == [24.0, 24.0]


@pytest.mark.parametrize("behaviour", ["timeout", "gone"])
async def test_silent_station_counts_at_maximum_until_it_answers(
    autojump_clock: trio.abc.Clock, behaviour: Behaviour
) -> None:
    """A station that does not answer (timeout) or whose link is gone may have applied anything: it is
    counted at its maximum, retried, and the other session gets its share back once it accepts."""
    fake = FakeStations(limit_amperes=48.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        for station_id in ("CS1", "CS2"):
            balancer.station_connected(station_id)
            balancer.station_call(station_id, "StatusNotification", status_notification(1))
        await settle()
        fake.behaviour["CS2"] = behaviour
        for index, station_id in enumerate(("CS1", "CS2")):
            balancer.station_call(station_id, "TransactionEvent", transaction_event("Started", f"TX-{index}"))
        await trio.sleep(fake.timeout_s + 5)
        assert profiles(registry, "increase", behaviour) == 1.0
        assert row(balancer, "CS2")["compliant"] is False
        assert row(balancer, "CS1")["allocated_amperes"] == 16.0
        assert fake.effective(("CS1", 1)) == 16.0
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert profiles(registry, "retry", behaviour) >= 1.0
        fake.behaviour["CS2"] = "accept"
        await trio.sleep(MIN_INTERVAL_S * 5)
        assert row(balancer, "CS2")["compliant"] is True
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [24.0, 24.0]


# --- what the CSMS says ------------------------------------------------------------------------------


async def test_charging_priority_from_transaction_event_response(autojump_clock: trio.abc.Clock) -> None:
    """K03.FR.04/05: chargingPriority in the CSMS's TransactionEventResponse serves that session first
    when capacity is short; K03.FR.06: the others keep priority 0."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake)
        request = transaction_event("Updated", "TX-1", seq_no=1)
        response = {"chargingPriority": 5}
        validate_result("TransactionEvent", response)
        balancer.csms_answer("CS2", "TransactionEvent", response, request)
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert row(balancer, "CS2")["priority"] == 5
        assert row(balancer, "CS1")["priority"] == 0
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [8.0, 32.0]
        assert fake.total_drawable() <= 40.0


async def test_csms_tx_profile_caps_ours_and_clear_reinstalls(autojump_clock: trio.abc.Clock) -> None:
    """A TxProfile of the CSMS accepted at a station caps our limit for that EVSE (ours sits higher in the
    stack, so it must only restrict further); a ClearChargingProfile without criteria may have removed
    ours: it is counted as a conflict and our profile is sent again."""
    fake = FakeStations(limit_amperes=40.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        await two_sessions(balancer, fake)
        first_capped = len(fake.calls)
        csms_profile = {
            "evseId": 1,
            "chargingProfile": {
                "id": 17,
                "stackLevel": 0,
                "chargingProfilePurpose": "TxProfile",
                "chargingProfileKind": "Relative",
                "transactionId": "TX-0",
                "chargingSchedule": [
                    {"id": 17, "chargingRateUnit": "A", "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 10.0}]}
                ],
            },
        }
        validate_call("SetChargingProfile", csms_profile)
        balancer.station_answer("CS1", "SetChargingProfile", {"status": "Accepted"}, csms_profile)
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [10.0, 30.0]
        ours = [c for c in fake.calls[first_capped:] if c.station_id == "CS1" and c.purpose == "TxProfile"]
        assert ours and all(c.limit_amperes <= 10.0 for c in ours)
        conflicts = "ocpp_lc_balancing_csms_profile_conflicts_total"
        assert registry.get_sample_value(conflicts) == 0.0

        first_cleared = len(fake.calls)
        fake.clear("CS1")
        balancer.station_answer("CS1", "ClearChargingProfile", {"status": "Accepted"}, {})
        await trio.sleep(MIN_INTERVAL_S * 5)
        assert registry.get_sample_value(conflicts) == 1.0
        resent = [c for c in fake.calls[first_cleared:] if c.station_id == "CS1"]
        assert resent and resent[0].purpose == "TxProfile" and resent[0].transaction_id == "TX-0"
        # The CSMS's cap went with the clear: both back to an even share.
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [20.0, 20.0]


# --- meter values ------------------------------------------------------------------------------------


async def test_underdrawing_ev_lends_its_share_and_gets_it_back(autojump_clock: trio.abc.Clock) -> None:
    """An EV drawing far below its offer for longer than underdraw_grace_s gives the unused current to the
    other session; once it draws into the room it keeps, it gets its share back."""
    fake = FakeStations(limit_amperes=36.0)
    balancer = make_balancer(fake, policy=AllocationPolicy(underdraw_grace_s=20.0, underdraw_headroom_amperes=2.0))
    async with running(balancer):
        await two_sessions(balancer, fake)
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [18.0, 18.0]
        balancer.station_call("CS1", "MeterValues", meter_values(1, 5.0))
        await trio.sleep(15)  # within the grace period: nothing changes
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [18.0, 18.0]
        await trio.sleep(MIN_INTERVAL_S * 3)
        # Capped at what it draws plus the headroom (5 + 2); the other gets the rest.
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [7.0, 29.0]
        assert row(balancer, "CS1")["measured_current_amperes"] == 5.0
        balancer.station_call("CS1", "MeterValues", meter_values(1, 7.0))
        await trio.sleep(MIN_INTERVAL_S * 3)
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [18.0, 18.0]


async def test_ended_transaction_falls_back_to_default(autojump_clock: trio.abc.Clock) -> None:
    """TransactionEvent Ended: the EVSE is governed by our TxDefaultProfile of 0 again and the remaining
    session gets the capacity (up to its maximum)."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake)
        fake.end_transaction(("CS1", 1))
        balancer.station_call("CS1", "TransactionEvent", transaction_event("Ended", "TX-0", None, seq_no=1))
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert fake.effective(("CS1", 1)) == 0.0
        assert row(balancer, "CS1")["transaction_id"] is None
        assert row(balancer, "CS1")["installed_amperes"] == 0.0
        assert fake.effective(("CS2", 1)) == EVSE_MAX_AMPERES
        assert balancer.status()["sessions"] == 1


async def test_disconnected_station_counts_at_maximum_until_forgotten(autojump_clock: trio.abc.Clock) -> None:
    """A station whose link is gone keeps whatever it had: counted at its maximum, never called, and
    (with no transaction open) forgotten after forget_disconnected_after_s: its capacity then goes to the
    others."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake, forget_after_s=300.0)
    async with running(balancer):
        await two_sessions(balancer, fake)
        balancer.station_call("CS1", "TransactionEvent", transaction_event("Ended", "TX-0", None, seq_no=1))
        await settle()
        await trio.sleep(MIN_INTERVAL_S * 2)
        first_gone = len(fake.calls)
        balancer.station_disconnected("CS1")
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert row(balancer, "CS1")["connected"] is False
        assert row(balancer, "CS1")["compliant"] is False
        assert fake.effective(("CS2", 1)) == 8.0  # 40 A less CS1's 32 A maximum
        assert balancer.status()["phases"]["L1"]["headroom_amperes"] == 0.0
        await trio.sleep(300 - MIN_INTERVAL_S * 2 - 1)
        assert row(balancer, "CS1")["connected"] is False
        # Meanwhile the station was taken off site for good (what forgetting it assumes).
        fake.evses.remove(("CS1", 1))
        await trio.sleep(1 + 10)  # past 300 s, and past the tick that may coincide with it
        assert [r["station_id"] for r in balancer.evse_rows()] == ["CS2"]
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert fake.effective(("CS2", 1)) == EVSE_MAX_AMPERES
        assert not [c for c in fake.calls[first_gone:] if c.station_id == "CS1"]


# --- robustness ----------------------------------------------------------------------------------------

BAD_EVSE_IDS: list[Any] = ["1", True, 1.0, 0, -1, 1001, None, float("nan")]


async def test_malformed_payloads_are_ignored_and_counted(autojump_clock: trio.abc.Clock) -> None:
    """Whatever a station or the CSMS writes, the loop never raises (it only observes relayed traffic);
    what it cannot read is counted in ocpp_lc_balancing_ignored_messages_total."""
    fake = FakeStations(limit_amperes=40.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)

    def ignored(action: str) -> float:
        return registry.get_sample_value("ocpp_lc_balancing_ignored_messages_total", {"action": action}) or 0.0

    async with running(balancer):
        await two_sessions(balancer, fake)
        before = list(fake.calls)
        status_bad: list[Any] = [None, [], "x", {}, *({"evseId": bad} for bad in BAD_EVSE_IDS)]
        for payload in status_bad:
            balancer.station_call("CS1", "StatusNotification", payload)
        assert ignored("StatusNotification") == len(status_bad)

        tx_bad: list[Any] = [
            None,
            [],
            {"eventType": "Started"},
            {"eventType": "Begun", "transactionInfo": {"transactionId": "T"}, "evse": {"id": 1}},
            {"eventType": "Started", "transactionInfo": {"transactionId": 5}, "evse": {"id": 1}},
            {"eventType": "Started", "transactionInfo": {"transactionId": ""}, "evse": {"id": 1}},
            {"eventType": "Started", "transactionInfo": "TX-9", "evse": {"id": 1}},
            {"eventType": True, "transactionInfo": {"transactionId": "TX-9"}},
            # An event of an unknown transaction without its EVSE (or with a bool / out-of-range one).
            {"eventType": "Updated", "transactionInfo": {"transactionId": "TX-9"}},
            {"eventType": "Updated", "transactionInfo": {"transactionId": "TX-9"}, "evse": {"id": True}},
            {"eventType": "Updated", "transactionInfo": {"transactionId": "TX-9"}, "evse": {"id": 5000}},
        ]
        for payload in tx_bad:
            balancer.station_call("CS2", "TransactionEvent", payload)
        assert ignored("TransactionEvent") == len(tx_bad)

        # Meter values the loop cannot read leave the measured draw unknown (not counted: optional data).
        for value in (float("nan"), float("inf"), -3.0, True, "12", None, 1e308):
            sample = {"value": value, "measurand": "Current.Import", "unitOfMeasure": {"unit": "A", "multiplier": 3}}
            balancer.station_call("CS1", "MeterValues", {"evseId": 1, "meterValue": [{"sampledValue": [sample]}]})
        for payload in (None, {"evseId": 1, "meterValue": "x"}, {"evseId": 1, "meterValue": [None]}, {"evseId": True}):
            balancer.station_call("CS1", "MeterValues", payload)
        odd_unit = {"value": 5, "measurand": "Current.Import", "unitOfMeasure": {"unit": {"A": 1}, "multiplier": True}}
        balancer.station_call("CS1", "MeterValues", {"evseId": 1, "meterValue": [{"sampledValue": [odd_unit]}]})
        assert row(balancer, "CS1")["measured_current_amperes"] is None

        # Priorities that are not an integer in -9..9 change nothing (K03.FR.06: 0 stays).
        request = transaction_event("Updated", "TX-0", seq_no=1)
        for priority in (True, "5", 5.5, 10, -10, float("nan"), None):
            balancer.csms_answer("CS1", "TransactionEvent", {"chargingPriority": priority}, request)
        for answer_request in (None, "x", {"transactionInfo": None}):
            balancer.csms_answer("CS1", "TransactionEvent", {"chargingPriority": 3}, answer_request)
        balancer.csms_answer("CS1", "TransactionEvent", None, request)
        assert row(balancer, "CS1")["priority"] == 0

        # The CSMS's SetChargingProfile the station accepted, but that the loop cannot read.
        for bad_profile in (None, {}, {"id": "x"}, {"id": 1, "stackLevel": -1, "chargingProfilePurpose": "TxProfile"}):
            balancer.station_answer(
                "CS1", "SetChargingProfile", {"status": "Accepted"}, {"evseId": 1, "chargingProfile": bad_profile}
            )
        assert ignored("SetChargingProfile") == 4
        for answer in (None, "Accepted", {"status": True}, {"status": "Rejected"}):
            balancer.station_answer("CS1", "SetChargingProfile", answer, {"evseId": 1})
            balancer.station_answer("CS1", "ClearChargingProfile", answer, {})
        balancer.station_answer("CS1", "ClearChargingProfile", {"status": "Accepted"}, None)
        balancer.station_call(None, None, None)  # type: ignore[arg-type]
        balancer.station_call("CS1", None, {"evseId": 1})

        await trio.sleep(MIN_INTERVAL_S * 2)
        # Nothing of that moved the allocation, and no EVSE was made up from it.
        assert [(r["station_id"], r["evse_id"]) for r in balancer.evse_rows()] == [("CS1", 1), ("CS2", 1)]
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [20.0, 20.0]
        assert fake.calls == before


# --- status and metrics ----------------------------------------------------------------------------


async def test_status_and_gauges_agree_with_the_state(autojump_clock: trio.abc.Clock) -> None:
    """status() and the ocpp_lc_balancing_* gauges show the same allocation, installed limits, draw and
    per-phase headroom as the stations hold."""
    fake = FakeStations(limit_amperes=40.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        await two_sessions(balancer, fake, ("CS1", "CS2", "CS3"))
        balancer.station_call("CS1", "MeterValues", meter_values(1, 19.5))
        await settle()

        def gauge(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(f"ocpp_lc_balancing_{name}", labels)

        status = balancer.status()
        assert status["sessions"] == 2
        assert status["overcommitted"] is False
        rows = {(r["station_id"], r["evse_id"]): r for r in status["evses"]}
        for station_id in ("CS1", "CS2", "CS3"):
            installed = fake.effective((station_id, 1))
            assert rows[(station_id, 1)]["installed_amperes"] == installed
            assert gauge("installed_amperes", station=station_id, evse="1") == installed
        for station_id in ("CS1", "CS2"):
            assert rows[(station_id, 1)]["allocated_amperes"] == 20.0
            assert gauge("allocated_amperes", station=station_id, evse="1") == 20.0
        # An idle EVSE has no allocation gauge (no session), only its installed 0.
        assert gauge("allocated_amperes", station="CS3", evse="1") is None
        assert gauge("measured_current_amperes", station="CS1", evse="1") == 19.5
        assert gauge("sessions") == 2.0
        assert gauge("noncompliant_evses") == 0.0
        assert gauge("overcommitted") == 0.0
        for phase in ("L1", "L2", "L3"):
            shown = status["phases"][phase]
            assert shown == {
                "limit_amperes": 40.0,
                "committed_amperes": 40.0,
                "measured_amperes": 19.5,
                "headroom_amperes": 0.0,
            }
            assert gauge("grid_limit_amperes", phase=phase) == 40.0
            assert gauge("committed_amperes", phase=phase) == 40.0
            assert gauge("measured_draw_amperes", phase=phase) == 19.5
            assert gauge("headroom_amperes", phase=phase) == 0.0
        assert (registry.get_sample_value("ocpp_lc_balancing_reallocations_total") or 0) >= 1
        assert profiles(registry, "increase", "sent") == profiles(registry, "increase", "accepted") == 2.0


# --- more of the CSMS's profiles, reconnects, scheduled limit changes ---------------------------------


def csms_tx_profile(profile_id: int, transaction_id: str, limit_amperes: float, stack_level: int = 0) -> dict[str, Any]:
    request = {
        "evseId": 1,
        "chargingProfile": {
            "id": profile_id,
            "stackLevel": stack_level,
            "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Relative",
            "transactionId": transaction_id,
            "chargingSchedule": [
                {
                    "id": profile_id,
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit_amperes}],
                }
            ],
        },
    }
    validate_call("SetChargingProfile", request)
    return request


async def test_csms_clearing_its_own_profile_lifts_the_cap_without_conflict(autojump_clock: trio.abc.Clock) -> None:
    """A ClearChargingProfile of the CSMS naming its own profile id leaves ours alone (no conflict, nothing
    re-sent at once) and lifts its cap: the session gets its even share back."""
    fake = FakeStations(limit_amperes=40.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        await two_sessions(balancer, fake)
        balancer.station_answer("CS1", "SetChargingProfile", {"status": "Accepted"}, csms_tx_profile(17, "TX-0", 10.0))
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [10.0, 30.0]
        balancer.station_answer("CS1", "ClearChargingProfile", {"status": "Accepted"}, {"chargingProfileId": 17})
        await trio.sleep(MIN_INTERVAL_S * 3)
        assert registry.get_sample_value("ocpp_lc_balancing_csms_profile_conflicts_total") == 0.0
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [20.0, 20.0]
        assert profiles(registry, "retry", "sent") == 2.0  # only the two first TxDefaultProfiles


async def test_csms_profile_at_our_stack_level_is_a_conflict(autojump_clock: trio.abc.Clock) -> None:
    """A CSMS TxProfile at the controller's reserved stack level replaces ours at the station: counted as a
    conflict, our limit there becomes unknown (counted at its maximum) and ours is installed again."""
    fake = FakeStations(limit_amperes=40.0)
    registry = CollectorRegistry()
    balancer = make_balancer(fake, registry=registry)
    async with running(balancer):
        await two_sessions(balancer, fake)
        first = len(fake.calls)
        request = csms_tx_profile(ID_BASE + 2, "TX-0", 25.0, stack_level=STACK_LEVEL)
        fake.installed[("CS1", 1)]["TxProfile"] = 25.0  # it replaced ours (same id, same stack level)
        balancer.station_answer("CS1", "SetChargingProfile", {"status": "Accepted"}, request)
        await settle()
        assert registry.get_sample_value("ocpp_lc_balancing_csms_profile_conflicts_total") == 1.0
        assert row(balancer, "CS1")["compliant"] is False
        # Counted at the most it may draw now (the CSMS's 25 A), so the other one gets what is left.
        assert fake.effective(("CS2", 1)) == 15.0
        await trio.sleep(MIN_INTERVAL_S * 5)
        resent = [c for c in fake.calls[first:] if c.station_id == "CS1"]
        assert resent and resent[0].transaction_id == "TX-0"
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [20.0, 20.0]


async def test_reconnected_station_is_trusted_again_once_it_accepts(autojump_clock: trio.abc.Clock) -> None:
    """After a reconnect the station's limit is re-sent (it may have rebooted); until it accepts it counts at
    its maximum, then both sessions get their share again."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake)
        balancer.station_disconnected("CS1")
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert fake.effective(("CS2", 1)) == 8.0
        first = len(fake.calls)
        balancer.station_connected("CS1")
        await trio.sleep(MIN_INTERVAL_S * 5)
        back = [c for c in fake.calls[first:] if c.station_id == "CS1"]
        assert back and back[0].purpose == "TxProfile" and back[0].limit_amperes <= 20.0
        assert row(balancer, "CS1")["compliant"] is True
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [20.0, 20.0]


async def test_scheduled_limit_change_is_applied_on_time(autojump_clock: trio.abc.Clock) -> None:
    """K14.FR.05: a limit that drops by itself (an EMS schedule's next period) reaches the stations at that
    instant, without anyone calling wake()."""
    fake = FakeStations(limit_amperes=40.0)
    drop_at = START + timedelta(seconds=125)

    def limits_at(now: datetime) -> SiteLimits:
        return SiteLimits.uniform(40.0 if now < drop_at else 24.0)

    def next_change(now: datetime) -> datetime | None:
        return drop_at if now < drop_at else None

    settings = LoopSettings(
        stack_level=STACK_LEVEL,
        profile_id_base=ID_BASE,
        recompute_interval_s=1000.0,  # the periodic tick is not what finds it
        rollout=RolloutPolicy(min_interval_s=MIN_INTERVAL_S),
    )
    balancer = Balancer(SiteConfig(), limits_at, fake, settings, next_limit_change=next_change, wall_clock=wall_clock)
    async with running(balancer):
        await two_sessions(balancer, fake)
        await trio.sleep(200)
        fake.limit_amperes = 24.0
        decreases = [c for c in fake.calls if c.lowers and c.purpose == "TxProfile"]
        assert sorted((c.station_id, c.limit_amperes) for c in decreases) == [("CS1", 12.0), ("CS2", 12.0)]
        assert all(125.0 <= c.sent_at_s <= 125.01 for c in decreases)
        assert fake.total_drawable() == 24.0


# --- found in review, fixed ---------------------------------------------------------------------------------


async def test_priority_from_id_token_info(autojump_clock: trio.abc.Clock) -> None:
    """K03.FR.05/06: the priority of a transaction is the TransactionEventResponse's chargingPriority, else the
    one in its idTokenInfo (the IdToken's priority); only when neither is known is it 0."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake)
        request = transaction_event("Updated", "TX-1", seq_no=1)
        response = {"idTokenInfo": {"status": "Accepted", "chargingPriority": 5}}
        validate_result("TransactionEvent", response)
        balancer.csms_answer("CS2", "TransactionEvent", response, request)
        await trio.sleep(MIN_INTERVAL_S * 2)
        assert row(balancer, "CS2")["priority"] == 5
        assert [fake.effective((s, 1)) for s in ("CS1", "CS2")] == [8.0, 32.0]


async def test_csms_tx_profile_is_forgotten_with_its_transaction(autojump_clock: trio.abc.Clock) -> None:
    """K02.FR.05: a TxProfile is deleted at the station when its transaction stops, so the loop's record of
    the CSMS's profiles must drop it too (otherwise it grows with every transaction the CSMS profiles)."""
    fake = FakeStations(limit_amperes=40.0)
    balancer = make_balancer(fake)
    async with running(balancer):
        await two_sessions(balancer, fake)
        for number in range(3):
            transaction_id = f"TX-A{number}"
            balancer.station_call("CS1", "TransactionEvent", transaction_event("Started", transaction_id))
            balancer.station_answer(
                "CS1", "SetChargingProfile", {"status": "Accepted"}, csms_tx_profile(100 + number, transaction_id, 10.0)
            )
            await trio.sleep(MIN_INTERVAL_S)
            balancer.station_call("CS1", "TransactionEvent", transaction_event("Ended", transaction_id, None))
            fake.end_transaction(("CS1", 1))
            await trio.sleep(MIN_INTERVAL_S)
        # No public view of the loop's record of the CSMS's profiles: its private state is the evidence.
        assert balancer._stations["CS1"].csms_profiles == {}


async def test_forgotten_station_returning_mid_transaction_is_counted(autojump_clock: trio.abc.Clock) -> None:
    """K14.FR.01: a station offline for longer than forget_disconnected_after_s may have kept charging (offline
    charging goes on under the profiles it has), so a station with a transaction open is not forgotten. When
    it is back and reports its running transaction (later TransactionEvents do not repeat the evse), that
    EVSE is still the session it was: the other session is never raised past the limit."""
    fake = FakeStations(limit_amperes=40.0, raise_on_violation=False)
    balancer = make_balancer(fake, forget_after_s=300.0)
    async with running(balancer):
        await two_sessions(balancer, fake)
        balancer.station_disconnected("CS1")
        await trio.sleep(400)
        assert [r["station_id"] for r in balancer.evse_rows()] == ["CS1", "CS2"]
        assert fake.violations == []
        balancer.station_connected("CS1")
        occupied = {"timestamp": timestamp(), "connectorStatus": "Occupied", "evseId": 1, "connectorId": 1}
        balancer.station_call("CS1", "StatusNotification", occupied)
        balancer.station_call("CS1", "TransactionEvent", transaction_event("Updated", "TX-0", None, seq_no=7))
        await trio.sleep(MIN_INTERVAL_S * 4)
        assert fake.violations == []
        assert row(balancer, "CS1")["transaction_id"] == "TX-0"
