"""The appliance's configuration: one TOML file, validated, with every problem in plain words.

Theory of operation: :func:`load_settings` reads the file with :mod:`tomllib`; :func:`parse_settings`
validates the tables against frozen, strict pydantic models that forbid unknown keys, so a typo is an
error rather than a setting silently ignored. Every key has a default: an empty file yields a runnable
controller (stations on port 9000, HTTP API on loopback only, CSMS at ``ws://127.0.0.1:9100/ocpp``,
state in ``/var/lib/ocpp-lc``).
Pydantic's errors are written for programmers; installers read :class:`ConfigError`, which lists
*every* problem at once, each naming the key, what it got and what is allowed.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from balancing.site import SiteConfig
from meters.settings import MeterSettings, site_problems
from mqtt.settings import MqttSettings

from .autonomy.settings import AutonomySettings
from .own.device_model import PASSWORD_STRING
from .tls import CsmsTlsSettings, StationTlsSettings

_EXAMPLES = "e.g. '0.0.0.0:9000' or '[::1]:9000'"
_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]:(.*)")
_PORT = re.compile(r"[0-9]{1,5}")
# identifierString (OCPP 2.0.1 Part 2 §2.1.2) minus ':', which separates user and password in the
# HTTP Basic credentials the controller presents to the CSMS.
_IDENTITY = re.compile(r"[A-Za-z0-9*\-_=+|@.]+")
_TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")  # printable ASCII without spaces: it travels in a header
_TOML_POSITION = re.compile(r"(.*) \(at line (\d+), column (\d+)\)")


class ListenAddress(NamedTuple):
    """A TCP endpoint: ``host`` is a name or an IP address (IPv6 without brackets), ``port`` 0..65535."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for ``localhost`` and loopback IP addresses: only this machine can connect."""
        return self.host.lower() == "localhost" or (_is_ip(self.host) and ipaddress.ip_address(self.host).is_loopback)


def _is_ip(host: str) -> bool:
    try:
        return bool(ipaddress.ip_address(host))
    except ValueError:
        return False


def parse_listen_address(text: str) -> ListenAddress:
    """Parse ``host:port`` or ``[ipv6]:port`` (port 0: the OS picks); ValueError says what is allowed."""
    if text.startswith("["):
        match = _BRACKETED.fullmatch(text)
        host, port_text = match.groups() if match else ("", "")
        if not host or ":" not in host or not _is_ip(host):
            raise ValueError(f"must be '[ipv6-address]:port' with an IPv6 address, {_EXAMPLES}, got {text!r}")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"must be host:port, {_EXAMPLES}, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address must be in brackets, e.g. '[::1]:9000', got {text!r}")
        if not host:
            raise ValueError(f"needs a host before the port ('0.0.0.0' for every interface), got {text!r}")
        # A dotted run of digits that is not a valid IPv4 address ("300.1.1.1") is a typo, not a name.
        is_name = len(host) <= 253 and not re.fullmatch(r"[0-9.]+", host) and _HOSTNAME.fullmatch(host)
        if not (is_name or _is_ip(host)):
            raise ValueError(f"{host!r} is not a host name or an IP address")
    port = int(port_text) if _PORT.fullmatch(port_text) else -1
    if not 0 <= port <= 65_535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return ListenAddress(host, port)


