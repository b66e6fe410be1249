"""Who may connect under which identity (issue #13 items 1 and 4), and the station-leg security events.

Under profile 3 only the controller sees a station's certificate (the CSMS sees the controller's own,
Part 4 §6.5), so the controller makes the CSMS's checks of A00.FR.404/405: the certificate's CN
(the station's serial number, A00.FR.511) must be the identity in the URL, and, when configured,
its O the CSO's name. A station may never use the controller's own identity. Stations are the `ocpp`
library peer or a hand-written TLS client (tests/e2e/test_tls.py); where a refused station must not
reach the CSMS, the upstream is a tripwire that counts connections.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from router.tls import StationTlsSettings
from tests.e2e.conftest import OpenRelay
from tests.e2e.test_tls import (
    TIMEOUT_S,
    UPGRADE_REQUEST,
    attempt,
    csms_leg,
    open_tls_station,
    run_controller,
    server_lines,
    station_context,
    tripwire,
)
from tests.support.certs import Pki, make_pki

INVALID_CERTIFICATE = "InvalidChargingStationCertificate"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def profile_3(pki: Pki, **extra: Any) -> StationTlsSettings:
    return StationTlsSettings.model_validate(
        {
            "security_profile": 3,
            "cert_file": pki.controller_server.cert_file,
            "key_file": pki.controller_server.key_file,
            "ca_file": pki.site_ca.cert_file,
            **extra,
        }
    )


def recorder() -> tuple[list[tuple[str, str]], Callable[[str, str], None]]:
    events: list[tuple[str, str]] = []

    def record(event_type: str, tech_info: str) -> None:
        events.append((event_type, tech_info))

    return events, record


def upgrade_as(identity: str) -> bytes:
    return UPGRADE_REQUEST.replace(b"/ocpp/CS01 ", f"/ocpp/{identity} ".encode())


# ---------------------------------------------------------------------------------------------------
# Item 1: profile 3 binds the certificate to the identity
# ---------------------------------------------------------------------------------------------------


async def test_a_certificate_for_cs01_cannot_connect_as_cs99(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    """A00.FR.405/511: the CN must name the station; any certificate of the site CA is not enough."""
    caplog.set_level(logging.INFO, logger="ocpp_lc")
    events, record = recorder()
    async with (
        tripwire() as csms,
        run_controller(profile_3(pki), csms_leg(pki, 2), csms.port, security_event=record) as lc,
        open_tls_station(pki, lc.url, "CS99", pki.station) as station,
    ):
        with trio.fail_after(TIMEOUT_S):
            refused = await station.wait_for(lambda e: e["event"] in ("connected", "rejected", "connect_failed"))
            assert refused["event"] == "rejected", refused
            assert refused["status"] == 403
            assert "CN 'CS01' is not the identity 'CS99'" in refused["body"]
            assert csms.connections == 0  # nothing was opened upstream for it
            assert lc.refusals("certificate_identity") == 1
            assert lc.metric("ocpp_lc_security_events_total", event=INVALID_CERTIFICATE, leg="station") == 1
            assert any("CS99" in line and INVALID_CERTIFICATE in line for line in server_lines(caplog))
            [(event_type, tech_info)] = events
            assert event_type == INVALID_CERTIFICATE
            assert "CS99" in tech_info and "CN 'CS01'" in tech_info and "127.0.0.1:" in tech_info
            assert len(tech_info) <= 255

            # The same certificate under its own identity gets through TLS and the checks: the
            # tripwire CSMS is what fails it (502), and no further event is reported.
            answer, _ = await attempt(lc.port, station_context(pki, pki.station), upgrade_as("CS01"))
            assert answer.startswith(b"HTTP/1.1 502 ")
            assert csms.connections == 1
            assert len(events) == 1


async def test_a_certificate_with_two_common_names_is_refused(pki: Pki) -> None:
    ambiguous = pki.site_ca.issue("CS01", extra_common_names=("CS02",), file_stem="station-two-cns")
    async with tripwire() as csms, run_controller(profile_3(pki), csms_leg(pki, 2), csms.port) as lc:
        with trio.fail_after(TIMEOUT_S):
            for identity in ("CS01", "CS02"):
                answer, _ = await attempt(lc.port, station_context(pki, ambiguous), upgrade_as(identity))
                assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert lc.refusals("certificate_identity") == 2
            assert csms.connections == 0


async def test_with_an_organization_set_the_certificate_must_carry_it(pki: Pki) -> None:
    """A00.FR.404: the O of the station certificate is the CSO's name."""
    elsewhere = pki.site_ca.issue("CS01", organization="another CSO", file_stem="station-other-o")
    events, record = recorder()
    settings = profile_3(pki, organization="ocpp-lc test CSO")
    async with tripwire() as csms, run_controller(settings, csms_leg(pki, 2), csms.port, security_event=record) as lc:
        with trio.fail_after(TIMEOUT_S):
            answer, _ = await attempt(lc.port, station_context(pki, elsewhere))
            assert answer.startswith(b"HTTP/1.1 403 "), answer
            assert b"O 'another CSO' is not the CSO 'ocpp-lc test CSO'" in answer
            assert [event for event, _ in events] == [INVALID_CERTIFICATE]
            assert csms.connections == 0

            answer, _ = await attempt(lc.port, station_context(pki, pki.station))
            assert answer.startswith(b"HTTP/1.1 502 ")  # the right O: through to the (tripwire) CSMS
            assert csms.connections == 1


