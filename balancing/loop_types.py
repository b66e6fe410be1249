"""The balancing loop's vocabulary: how a call ends, what it calls and stores through, its settings, and
the state its parts share (:class:`LoopCore`, the base of :class:`balancing.loop.Balancer` and of the
parts split out of it: :mod:`balancing.sessions`, :mod:`balancing.renewal`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from .allocator import Allocation
from .overdraw import OverdrawPolicy
from .records import EvseRecord, Purpose, StationRecord
from .report import BalancingMetrics
from .rollout import RolloutPolicy, RolloutState
from .site import SiteConfig
from .station_profiles import CsmsProfiles

log = logging.getLogger("ocpp_lc.balancing")

#: Highest EVSE id the profile id scheme leaves room for (the site model's bound too).
MAX_EVSE_ID = 1000
#: chargingSchedule ids are a separate number space; ours mirror the profile id.
PROFILE_ID_SPAN = 2 * MAX_EVSE_ID + 2


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """How a call to a station ended: ``answered`` (payload is the CALLRESULT), ``error`` (a
    CALLERROR), ``timeout``, or ``gone`` (the station's link closed or never was)."""

    status: Literal["answered", "error", "timeout", "gone"]
    payload: Mapping[str, Any] | None = None
    detail: str = ""


class BalancerState(Protocol):
    """Where the loop keeps what it knows of each station across restarts (a store namespace)."""

    def put_many(self, items: Mapping[str, Any]) -> None: ...

    def delete(self, key: str) -> bool: ...

    def items(self) -> dict[str, Any]: ...


class Caller(Protocol):
    """Sends one CALL of the controller's own to a station (the router's LC-call API)."""

    async def __call__(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome: ...


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """The loop's knobs (``[balancing]`` in the configuration)."""

    stack_level: int = 8
    profile_id_base: int = 900_000
    recompute_interval_s: float = 10.0
    #: A station gone for this long is forgotten (its EVSEs stop counting at their maximum).
    forget_disconnected_after_s: float = 3600.0
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)
    #: Every profile of ours is valid this long from when it is sent, and renewed at half of it.
    profile_validity_s: float = 3600.0
    #: Scheduled limit drops are allocated for this long ahead, so decreases are in force when they come.
    decrease_lead_s: float = 0.0
    overdraw: OverdrawPolicy = field(default_factory=OverdrawPolicy)

    def profile_id(self, evse_id: int, purpose: Purpose) -> int:
        return self.profile_id_base + 2 * evse_id + (1 if purpose == "TxDefaultProfile" else 0)

    def is_ours(self, profile_id: int) -> bool:
        return self.profile_id_base <= profile_id < self.profile_id_base + PROFILE_ID_SPAN


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class LoopCore:
    """What the parts of the loop share; :class:`balancing.loop.Balancer` sets it all up."""

    site: SiteConfig
    settings: LoopSettings
    rollout: RolloutState
    allocation: Allocation
    metrics: BalancingMetrics
    _stations: dict[str, StationRecord]
    _dirty: set[str]
    _wall: Callable[[], datetime]
    _csms: CsmsProfiles

    def wake(self) -> None:
        raise NotImplementedError

    def _answered(self, key: tuple[str, int], accepted: bool) -> None:
        raise NotImplementedError

    def _records(self) -> Iterator[EvseRecord]:
        raise NotImplementedError

    def _station(self, station_id: str) -> StationRecord:
        raise NotImplementedError

    def _evse(self, station_id: str, evse_id: int) -> EvseRecord:
        raise NotImplementedError

    def _connected(self, station_id: str, station: StationRecord) -> bool:
        raise NotImplementedError

    async def _call(self, station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        raise NotImplementedError

    def profile_payload(
        self,
        record: EvseRecord,
        purpose: Purpose,
        amperes: float,
        valid_to: datetime | None = None,
        phases: int | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    def _default_in_force(self, record: EvseRecord) -> float | None:
        raise NotImplementedError

    def _measured_amperes(self, record: EvseRecord) -> float | None:
        raise NotImplementedError

    def _default_phases(self, record: EvseRecord) -> int | None:
        raise NotImplementedError


def reason_code(status_info: Any) -> str | None:
    """The reasonCode of a statusInfo (None where there is none or it is malformed)."""
    if isinstance(status_info, dict):
        reason = status_info.get("reasonCode")
        return reason if isinstance(reason, str) else None
    return None
