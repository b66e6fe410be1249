"""``[balancing]``: how the balancing loop's charging profiles look and how often they may change."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field

from .values import MODEL, show_toml


def _check_resolution(resolution_amperes: float) -> float:
    # A charging schedule's limit carries at most one decimal (Part 2, ChargingSchedulePeriodType), so
    # the limits the controller rounds to must be whole tenths of an ampere (#11.9).
    tenths = resolution_amperes * 10
    if not 1 <= tenths <= 10 or abs(tenths - round(tenths)) > 1e-9:
        raise ValueError(
            "must be from 0.1 to 1 A with at most one decimal (0.1, 0.5, 1 ...: OCPP charging schedule "
            f"limits carry at most one decimal), got {show_toml(resolution_amperes)}"
        )
    return resolution_amperes


class BalancingSettings(BaseModel):
    """The balancing loop: how its charging profiles look and how often they may change (K01, K03, K14)."""

    model_config = MODEL
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
    child_process_from_evses: int = Field(
        default=200,
        ge=0,
        le=1_000_000,
        description="from this many EVSEs on, each balancing round is computed in a forked child process, so "
        "relaying never waits for it (count; 0: never, every round on the event loop)",
    )
    child_process_timeout_s: float = Field(
        default=5.0,
        ge=0.5,
        le=120,
        description="a child process that has not answered a round by then is ended and the round is computed "
        "on the event loop (s)",
    )
