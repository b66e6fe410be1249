"""Security events under the own identity (A04, #13.2): what is sent, what is only logged, the rate limit.

The reporter is tested with the real durable outbox of a store in a temporary directory and on trio's
virtual clock; the own identity's part (the start-up and reset events, the own connection's TLS
failures) against the in-memory CSMS of ``test_own_backoff``. Every payload is checked against the OCA
schema. The same events against an independent CSMS are in ``tests/e2e/test_own_identity.py``.
"""

from __future__ import annotations

import datetime
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from router.app import build_app
from router.config import parse_settings
from router.own.security_events import TECH_INFO_CHARS, RatePolicy, SecurityEvents
from router.store import Outbox, Store, StoreError
from router.transport import HandshakeFailed
from tests.support.schemas import validate_call
from tests.unit.test_own_backoff import NOW, TEST_TIMEOUT_S, running_own


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as opened:
        yield opened


class Reporter:
    """A SecurityEvents on the store's outbox, with a wall clock the test moves."""

    def __init__(self, store: Store, policy: RatePolicy | None = None) -> None:
        self.queue: Outbox = store.outbox("upstream")
        self.registry = CollectorRegistry()
        self.now = NOW
        self.events = SecurityEvents(
            lambda action, payload: self.queue.append({"action": action, "payload": payload}),
            self.registry,
            wall_clock=lambda: self.now,
            policy=policy,
        )

    def queued(self) -> list[dict[str, Any]]:
        payloads = []
        for _, item in self.queue.peek(1000):
            assert item["action"] == "SecurityEventNotification"
            validate_call("SecurityEventNotification", item["payload"])
            payloads.append(item["payload"])
        return payloads

    def count(self, event_type: str, source: str, outcome: str) -> float:
        labels = {"type": event_type, "source": source, "outcome": outcome}
        return self.registry.get_sample_value("ocpp_lc_own_security_events_total", labels) or 0.0


