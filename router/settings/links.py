"""``[stations]``, ``[csms]`` and ``[routing]``: the websocket links on both sides and how calls are relayed."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, model_validator

from ..tls import CsmsTlsSettings, StationTlsSettings
from .values import (
    MODEL,
    ListenAddress,
    ListenText,
    PingInterval,
    check_url,
    parse_listen_address,
    parse_ws_url,
    problem,
)


def _check_station_path(path: str) -> str:
    if not path.startswith("/") or path.endswith("/") or any(char in path for char in "?# \t"):
        raise ValueError(
            "must start with '/', not end with '/' and have no '?', '#' or spaces "
            f"(stations connect to '<path>/<id>'), e.g. '/ocpp', got {path!r}"
        )
    return path


class StationsSettings(BaseModel):
    """The websocket server that charging stations connect to."""

    model_config = MODEL
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

    model_config = MODEL
    url: Annotated[str, AfterValidator(check_url)] = Field(
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
            raise problem(f"security_profile {profile} needs a {wanted} URL, got {self.url!r}", field="url")
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

    model_config = MODEL
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