def parse_ws_url(url: str) -> tuple[ListenAddress, str, bool]:
    """Split a ws:// or wss:// URL into (host and port [80/443], path [maybe ''], TLS); or ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not url.lower().startswith(f"{parts.scheme}://"):
        raise ValueError(f"must be a ws:// or wss:// URL, got {url!r}")
    if any(char in url for char in "?# \t@"):
        raise ValueError(f"must not have a query ('?'), fragment ('#'), user name ('@') or spaces, got {url!r}")
    if not parts.netloc:
        raise ValueError(f"needs a host, e.g. 'ws://csms.example.net:9000/ocpp', got {url!r}")
    if url.endswith("/"):
        raise ValueError(f"must not end with '/': each station's identity is appended as '/<id>', got {url!r}")
    tls = parts.scheme == "wss"
    has_port = not parts.netloc.endswith("]") and ":" in parts.netloc
    address = parse_listen_address(parts.netloc if has_port else f"{parts.netloc}:{443 if tls else 80}")
    if address.port == 0:
        raise ValueError(f"port must be a number from 1 to 65535, got 0 in {url!r}")
    return address, parts.path, tls


def _check_listen(text: str) -> str:
    parse_listen_address(text)
    return text


def _check_url(url: str) -> str:
    parse_ws_url(url)
    return url


def _check_ping_interval(interval_s: float) -> float:
    if interval_s != 0 and not 1 <= interval_s <= 86_400:
        raise ValueError(f"must be 0 (no pings) or from 1 to 86400 seconds, got {_show(interval_s)}")
    return interval_s


def _check_resolution(resolution_amperes: float) -> float:
    # A charging schedule's limit carries at most one decimal (Part 2, ChargingSchedulePeriodType), so
    # the limits the controller rounds to must be whole tenths of an ampere (#11.9).
    tenths = resolution_amperes * 10
    if not 1 <= tenths <= 10 or abs(tenths - round(tenths)) > 1e-9:
        raise ValueError(
            "must be from 0.1 to 1 A with at most one decimal (0.1, 0.5, 1 ...: OCPP charging schedule "
            f"limits carry at most one decimal), got {_show(resolution_amperes)}"
        )
    return resolution_amperes


def _check_station_path(path: str) -> str:
    if not path.startswith("/") or path.endswith("/") or any(char in path for char in "?# \t"):
        raise ValueError(
            "must start with '/', not end with '/' and have no '?', '#' or spaces "
            f"(stations connect to '<path>/<id>'), e.g. '/ocpp', got {path!r}"
        )
    return path


def _check_identity(identity: str) -> str:
    if ":" in identity:
        raise ValueError(f"must not contain ':' (it separates user and password in HTTP Basic), got {identity!r}")
    if not _IDENTITY.fullmatch(identity):
        raise ValueError(f"may contain only letters, digits and *-_=+|@. , got {identity!r}")
    return identity


def _problem(message: str, field: str) -> PydanticCustomError:  # field: dotted, relative to the model
    return PydanticCustomError("config", "{message}", {"message": message, "field": field})


ListenText = Annotated[str, AfterValidator(_check_listen)]
PingInterval = Annotated[float, AfterValidator(_check_ping_interval)]
_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ControllerSettings(BaseModel):
    """Who the controller is towards the CSMS: its own identity, a charging station without EVSEs.

    The timing values are the device model's defaults (OCPPCommCtrlr, Part 2 appendix): once the CSMS
    sets one with SetVariables, the stored value wins over the file.
    """

    model_config = _MODEL
    identity: Annotated[str, AfterValidator(_check_identity)] = Field(
        default="LC01", min_length=1, max_length=48, description="own OCPP identity (text, 1..48 characters)"
    )
    connect: bool = Field(default=True, description="keep the controller's own connection to the CSMS (true/false)")
    vendor_name: str = Field(
        default="ocpp-lc", min_length=1, max_length=50, description="vendorName in BootNotification (text, 1..50)"
    )
    model: str = Field(
        default="ocpp-lc", min_length=1, max_length=20, description="model in BootNotification (text, 1..20)"
    )
    serial_number: str | None = Field(
        default=None, min_length=1, max_length=25, description="serialNumber in BootNotification (text, 1..25)"
    )
    basic_auth_password: SecretStr | None = Field(
        default=None, description="initial BasicAuthPassword towards the CSMS (text, 16..40 characters)"
    )
    heartbeat_interval_s: int = Field(
        default=300, ge=1, le=86_400, description="heartbeat period until the CSMS sets one (whole seconds)"
    )
    message_timeout_s: int = Field(
        default=30, ge=1, le=600, description="own calls wait this long for an answer (whole seconds)"
    )
    boot_retry_s: float = Field(
        default=60.0, ge=1, le=3600, description="retry a boot the CSMS did not answer usably (seconds)"
    )
    retry_wait_minimum_s: int = Field(
        default=5, ge=1, le=3600, description="first reconnect back-off, doubled per failure (whole seconds)"
    )
    retry_random_range_s: int = Field(
        default=10, ge=0, le=3600, description="random extra wait per reconnect, up to (whole seconds)"
    )
    retry_repeat_times: int = Field(
        default=5, ge=0, le=16, description="how often the back-off doubles at most (count)"
    )

    def basic_auth_password_value(self) -> str | None:
        """The initial BasicAuthPassword in clear text, or None when none is configured."""
        return None if self.basic_auth_password is None else self.basic_auth_password.get_secret_value()

    @model_validator(mode="after")
    def _password_is_sound(self) -> ControllerSettings:
        password = self.basic_auth_password_value()
        # passwordString (Part 2 §2.1.2), 16..40 characters (A00.FR.205). Never echoed: messages reach logs.
        if password is not None and not (16 <= len(password) <= 40 and PASSWORD_STRING.fullmatch(password)):
            message = "must be 16 to 40 characters: letters, digits and *-_=:+|@. (OCPP passwordString)"
            raise _problem(message, field="basic_auth_password")
        return self


def _check_state_dir(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(
            f"must be an absolute path, e.g. '/var/lib/ocpp-lc' (a relative one would depend on where the "
            f"service starts), got {text!r}"
        )
    return text


def _check_readable_file(text: str) -> str:
    _check_state_dir(text)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text!r}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror}") from None
    return text


class StateSettings(BaseModel):
    """Where the controller keeps what must survive a restart."""

    model_config = _MODEL
    dir: Annotated[str, AfterValidator(_check_state_dir)] = Field(
        default="/var/lib/ocpp-lc", min_length=1, max_length=4096, description="state directory (absolute path)"
    )

    @property
    def path(self) -> Path:
        """The state directory (the store file inside it is ``state.sqlite3``)."""
        return Path(self.dir)


class StationsSettings(BaseModel):
    """The websocket server that charging stations connect to."""

    model_config = _MODEL
    listen: ListenText = Field(default="0.0.0.0:9000", description="address for stations (host:port)")
    path: Annotated[str, AfterValidator(_check_station_path)] = Field(
        default="/ocpp", max_length=1024, description="URL path; stations connect to <path>/<id> (text)"
    )
    max_message_bytes: int = Field(default=1_048_576, ge=1024, le=67_108_864, description="largest message (bytes)")
    handshake_timeout_s: float = Field(default=10.0, ge=0.1, le=300, description="TLS + ws handshake (seconds)")
    ping_interval_s: PingInterval = Field(default=60.0, description="websocket ping period (seconds, 0 = off)")
    ping_timeout_s: float = Field(default=30.0, ge=1, le=600, description="wait for a pong (seconds)")
    max_stations: int = Field(default=5000, ge=1, le=100_000, description="concurrent stations (count)")
    security: StationTlsSettings = StationTlsSettings()

    @property
    def address(self) -> ListenAddress:
        """Where to listen for stations."""
        return parse_listen_address(self.listen)


class CsmsSettings(BaseModel):
    """The upstream CSMS the controller relays to."""

    model_config = _MODEL
    url: Annotated[str, AfterValidator(_check_url)] = Field(
        default="ws://127.0.0.1:9100/ocpp", description="CSMS base URL (ws:// or wss://); '/<id>' is appended"
    )
    connect_timeout_s: float = Field(default=10.0, ge=0.1, le=300, description="TCP + TLS + handshake (seconds)")
    ping_interval_s: PingInterval = Field(default=60.0, description="websocket ping period (seconds, 0 = off)")
    ping_timeout_s: float = Field(default=30.0, ge=1, le=600, description="wait for a pong (seconds)")
    security: CsmsTlsSettings = CsmsTlsSettings()

    @model_validator(mode="after")
    def _scheme_fits_the_profile(self) -> CsmsSettings:
        # A00.FR.001: one profile at a time; a wss:// URL under profile 1 (or ws:// under 2/3) is a mistake.
        profile = self.security.security_profile
        if self.tls != (profile >= 2):
            wanted = "wss://" if profile >= 2 else "ws://"
            raise _problem(f"security_profile {profile} needs a {wanted} URL, got {self.url!r}", field="url")
        return self

    @property
    def address(self) -> ListenAddress:
        """The CSMS host and port (80 for ws, 443 for wss when the URL names none)."""
        return parse_ws_url(self.url)[0]

    @property
    def path(self) -> str:
        """The URL path that '/<id>' is appended to; possibly empty."""
        return parse_ws_url(self.url)[1]

    @property
    def tls(self) -> bool:
        """True for wss:// URLs."""
        return parse_ws_url(self.url)[2]