async def test_critical_events_are_queued_and_the_others_only_logged(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ocpp_lc.security")
    reporter = Reporter(store)
    events = reporter.events
    assert events.report("InvalidChargingStationCertificate", "10.0.0.7:50012: expired\x1b[2J", source="station")
    assert events.report("StartupOfTheDevice", "x" * 400) == "queued"
    # Not critical (Part 2 appendix 1), or not on the list at all: the security log only (A04.FR.04).
    assert events.report("TLSHandshakeFailed", "not TLS at all", source="station") == "logged"
    assert events.report("ReconfigurationOfSecurityParameters", "BasicAuthPassword changed") == "logged"
    queued = reporter.queued()
    assert [p["type"] for p in queued] == ["InvalidChargingStationCertificate", "StartupOfTheDevice"]  # A04.FR.01
    assert queued[0] == {
        "type": "InvalidChargingStationCertificate",
        "timestamp": "2026-11-25T10:00:00.000Z",
        "techInfo": "10.0.0.7:50012: expired [2J",  # one printable line
    }
    assert len(queued[1]["techInfo"]) == TECH_INFO_CHARS
    assert reporter.count("InvalidChargingStationCertificate", "station", "queued") == 1
    assert reporter.count("TLSHandshakeFailed", "station", "logged") == 1
    logged = [r.getMessage() for r in caplog.records if r.name == "ocpp_lc.security"]
    assert any("TLSHandshakeFailed" in line and "not TLS at all" in line for line in logged)
    assert any("InvalidChargingStationCertificate" in line for line in logged)


async def test_a_flood_is_held_to_the_rate_limit_and_summarised_when_a_token_comes(
    store: Store, caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock
) -> None:
    caplog.set_level(logging.INFO, logger="ocpp_lc.security")
    reporter = Reporter(store, RatePolicy(burst=3, refill_s=60))
    events = reporter.events
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(events.run)
            # A hostile station fails the TLS handshake a thousand times in a second.
            for n in range(1000):
                events.report("InvalidChargingStationCertificate", f"attempt {n}", source="station")
            # Another type has its own bucket: a real boot event is not crowded out.
            assert events.report("StartupOfTheDevice", "started") == "queued"
            assert [p.get("techInfo") for p in reporter.queued()] == ["attempt 0", "attempt 1", "attempt 2", "started"]
            assert reporter.count("InvalidChargingStationCertificate", "station", "suppressed") == 997
            assert events.held_back == 997
            start = trio.current_time()
            reporter.now += datetime.timedelta(seconds=1)

            # The next token comes after refill_s: one notification says what was held back.
            await trio.sleep(59.9)
            assert len(reporter.queued()) == 4
            await trio.sleep(0.2)
            summary = reporter.queued()[-1]
            assert trio.current_time() - start == pytest.approx(60.1)
            assert summary["type"] == "InvalidChargingStationCertificate"
            assert summary["timestamp"] == "2026-11-25T10:00:00.000Z"  # when the last of them happened
            assert summary["techInfo"].startswith("997 InvalidChargingStationCertificate events from ")
            assert "997 held back by the rate limit; last: attempt 999" in summary["techInfo"]
            assert events.held_back == 0

            # Quiet from then on: nothing more goes; an event much later is sent at once, on its own.
            await trio.sleep(3600)
            assert len(reporter.queued()) == 5
            assert events.report("InvalidChargingStationCertificate", "a new one", source="station") == "queued"
            assert reporter.queued()[-1]["techInfo"] == "a new one"
            nursery.cancel_scope.cancel()
    # The operator sees the flood in the log once, not a thousand times.
    held = [r for r in caplog.records if "held back and summarised" in r.getMessage()]
    assert len(held) == 1 and held[0].levelno == logging.WARNING


async def test_an_event_that_gets_a_token_during_a_flood_carries_the_summary(
    store: Store, autojump_clock: trio.testing.MockClock
) -> None:
    reporter = Reporter(store, RatePolicy(burst=1, refill_s=10))
    events = reporter.events
    assert events.report("InvalidTLSVersion", "first", source="station") == "queued"
    assert events.report("InvalidTLSVersion", "second", source="station") == "suppressed"
    await trio.sleep(10)  # no summary task running: the next report spends the token
    assert events.report("InvalidTLSVersion", "third", source="station") == "queued"
    last = reporter.queued()[-1]["techInfo"]
    assert last.startswith("2 InvalidTLSVersion events") and "1 held back by the rate limit; last: third" in last


async def test_the_own_connection_failing_again_is_reported_once_per_outage(store: Store) -> None:
    reporter = Reporter(store)
    events = reporter.events
    outcomes = [events.connection_failed("InvalidCsmsCertificate", f"attempt {n}") for n in range(4)]
    assert outcomes == ["queued", "repeated", "repeated", "repeated"]  # A00.FR.316's note
    assert events.connection_failed("InvalidTLSVersion", "older TLS") == "queued"  # another event is news
    events.connected()
    assert events.connection_failed("InvalidCsmsCertificate", "next outage") == "queued"
    assert [p["techInfo"] for p in reporter.queued()] == ["attempt 0", "older TLS", "next outage"]
    assert reporter.count("InvalidCsmsCertificate", "own", "repeated") == 3


async def test_a_store_that_fails_loses_the_event_but_not_the_caller(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()

    def broken(action: str, payload: dict[str, Any]) -> None:
        raise StoreError("disk full")

    events = SecurityEvents(broken, registry, wall_clock=lambda: NOW)
    assert events.report("InvalidCsmsCertificate", "x") == "failed"
    labels = {"type": "InvalidCsmsCertificate", "source": "own", "outcome": "failed"}
    assert registry.get_sample_value("ocpp_lc_own_security_events_total", labels) == 1
    assert any("could not be queued" in r.getMessage() for r in caplog.records)


# -- the own identity ---------------------------------------------------------------------------------


def _security_events(calls: list[tuple[float, list[Any]]]) -> list[dict[str, Any]]:
    return [frame[3] for _, frame in calls if frame[2] == "SecurityEventNotification"]


async def test_start_up_goes_after_the_accepted_boot_and_a_reset_is_reported_after_the_restart(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path) as run:
            csms = run.csms
            await csms.wait_until(lambda: _security_events(csms.calls()))
            actions = [frame[2] for _, frame in csms.calls()]
            assert actions[:2] == ["BootNotification", "SecurityEventNotification"]  # B01.FR.08, then A04.FR.01
            startup = _security_events(csms.calls())[0]
            assert startup == {
                "type": "StartupOfTheDevice",
                "timestamp": "2026-11-25T10:00:00.000Z",
                "techInfo": "ocpp-lc 1.0.0 started (boot reason PowerUp)",
            }
            reply = await csms.call("r-1", "Reset", {"type": "Immediate"})
            assert reply[2] == {"status": "Accepted"}
            await csms.wait_until(lambda: run.restarts)
        async with running_own(tmp_path) as again:
            await again.csms.wait_until(lambda: _security_events(again.csms.calls()))
            reset = _security_events(again.csms.calls())[0]
            assert reset["type"] == "ResetOrReboot" and "RemoteReset" in reset["techInfo"]
            assert again.csms.calls("BootNotification")[0][1][3]["reason"] == "RemoteReset"


def _tls_refusal(reason: str, error: ssl.SSLError) -> HandshakeFailed:
    """A refusal as the transport raises it, over the SSLError OpenSSL would have given."""
    error.reason = error.strerror.split("] ")[0].removeprefix("[SSL: ")  # set by the C code for real errors
    failure = HandshakeFailed(reason, kind="tls")
    failure.__cause__ = error
    return failure


async def test_tls_failures_of_the_own_connection_are_counted_and_reported_once_after_reconnecting(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    unverified = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    failures = [_tls_refusal("certificate verify failed", unverified) for _ in range(3)]
    with trio.fail_after(TEST_TIMEOUT_S):
        async with running_own(tmp_path, {"dial_failures": failures}) as run:
            csms = run.csms
            await csms.wait_until(lambda: len(_security_events(csms.calls())) >= 2)
            # Three failed attempts, then a connection: the event was queued once and went once accepted.
            assert len(csms.dials) == 4
            sent = _security_events(csms.calls())
            assert [e["type"] for e in sent] == ["StartupOfTheDevice", "InvalidCsmsCertificate"]  # A00.FR.310
            assert "certificate verify failed" in sent[1]["techInfo"]
            labels = {"type": "InvalidCsmsCertificate", "source": "own"}
            counter = "ocpp_lc_own_security_events_total"
            assert run.registry.get_sample_value(counter, {**labels, "outcome": "queued"}) == 1
            assert run.registry.get_sample_value(counter, {**labels, "outcome": "repeated"}) == 2
            assert run.registry.get_sample_value("ocpp_lc_own_connect_attempts_total", {"outcome": "tls"}) == 3


async def test_the_app_hands_station_leg_events_to_the_own_identity_and_counts_own_tls_failures(
    tmp_path: Path,
) -> None:
    settings = parse_settings(
        {
            "csms": {"url": "ws://127.0.0.1:9/ocpp"},
            "stations": {"listen": "127.0.0.1:0"},
            "http": {"listen": "127.0.0.1:0"},
            "state": {"dir": str(tmp_path / "state")},
        }
    )
    with Store.open(tmp_path / "state") as store:
        app = build_app(settings, store)
        assert app.own is not None
        tell = app.server._security_event
        assert tell is not None
        for n in range(10):
            tell("InvalidChargingStationCertificate", f"192.0.2.{n}:443: unknown CA")
        queued = [item["payload"] for _, item in store.outbox("upstream").peek(100)]
        # The default policy lets five through at once; the rest wait for a summary.
        assert [p["techInfo"] for p in queued] == [f"192.0.2.{n}:443: unknown CA" for n in range(5)]
        held = {"type": "InvalidChargingStationCertificate", "source": "station", "outcome": "suppressed"}
        assert app.registry.get_sample_value("ocpp_lc_own_security_events_total", held) == 5
        # The own connection's TLS failures count where the relayed legs' do, as leg "own" (the alert's metric).
        hook = app.own.connection._on_dial_failed
        assert hook is not None
        hook(_tls_refusal("unsupported protocol", ssl.SSLError(1, "[SSL: UNSUPPORTED_PROTOCOL] unsupported protocol")))
        own_leg = {"event": "InvalidTLSVersion", "leg": "own"}
        assert app.registry.get_sample_value("ocpp_lc_security_events_total", own_leg) == 1
