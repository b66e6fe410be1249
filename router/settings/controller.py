"""``[controller]`` and ``[log]``: who the controller is towards the CSMS, and what it logs."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, SecretStr, model_validator

from ..own.device_model import PASSWORD_STRING
from .values import MODEL, problem

# identifierString (OCPP 2.0.1 Part 2 §2.1.2) minus ':', which separates user and password in the
# HTTP Basic credentials the controller presents to the CSMS.
_IDENTITY = re.compile(r"[A-Za-z0-9*\-_=+|@.]+")


def _check_identity(identity: str) -> str:
    if ":" in identity:
        raise ValueError(f"must not contain ':' (it separates user and password in HTTP Basic), got {identity!r}")
    if not _IDENTITY.fullmatch(identity):
        raise ValueError(f"may contain only letters, digits and *-_=+|@. , got {identity!r}")
    return identity


class ControllerSettings(BaseModel):
    """Who the controller is towards the CSMS: its own identity, a charging station without EVSEs.

    The timing values are the device model's defaults (OCPPCommCtrlr, Part 2 appendix): once the CSMS
    sets one with SetVariables, the stored value wins over the file.
    """

    model_config = MODEL
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
            raise problem(message, field="basic_auth_password")
        return self


class LogSettings(BaseModel):
    """What the controller logs and how."""

    model_config = MODEL
    level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="least severe logged")
    format: Literal["text", "json"] = Field(default="text", description="one record per line, text or JSON")
