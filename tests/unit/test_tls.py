"""Security-profile settings and the TLS contexts they build (Part 2 A00, Part 4 §6.5).

Settings are checked the way an installer meets them: a profile without its files, a missing file, a
private key others can read, an encrypted key, a key of another certificate. The contexts are
checked by real TLS handshakes over trio's in-memory streams, against client and server contexts
built with the standard library's defaults (as another implementation would), using the throw-away
PKI of `tests/support/certs.py`.
"""

from __future__ import annotations

import shutil
import ssl
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from router.tls import (
    INVALID_CSMS_CERTIFICATE,
    INVALID_STATION_CERTIFICATE,
    INVALID_TLS_CIPHER_SUITE,
    INVALID_TLS_VERSION,
    TLS12_CIPHERS,
    CertificateSummary,
    CsmsTlsSettings,
    StationTlsSettings,
    client_context,
    peer_certificate_summary,
    security_event,
    server_context,
)
from tests.support.certs import CertifiedKey, Pki, make_pki, peer_ssl_context

#: Bound on each handshake over memory streams (they take milliseconds).
HANDSHAKE_TIMEOUT_S = 5.0

#: The four suites A00.FR.421 names, in OpenSSL's spelling.
A00_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rsa_server(pki: Pki) -> CertifiedKey:
    """The controller's CSMS-role certificate with an RSA key (for the static-RSA suites)."""
    return pki.site_ca.issue("localhost", hosts=("127.0.0.1",), key_kind="rsa", file_stem="controller-rsa")


def station_settings(pki: Pki, profile: int = 3, server: CertifiedKey | None = None) -> StationTlsSettings:
    own = server or pki.controller_server
    data: dict[str, Any] = {"security_profile": profile, "cert_file": own.cert_file, "key_file": own.key_file}
    if profile == 3:
        data["ca_file"] = pki.site_ca.cert_file
    return StationTlsSettings.model_validate(data)


def csms_settings(pki: Pki, profile: int = 3, ca_file: Path | None = None) -> CsmsTlsSettings:
    data: dict[str, Any] = {"security_profile": profile, "ca_file": ca_file or pki.cso_ca.cert_file}
    if profile == 3:
        data |= {"cert_file": pki.controller_client.cert_file, "key_file": pki.controller_client.key_file}
    return CsmsTlsSettings.model_validate(data)


def problem(error: pytest.ExceptionInfo[ValidationError]) -> tuple[str, str]:
    """(setting at fault, message) of the one problem a ValidationError reports."""
    [detail] = error.value.errors(include_url=False)
    ctx = detail.get("ctx", {})
    field = str(ctx["field"]) if "field" in ctx else ".".join(str(part) for part in detail["loc"])
    message = str(ctx["message"]) if "message" in ctx else str(ctx.get("error", detail["msg"]))
    return field, message


# ---------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------


def test_defaults_are_profile_1_without_tls() -> None:
    stations, csms = StationTlsSettings(), CsmsTlsSettings()
    assert (stations.security_profile, csms.security_profile) == (1, 1)
    assert stations.handshake_timeout_s == 2.0  # the issue's "refused within 2 seconds"
    assert server_context(stations) is None
    assert client_context(csms) is None


def test_settings_accept_paths_as_toml_text(pki: Pki) -> None:
    settings = StationTlsSettings.model_validate(
        {
            "security_profile": 2,
            "cert_file": str(pki.controller_server.cert_file),
            "key_file": str(pki.controller_server.key_file),
            "handshake_timeout_s": 3,
        }
    )
    assert settings.cert_file == pki.controller_server.cert_file
    assert isinstance(server_context(settings), ssl.SSLContext)


