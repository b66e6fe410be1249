"""A small, pure simulation of a site over time: the limit sources, the sessions and the allocator.

Theory of operation: :class:`Simulation` holds what the balancing loop will hold (sessions observed
from TransactionEvent and MeterValues, the CSMS's site profiles, the EMS limit with its validity, the
stations that reject our profiles) and applies timestamped events to it. :meth:`Simulation.allocate`
computes the limits in force (the lowest of configuration, the CSMS's composite schedule and the EMS
limit, or the EMS failsafe once the EMS limit has gone stale) and runs the allocator, then keeps the
per-session bookkeeping the allocator reads (underdraw timers, turns). It does no I/O and reads no
clock: time is the ``now_s`` the caller passes, seconds after ``start``.

It drives the golden scenario files (tests/scenarios/balancing/) and is the reference the loop's
bookkeeping follows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from .allocator import Allocation, EvseKey, Session, SiteLimits, allocate, turn_after, underdraw_since
from .schedules import ChargingProfile, composite_limit_at
from .site import SiteConfig


@dataclass(frozen=True, slots=True)
class EmsLimit:
    """A limit set by the EMS; stale from ``valid_until_s`` on (``None``: until released)."""

    limits: SiteLimits
    valid_until_s: float | None


@dataclass(frozen=True, slots=True)
class LimitsInForce:
    """The site limit at an instant and where each part came from (for status and metrics)."""

    limits: SiteLimits
    csms: SiteLimits | None
    ems: SiteLimits | None
    ems_stale: bool


class EventError(ValueError):
    """An event names something that does not exist or carries a value that makes no sense."""


class Simulation:
    """Site state driven by events; see the module docstring."""

    def __init__(self, site: SiteConfig, start: datetime, ems_failsafe: SiteLimits | None = None) -> None:
        self.site = site
        self.start = start
        self.ems_failsafe = ems_failsafe if ems_failsafe is not None else SiteLimits()
        self.sessions: dict[EvseKey, Session] = {}
        self.csms_profiles: dict[int, ChargingProfile] = {}
        self.ems: EmsLimit | None = None
        self.rejecting: set[str] = set()
        self.last = Allocation(evses={})

    # --- limits ---------------------------------------------------------------------------------

    def limits_at(self, now_s: float) -> LimitsInForce:
        """The lowest of the CSMS's composite site limit and the EMS's (or its failsafe if stale)."""
        voltage = self.site.nominal_voltage_volts
        csms: SiteLimits | None = None
        composite = composite_limit_at(self.csms_profiles.values(), self.start + timedelta(seconds=now_s), voltage)
        if composite is not None:
            if composite.unit == "A":
                csms = SiteLimits.uniform(current_amperes=composite.limit)
            else:
                csms = SiteLimits(power_watts=composite.limit)
        ems: SiteLimits | None = None
        stale = False
        if self.ems is not None:
            stale = self.ems.valid_until_s is not None and now_s >= self.ems.valid_until_s
            ems = self.ems_failsafe if stale else self.ems.limits
        limits = SiteLimits()
        for source in (csms, ems):
            if source is not None:
                limits = limits.tighter(source)
        return LimitsInForce(limits=limits, csms=csms, ems=ems, ems_stale=stale)

    # --- events ---------------------------------------------------------------------------------

    def apply(self, event: Mapping[str, Any], now_s: float) -> None:
        """Apply one event (a scenario file's dict); raises EventError for a malformed one."""
        kind = event.get("type")
        handler = self._handlers.get(str(kind))
        if handler is None:
            raise EventError(f"unknown event type {kind!r}")
        handler(self, event, now_s)

    def _key(self, event: Mapping[str, Any]) -> EvseKey:
        return (str(event["station"]), int(event.get("evse", 1)))

    def _session(self, event: Mapping[str, Any]) -> Session:
        found = self.sessions.get(self._key(event))
        if found is None:
            raise EventError(f"no session on {self._key(event)}")
        return found

    def _arrive(self, event: Mapping[str, Any], now_s: float) -> None:
        station_id, evse_id = self._key(event)
        self.sessions[(station_id, evse_id)] = Session(
            station_id=station_id,
            evse_id=evse_id,
            transaction_id=event.get("transaction_id"),
            priority=int(event.get("priority", 0)),
            phases_used=event.get("phases"),
            compliant=station_id not in self.rejecting,
            waiting_since_s=now_s,
        )

    def _depart(self, event: Mapping[str, Any], now_s: float) -> None:
        self.sessions.pop(self._key(event), None)

    def _meter(self, event: Mapping[str, Any], now_s: float) -> None:
        session = self._session(event)
        measured = float(event["current_amperes"])
        offered = self.last.current_amperes(session.station_id, session.evse_id)
        since = underdraw_since(measured, offered, session.underdraw_since_s, now_s, self.site.policy)
        self.sessions[session.key] = dataclasses.replace(
            session, measured_current_amperes=measured, underdraw_since_s=since
        )

    def _priority(self, event: Mapping[str, Any], now_s: float) -> None:
        session = self._session(event)
        self.sessions[session.key] = dataclasses.replace(session, priority=int(event["priority"]))

    def _phases(self, event: Mapping[str, Any], now_s: float) -> None:
        session = self._session(event)
        self.sessions[session.key] = dataclasses.replace(session, phases_used=int(event["phases"]))

    def _ems_set(self, event: Mapping[str, Any], now_s: float) -> None:
        limits = SiteLimits.uniform(event.get("current_amperes"), event.get("power_watts"))
        valid_for_s = event.get("valid_for_s")
        self.ems = EmsLimit(limits, None if valid_for_s is None else now_s + float(valid_for_s))

    def _ems_release(self, event: Mapping[str, Any], now_s: float) -> None:
        self.ems = None

    def _csms_profile(self, event: Mapping[str, Any], now_s: float) -> None:
        profile = ChargingProfile.model_validate(event["profile"])
        if profile.charging_profile_purpose != "ChargingStationMaxProfile":
            raise EventError("only a ChargingStationMaxProfile sets the site limit")
        self.csms_profiles[profile.id] = profile

    def _csms_clear(self, event: Mapping[str, Any], now_s: float) -> None:
        if "id" in event:
            self.csms_profiles.pop(int(event["id"]), None)
        else:
            self.csms_profiles.clear()

    def _set_compliance(self, event: Mapping[str, Any], now_s: float) -> None:
        station_id = str(event["station"])
        compliant = event["type"] == "station_accepts"
        if compliant:
            self.rejecting.discard(station_id)
        else:
            self.rejecting.add(station_id)
        for key, session in self.sessions.items():
            if session.station_id == station_id:
                self.sessions[key] = dataclasses.replace(session, compliant=compliant)

    _handlers: Mapping[str, Any] = {
        "arrive": _arrive,
        "depart": _depart,
        "meter": _meter,
        "priority": _priority,
        "phases": _phases,
        "ems_set": _ems_set,
        "ems_release": _ems_release,
        "csms_profile": _csms_profile,
        "csms_clear": _csms_clear,
        "station_rejects": _set_compliance,
        "station_accepts": _set_compliance,
    }

    # --- allocation -----------------------------------------------------------------------------

    def allocate(self, now_s: float) -> Allocation:
        """Allocate at ``now_s`` and update the turn bookkeeping of every session."""
        limits = self.limits_at(now_s).limits
        allocation = allocate(self.site, limits, self.sessions.values(), now_s)
        for key, session in self.sessions.items():
            served_since, waiting_since = turn_after(
                allocation.current_amperes(*key) > 0, session.served_since_s, session.waiting_since_s, now_s
            )
            self.sessions[key] = dataclasses.replace(
                session, served_since_s=served_since, waiting_since_s=waiting_since
            )
        self.last = allocation
        return allocation
