"""Security profiles (Part 2 §1.3, A00; Part 4 §6.5): each leg's TLS settings and its SSL context.

A Local Controller plays both roles (Part 4 §6.5). Toward stations it is the CSMS: the TLS server,
presenting its own CSMS-role certificate. Toward the CSMS it is a station: a TLS client that verifies
the CSMS (certificate path and host name) and, under profile 3, presents its own station-role
certificate. Each leg picks its profile in the configuration, independently:

    profile  station leg (we serve)                        CSMS leg (we connect)
    1        ws://; Basic auth passes through              ws://; Basic auth passes through
    2        wss:// with our CSMS-role certificate;        wss://; the CSMS's certificate checked against
             Basic auth still passes through               ca_file (or the system CAs) and its host name
    3        as 2, and every station must present a        as 2, and we present our station-role
             certificate chaining to ca_file               certificate

Both contexts allow TLS 1.2 and newer only (A00.FR.313/416), never TLS compression (A00.FR.424),
and for TLS 1.2 only the AEAD suites of A00.FR.421 (see :data:`TLS12_CIPHERS`); TLS 1.3 keeps
OpenSSL's suites, all of them AEAD.

Theory of operation: the settings models check everything that can be checked before the service
starts, so ``ocpp-lc check-config`` reports it in words: which files a profile needs, that each file
exists and can be read, that a private key is readable by its owner only, and, by building the
context once, that the PEM files parse, the key is not encrypted and belongs to its certificate.
:func:`server_context` and :func:`client_context` then build the contexts the transport uses
(``None`` for profile 1). Problems name files, never their contents: no key material reaches a log.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

#: TLS 1.2 suites, OpenSSL names. The four A00.FR.421 names come as
#: TLS_ECDHE_ECDSA_WITH_AES_{128_GCM_SHA256,256_GCM_SHA384} and TLS_RSA_WITH_AES_{128,256}_GCM_*;
#: A00.FR.421 asks for "at least" those, so the two ECDHE-RSA twins sit before the static-RSA pair:
#: with an RSA certificate they give forward secrecy (A00.FR.422 recommends ECDHE), and a peer that
#: only has TLS_RSA still gets through.
TLS12_CIPHERS: Final = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
)

MINIMUM_TLS_VERSION: Final = ssl.TLSVersion.TLSv1_2

SecurityProfile = Literal[1, 2, 3]
Leg = Literal["station", "csms"]


class TlsSetupError(ValueError):
    """A certificate, key or CA file cannot be used; ``field`` names the setting at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _problem(message: str, field: str) -> PydanticCustomError:
    # The same error shape as router/settings/values.py's problem(), so ConfigError shows "[section] key: message".
    return PydanticCustomError("config", "{message}", {"message": message, "field": field})


def _as_path(value: object) -> object:
    if isinstance(value, str) and not value.strip():
        raise ValueError("must be a file path, got an empty string")
    if value is not None and not isinstance(value, str | Path):
        raise ValueError(f"must be a file path (text in quotes), got {value!r}")
    return value


def _check_readable(path: Path | None) -> Path | None:
    if path is None:
        return None
    if not path.exists():
        raise ValueError(f"file not found: {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"is not a regular file: {str(path)!r}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"cannot be read by the controller's user: {str(path)!r}")
    return path


def _check_private(path: Path | None) -> Path | None:
    """A private key must be accessible by its owner only (the issue: readable only by the service)."""
    path = _check_readable(path)
    if path is not None:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ValueError(
                f"{str(path)!r} has mode {mode:04o}: a private key must be readable by the service's user "
                f"only (chmod 600 {path}, owned by that user)"
            )
    return path


def _check_handshake_timeout(timeout_s: float) -> float:
    if not 0.1 <= timeout_s <= 60:
        raise ValueError(f"must be from 0.1 to 60 seconds, got {timeout_s:g}")
    return timeout_s


CertificateFile = Annotated[Path | None, BeforeValidator(_as_path), AfterValidator(_check_readable)]
PrivateKeyFile = Annotated[Path | None, BeforeValidator(_as_path), AfterValidator(_check_private)]
_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
_PROFILE_HELP = "OCPP security profile: 1 plain ws:// (Basic auth), 2 TLS + Basic auth, 3 TLS + client certificates"


