"""What the balancing loop knows of each station and EVSE, and how that is kept across a restart.

The records are plain mutable dataclasses owned by :class:`balancing.loop.Balancer`. :func:`encode` and
:func:`decode` turn one station's record into the msgpack-friendly form of the store and back. What is
kept is what the controller cannot learn again from the station at once: the EVSEs, their open
transactions, the most each EVSE may have installed (*including* a step that was in flight when the
controller stopped, so a crash inside the call window never leaves a belief that is too low), the phase
count of that profile, the validity of our profiles, and the CSMS's own profiles at the station.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import ValidationError

from .observe import Measurement
from .schedules import ChargingProfile

Purpose = Literal["TxProfile", "TxDefaultProfile"]
PURPOSES: tuple[Purpose, Purpose] = ("TxProfile", "TxDefaultProfile")


@dataclass
class EvseRecord:
    station_id: str
    evse_id: int
    default_amperes: float | None = None  # our TxDefaultProfile as the station accepted it (None: unknown)
    default_phases: int | None = None  # its numberPhases (None: every phase, or not known since a restart)
    transaction_id: str | None = None
    started_at: datetime | None = None
    charging_state: str | None = None
    priority: int = 0
    phases_used: int | None = None
    measured: Measurement | None = None
    underdraw_since_s: float | None = None
    overdraw_since_s: float | None = None
    served_since_s: float | None = None
    waiting_since_s: float = 0.0
    generation: int = 0  # grows when a transaction starts or ends: answers from before are stale
    tx_profile_accepted: bool = False  # a TxProfile of ours for the current transaction was accepted
    #: Per purpose, the validTo of the profile of ours the station last accepted.
    valid_until: dict[Purpose, datetime] = field(default_factory=dict)
    #: While a TxDefaultProfile of ours is sent under a running TxProfile: its limit and numberPhases.
    renewing_to: tuple[float, int | None] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.station_id, self.evse_id)

    @property
    def renewing(self) -> bool:
        """A TxDefaultProfile of ours is under way beside the running TxProfile (one call per EVSE)."""
        return self.renewing_to is not None

    @property
    def governing(self) -> Purpose:
        """Which profile of ours sets this EVSE's limit now."""
        return "TxProfile" if self.transaction_id is not None and self.tx_profile_accepted else "TxDefaultProfile"


@dataclass
class StationRecord:
    connections: int = 0
    disconnected_at_s: float | None = None
    evses: dict[int, EvseRecord] = field(default_factory=dict)
    transactions: dict[str, int] = field(default_factory=dict)  # transactionId -> evseId
    csms_profiles: dict[int, tuple[int, ChargingProfile]] = field(default_factory=dict)  # id -> (evse, profile)
    #: Forgotten (gone too long): kept in the store only so that our profiles can be cleared there later.
    forgotten: bool = False
    #: The OCPP version it speaks (the websocket subprotocol), when the router said.
    protocol: str | None = None
    #: False for a station that cannot be steered (a 1.6 one without SmartCharging), None while that is
    #: being asked: either way counted at its maximum and sent nothing.
    steerable: bool | None = True
    #: The station has said whether it can be steered (in this run); until then a 1.6 one is unknown.
    steerability_known: bool = False

    @property
    def connected(self) -> bool:
        return self.connections > 0


@dataclass(frozen=True, slots=True)
class StoredEvse:
    """One EVSE as the store gives it back: the record, and what it may have installed."""

    record: EvseRecord
    ceiling_amperes: float | None
    phases: int | None


def _optional_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError("a time without a time zone")
    return moment


def encode(station: StationRecord, ceilings: dict[int, tuple[float | None, int | None]]) -> dict[str, Any]:
    """The store's form of a station; ``ceilings`` gives per EVSE the most it may have installed and the
    phase count of that profile (``None``: unknown)."""
    evses = {}
    for evse_id, record in station.evses.items():
        ceiling, phases = ceilings.get(evse_id, (None, None))
        evses[str(evse_id)] = {
            "default": record.default_amperes,
            "tx": record.transaction_id,
            "started": None if record.started_at is None else record.started_at.isoformat(),
            "priority": record.priority,
            "phases": record.phases_used,
            "installed": ceiling,
            "installed_phases": phases,
            "valid": {purpose: moment.isoformat() for purpose, moment in record.valid_until.items()},
        }
    csms = [
        [evse_id, profile.model_dump(mode="json", by_alias=True, exclude_none=True)]
        for _, (evse_id, profile) in sorted(station.csms_profiles.items())
    ]
    stored: dict[str, Any] = {"evses": evses, "csms": csms}
    if station.forgotten:
        stored["forgotten"] = True
    return stored


def decode(station_id: str, stored: Any) -> tuple[StationRecord, list[StoredEvse]]:
    """A station from the store's form; KeyError, TypeError, ValueError or AttributeError if it is not that."""
    station = StationRecord(forgotten=bool(stored.get("forgotten")))
    evses: list[StoredEvse] = []
    for key, item in stored["evses"].items():
        evse_id = int(key)
        valid = item.get("valid") or {}
        record = EvseRecord(
            station_id,
            evse_id,
            default_amperes=_optional_float(item.get("default")),
            transaction_id=item.get("tx") if isinstance(item.get("tx"), str) else None,
            started_at=_time(item.get("started")),
            priority=int(item.get("priority") or 0),
            phases_used=item.get("phases") if item.get("phases") in (1, 2, 3) else None,
            valid_until={purpose: moment for purpose in PURPOSES if (moment := _time(valid.get(purpose))) is not None},
        )
        station.evses[evse_id] = record
        if record.transaction_id is not None:
            station.transactions[record.transaction_id] = evse_id
        phases = item.get("installed_phases")
        evses.append(
            StoredEvse(record, _optional_float(item.get("installed")), phases if phases in (1, 2, 3) else None)
        )
    for evse_id, raw in stored.get("csms") or []:
        try:
            profile = ChargingProfile.model_validate(raw)
        except ValidationError as error:
            raise ValueError(f"a CSMS profile: {error.errors()[0]['msg']}") from None
        station.csms_profiles[profile.id] = (int(evse_id), profile)
    return station, evses
