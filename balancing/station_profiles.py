"""The CSMS's own charging profiles at the stations, as the balancing loop sees them in relayed traffic.

The CSMS may set TxProfiles and TxDefaultProfiles on a station through the controller. Once the station
accepted one, it caps our limit for that EVSE (ours sits at a higher stack level and so replaces theirs,
and therefore must only ever restrict further), or, where it outranks ours, makes that EVSE *governed*
by the CSMS: counted at the CSMS's limit (or its maximum) and not sent to. A CSMS request that touches
our reserved ids or stack level makes our profiles there unknown until the station accepts ours again
(counted as a conflict). These profiles are part of the station's record, so they survive a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import Counter
from pydantic import ValidationError

from .allocator import EvseKey
from .records import EvseRecord, StationRecord
from .rollout import RolloutState
from .schedules import ChargingProfile, leading_limit, limit_at

log = logging.getLogger("ocpp_lc.balancing")


class OurProfiles(Protocol):
    """What this module needs of the loop's settings."""

    @property
    def stack_level(self) -> int: ...

    @property
    def profile_id_base(self) -> int: ...

    def is_ours(self, profile_id: int) -> bool: ...


class CsmsProfiles:
    """Reads the CSMS's SetChargingProfile / ClearChargingProfile that stations accepted; see the module docstring."""

    def __init__(self, settings: OurProfiles, rollout: RolloutState, conflicts: Counter, ignored: Counter) -> None:
        self._settings = settings
        self._rollout = rollout
        self._conflicts = conflicts
        self._ignored = ignored

    def on_set(self, station_id: str, station: StationRecord, request: Mapping[str, Any]) -> bool:
        """A SetChargingProfile of the CSMS the station accepted; True if the allocation may change."""
        evse_id = request.get("evseId")
        try:
            profile = ChargingProfile.model_validate(request.get("chargingProfile"))
        except ValidationError:
            self._ignored.labels("SetChargingProfile").inc()
            return False
        if not isinstance(evse_id, int) or isinstance(evse_id, bool):
            return False
        ours = self._settings.stack_level
        if self._settings.is_ours(profile.id) or profile.stack_level == ours:
            self.conflict(station_id, station, evse_id, f"SetChargingProfile id {profile.id}")
        elif profile.stack_level > ours:
            self._conflicts.inc()
            log.warning(
                "[%s] the CSMS's %s at stack level %d outranks the controller's (%d): that EVSE counts at the "
                "CSMS's limit or its maximum and is not steered",
                station_id,
                profile.charging_profile_purpose,
                profile.stack_level,
                ours,
            )
        if profile.charging_profile_purpose in ("TxProfile", "TxDefaultProfile"):
            station.csms_profiles[profile.id] = (evse_id, profile)
            return True
        return False

    def on_clear(self, station_id: str, station: StationRecord, request: Mapping[str, Any]) -> None:
        """A ClearChargingProfile of the CSMS the station accepted."""
        profile_id = request.get("chargingProfileId")
        criteria = request.get("chargingProfileCriteria")
        criteria = criteria if isinstance(criteria, Mapping) else {}
        evse_id = criteria.get("evseId")
        purpose = criteria.get("chargingProfilePurpose")
        stack_level = criteria.get("stackLevel")
        if isinstance(profile_id, int):
            station.csms_profiles.pop(profile_id, None)
            may_touch_ours = self._settings.is_ours(profile_id)
        else:
            for known_id, (known_evse, profile) in list(station.csms_profiles.items()):
                if (
                    (evse_id is None or evse_id == known_evse)
                    and (purpose is None or purpose == profile.charging_profile_purpose)
                    and (stack_level is None or stack_level == profile.stack_level)
                ):
                    del station.csms_profiles[known_id]
            may_touch_ours = purpose in (None, "TxProfile", "TxDefaultProfile") and stack_level in (
                None,
                self._settings.stack_level,
            )
        if may_touch_ours:
            self.conflict(station_id, station, evse_id if isinstance(evse_id, int) else None, "ClearChargingProfile")

    def conflict(self, station_id: str, station: StationRecord, evse_id: int | None, what: str) -> None:
        """The CSMS may have replaced or removed our profiles: they are unknown until accepted again."""
        self._conflicts.inc()
        log.warning(
            "[%s] the CSMS's %s touches the controller's profiles (ids from %d, stack level %d): re-installing them",
            station_id,
            what,
            self._settings.profile_id_base,
            self._settings.stack_level,
        )
        for record in station.evses.values():
            if evse_id in (None, 0, record.evse_id):
                record.default_amperes = None
                record.valid_until.clear()
                self._rollout.installed(record.key, None)

    @staticmethod
    def transaction_ended(station: StationRecord, transaction_id: str | None) -> None:
        """A TxProfile ends with its transaction (K01): the CSMS's too."""
        for profile_id, (_, profile) in list(station.csms_profiles.items()):
            if profile.charging_profile_purpose == "TxProfile" and profile.transaction_id == transaction_id:
                del station.csms_profiles[profile_id]

    def cap(self, station: StationRecord, record: EvseRecord, wall: datetime, voltage_volts: float) -> float | None:
        """The CSMS's limit on one EVSE now, as the station converts it; None where the CSMS sets none."""
        if not station.csms_profiles:
            return None
        tx = [
            profile
            for _, profile in station.csms_profiles.values()
            if profile.charging_profile_purpose == "TxProfile" and profile.transaction_id == record.transaction_id
        ]
        found = leading_limit(tx, wall, record.started_at)
        if found is None:
            # One pool: an EVSE's own TxDefaultProfile and one for every EVSE (0) compete by stack level.
            defaults = [
                profile
                for evse, profile in station.csms_profiles.values()
                if evse in (record.evse_id, 0) and profile.charging_profile_purpose == "TxDefaultProfile"
            ]
            found = leading_limit(defaults, wall, record.started_at)
        if found is None:
            return None
        # As the station converts it (K01.FR.50: W over numberPhases, 3 when absent).
        return found.amperes(voltage_volts)

    def governed(self, stations: Iterable[StationRecord], wall: datetime) -> set[EvseKey]:
        """EVSEs where a CSMS profile, not ours, sets the limit: counted at it (or their maximum), not sent to.

        A CSMS TxProfile for the transaction outranks any TxDefaultProfile, so it governs until a TxProfile
        of ours is accepted, and for good if its stack level is above ours (K01.FR.17); a CSMS
        TxDefaultProfile above our stack level governs an EVSE without a TxProfile of ours.
        """
        result: set[EvseKey] = set()
        ours = self._settings.stack_level
        for station in stations:
            if not station.csms_profiles:
                continue
            for record in station.evses.values():
                for evse, profile in station.csms_profiles.values():
                    purpose = profile.charging_profile_purpose
                    if purpose == "TxProfile":
                        mine = record.transaction_id is not None and profile.transaction_id == record.transaction_id
                        governs = mine and (profile.stack_level > ours or not record.tx_profile_accepted)
                    else:
                        governs = (
                            evse in (0, record.evse_id)
                            and profile.stack_level > ours
                            and not record.tx_profile_accepted
                        )
                    if governs and limit_at(profile, wall, record.started_at) is not None:
                        result.add(record.key)
                        applied = self._rollout.evses.get(record.key)
                        if applied is not None and (applied.confirmed or applied.in_flight_amperes is not None):
                            self._rollout.installed(record.key, None)
                        break
        return result