class RoutingSettings(BaseModel):
    """How the router tracks calls and feeds observers."""

    model_config = _MODEL
    lc_call_timeout_s: float = Field(default=30.0, ge=1, le=600, description="LC call waits for answer (seconds)")
    # Shorter than the ~30 s after which CSMSs commonly give up on a call: a CSMS call the station
    # leaves unanswered must not keep the CSMS's next call (or ours) waiting once the CSMS moved on.
    csms_call_hold_s: float = Field(
        default=25.0,
        ge=1,
        le=3600,
        description="relayed call outstanding (seconds); below the CSMS's own call timeout, commonly 30 s",
    )
    observer_queue: int = Field(default=1000, ge=1, le=1_000_000, description="events buffered per observer (count)")
    shutdown_grace_s: float = Field(default=5.0, ge=0, le=120, description="closing time on stop (seconds)")
    tracked_calls_max: int = Field(default=64, ge=1, le=10_000, description="calls tracked per station (count)")


class HttpSettings(BaseModel):
    """The HTTP server for the EMS API, admin API and metrics."""

    model_config = _MODEL
    listen: ListenText = Field(default="127.0.0.1:8080", description="address for the HTTP API (host:port)")
    token: SecretStr | None = Field(default=None, description="bearer token (text, 16..4096 characters)")

    @property
    def address(self) -> ListenAddress:
        """Where to serve HTTP."""
        return parse_listen_address(self.listen)

    def token_value(self) -> str | None:
        """The bearer token in clear text, or None when none is configured."""
        return None if self.token is None else self.token.get_secret_value()

    @model_validator(mode="after")
    def _token_is_sound(self) -> HttpSettings:
        token = self.token_value()
        if token is not None and not _TOKEN.fullmatch(token):  # never echo the token: messages reach logs
            raise _problem("must be 16 to 4096 printable ASCII characters without spaces", field="token")
        if token is None and not self.address.is_loopback:
            message = "serving beyond loopback needs [http] token (the EMS and admin API must not be open)"
            raise _problem(message, field="listen")
        return self


