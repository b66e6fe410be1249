"""What the demo prints when it ends: the run as the controller saw it, in a few lines."""

from __future__ import annotations

from dataclasses import dataclass, field

from .building_meter import BuildingRecord
from .ems_script import EmsEvent
from .outage import OutageRecord
from .sandbox_csms import FirmwareProgress
from .settings import FIRMWARE_NAME
from .view import format_bytes


def _per_phase(amperes: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.0f}" for value in amperes) + " A"


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What happened during a demo run, as the controller saw it."""

    stations: int
    booted: tuple[str, ...]
    transactions_started: int
    transactions_ended: int
    meter_samples: int
    csms_calls_relayed: int
    csms_calls_answered: int
    frames_station_to_csms: int
    frames_csms_to_station: int
    payload_bytes: int
    wire_bytes: int
    energy_wh: float
    errors: int
    station_closes: dict[int, int]  # close code the stations' connections ended with → count
    duration_s: float
    observations_missed: int = 0  # events the view lost because it fell behind (it never slows the router)
    site_limit: str = "-"  # the configured grid limit, as the view shows it
    profiles: dict[str, int] = field(default_factory=dict)  # balancing's SetChargingProfile by outcome
    ems_events: tuple[EmsEvent, ...] = ()
    firmware: FirmwareProgress = field(default_factory=FirmwareProgress)
    firmware_name: str = FIRMWARE_NAME
    outage: OutageRecord | None = None
    building: BuildingRecord | None = None

    def lines(self) -> list[str]:
        """The summary as printed at the end of the demo (fits 80 columns)."""
        closes = ", ".join(f"{count} with {code}" for code, count in sorted(self.station_closes.items())) or "none"
        in_progress = self.transactions_started - self.transactions_ended
        lines = [
            f"ocpp-lc demo summary ({self.duration_s:.0f} s)",
            f"  stations      {self.stations} simulated, {len(self.booted)} booted through the controller",
            f"  shutdown      station connections closed: {closes}",
            f"  transactions  {self.transactions_started} started, {self.transactions_ended} ended "
            f"({in_progress} in progress at shutdown)",
            f"  meter values  {self.meter_samples} samples relayed",
            f"  relayed       station → CSMS {self.frames_station_to_csms} messages, "
            f"CSMS → station {self.frames_csms_to_station}",
            f"  bytes         {format_bytes(self.payload_bytes)} of OCPP-J, "
            f"{format_bytes(self.wire_bytes)} on the wire",
            f"  CSMS calls    {self.csms_calls_relayed} relayed to stations, {self.csms_calls_answered} answered",
            f"  energy        {self.energy_wh / 1000:.3f} kWh delivered",
            f"  balancing     site limit {self.site_limit}; {self.profiles.get('sent', 0)} charging profiles "
            f"sent, {self.profiles.get('accepted', 0)} accepted",
        ]
        for event in self.ems_events:
            lines.append(f"  EMS           {event.action} at {event.at_s:.0f} s: {event.limit}")
            if event.settled_s is None:
                lines.append("                the stations did not follow in time")
            elif event.action == "lowered":
                peak = event.peak_drawn_amperes
                lines.append(
                    f"{'':16}stations within it after {event.settled_s:.1f} s"
                    + ("" if peak is None else f", drew at most {_per_phase(peak)} until released")
                )
            else:
                allowed = _per_phase(event.committed_amperes)
                lines.append(f"{'':16}stations allowed {allowed} again after {event.settled_s:.1f} s")
        firmware = self.firmware
        if firmware.publish_answer is not None:
            lines.append(
                f"  firmware      {self.firmware_name}: publish {firmware.publish_status or firmware.publish_answer}"
                + "".join(f"; {station} {status}" for station, status in sorted(firmware.station_status.items()))
            )
        if self.outage is not None:
            lines.extend(self.outage.lines())
        if self.building is not None:
            lines.extend(self.building.lines())
        lines.append(f"  errors        {self.errors}")
        if self.observations_missed:
            lines.append(f"  (the view missed {self.observations_missed} observations: the figures above undercount)")
        return lines
