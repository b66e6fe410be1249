"""``[http]`` and ``[ems]``: the HTTP server (EMS API, admin API, metrics) and what an EMS may set through it."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, SecretStr, model_validator

from .values import MODEL, ListenAddress, ListenText, parse_listen_address, problem, show_toml

_TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")  # printable ASCII without spaces: it travels in a header


class HttpSettings(BaseModel):
    """The HTTP server for the EMS API, admin API and metrics."""

    model_config = MODEL
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
            raise problem("must be 16 to 4096 printable ASCII characters without spaces", field="token")
        if token is None and not self.address.is_loopback:
            message = "serving beyond loopback needs [http] token (the EMS and admin API must not be open)"
            raise problem(message, field="listen")
        return self


class EmsSettings(BaseModel):
    """Site limits set by an energy-management system through the EMS API (K14)."""

    model_config = MODEL
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
                f"must not exceed [ems] max_current_amperes ({show_toml(self.max_current_amperes)}), "
                f"got {show_toml(self.failsafe_current_amperes)}"
            )
            raise problem(message, field="failsafe_current_amperes")
        return self