@pytest.mark.parametrize(
    ("model", "data", "field", "words"),
    [
        (StationTlsSettings, {"security_profile": 2}, "cert_file", "required with security_profile 2"),
        (CsmsTlsSettings, {"security_profile": 3}, "cert_file", "required with security_profile 3"),
        (StationTlsSettings, {"security_profile": 4}, "security_profile", "1, 2 or 3"),
        (StationTlsSettings, {"handshake_timeout_s": 0}, "handshake_timeout_s", "from 0.1 to 60 seconds"),
        (StationTlsSettings, {"cert_file": ""}, "cert_file", "empty"),
        (CsmsTlsSettings, {"ca_file": 42}, "ca_file", "file path"),
        (StationTlsSettings, {"security_profil": 2}, "security_profil", "Extra inputs are not permitted"),
    ],
)
def test_settings_refuse_what_cannot_work(
    model: type[StationTlsSettings | CsmsTlsSettings], data: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as error:
        model.model_validate(data)
    at, message = problem(error)
    assert at == field
    assert words in message


def test_station_profile_3_needs_the_ca_that_stations_chain_to(pki: Pki) -> None:
    with pytest.raises(ValidationError) as error:
        StationTlsSettings.model_validate(
            {
                "security_profile": 3,
                "cert_file": pki.controller_server.cert_file,
                "key_file": pki.controller_server.key_file,
            }
        )
    assert problem(error) == (
        "ca_file",
        "is required with security_profile 3: the CA that station certificates must chain to (PEM file)",
    )


def test_files_a_profile_does_not_use_are_an_error_not_silently_ignored(pki: Pki) -> None:
    with pytest.raises(ValidationError) as error:
        StationTlsSettings.model_validate({"cert_file": pki.controller_server.cert_file})
    field, message = problem(error)
    assert field == "cert_file"
    assert "only used with security_profile 2 or 3" in message

    with pytest.raises(ValidationError) as error:
        CsmsTlsSettings.model_validate(
            {"security_profile": 2, "ca_file": pki.cso_ca.cert_file, "cert_file": pki.controller_client.cert_file}
        )
    field, message = problem(error)
    assert field == "cert_file"
    assert "only used with security_profile 3" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.crt"
    with pytest.raises(ValidationError) as error:
        CsmsTlsSettings.model_validate({"security_profile": 2, "ca_file": missing})
    assert problem(error) == ("ca_file", f"file not found: {str(missing)!r}")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_private_key_readable_by_others_is_refused(pki: Pki, tmp_path: Path, mode: int) -> None:
    key = tmp_path / "controller.key"
    shutil.copyfile(pki.controller_server.key_file, key)
    key.chmod(mode)
    with pytest.raises(ValidationError) as error:
        StationTlsSettings.model_validate(
            {"security_profile": 2, "cert_file": pki.controller_server.cert_file, "key_file": key}
        )
    field, message = problem(error)
    assert field == "key_file"
    assert f"has mode {mode:04o}" in message
    assert f"chmod 600 {key}" in message

    key.chmod(0o600)
    settings = StationTlsSettings.model_validate(
        {"security_profile": 2, "cert_file": pki.controller_server.cert_file, "key_file": key}
    )
    assert settings.key_file == key


def test_encrypted_key_is_refused_without_prompting(pki: Pki, tmp_path: Path) -> None:
    # OpenSSL would otherwise ask for a passphrase on the terminal, which a service cannot answer.
    loaded = serialization.load_pem_private_key(pki.controller_server.key_file.read_bytes(), password=None)
    key = tmp_path / "encrypted.key"
    key.write_bytes(
        loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse battery staple"),
        )
    )
    key.chmod(0o600)
    with pytest.raises(ValidationError) as error:
        StationTlsSettings.model_validate(
            {"security_profile": 2, "cert_file": pki.controller_server.cert_file, "key_file": key}
        )
    assert problem(error) == (
        "key_file",
        f"{str(key)!r} is encrypted: the controller needs it unencrypted, protected by mode 0600",
    )


def test_key_of_another_certificate_is_refused(pki: Pki) -> None:
    with pytest.raises(ValidationError) as error:
        CsmsTlsSettings.model_validate(
            {
                "security_profile": 3,
                "ca_file": pki.cso_ca.cert_file,
                "cert_file": pki.controller_client.cert_file,
                "key_file": pki.station.key_file,
            }
        )
    field, message = problem(error)
    assert field == "key_file"
    assert (
        message == f"{str(pki.station.key_file)!r} is not the private key of {str(pki.controller_client.cert_file)!r}"
    )