def _unused(settings: BaseModel, fields: tuple[str, ...], profile: int, needed_from: int) -> None:
    for name in fields:
        if getattr(settings, name) is not None:
            raise _problem(
                f"is only used with security_profile {needed_from}"
                f"{' or 3' if needed_from == 2 else ''}, and security_profile is {profile}: "
                f"remove it, or raise security_profile",
                field=name,
            )


def _required(settings: BaseModel, fields: dict[str, str], profile: int) -> None:
    for name, what in fields.items():
        if getattr(settings, name) is None:
            raise _problem(f"is required with security_profile {profile}: {what} (PEM file)", field=name)


class StationTlsSettings(BaseModel):
    """TLS toward the stations, where the controller is the TLS server (Part 4 §6.5)."""

    model_config = _MODEL
    security_profile: SecurityProfile = Field(default=1, description=_PROFILE_HELP)
    cert_file: CertificateFile = Field(
        default=None,
        strict=False,
        description="the controller's CSMS-role certificate, PEM, leaf first then intermediates (profile 2, 3)",
    )
    key_file: PrivateKeyFile = Field(
        default=None, strict=False, description="its private key, PEM, unencrypted, mode 0600 (profile 2, 3)"
    )
    ca_file: CertificateFile = Field(
        default=None, strict=False, description="CA certificates (PEM) station certificates must chain to (profile 3)"
    )
    handshake_timeout_s: Annotated[float, AfterValidator(_check_handshake_timeout)] = Field(
        default=2.0, description="a station's TLS handshake must finish within this (seconds)"
    )
    organization: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="the O (organizationName) every station certificate must carry, the CSO's name "
        "(profile 3, A00.FR.404; unset: not checked)",
    )

    @model_validator(mode="after")
    def _files_fit_the_profile(self) -> StationTlsSettings:
        profile = self.security_profile
        if profile != 3:
            _unused(self, ("organization",), profile, 3)
        if profile == 1:
            _unused(self, ("cert_file", "key_file", "ca_file"), profile, 2)
            return self
        _required(
            self,
            {"cert_file": "the controller's CSMS-role certificate", "key_file": "its private key"},
            profile,
        )
        if profile == 3:
            _required(self, {"ca_file": "the CA that station certificates must chain to"}, profile)
        else:
            _unused(self, ("ca_file",), profile, 3)
        try:
            server_context(self)
        except TlsSetupError as error:
            raise _problem(error.message, field=error.field) from None
        return self


class CsmsTlsSettings(BaseModel):
    """TLS toward the CSMS, where the controller is a TLS client in the station role (Part 4 §6.5)."""

    model_config = _MODEL
    security_profile: SecurityProfile = Field(default=1, description=_PROFILE_HELP)
    ca_file: CertificateFile = Field(
        default=None,
        strict=False,
        description="CA certificates (PEM) the CSMS certificate must chain to (profile 2, 3; none: the system CAs)",
    )
    cert_file: CertificateFile = Field(
        default=None,
        strict=False,
        description="the controller's station-role client certificate, PEM, leaf first (profile 3)",
    )
    key_file: PrivateKeyFile = Field(
        default=None, strict=False, description="its private key, PEM, unencrypted, mode 0600 (profile 3)"
    )

    @model_validator(mode="after")
    def _files_fit_the_profile(self) -> CsmsTlsSettings:
        profile = self.security_profile
        if profile == 1:
            _unused(self, ("ca_file", "cert_file", "key_file"), profile, 2)
            return self
        if profile == 3:
            _required(
                self,
                {"cert_file": "the controller's station-role certificate", "key_file": "its private key"},
                profile,
            )
        else:
            _unused(self, ("cert_file", "key_file"), profile, 3)
        try:
            client_context(self)
        except TlsSetupError as error:
            raise _problem(error.message, field=error.field) from None
        return self


# ---------------------------------------------------------------------------------------------------
# Contexts
# ---------------------------------------------------------------------------------------------------


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key: a service must not.
    raise _EncryptedKey


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = MINIMUM_TLS_VERSION
    context.options |= ssl.OP_NO_COMPRESSION  # A00.FR.424 (CRIME); OpenSSL 3 defaults to it, we insist
    context.options |= ssl.OP_NO_RENEGOTIATION  # TLS 1.2 renegotiation: a CPU cost a station could force
    context.set_ciphers(":".join(TLS12_CIPHERS))