def _check_public_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not url.lower().startswith(f"{parts.scheme}://") or not parts.hostname:
        example = "http://192.168.1.10:8080"
        raise ValueError(f"must be an http:// or https:// URL with a host, e.g. {example!r}, got {url!r}")
    if url.endswith("/") or any(char in url for char in "?# \t@"):
        raise ValueError(f"must not end with '/' or have a query, fragment, user name or spaces, got {url!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port, got {url!r}") from None
    return url


class FirmwareCacheSettings(BaseModel):
    """The firmware cache (L03/L04): where files are kept and how stations reach them."""

    model_config = _MODEL
    public_base_url: Annotated[str, AfterValidator(_check_public_base_url)] | None = Field(
        default=None,
        max_length=400,
        description=(
            "base URL stations download published firmware from (http(s)://host[:port]); default: the "
            "[http] listen address, unless that is 0.0.0.0 or ::"
        ),
    )
    cache_dir: Annotated[str, AfterValidator(_check_state_dir)] | None = Field(
        default=None, max_length=4096, description="where firmware files are kept (absolute path; <state dir>/firmware)"
    )
    ca_file: Annotated[str, AfterValidator(_check_readable_file)] | None = Field(
        default=None,
        max_length=4096,
        description="CA certificates (PEM, absolute path) an https firmware source must chain to; "
        "default: the system's CAs",
    )
    max_file_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024, le=64 * 1024**3, description="largest firmware file (bytes)"
    )
    disk_budget_bytes: int = Field(
        default=2 * 1024**3, ge=1024, le=16 * 1024**4, description="disk space the cache may use in all (bytes)"
    )
    download_timeout_s: float = Field(
        default=60.0, ge=1, le=3600, description="a download source silent this long fails the attempt (seconds)"
    )
    retries: int = Field(default=3, ge=0, le=100, description="retries when PublishFirmware names none (count)")
    retry_interval_s: int = Field(
        default=30, ge=0, le=86_400, description="wait between attempts when PublishFirmware names none (seconds)"
    )

    def cache_path(self, state_dir: Path) -> Path:
        """The cache directory: ``cache_dir``, or ``firmware`` inside the state directory."""
        return Path(self.cache_dir) if self.cache_dir is not None else state_dir / "firmware"

    def public_base(self, http: ListenAddress, http_port: int) -> str | None:
        """The URL stations are told, given the bound HTTP port; None when it cannot be derived."""
        if self.public_base_url is not None:
            return self.public_base_url
        if http.host in ("0.0.0.0", "::", ""):
            return None  # every interface: which address a station can reach is the installer's to say
        host = f"[{http.host}]" if ":" in http.host else http.host
        return f"http://{host}:{http_port}"