def test_files_that_are_not_pem_are_named_without_their_contents(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValidationError) as error:
        CsmsTlsSettings.model_validate({"security_profile": 2, "ca_file": junk})
    assert problem(error) == ("ca_file", f"holds no PEM CA certificate: {str(junk)!r}")

    # A certificate given as the key: the message names the file and never quotes what is in it.
    swapped = tmp_path / "swapped.key"
    shutil.copyfile(pki.controller_server.cert_file, swapped)
    swapped.chmod(0o600)
    with pytest.raises(ValidationError) as error:
        StationTlsSettings.model_validate(
            {"security_profile": 2, "cert_file": pki.controller_server.cert_file, "key_file": swapped}
        )
    field, message = problem(error)
    assert (field, message) == ("key_file", f"holds no usable PEM private key: {str(swapped)!r}")
    key_body = pki.controller_server.key_file.read_text().splitlines()[1]
    assert key_body not in str(error.value)


# ---------------------------------------------------------------------------------------------------
# Handshakes
# ---------------------------------------------------------------------------------------------------


@dataclass
class Side:
    """How one end of a handshake went."""

    stream: trio.SSLStream[Any] | None = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.stream is not None


async def handshake(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext, host: str = "127.0.0.1"
) -> tuple[Side, Side]:
    """Run a TLS handshake plus one exchange (what a websocket handshake does) over memory streams.

    A client only learns that a TLS 1.3 server refused its certificate when it reads (the server
    decides after the client's last handshake flight), so each side sends and reads one message.
    Whoever fails closes its stream, as a real endpoint does, so the other side never hangs.
    """
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client, server = Side(), Side()

    async def run(side: Side, stream: trio.SSLStream[Any], raw: trio.abc.Stream, greeting: bytes) -> None:
        try:
            await stream.do_handshake()
            await stream.send_all(greeting)
            if not await stream.receive_some(64):
                raise trio.BrokenResourceError("closed by the peer")
            side.stream = stream
        except (trio.BrokenResourceError, ssl.SSLError) as error:
            side.error = error
            await trio.aclose_forcefully(raw)

    with trio.fail_after(HANDSHAKE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            tls_server = trio.SSLStream(server_raw, server_context, server_side=True, https_compatible=True)
            tls_client = trio.SSLStream(client_raw, client_context, server_hostname=host, https_compatible=True)
            nursery.start_soon(run, server, tls_server, server_raw, b"HTTP/1.1 101")
            nursery.start_soon(run, client, tls_client, client_raw, b"GET / HTTP/1.1")
    return client, server


def station_client(pki: Pki, cert: CertifiedKey | None, ca: Path | None = None) -> ssl.SSLContext:
    """A station's TLS client context (standard-library defaults), optionally with a client certificate."""
    return peer_ssl_context(
        "station",
        ca=ca or pki.site_ca.cert_file,
        cert=cert.cert_file if cert else None,
        key=cert.key_file if cert else None,
    )


def controller_server(pki: Pki, profile: int = 3) -> ssl.SSLContext:
    context = server_context(station_settings(pki, profile))
    assert context is not None
    return context


def controller_client(pki: Pki, profile: int = 3, ca_file: Path | None = None) -> ssl.SSLContext:
    context = client_context(csms_settings(pki, profile, ca_file))
    assert context is not None
    return context


async def test_profile_3_accepts_a_station_certificate_from_the_site_ca(pki: Pki) -> None:
    client, server = await handshake(station_client(pki, pki.station), controller_server(pki))
    assert client.ok and server.ok
    assert server.stream is not None
    assert server.stream.version() == "TLSv1.3"
    assert server.stream.compression() is None  # A00.FR.424
    summary = peer_certificate_summary(server.stream)
    assert summary == CertificateSummary(
        common_name="CS01",
        subject="O=ocpp-lc test CSO,CN=CS01",
        issuer="O=ocpp-lc test CSO,CN=ocpp-lc test site CA",
        serial=pki.station.serial_hex,
        not_after=summary.not_after if summary else "",
    )
    assert str(summary).startswith("subject 'O=ocpp-lc test CSO,CN=CS01', issuer ")


@pytest.mark.parametrize(
    ("which", "verify_words"),
    [
        ("none", "peer did not return a certificate"),
        ("rogue", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
    ],
)
@pytest.mark.parametrize("max_version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_profile_3_refuses_stations_without_a_valid_certificate(
    pki: Pki, which: str, verify_words: str, max_version: ssl.TLSVersion
) -> None:
    cert = {"none": None, "rogue": pki.station_rogue, "expired": pki.station_expired}[which]
    context = station_client(pki, cert)
    context.maximum_version = max_version
    client, server = await handshake(context, controller_server(pki))
    assert not server.ok and not client.ok
    assert server.error is not None
    assert verify_words in str(server.error.__cause__)
    assert security_event(server.error, "station") == INVALID_STATION_CERTIFICATE


async def test_profile_2_serves_stations_without_a_client_certificate(pki: Pki) -> None:
    client, server = await handshake(station_client(pki, None), controller_server(pki, profile=2))
    assert client.ok and server.ok
    assert peer_certificate_summary(server.stream) is None


async def test_stations_must_trust_the_controller_csms_role_certificate(pki: Pki) -> None:
    # A station that trusts only the CSO CA does not accept the controller: the two roles have
    # different certificates (Part 4 §6.5).
    client, _ = await handshake(station_client(pki, pki.station, ca=pki.cso_ca.cert_file), controller_server(pki))
    assert not client.ok
    assert "certificate verify failed" in str(client.error.__cause__ if client.error else "")


async def test_tls_1_1_is_refused(pki: Pki) -> None:
    context = station_client(pki, pki.station)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 would not even offer TLS 1.1 otherwise
    client, server = await handshake(context, controller_server(pki))
    assert not server.ok and not client.ok
    assert server.error is not None
    assert "UNSUPPORTED_PROTOCOL" in str(server.error.__cause__)
    assert security_event(server.error, "station") == INVALID_TLS_VERSION


@pytest.mark.parametrize("suite", A00_SUITES)
async def test_each_a00_tls12_suite_is_accepted(pki: Pki, rsa_server: CertifiedKey, suite: str) -> None:
    server_cert = pki.controller_server if "ECDSA" in suite else rsa_server
    server = server_context(station_settings(pki, 2, server=server_cert))
    assert server is not None
    context = station_client(pki, None)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(suite)
    client, served = await handshake(context, server)
    assert client.ok and served.ok
    assert served.stream is not None
    assert served.stream.cipher()[0] == suite


async def test_tls12_prefers_forward_secrecy_with_an_rsa_certificate(pki: Pki, rsa_server: CertifiedKey) -> None:
    server = server_context(station_settings(pki, 2, server=rsa_server))
    assert server is not None
    context = station_client(pki, None)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384")  # static RSA first, on purpose
    _, served = await handshake(context, server)
    assert served.stream is not None
    # Our order, not the client's (OP_CIPHER_SERVER_PREFERENCE): the ECDHE suite wins.
    assert served.stream.cipher()[0] == "ECDHE-RSA-AES256-GCM-SHA384"


async def test_tls12_suites_outside_the_list_are_refused(pki: Pki) -> None:
    context = station_client(pki, None)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305")
    client, server = await handshake(context, controller_server(pki, profile=2))
    assert not server.ok and not client.ok
    assert server.error is not None
    assert security_event(server.error, "station") == INVALID_TLS_CIPHER_SUITE


def test_both_contexts_offer_only_the_listed_tls12_suites(pki: Pki) -> None:
    for context in (controller_server(pki), controller_client(pki)):
        tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 == list(TLS12_CIPHERS)
        assert set(A00_SUITES) <= set(tls12)
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION


# ---------------------------------------------------------------------------------------------------
# The CSMS leg: the controller as a client
# ---------------------------------------------------------------------------------------------------


def csms_server(pki: Pki, *, require_client_ca: Path | None = None, cert: CertifiedKey | None = None) -> ssl.SSLContext:
    own = cert or pki.csms_server
    return peer_ssl_context("csms", cert=own.cert_file, key=own.key_file, ca=require_client_ca)


async def test_profile_3_controller_presents_its_station_role_certificate(pki: Pki) -> None:
    client, server = await handshake(controller_client(pki), csms_server(pki, require_client_ca=pki.cso_ca.cert_file))
    assert client.ok and server.ok
    seen = peer_certificate_summary(server.stream)
    assert seen is not None
    assert (seen.common_name, seen.serial) == ("LC01", pki.controller_client.serial_hex)
    assert seen.issuer == "O=ocpp-lc test CSO,CN=ocpp-lc test CSO CA"
    csms_seen = peer_certificate_summary(client.stream)
    assert csms_seen is not None and csms_seen.serial == pki.csms_server.serial_hex


async def test_profile_2_controller_is_refused_by_a_csms_that_wants_a_client_certificate(pki: Pki) -> None:
    client, server = await handshake(
        controller_client(pki, profile=2), csms_server(pki, require_client_ca=pki.cso_ca.cert_file)
    )
    assert not client.ok and not server.ok


@pytest.mark.parametrize(
    ("make_server", "host", "words"),
    [
        # Signed by a CA we were not told to trust (A00.FR.308).
        (lambda pki: csms_server(pki, cert=pki.station_rogue), "127.0.0.1", "certificate verify failed"),
        # Ours, but for another host (A00.FR.309).
        (lambda pki: csms_server(pki), "csms.example.net", "Hostname mismatch"),
    ],
)
async def test_controller_refuses_a_csms_it_cannot_verify(
    pki: Pki, make_server: Callable[[Pki], ssl.SSLContext], host: str, words: str
) -> None:
    client, _ = await handshake(controller_client(pki, profile=2), make_server(pki), host=host)
    assert not client.ok
    assert client.error is not None
    assert words in str(client.error.__cause__)
    assert security_event(client.error, "csms") == INVALID_CSMS_CERTIFICATE


async def test_without_a_ca_file_only_the_system_cas_are_trusted(pki: Pki) -> None:
    settings = CsmsTlsSettings.model_validate({"security_profile": 2})
    context = client_context(settings)
    assert context is not None
    client, _ = await handshake(context, csms_server(pki))
    assert not client.ok  # our test CA is in no system store


# ---------------------------------------------------------------------------------------------------
# Log summaries
# ---------------------------------------------------------------------------------------------------


async def test_summary_neutralises_control_characters_from_a_certificate(pki: Pki) -> None:
    # A station chooses what its certificate says: a CN must not be able to forge a log line.
    forged = pki.site_ca.issue("CS01\n2026-01-01T00:00:00Z INFO fake", file_stem="station-forged")
    _, server = await handshake(station_client(pki, forged), controller_server(pki))
    summary = peer_certificate_summary(server.stream)
    assert summary is not None
    assert summary.common_name == "CS01?2026-01-01T00:00:00Z INFO fake"
    assert "\n" not in str(summary)


class DecodedCertificate:
    """What `getpeercert()` returns for a certificate made by a tool less strict than `cryptography`."""

    def getpeercert(self, binary_form: bool = False) -> dict[str, Any]:
        return {
            "subject": ((("commonName", "C" * 300),), (("organizationName", "Bell\x07Corp"),)),
            "issuer": ((("commonName", "Some CA"),),),
            "serialNumber": "0A",
            "notAfter": "Jan  1 00:00:00 2030 GMT",
        }


def test_summary_truncates_endless_names() -> None:
    summary = peer_certificate_summary(DecodedCertificate())
    assert summary is not None
    assert summary.common_name == "C" * 61 + "..."
    assert summary.subject == f"CN={'C' * 61}...,O=Bell?Corp"
    assert str(summary) == (
        f"subject 'CN={'C' * 61}...,O=Bell?Corp', issuer 'CN=Some CA', serial 0A, valid until Jan  1 00:00:00 2030 GMT"
    )