def _load_own_certificate(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert_file)
    except ssl.SSLError:
        raise TlsSetupError("cert_file", f"holds no PEM certificate: {str(cert_file)!r}") from None
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except _EncryptedKey:
        message = f"{str(key_file)!r} is encrypted: the controller needs it unencrypted, protected by mode 0600"
        raise TlsSetupError("key_file", message) from None
    except ssl.SSLError as error:
        reason = error.reason or ""
        if reason == "KEY_VALUES_MISMATCH":
            message = f"{str(key_file)!r} is not the private key of {str(cert_file)!r}"
        elif "TOO_SMALL" in reason or "TOO_WEAK" in reason:
            message = f"key or signature too weak ({reason}): use RSA >= 2048 bits or EC >= 224 bits (A00.FR.501)"
        else:
            message = f"holds no usable PEM private key: {str(key_file)!r}"
        raise TlsSetupError("key_file", message) from None


def _load_ca(context: ssl.SSLContext, ca_file: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except ssl.SSLError:
        raise TlsSetupError("ca_file", f"holds no PEM CA certificate: {str(ca_file)!r}") from None


def server_context(settings: StationTlsSettings) -> ssl.SSLContext | None:
    """The station leg's TLS server context, or None under profile 1 (plain ws://).

    Profile 3 requires a client certificate chaining to ``ca_file`` and nothing else: unlike
    ``ssl.create_default_context(Purpose.CLIENT_AUTH)``, the system CAs are never trusted for stations.
    Raises :class:`TlsSetupError` when a file cannot be used.
    """
    if settings.security_profile == 1:
        return None
    assert settings.cert_file is not None and settings.key_file is not None  # the model guarantees them
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    # Our order of preference, not the client's: ECDHE before static RSA.
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_own_certificate(context, settings.cert_file, settings.key_file)
    if settings.security_profile == 3:
        assert settings.ca_file is not None
        _load_ca(context, settings.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: CsmsTlsSettings) -> ssl.SSLContext | None:
    """The CSMS leg's TLS client context, or None under profile 1 (plain ws://).

    The CSMS certificate must chain to ``ca_file`` (the system CAs when none is set) and name the host
    we connect to (A00.FR.308/309); under profile 3 we present the station-role certificate.
    Raises :class:`TlsSetupError` when a file cannot be used.
    """
    if settings.security_profile == 1:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    _harden(context)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if settings.ca_file is not None:
        _load_ca(context, settings.ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.security_profile == 3:
        assert settings.cert_file is not None and settings.key_file is not None
        _load_own_certificate(context, settings.cert_file, settings.key_file)
    return context


# ---------------------------------------------------------------------------------------------------
# What to log
# ---------------------------------------------------------------------------------------------------


class HasPeerCertificate(Protocol):
    """An ``ssl.SSLObject``/``SSLSocket`` or a ``trio.SSLStream`` after its handshake."""

    def getpeercert(self, binary_form: bool = False) -> Any: ...


_SHORT_NAMES: Final = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}
_MAX_VALUE_CHARS: Final = 64


def _clean(value: object) -> str:
    # A certificate is attacker-supplied text: no control characters or endless names in our logs.
    text = "".join(char if char.isprintable() else "?" for char in str(value))
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 3] + "..."


def _dn(rdns: Any) -> str:
    parts = [f"{_SHORT_NAMES.get(str(key), _clean(key))}={_clean(value)}" for rdn in rdns or () for key, value in rdn]
    return ",".join(parts)


class CertificateSummary(NamedTuple):
    """Who a verified peer certificate names: public facts only, for logs."""

    common_name: str | None
    subject: str
    issuer: str
    serial: str
    not_after: str

    def __str__(self) -> str:
        return f"subject {self.subject!r}, issuer {self.issuer!r}, serial {self.serial}, valid until {self.not_after}"


def peer_certificate_summary(ssl_object: HasPeerCertificate | None) -> CertificateSummary | None:
    """The peer's verified certificate as subject, issuer, serial and expiry; None when there is none.

    Python only decodes a certificate it verified, so under profile 2 (no client certificate
    requested) this is None on the station leg.
    """
    if ssl_object is None:
        return None
    cert = ssl_object.getpeercert()
    if not cert:
        return None
    common_names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return CertificateSummary(
        common_name=_clean(common_names[0]) if common_names else None,
        subject=_dn(cert.get("subject")),
        issuer=_dn(cert.get("issuer")),
        serial=_clean(cert.get("serialNumber", "?")),
        not_after=_clean(cert.get("notAfter", "?")),
    )