class EmsSettings(BaseModel):
    """Site limits set by an energy-management system through the EMS API (K14)."""

    model_config = _MODEL
    failsafe_current_amperes: float = Field(
        default=0.0, ge=0, le=10_000, description="per-phase limit in place of a stale EMS limit (A; 0 stops charging)"
    )
    max_current_amperes: float = Field(
        default=10_000.0, ge=1, le=10_000, description="largest per-phase limit an EMS may set (A)"
    )
    default_validity_s: float = Field(
        default=900.0, ge=1, le=604_800, description="validity of an EMS limit that names none (seconds)"
    )

    @model_validator(mode="after")
    def _failsafe_within_maximum(self) -> EmsSettings:
        if self.failsafe_current_amperes > self.max_current_amperes:
            message = (
                f"must not exceed [ems] max_current_amperes ({_show(self.max_current_amperes)}), "
                f"got {_show(self.failsafe_current_amperes)}"
            )
            raise _problem(message, field="failsafe_current_amperes")
        return self


class BalancingSettings(BaseModel):
    """The balancing loop: how its charging profiles look and how often they may change (K01, K03, K14)."""

    model_config = _MODEL
    enabled: bool = Field(default=True, description="balance the site's sessions with charging profiles")
    stack_level: int = Field(
        default=8, ge=0, le=1000, description="stack level of the controller's profiles; the CSMS must not use it"
    )
    profile_id_base: int = Field(
        default=900_000,
        ge=1,
        le=2_000_000_000,
        description="first of 2002 charging profile ids reserved for the controller; the CSMS must not use them",
    )
    recompute_interval_s: float = Field(default=10.0, ge=0.5, le=3600, description="reallocate at least this often (s)")
    hysteresis_amperes: float = Field(default=1.0, ge=0, le=32, description="smaller changes are not sent (A)")
    min_interval_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="per station, from its last profile change to an increase (decreases never wait) (s)",
    )
    resolution_amperes: Annotated[float, AfterValidator(_check_resolution)] = Field(
        default=0.1, description="limits are rounded down to this (A; 0.1 to 1, one decimal)"
    )
    forget_disconnected_after_s: float = Field(
        default=3600.0, ge=0, le=604_800, description="a station gone this long stops counting at its maximum (s)"
    )
    idle_current_amperes: float = Field(
        default=6.0,
        ge=0,
        le=80,
        description="what an idle EVSE's TxDefaultProfile offers where the sessions leave room, so an EV that "
        "plugs in can start at once; counted against the limits (A per phase; 0: nothing until its session)",
    )
    profile_validity_s: float = Field(
        default=3600.0,
        ge=120,
        le=604_800,
        description="validity (validTo) of every profile of the controller's, renewed at half of it: how long a "
        "station keeps the controller's limit once the controller is gone (s)",
    )
    decrease_lead_s: float = Field(
        default=15.0,
        ge=0,
        le=600,
        description="a scheduled limit drop (CSMS or EMS schedule) is allocated for this long ahead, so the "
        "stations have accepted their decreases when it comes (s)",
    )
    overdraw_margin_amperes: float = Field(
        default=2.0, ge=0.5, le=32, description="measured draw above an EVSE's limit by more than this is overdraw (A)"
    )
    overdraw_grace_s: float = Field(
        default=60.0,
        ge=5,
        le=3600,
        description="overdraw lasting this long makes the EVSE count at its draw, not trusted (s)",
    )
    observer_queue: int = Field(
        default=10_000, ge=100, le=1_000_000, description="relayed messages buffered for the loop (count)"
    )


class LogSettings(BaseModel):
    """What the controller logs and how."""

    model_config = _MODEL
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="least severe logged")
    format: Literal["text", "json"] = Field(default="text", description="one record per line, text or JSON")


