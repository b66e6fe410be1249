"""A throw-away PKI for the TLS tests (security profiles 2 and 3), and a TLS wrapper for the test peers.

Certificates are made with `cryptography` when a test starts, so nothing secret or expiring is kept in
the repository. They follow Part 2 A00.FR.5xx where a test can tell: ECDSA P-256 keys (or RSA 2048 for
the static-RSA suites), SHA-256 signatures, a serial number, O and CN in the subject, Key Usage, no
Extended Key Usage (A00.FR.514), and no subjectAltName on station certificates, whose CN is the
station's serial number (A00.FR.511). Server certificates carry 127.0.0.1 and localhost as
subjectAltNames, because host-name checks of IP addresses only look there.

A Local Controller holds two certificates of its own (Part 4 §6.5), one per role, and the two legs
here are deliberately signed by two different CAs, so a context that loaded the wrong CA fails:

    site CA ── controller's CSMS-role certificate (what stations verify)
            └─ station certificates (what the controller verifies under profile 3)
    CSO CA  ── the CSMS's server certificate (what the controller verifies)
            └─ controller's station-role certificate (what the CSMS verifies under profile 3)
    rogue CA ─ a station certificate with a valid-looking CN from nobody we trust

Private keys are written with mode 0600 from the start (the controller refuses wider modes).

The test peers (`tests/peers/csms.py`, `station.py`, the PyPI `ocpp` library on `websockets`) have
no TLS options. Run through this module they get them, unchanged otherwise:

    python -m tests.support.certs csms --cert C --key K [--client-ca CA] -- <csms peer arguments>
    python -m tests.support.certs station --ca CA [--cert C --key K] -- <station peer arguments>

The wrapper hands an `ssl.SSLContext` to the `websockets` `serve`/`connect` the peer calls (the
station's `--url` must then be wss://). The CSMS also emits one extra event per connection,
`{"event": "tls_client", "path", "subject"}`, naming the client certificate it verified (or null).
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KeyKind = Literal["ec", "rsa"]

#: Where server certificates are valid: the loopback address the tests connect to, and its name.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")

_ORGANIZATION = "ocpp-lc test CSO"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key(kind: KeyKind) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str = _ORGANIZATION, extra_common_names: tuple[str, ...] = ()) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            *(x509.NameAttribute(NameOID.COMMON_NAME, name) for name in extra_common_names),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created 0600: the key is never readable by others, not even between open() and chmod().
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _write_cert(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _key_usage(*, ca: bool, kind: KeyKind) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        # Static-RSA suites (A00.FR.421) encrypt the premaster secret with the server's key.
        key_encipherment=not ca and kind == "rsa",
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key, as PEM files (the key 0600)."""

    cert_file: Path
    key_file: Path
    certificate: x509.Certificate

    @property
    def common_name(self) -> str:
        return str(self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)

    @property
    def serial_hex(self) -> str:
        """The serial number as upper-case hex, the way `ssl.getpeercert()` shows it."""
        text = f"{self.certificate.serial_number:X}"
        # getpeercert() prints whole bytes: a serial whose first nibble is 0 keeps its leading zero.
        return text if len(text) % 2 == 0 else "0" + text


