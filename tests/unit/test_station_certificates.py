"""Does a verified station certificate belong to the identity it connects as (A00.FR.404/405/511)?

Real TLS handshakes over trio's memory streams (tests/unit/test_tls.py's helpers), certificates from
tests/support/certs.py; the decision is router.tls.station_certificate_problem.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from router.tls import StationTlsSettings, station_certificate_problem
from tests.support.certs import CertifiedKey, Pki, make_pki
from tests.unit.test_tls import controller_server, handshake, station_client


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def problem(pki: Pki, cert: CertifiedKey, identity: str, organization: str | None = None) -> str | None:
    client, server = await handshake(station_client(pki, cert), controller_server(pki))
    assert client.ok and server.ok
    return station_certificate_problem(server.stream, identity, organization=organization)


async def test_the_certificate_of_the_identity_passes(pki: Pki) -> None:
    assert await problem(pki, pki.station, "CS01") is None
    assert await problem(pki, pki.station, "CS01", organization="ocpp-lc test CSO") is None


@pytest.mark.parametrize("identity", ["CS99", "cs01", "CS01 ", "CS0"])
async def test_a_cn_that_is_not_exactly_the_identity_is_a_problem(pki: Pki, identity: str) -> None:
    found = await problem(pki, pki.station, identity)
    assert found == f"certificate CN 'CS01' is not the identity {identity!r}"


async def test_an_organization_other_than_the_cso_is_a_problem(pki: Pki) -> None:
    other = pki.site_ca.issue("CS01", organization="another CSO", file_stem="unit-other-o")
    assert await problem(pki, other, "CS01") is None  # not configured: not checked
    assert await problem(pki, other, "CS01", organization="ocpp-lc test CSO") == (
        "certificate O 'another CSO' is not the CSO 'ocpp-lc test CSO'"
    )


async def test_two_common_names_are_ambiguous(pki: Pki) -> None:
    two = pki.site_ca.issue("CS01", extra_common_names=("CS02",), file_stem="unit-two-cns")
    for identity in ("CS01", "CS02"):
        found = await problem(pki, two, identity)
        assert found is not None and "2 CNs" in found


async def test_a_forged_cn_cannot_forge_a_log_line(pki: Pki) -> None:
    forged = pki.site_ca.issue("CS01\nINFO all good", file_stem="unit-forged-cn")
    found = await problem(pki, forged, "CS01")
    assert found == "certificate CN 'CS01?INFO all good' is not the identity 'CS01'"


def test_no_verified_certificate_is_a_problem() -> None:
    assert station_certificate_problem(None, "CS01") == "no verified client certificate"


def test_organization_is_a_profile_3_setting(pki: Pki) -> None:
    files = {"cert_file": pki.controller_server.cert_file, "key_file": pki.controller_server.key_file}
    settings = StationTlsSettings.model_validate(
        {"security_profile": 3, "ca_file": pki.site_ca.cert_file, "organization": "ocpp-lc test CSO", **files}
    )
    assert settings.organization == "ocpp-lc test CSO"
    with pytest.raises(ValidationError, match="only used with security_profile 3"):
        StationTlsSettings.model_validate({"security_profile": 2, "organization": "ocpp-lc test CSO", **files})
