"""The ``[mqtt]`` configuration: which broker, as whom, how securely, under which topics.

MQTT is off unless ``host`` is set. The password is given inline (``password``) or, better, in a file
only the service can read (``password_file``, e.g. a systemd credential); it is never echoed in an
error, a log line or ``ocpp-lc status``. TLS verifies the broker's certificate (against ``ca_file`` or
the system's CAs) and its host name unless ``tls_verify = false`` (a test broker only).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_core import PydanticCustomError

from router.settings.values import check_readable_file

_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
#: A topic prefix: MQTT levels without wildcards, no leading or trailing '/'.
_PREFIX = re.compile(r"[^/#+\x00]+(/[^/#+\x00]+)*")
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SOURCE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _problem(message: str, field: str) -> PydanticCustomError:
    # The "config" error type is how router/config.py reports a problem under a key of this table.
    return PydanticCustomError("config", "{message}", {"message": message, "field": field})


def _prefix(text: str) -> str:
    if not _PREFIX.fullmatch(text):
        raise ValueError(f"must be MQTT topic levels separated by '/', without '+', '#' or a leading '/', got {text!r}")
    return text


def _client_id(text: str) -> str:
    if not _CLIENT_ID.fullmatch(text):
        raise ValueError(f"must be 1 to 64 letters, digits, '_', '-' or '.', got {text!r}")
    return text


def _sources(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        if not _SOURCE.fullmatch(value):
            raise ValueError(f"each source must be 1 to 64 letters, digits, '_', '-' or '.', got {value!r}")
    return values


PathText = Annotated[str, AfterValidator(check_readable_file)]


class MqttSettings(BaseModel):
    """The ``[mqtt]`` table; see the module docstring and the README's "EMS over MQTT" section."""

    model_config = _MODEL
    host: str | None = Field(
        default=None, min_length=1, max_length=253, description="broker host name or address (unset: MQTT off)"
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="broker port (default 1883, or 8883 with TLS)")
    client_id: Annotated[str, AfterValidator(_client_id)] = Field(
        default="ocpp-lc", description="MQTT client id (unique on the broker)"
    )
    username: str | None = Field(default=None, min_length=1, max_length=256, description="user name at the broker")
    password: SecretStr | None = Field(default=None, description="password (prefer password_file)")
    password_file: PathText | None = Field(
        default=None, max_length=4096, description="file holding the password (absolute path; trailing newline dropped)"
    )
    tls: bool = Field(default=False, description="connect with TLS")
    ca_file: PathText | None = Field(
        default=None, max_length=4096, description="CA certificates (PEM) the broker must chain to; default: system CAs"
    )
    cert_file: PathText | None = Field(default=None, max_length=4096, description="client certificate (PEM)")
    key_file: PathText | None = Field(default=None, max_length=4096, description="client private key (PEM)")
    tls_verify: bool = Field(default=True, description="verify the broker's certificate and host name")
    topic_prefix: Annotated[str, AfterValidator(_prefix)] = Field(
        default="ocpp-lc", max_length=200, description="first levels of every topic"
    )
    sources: Annotated[tuple[str, ...], AfterValidator(_sources)] = Field(
        default=(), strict=False, max_length=16, description="EMS sources accepted over MQTT (empty: any name)"
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive (seconds)")
    connect_timeout_s: float = Field(default=10.0, ge=1, le=120, description="TCP, TLS and CONNACK time (seconds)")
    reconnect_min_s: float = Field(default=1.0, ge=0.1, le=600, description="first reconnect wait (seconds)")
    reconnect_max_s: float = Field(default=60.0, ge=0.1, le=3600, description="longest reconnect wait (seconds)")
    status_min_interval_s: float = Field(
        default=2.0, ge=0.1, le=3600, description="status published at most this often on change (seconds)"
    )
    status_interval_s: float = Field(
        default=60.0, ge=1, le=86_400, description="status published at least this often (seconds)"
    )

    @property
    def enabled(self) -> bool:
        """True once a broker is configured."""
        return self.host is not None

    @property
    def broker_port(self) -> int:
        """The configured port, or MQTT's default for the transport."""
        return self.port if self.port is not None else 8883 if self.tls else 1883

    def password_value(self) -> str | None:
        """The password in clear text (read from ``password_file`` when that is set), or None."""
        if self.password_file is not None:
            return Path(self.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        return None if self.password is None else self.password.get_secret_value()

    @model_validator(mode="after")
    def _consistent(self) -> MqttSettings:
        if self.password is not None and self.password_file is not None:
            raise _problem("give password or password_file, not both", field="password_file")
        if (self.password is not None or self.password_file is not None) and self.username is None:
            raise _problem("a password needs a username", field="username")
        if (self.cert_file is None) != (self.key_file is None):
            raise _problem("cert_file and key_file go together", field="key_file")
        if not self.tls and any(value is not None for value in (self.ca_file, self.cert_file, self.key_file)):
            raise _problem("ca_file, cert_file and key_file need tls = true", field="tls")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise _problem("must not be below reconnect_min_s", field="reconnect_max_s")
        if self.status_min_interval_s > self.status_interval_s:
            raise _problem("must not be below status_min_interval_s", field="status_interval_s")
        if self.password_file is not None:
            try:
                text = Path(self.password_file).read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError):
                raise _problem("cannot be read as UTF-8 text", field="password_file") from None
            if not text:  # never echo the content: messages reach logs
                raise _problem("is empty", field="password_file")
        return self