def _attribute_values(cert: dict[str, Any], name: str) -> list[str]:
    return [str(value) for rdn in cert.get("subject", ()) for key, value in rdn if key == name]


def station_certificate_problem(
    ssl_object: HasPeerCertificate | None, identity: str, *, organization: str | None = None
) -> str | None:
    """Why the verified station certificate does not belong to ``identity``; None when it does.

    Under profile 3 only the controller sees the station's certificate (the CSMS sees the
    controller's), so the controller makes the checks A00.FR.404/405 give the CSMS: the subject's one
    CN (commonName) is the station's serial number (A00.FR.511), which must be exactly the identity
    in the connection URL (Part 4 §3.1 recommends checking the identity against the credentials);
    with ``organization`` set, an O (organizationName) of the subject must be exactly it. Without a
    verified certificate the answer is a problem too. The text names the certificate's values
    (cleaned of control characters), fit for a log line and a security event.
    """
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return "no verified client certificate"
    common_names = _attribute_values(cert, "commonName")
    if len(common_names) != 1:
        return f"the certificate's subject has {len(common_names)} CNs, where one must name the station"
    if common_names[0] != identity:
        return f"certificate CN {_clean(common_names[0])!r} is not the identity {_clean(identity)!r}"
    if organization is not None:
        organizations = _attribute_values(cert, "organizationName")
        if organization not in organizations:
            shown = ",".join(_clean(value) for value in organizations) or "none"
            return f"certificate O {shown!r} is not the CSO {organization!r}"
    return None


# ---------------------------------------------------------------------------------------------------
# Security events
# ---------------------------------------------------------------------------------------------------

#: Security event names (Part 2 appendices, security events) for handshake failures.
INVALID_STATION_CERTIFICATE: Final = "InvalidChargingStationCertificate"
INVALID_CSMS_CERTIFICATE: Final = "InvalidCsmsCertificate"
INVALID_TLS_VERSION: Final = "InvalidTLSVersion"
INVALID_TLS_CIPHER_SUITE: Final = "InvalidTLSCipherSuite"
TLS_HANDSHAKE_FAILED: Final = "TLSHandshakeFailed"  # ours: none of the above (e.g. not TLS at all)

_VERSION_REASONS: Final = frozenset({"UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER", "TLSV1_ALERT_PROTOCOL_VERSION"})
_CIPHER_REASONS: Final = frozenset({"NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_CIPHERS_AVAILABLE"})
_STATION_CERT_REASONS: Final = frozenset(
    {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED", "TLSV13_ALERT_CERTIFICATE_REQUIRED"}
)


def _ssl_error_in(error: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def security_event(error: BaseException, leg: Leg) -> str:
    """Name the security event a failed TLS handshake amounts to (A00.FR.408, .310, .316, .426).

    ``error`` is what the handshake raised (the :class:`ssl.SSLError` is found along its causes);
    ``leg`` says whether we were the server toward a station or the client toward the CSMS.
    """
    found = _ssl_error_in(error)
    reason = (found.reason or "") if found is not None else ""
    if reason in _VERSION_REASONS:
        return INVALID_TLS_VERSION
    if reason in _CIPHER_REASONS:
        return INVALID_TLS_CIPHER_SUITE
    if isinstance(found, ssl.SSLCertVerificationError) or reason in _STATION_CERT_REASONS:
        return INVALID_STATION_CERTIFICATE if leg == "station" else INVALID_CSMS_CERTIFICATE
    return TLS_HANDSHAKE_FAILED


__all__ = [
    "INVALID_CSMS_CERTIFICATE",
    "INVALID_STATION_CERTIFICATE",
    "INVALID_TLS_CIPHER_SUITE",
    "INVALID_TLS_VERSION",
    "MINIMUM_TLS_VERSION",
    "TLS12_CIPHERS",
    "TLS_HANDSHAKE_FAILED",
    "CertificateSummary",
    "CsmsTlsSettings",
    "HasPeerCertificate",
    "StationTlsSettings",
    "TlsSetupError",
    "client_context",
    "peer_certificate_summary",
    "security_event",
    "server_context",
    "station_certificate_problem",
]