class TestCa:
    """A self-signed root CA that issues server and client certificates into ``directory``."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, directory: Path, name: str, *, organization: str = _ORGANIZATION) -> None:
        self.directory = directory
        self.name = name
        self._organization = organization
        self._key = _new_key("ec")
        subject = _name(name, organization)
        now = _now()
        public_key = self._key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True, kind="ec"), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = directory / f"{_slug(name)}.crt"
        _write_cert(self.cert_file, self.certificate)

    def issue(
        self,
        common_name: str,
        *,
        hosts: tuple[str, ...] = (),
        key_kind: KeyKind = "ec",
        valid_from: datetime.datetime | None = None,
        valid_until: datetime.datetime | None = None,
        file_stem: str | None = None,
        organization: str | None = None,
        extra_common_names: tuple[str, ...] = (),
    ) -> CertifiedKey:
        """Issue a leaf certificate for ``common_name``; ``hosts`` (names or IPs) become subjectAltNames.

        Valid from yesterday for a year unless ``valid_from``/``valid_until`` say otherwise (an expired
        certificate: both in the past). The subject's O is the CA's unless ``organization`` says
        otherwise; ``extra_common_names`` adds further CN attributes (an ambiguous subject).
        """
        key = _new_key(key_kind)
        now = _now()
        public_key = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organization or self._organization, extra_common_names))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from or now - datetime.timedelta(days=1))
            .not_valid_after(valid_until or now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False, kind=key_kind), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if hosts:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), False)
        certificate = builder.sign(self._key, hashes.SHA256())
        stem = self.directory / _slug(file_stem or f"{self.name}-{common_name}-{key_kind}")
        issued = CertifiedKey(stem.with_suffix(".crt"), stem.with_suffix(".key"), certificate)
        _write_cert(issued.cert_file, certificate)
        _write_key(issued.key_file, key)
        return issued


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text)


@dataclass(frozen=True)
class Pki:
    """Every certificate the TLS tests use (see the module docstring for who signs what)."""

    site_ca: TestCa
    cso_ca: TestCa
    rogue_ca: TestCa
    #: The controller's CSMS-role certificate, toward stations (Part 4 §6.5).
    controller_server: CertifiedKey
    #: The controller's station-role certificate, toward the CSMS (profile 3).
    controller_client: CertifiedKey
    #: The CSMS's own server certificate.
    csms_server: CertifiedKey
    #: A station certificate the controller must accept (CN = the station's identity).
    station: CertifiedKey
    #: Same CA and CN, but it expired yesterday.
    station_expired: CertifiedKey
    #: Same CN, issued by a CA nobody trusts.
    station_rogue: CertifiedKey


def make_pki(directory: Path, *, station_identity: str = "CS01", controller_identity: str = "LC01") -> Pki:
    """Create the CAs and certificates of :class:`Pki` as files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    site_ca = TestCa(directory, "ocpp-lc test site CA")
    cso_ca = TestCa(directory, "ocpp-lc test CSO CA")
    rogue_ca = TestCa(directory, "rogue CA", organization="somebody else")
    now = _now()
    return Pki(
        site_ca=site_ca,
        cso_ca=cso_ca,
        rogue_ca=rogue_ca,
        controller_server=site_ca.issue("localhost", hosts=LOOPBACK_HOSTS, file_stem="controller-csms-role"),
        controller_client=cso_ca.issue(controller_identity, file_stem="controller-station-role"),
        csms_server=cso_ca.issue("localhost", hosts=LOOPBACK_HOSTS, file_stem="csms"),
        station=site_ca.issue(station_identity, file_stem="station"),
        station_expired=site_ca.issue(
            station_identity,
            valid_from=now - datetime.timedelta(days=30),
            valid_until=now - datetime.timedelta(days=1),
            file_stem="station-expired",
        ),
        station_rogue=rogue_ca.issue(station_identity, file_stem="station-rogue"),
    )


# ---------------------------------------------------------------------------------------------------
# TLS for the test peers
# ---------------------------------------------------------------------------------------------------


def peer_ssl_context(
    role: Literal["csms", "station"],
    *,
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
) -> ssl.SSLContext:
    """What a peer uses: a server context (``ca``: require client certificates from it) or a client one.

    Plain library defaults on purpose: the peers stand for other people's implementations, not ours.
    """
    if role == "csms":
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca) if ca else None)
        context.verify_mode = ssl.CERT_REQUIRED if ca else ssl.CERT_NONE
    else:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def subject_text(peercert: dict[str, Any] | None) -> str | None:
    """``"O=...,CN=..."`` from an `ssl.getpeercert()` dict (None when there is no certificate)."""
    if not peercert:
        return None
    short = {"commonName": "CN", "organizationName": "O"}
    return ",".join(f"{short.get(k, k)}={v}" for rdn in peercert.get("subject", ()) for k, v in rdn)


def _run_tls_peer(argv: list[str]) -> int:
    import argparse

    split = argv.index("--") if "--" in argv else len(argv)
    own, peer_args = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="python -m tests.support.certs", description=__doc__)
    parser.add_argument("role", choices=["csms", "station"])
    parser.add_argument("--cert", type=Path, help="own certificate (PEM)")
    parser.add_argument("--key", type=Path, help="own private key (PEM)")
    parser.add_argument("--ca", type=Path, help="station: CA that verifies the server")
    parser.add_argument("--client-ca", type=Path, help="csms: require client certificates chaining to this CA")
    args = parser.parse_args(own)
    if args.role == "csms":
        from websockets.asyncio.server import ServerConnection

        from tests.peers import csms
        from tests.peers.common import emit

        context = peer_ssl_context("csms", cert=args.cert, key=args.key, ca=args.client_ca)
        csms.serve = functools.partial(csms.serve, ssl=context)  # type: ignore[attr-defined]
        handle = csms.Csms.handle

        async def handle_with_tls_event(self: csms.Csms, ws: ServerConnection) -> None:
            assert ws.request is not None
            peercert = ws.transport.get_extra_info("peercert")
            emit({"event": "tls_client", "path": ws.request.path, "subject": subject_text(peercert)})
            await handle(self, ws)

        csms.Csms.handle = handle_with_tls_event  # type: ignore[method-assign]
        return csms.main(peer_args)

    from tests.peers import station

    context = peer_ssl_context("station", cert=args.cert, key=args.key, ca=args.ca)
    station.connect = functools.partial(station.connect, ssl=context)  # type: ignore[attr-defined,assignment]
    return station.main(peer_args)


if __name__ == "__main__":
    sys.exit(_run_tls_peer(sys.argv[1:]))