class Settings(BaseModel):
    """The whole configuration file; every section is optional."""

    model_config = _MODEL
    controller: ControllerSettings = ControllerSettings()
    stations: StationsSettings = StationsSettings()
    csms: CsmsSettings = CsmsSettings()
    routing: RoutingSettings = RoutingSettings()
    http: HttpSettings = HttpSettings()
    state: StateSettings = StateSettings()
    firmware: FirmwareCacheSettings = FirmwareCacheSettings()
    ems: EmsSettings = EmsSettings()
    site: SiteConfig = SiteConfig()
    balancing: BalancingSettings = BalancingSettings()
    autonomy: AutonomySettings = AutonomySettings()
    log: LogSettings = LogSettings()
    meters: tuple[MeterSettings, ...] = Field(default=(), strict=False)  # [[meters]]: see meters/settings.py
    mqtt: MqttSettings = MqttSettings()  # [mqtt]: see mqtt/settings.py

    @model_validator(mode="after")
    def _meters_fit_the_site(self) -> Settings:
        for field, message in site_problems(self.meters, self.site)[:1]:
            raise _problem(message, field=field)
        return self

    @model_validator(mode="after")
    def _ports_do_not_clash(self) -> Settings:
        stations, http = self.stations.address, self.http.address
        hosts = {stations.host, http.host}
        if stations.port == http.port != 0 and (len(hosts) == 1 or hosts & {"0.0.0.0", "::"}):
            raise _problem(f"uses port {http.port}, like [stations] listen; pick another port", field="http.listen")
        return self

    @model_validator(mode="after")
    def _password_fits_the_profile(self) -> Settings:
        # Profile 3 authenticates the controller by its certificate; Basic auth belongs to 1 and 2 (A00).
        if self.controller.basic_auth_password is not None and self.csms.security.security_profile == 3:
            message = (
                "is not used with [csms.security] security_profile 3 (the client certificate identifies the "
                "controller): remove it"
            )
            raise _problem(message, field="controller.basic_auth_password")
        return self


_SECTIONS: dict[str, type[BaseModel]] = {
    name: info.annotation
    for name, info in Settings.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
}


class ConfigProblem(NamedTuple):
    """One thing wrong with the configuration."""

    location: str  # dotted key, e.g. "csms.url"; "" for the file as a whole
    message: str  # what is wrong and what is allowed, in plain words


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists everything wrong with it, in file order."""

    def __init__(self, problems: list[ConfigProblem], path: Path | None = None, source: str | None = None) -> None:
        self.path = path
        self.problems = list(problems)
        self.source = source if source is not None else str(path) if path is not None else "<config>"
        super().__init__(str(self))

    def __str__(self) -> str:
        """Every problem on its own line, as ``<file>: [section] key: message``."""
        lines = []
        for location, message in self.problems:
            # "stations.security.key_file" is key "key_file" of the TOML table [stations.security].
            section, _, key = location.rpartition(".") if "." in location else (location, "", "")
            where = f"[{section}] {key}: " if key else f"[{section}]: " if section in _SECTIONS else ""
            lines.append(f"{self.source}: {where}{message}")
        return "\n".join(lines)


def load_settings(path: Path) -> Settings:
    """Read and validate the TOML file at ``path``; raise ConfigError listing every problem."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        match = _TOML_POSITION.fullmatch(str(error))
        message = f"TOML syntax error at line {match[2]}, column {match[3]}: {match[1]}" if match else f"{error}"
        message += " (text needs double quotes)" if match and match[1] == "Invalid value" else ""
    except UnicodeDecodeError:
        message = "is not UTF-8 text"
    except FileNotFoundError:
        message = "file not found"
    except OSError as error:
        message = f"cannot read the file: {error.strerror or error}"
    else:
        return _validate(data, path, str(path))
    raise ConfigError([ConfigProblem("", message)], path)


def parse_settings(data: Mapping[str, Any], source: str = "<config>") -> Settings:
    """Validate already-parsed tables; raise ConfigError listing every problem."""
    return _validate(data, None, source)


def _validate(data: Mapping[str, Any], path: Path | None, source: str) -> Settings:
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as error:
        problems = [_translate(detail) for detail in error.errors(include_url=False)]
    raise ConfigError(problems, path, source)


_TYPE_WORDS = {"int_type": "a whole number", "float_type": "a number", "finite_number": "a finite number"}
_TYPE_WORDS |= {"string_type": "a string in quotes", "bool_type": "true or false"}
_BOUNDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "string_too_short", "string_too_long"}