# ---------------------------------------------------------------------------------------------------
# The security-event hook for TLS refusals
# ---------------------------------------------------------------------------------------------------


async def test_tls_refusals_reach_the_security_event_hook_with_their_ocpp_event_type(pki: Pki) -> None:
    events, record = recorder()
    async with (
        tripwire() as csms,
        run_controller(profile_3(pki), csms_leg(pki, 2), csms.port, security_event=record) as lc,
    ):
        with trio.fail_after(TIMEOUT_S):
            for cert in (None, pki.station_rogue, pki.station_expired):
                await attempt(lc.port, station_context(pki, cert))
                await trio.testing.wait_all_tasks_blocked()
            # Plain HTTP on the TLS port: counted and logged, but no OCPP security event.
            await attempt(lc.port, None)
            await trio.testing.wait_all_tasks_blocked()
            assert lc.refusals("tls") == 4
            assert [event for event, _ in events] == [INVALID_CERTIFICATE] * 3
            for _, tech_info in events:
                assert tech_info.startswith("TLS from 127.0.0.1:") and len(tech_info) <= 255
            assert "certificate has expired" in events[2][1]
            assert csms.connections == 0


async def test_a_failing_hook_does_not_stop_the_refusal_or_the_next_station(pki: Pki) -> None:
    def broken(event_type: str, tech_info: str) -> None:
        raise RuntimeError("reporting is down")

    async with (
        tripwire() as csms,
        run_controller(profile_3(pki), csms_leg(pki, 2), csms.port, security_event=broken) as lc,
    ):
        with trio.fail_after(TIMEOUT_S):
            answer, _ = await attempt(lc.port, station_context(pki, pki.station), upgrade_as("CS99"))
            assert answer.startswith(b"HTTP/1.1 403 ")
            answer, _ = await attempt(lc.port, station_context(pki, pki.station), upgrade_as("CS01"))
            assert answer.startswith(b"HTTP/1.1 502 ")
            assert lc.metric("ocpp_lc_handler_errors_total") == 0


# ---------------------------------------------------------------------------------------------------
# Item 4: the controller's own identity is not a station's
# ---------------------------------------------------------------------------------------------------


async def test_a_station_under_the_controllers_own_identity_is_refused(
    open_relay: OpenRelay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ocpp_lc")
    async with open_relay(controller={"connect": True, "identity": "LC01"}) as relay:
        csms = relay.csms
        with trio.fail_after(TIMEOUT_S):
            await csms.wait_for_event("connected", identity="LC01")  # the controller's own connection
            for identity in ("LC01", "lc01"):
                async with relay.station(identity) as station:
                    refused = await station.wait_for(
                        lambda e: e["event"] in ("connected", "rejected", "connect_failed")
                    )
                assert refused["event"] == "rejected", refused
                assert refused["status"] == 404
                assert "local controller's own" in refused["body"]
            assert relay.metric("ocpp_lc_handshake_refusals_total", reason="own_identity") == 2
            lines = [r.getMessage() for r in caplog.records if r.name == "ocpp_lc.server"]
            assert any("controller's own identity" in line for line in lines), lines

            # Other stations are relayed as before.
            async with relay.station("CS01") as station:
                boot = await station.wait_for_event("boot")
                assert boot["payload"]["status"] == "Accepted"
    # The CSMS only ever saw the controller's own connection under that identity.
    own = [e for e in csms.events if e["event"] == "connected" and e["identity"].casefold() == "lc01"]
    assert len(own) == 1