def _translate(detail: ErrorDetails) -> ConfigProblem:
    """Turn one pydantic error into words an installer can act on."""
    loc = tuple(str(part) for part in detail["loc"])
    kind, got, ctx = detail["type"], detail["input"], detail.get("ctx", {})
    if kind == "config":
        return ConfigProblem(".".join((*loc, ctx["field"])), str(ctx["message"]))
    if kind == "value_error":
        message = str(ctx["error"])
    elif kind == "extra_forbidden":
        message = _unknown_key(loc, got)
    elif kind == "model_type":
        message = f"must be a table (a [{'.'.join(loc)}] section), got {_show(got)}"
    elif kind in _TYPE_WORDS:
        message = f"must be {_TYPE_WORDS[kind]}, got {_show(got)}"
    elif kind == "literal_error":
        message = f"must be one of {ctx['expected']}, got {_show(got)}"
    elif kind in _BOUNDS:
        message = _range(loc, got, ctx)
    else:  # a case this table does not foresee: pydantic's own words beat none
        message = f"{detail['msg']}, got {_show(got)}"
    return ConfigProblem(".".join(loc), message)


def _model_at(loc: tuple[str, ...]) -> type[BaseModel] | None:
    """The settings model of the table at ``loc`` (e.g. ("stations", "security")), if there is one."""
    model: type[BaseModel] | None = Settings
    for part in loc:
        info = model.model_fields.get(part) if model is not None else None
        annotation = info.annotation if info is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _unknown_key(loc: tuple[str, ...], got: object) -> str:
    key, section = loc[-1], _model_at(loc[:-1]) if len(loc) >= 2 else None
    known = list(section.model_fields) if section else list(_SECTIONS)
    guess = difflib.get_close_matches(key, known, n=1)
    homes = [name for name, other in _SECTIONS.items() if key in other.model_fields and other is not section]
    hint = f"; did you mean {guess[0]!r}?" if guess else f"; it belongs in [{homes[0]}]" if homes else ""
    if len(loc) > 1:
        return f"unknown key {key!r}{hint} (known keys: {', '.join(known)})"
    what = f"unknown section [{key}]" if isinstance(got, Mapping) else f"unknown key {key!r} outside any section"
    return f"{what}{hint} (known sections: {', '.join(known)})"


def _range(loc: tuple[str, ...], got: object, ctx: Mapping[str, Any] | None = None) -> str:
    """What values a bounded key allows, in words, from the field's own bounds (or the error's, deeper down)."""
    info = _SECTIONS[loc[0]].model_fields.get(loc[1]) if len(loc) == 2 and loc[0] in _SECTIONS else None
    unit = " seconds" if loc[-1].endswith("_s") else " bytes" if loc[-1].endswith("_bytes") else ""
    low = high = None
    for rule in info.metadata if info else []:
        low = rule.ge if isinstance(rule, Ge) else rule.min_length if isinstance(rule, MinLen) else low
        high = rule.le if isinstance(rule, Le) else rule.max_length if isinstance(rule, MaxLen) else high
    if info is None and ctx:
        # A key deeper in a table ([site.grid], [[site.stations]]): the error names the bound it broke.
        low = ctx.get("ge", ctx.get("gt", ctx.get("min_length")))
        high = ctx.get("le", ctx.get("lt", ctx.get("max_length")))
        if low is not None:
            return f"must be {'above' if 'gt' in ctx else 'at least'} {_show(low)}{unit}, got {_show(got)}"
        if high is not None:
            return f"must be {'below' if 'lt' in ctx else 'at most'} {_show(high)}{unit}, got {_show(got)}"
    shown = _show(got)
    if isinstance(got, str):
        unit, shown = " characters", f"{len(got)} characters"
    if low is not None and high is not None:
        return f"must be from {_show(low)} to {_show(high)}{unit}, got {shown}"
    if low is not None:
        return f"must be at least {_show(low)}{unit}, got {shown}"
    return f"must be at most {_show(high)}{unit}, got {shown}"


def _show(value: object) -> str:
    """A value as the installer wrote it in TOML."""
    if isinstance(value, bool | Mapping | list):
        return "a table" if isinstance(value, Mapping) else "a list" if isinstance(value, list) else str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return str(value)
