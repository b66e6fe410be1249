"""What the demo shows: a model of the site built from what the router observed, and its renderings.

Theory of operation: :class:`SiteModel` is fed every :class:`~router.observers.Observation` the
ObserverHub publishes (the same stream balancing and the status API read) and keeps, per station,
what a site operator wants to see: connector status, link, charging state, current per phase,
energy, messages relayed. It never looks at the simulators, so the demo shows what really went
through the controller. Balancing comes from the controller itself: :func:`site_balance` condenses
``App.status()`` (the limit in force per phase and its source, what the balancing loop committed,
allocated and installed per EVSE) into a :class:`SiteBalance` for the view.
:meth:`SiteModel.apply` returns the notable events as sentences, for the line-by-line output;
:func:`render_live` turns the model into the lines of one full-screen frame. Everything here is
synchronous and pure apart from reading the clock it is given.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from prometheus_client import CollectorRegistry

from ..metrics import RouterMetrics
from ..observers import LinkEvent, Observation, ObservedMessage, RawFrame
from ..ocppj import MessageType, is_lc_message_id

#: Recent messages kept for the live view (it shows as many as fit).
RECENT_MESSAGES: Final = 100

_ENERGY_UNITS: Final = {"Wh": 1.0, "kWh": 1000.0}


@dataclass
class StationRow:
    """One station as the router saw it."""

    station_id: str
    connected: bool = False
    booted: bool = False
    connector_status: str = "-"
    charging_state: str = "-"
    transaction_id: str | None = None
    currents_amperes: tuple[float, ...] = ()
    register_start_wh: float | None = None
    register_wh: float | None = None
    delivered_wh: float = 0.0  # sessions that ended
    messages: int = 0

    @property
    def session_wh(self) -> float:
        """Energy of the session in progress (0 without one)."""
        if self.transaction_id is None or self.register_start_wh is None or self.register_wh is None:
            return 0.0
        return max(self.register_wh - self.register_start_wh, 0.0)


@dataclass(frozen=True, slots=True)
class RecentMessage:
    """One relayed message as the live view lists it."""

    time_s: float
    direction: tuple[str, str]  # (from, to)
    kind: str  # CALL, RESULT or ERROR
    action: str
    summary: str


@dataclass
class SiteModel:
    """The site as seen through the router's observations."""

    rows: dict[str, StationRow] = field(default_factory=dict)
    recent: deque[RecentMessage] = field(default_factory=lambda: deque(maxlen=RECENT_MESSAGES))
    transactions_started: int = 0
    transactions_ended: int = 0
    meter_samples: int = 0
    csms_calls: int = 0
    csms_calls_answered: int = 0
    call_errors: int = 0

    @property
    def booted(self) -> list[str]:
        """Stations whose BootNotification the CSMS accepted, through the router."""
        return sorted(row.station_id for row in self.rows.values() if row.booted)

    @property
    def energy_wh(self) -> float:
        """Energy delivered so far, sessions in progress included."""
        return sum(row.delivered_wh + row.session_wh for row in self.rows.values())

    def row(self, station_id: str) -> StationRow:
        """The row of ``station_id`` (created on first sight)."""
        row = self.rows.get(station_id)
        if row is None:
            row = self.rows[station_id] = StationRow(station_id)
        return row

    def apply(self, event: Observation) -> list[str]:
        """Take in one observation; return the notable events it makes, as sentences."""
        if isinstance(event, RawFrame):
            return []
        row = self.row(event.station_id)
        if isinstance(event, LinkEvent):
            row.connected = event.kind == "connected"
            if row.connected:
                return [f"{row.station_id} connected through the controller ({event.subprotocol})"]
            row.currents_amperes = ()
            return [f"{row.station_id} disconnected ({event.reason or 'closed'})"]
        row.messages += 1
        row.connected = True  # messages flow only over a live link (even if its LinkEvent was missed)
        return self._apply_message(row, event)

    def _apply_message(self, row: StationRow, message: ObservedMessage) -> list[str]:
        action = message.action or "?"
        payload = message.payload if isinstance(message.payload, dict) else {}
        # A station's answer to the controller's own call is not relayed: it ends at the controller.
        to_controller = message.source == "station" and is_lc_message_id(message.message_id)
        notable: list[str] = []
        summary = ""
        if message.message_type is MessageType.CALLERROR:
            self.call_errors += 1
            kind = "ERROR"
            notable.append(f"{_who(message.source, row.station_id)} answered {action} with an error: {payload}")
        elif message.message_type is MessageType.CALL:
            kind = "CALL"
            if message.source == "station":
                summary, notable = self._station_call(row, action, payload)
            else:
                if message.source == "csms":
                    self.csms_calls += 1
                summary = _call_summary(action, payload)
                what = "CSMS call relayed" if message.source == "csms" else "controller's own call"
                notable.append(f"{what} to {row.station_id}: {action} {summary}".rstrip())
        else:
            kind = "RESULT"
            summary = _result_summary(action, payload)
            if message.source == "csms" and action == "BootNotification" and payload.get("status") == "Accepted":
                row.booted = True
                notable.append(
                    f"{row.station_id} booted: BootNotification accepted by the CSMS through the controller "
                    f"(heartbeat every {payload.get('interval')} s)"
                )
            elif message.source == "station" and not to_controller:
                self.csms_calls_answered += 1
        sender = "CSMS" if message.source == "csms" else "LC" if message.source == "lc" else row.station_id
        receiver = row.station_id if message.source != "station" else "LC" if to_controller else "CSMS"
        self.recent.append(RecentMessage(message.time_s, (sender, receiver), kind, action, summary))
        return notable

    def _station_call(self, row: StationRow, action: str, payload: dict[str, Any]) -> tuple[str, list[str]]:
        notable: list[str] = []
        if action == "StatusNotification":
            row.connector_status = str(payload.get("connectorStatus", "?"))
            return f"{row.connector_status} (EVSE {payload.get('evseId')})", notable
        if action == "MeterValues":
            self._read_meter(row, payload.get("meterValue"))
            return f"{_amperes(row.currents_amperes)}, register {_kwh(row.register_wh)} kWh", notable
        if action == "TransactionEvent":
            info = payload.get("transactionInfo", {})
            event_type = payload.get("eventType")
            if event_type == "Started":
                self.transactions_started += 1
            if event_type == "Started" or row.transaction_id != info.get("transactionId"):
                # A new transaction (or one whose start the view missed): its energy counts from here.
                row.transaction_id = info.get("transactionId")
                row.register_start_wh = None
            self._read_meter(row, payload.get("meterValue"))
            if row.register_start_wh is None:
                row.register_start_wh = row.register_wh
            row.charging_state = str(info.get("chargingState", row.charging_state))
            transaction = str(info.get("transactionId", "?"))[:8]
            trigger = payload.get("triggerReason")
            summary = f"{event_type}" if trigger == "MeterValuePeriodic" else f"{event_type} {trigger}"
            if event_type == "Ended":
                summary += f" ({info.get('stoppedReason', '-')})"
            elif trigger == "ChargingStateChanged":
                summary += f" to {row.charging_state}"
            summary += f", {_amperes(row.currents_amperes)}, {row.session_wh / 1000:.3f} kWh"
            if event_type == "Started":
                token = payload.get("idToken", {}).get("idToken", "?")
                notable.append(f"{row.station_id} transaction {transaction} started (idToken {token})")
            elif event_type == "Ended":
                session_wh = row.session_wh
                row.delivered_wh += session_wh
                row.transaction_id = None
                row.register_start_wh = None
                row.charging_state = "-"
                row.currents_amperes = ()
                self.transactions_ended += 1
                reason = info.get("stoppedReason", "no reason given")
                energy = f"{session_wh / 1000:.3f} kWh"
                notable.append(f"{row.station_id} transaction {transaction} ended ({reason}): {energy} delivered")
            return summary, notable
        return _call_summary(action, payload), notable

    def _read_meter(self, row: StationRow, meter_values: Any) -> None:
        """Take the energy register and the current per phase from the latest meter value."""
        if not isinstance(meter_values, list) or not meter_values:
            return
        self.meter_samples += 1
        currents: dict[str, float] = {}
        for sampled in meter_values[-1].get("sampledValue", []):
            measurand = sampled.get("measurand", "Energy.Active.Import.Register")
            unit = sampled.get("unitOfMeasure", {})
            value = float(sampled.get("value", 0.0)) * 10 ** int(unit.get("multiplier", 0))
            if measurand == "Energy.Active.Import.Register" and "phase" not in sampled:
                row.register_wh = value * _ENERGY_UNITS.get(unit.get("unit", "Wh"), 1.0)
            elif measurand == "Current.Import":
                currents[str(sampled.get("phase", "L1"))] = value
        if currents:
            row.currents_amperes = tuple(currents[phase] for phase in sorted(currents))


def _who(source: str, station_id: str) -> str:
    return {"csms": "the CSMS", "lc": "the controller"}.get(source, station_id)


def _kwh(wh: float | None) -> str:
    return "-" if wh is None else f"{wh / 1000:.3f}"


def _amperes(currents: tuple[float, ...]) -> str:
    return "/".join(f"{current:.1f}" for current in currents) + " A" if currents else "0 A"


def _call_summary(action: str, payload: dict[str, Any]) -> str:
    """A few words on a call's payload."""
    if action == "BootNotification":
        return f"{payload.get('reason')}, {payload.get('chargingStation', {}).get('model', '?')}"
    if action == "Authorize":
        return str(payload.get("idToken", {}).get("idToken", "?"))
    if action == "GetVariables":
        wanted = payload.get("getVariableData", [])
        return ", ".join(f"{item['component']['name']}.{item['variable']['name']}" for item in wanted)
    if action == "GetBaseReport":
        return str(payload.get("reportBase", ""))
    if action == "NotifyReport":
        return f"{len(payload.get('reportData', []))} variables"
    if action == "FirmwareStatusNotification":
        return str(payload.get("status", ""))
    if action == "UpdateFirmware":
        return str(payload.get("firmware", {}).get("location", ""))
    if action == "SetChargingProfile":
        profile = payload.get("chargingProfile", {})
        schedule = (profile.get("chargingSchedule") or [{}])[0]
        periods = schedule.get("chargingSchedulePeriod") or [{}]
        limit = periods[0].get("limit", "?")
        return f"{profile.get('chargingProfilePurpose')} {limit} {schedule.get('chargingRateUnit', '')}".rstrip()
    return ""


def _result_summary(action: str, payload: dict[str, Any]) -> str:
    """A few words on a result's payload."""
    if action == "BootNotification":
        return f"{payload.get('status')}, heartbeat {payload.get('interval')} s"
    if action == "Heartbeat":
        return str(payload.get("currentTime", ""))
    if "idTokenInfo" in payload:
        return f"idToken {payload['idTokenInfo'].get('status')}"
    if action == "GetVariables":
        results = payload.get("getVariableResult", [])
        return ", ".join(
            f"{item['variable']['name']}={item.get('attributeValue', item.get('attributeStatus'))}" for item in results
        )
    return str(payload.get("status", "")) or "{}"


# -- the router's own counters ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayCounters:
    """What the controller's metrics say it relayed."""

    frames: dict[str, int]  # by direction
    payload_bytes: int  # the messages themselves, uncompressed
    wire_bytes: int  # what arrived on the network for them (compressed), on both legs
    stations_connected: int
    observations_missed: int = 0  # by the demo's view

    def frames_to(self, direction: str) -> int:
        """Frames counted in one direction (0 when none)."""
        return self.frames.get(direction, 0)


def read_counters(metrics: RouterMetrics) -> RelayCounters:
    """Sum the router's frame and byte counters over their labels."""
    frames: dict[str, int] = {}
    for family in metrics.frames.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                direction = sample.labels["direction"]
                frames[direction] = frames.get(direction, 0) + int(sample.value)
    # Every relayed message arrives once and leaves once: counting what arrived counts each once.
    wire_received = [
        sample.value
        for family in metrics.wire_bytes.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["direction"] == "received"
    ]
    return RelayCounters(
        frames=frames,
        payload_bytes=_total(metrics.frame_bytes.collect(), "_total"),
        wire_bytes=int(sum(wire_received)),
        stations_connected=_total(metrics.stations_connected.collect(), ""),
        observations_missed=int(
            sum(
                sample.value
                for family in metrics.observer_dropped.collect()
                for sample in family.samples
                if sample.name.endswith("_total") and sample.labels["observer"] == "demo"
            )
        ),
    )


def _total(families: Iterable[Any], suffix: str) -> int:
    return int(sum(sample.value for family in families for sample in family.samples if sample.name.endswith(suffix)))


def read_profile_counts(registry: CollectorRegistry) -> dict[str, int]:
    """The balancing loop's SetChargingProfile count by outcome (sent, accepted, rejected, ...)."""
    counts: dict[str, int] = {}
    for family in registry.collect():
        if family.name != "ocpp_lc_balancing_profiles":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0) + int(sample.value)
    return counts


# -- balancing, as the controller reports it -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiteBalance:
    """The limit in force and what the balancing loop made of it, for the live view."""

    limit: str  # "100 A per phase (config)"
    committed_amperes: tuple[float, ...]
    measured_amperes: tuple[float, ...]
    headroom_amperes: tuple[float | None, ...]
    overcommitted: bool
    #: The balancing loop's row of each station's EVSE 1 (allocated, installed, measured, phases used).
    evses: dict[str, Mapping[str, Any]]
    ems: str  # what the EMS is doing
    firmware: str  # how the firmware publish and update are going
    outage: str = ""  # how the demo's WAN outage is going
    #: Site autonomy as the controller reports it: one line, and each station's mode when not relayed.
    autonomy: str = ""
    modes: dict[str, str] = field(default_factory=dict)
    #: The simulated building and what its grid meter leaves for the EVs ("": no meter).
    building: str = ""


_PHASES: Final = ("L1", "L2", "L3")


def site_balance(
    status: Mapping[str, Any], *, ems: str, firmware: str, outage: str = "", building: str = ""
) -> SiteBalance:
    """Condense ``App.status()`` for the view."""
    balancing = status.get("balancing") or {}
    phases = balancing.get("phases") or {}

    def per_phase(key: str) -> tuple[Any, ...]:
        return tuple((phases.get(name) or {}).get(key) for name in _PHASES)

    evses: dict[str, Mapping[str, Any]] = {}
    for row in balancing.get("evses", []):
        if row.get("evse_id") == 1:
            evses[str(row.get("station_id"))] = row
    return SiteBalance(
        limit=limit_text((status.get("limits") or {}).get("phases") or {}),
        committed_amperes=tuple(value or 0.0 for value in per_phase("committed_amperes")),
        measured_amperes=tuple(value or 0.0 for value in per_phase("measured_amperes")),
        headroom_amperes=per_phase("headroom_amperes"),
        overcommitted=bool(balancing.get("overcommitted")),
        evses=evses,
        ems=ems,
        firmware=firmware,
        outage=outage,
        autonomy=autonomy_text(status.get("autonomy")),
        modes={
            str(station["station_id"]): str(station["mode"])
            for station in (status.get("autonomy") or {}).get("stations", [])
        },
        building=building,
    )


def autonomy_text(autonomy: Mapping[str, Any] | None) -> str:
    """Which stations the controller serves without their CSMS and what it keeps for it, in a few words."""
    if autonomy is None:
        return "off"
    stations = autonomy.get("stations", [])
    kept = f"{autonomy.get('queue_messages', 0)} messages ({format_bytes(autonomy.get('queue_bytes', 0))}) kept"
    if not stations:
        return f"every station relayed, {kept}"
    local = sum(1 for station in stations if station.get("mode") == "local")
    return f"{local} stations local, {len(stations) - local} replaying, {kept}"


def limit_text(phases: Mapping[str, Any]) -> str:
    """The per-phase limit in force and its source: ``60 A per phase (ems:pv)`` when alike."""
    values = [(phases.get(name) or {}).get("limit_amperes") for name in _PHASES]
    sources = [(phases.get(name) or {}).get("source") for name in _PHASES]
    if all(value is None for value in values):
        return "none (nothing limits the grid connection)"
    if len(set(values)) == 1 and len(set(sources)) == 1:
        return f"{values[0]:g} A per phase ({sources[0]})"
    return ", ".join(
        f"{name} {'-' if value is None else f'{value:g} A'} ({source or '-'})"
        for name, value, source in zip(_PHASES, values, sources, strict=True)
    )


def _triple(values: Iterable[float | None]) -> str:
    return "/".join("-" if value is None else f"{value:.0f}" for value in values)


def _amps(value: Any) -> str:
    return "-" if value is None else f"{float(value):.1f}"


# -- the live view ------------------------------------------------------------------------------


class ScreenLine(NamedTuple):
    """One line of the live view; ``emphasis`` lines (titles, column heads) are drawn in bold."""

    text: str
    emphasis: bool = False


@dataclass(frozen=True, slots=True)
class Header:
    """Where everything runs, for the top of the live view."""

    identity: str
    station_url: str
    metrics_url: str
    csms_url: str


def format_bytes(count: int) -> str:
    """``1234567`` → ``1.2 MB``."""
    value = float(count)
    for unit in ("B", "kB", "MB"):
        if value < 1000 or unit == "MB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def wall_time(time_s: float, origin_s: float, origin_wall: datetime.datetime) -> str:
    """A trio timestamp as local wall-clock time, ``HH:MM:SS``."""
    moment = origin_wall + datetime.timedelta(seconds=time_s - origin_s)
    return moment.astimezone().strftime("%H:%M:%S")


def _link(row: StationRow, modes: Mapping[str, str]) -> str:
    """The station's link: ``up`` (relayed), ``local`` / ``replay`` (its CSMS away or catching up), ``down``."""
    if not row.connected:
        return "down"
    return {"local": "local", "replaying": "replay"}.get(modes.get(row.station_id, ""), "up")


def render_live(
    model: SiteModel,
    header: Header,
    counters: RelayCounters,
    *,
    uptime_s: float,
    clock: tuple[float, datetime.datetime],
    width: int,
    height: int,
    unicode: bool = True,
    notes: Iterable[str] = (),
    balance: SiteBalance | None = None,
) -> list[ScreenLine]:
    """The lines of one live-view frame: at most ``height`` lines, each shorter than ``width``.

    The last column stays empty: writing there makes some terminals wrap (and scroll a full screen).
    ``clock`` is (trio time, wall time) of the same instant, to print message times; ``notes`` are
    warnings to show at the bottom. The station table gets the room left after the header and the
    counters; the recent messages get whatever remains.
    """
    arrow, dot = ("→", "·") if unicode else ("->", "|")
    hours, rest = divmod(int(uptime_s), 3600)
    id_width = max([7, *(len(station_id) for station_id in model.rows)])
    top = [
        ScreenLine(
            f"ocpp-lc demo {dot} controller {header.identity} {dot} up {hours:02d}:{rest // 60:02d}:{rest % 60:02d} "
            f"{dot} Ctrl-C to stop",
            emphasis=True,
        ),
        ScreenLine(f"{f'stations {arrow}':<11}{header.station_url} {dot} {counters.stations_connected} links up"),
        ScreenLine(f"{f'{arrow} CSMS':<11}{header.csms_url} (sandbox)"),
        ScreenLine(f"{'metrics':<11}{header.metrics_url}"),
    ]
    if balance is not None:
        headroom = _triple(balance.headroom_amperes)
        top += [
            ScreenLine(f"{'limit':<11}{balance.limit} {dot} EMS {balance.ems}"),
            ScreenLine(
                f"{'balancing':<11}committed {_triple(balance.committed_amperes)} A {dot} "
                f"draw {_triple(balance.measured_amperes)} A {dot} headroom {headroom} A"
                + (f" {dot} OVERCOMMITTED" if balance.overcommitted else "")
            ),
            *([ScreenLine(f"{'building':<11}{balance.building}")] if balance.building else []),
            ScreenLine(f"{'firmware':<11}{balance.firmware}"),
            ScreenLine(f"{'autonomy':<11}{balance.outage} {dot} {balance.autonomy}"),
        ]
    top.append(
        ScreenLine(
            f"{'STATION':<{id_width}}  {'CONNECTOR':<9}  {'LINK':<6}  {'SESSION':<13}  PH  ALLOC   INST   DRAW  "
            f"{'kWh':>6}  MSGS",
            emphasis=True,
        )
    )
    missed = f" {dot} view missed {counters.observations_missed}" if counters.observations_missed else ""
    relayed = counters.frames_to("station_to_csms") + counters.frames_to("csms_to_station")
    middle = [
        ScreenLine(
            f"sessions  {model.transactions_started} started, {model.transactions_ended} ended {dot} "
            f"{model.energy_wh / 1000:.3f} kWh {dot} {relayed} messages relayed {dot} "
            f"errors {model.call_errors}{missed}"
        ),
        ScreenLine("RECENT MESSAGES", emphasis=True),
    ]
    bottom = [ScreenLine(f"! {note}") for note in list(notes)[-3:]]

    room = max(height - len(top) - len(middle) - len(bottom), 1)
    rows = [model.rows[station_id] for station_id in sorted(model.rows)]
    shown = rows if len(rows) <= room else rows[: room - 1]
    table = []
    evses = balance.evses if balance is not None else {}
    modes = balance.modes if balance is not None else {}
    for row in shown:
        evse = evses.get(row.station_id, {})
        drawn = max(row.currents_amperes) if row.currents_amperes else None
        phases = sum(1 for current in row.currents_amperes if current > 0) or evse.get("phases_used") or "-"
        energy = f"{row.session_wh / 1000:.3f}" if row.transaction_id else "-"
        table.append(
            ScreenLine(
                f"{row.station_id:<{id_width}}  {row.connector_status:<9}  {_link(row, modes):<6}  "
                f"{row.charging_state:<13}  {phases!s:>2}  {_amps(evse.get('allocated_amperes')):>5}  "
                f"{_amps(evse.get('installed_amperes')):>5}  {_amps(drawn):>5}  {energy:>6}  {row.messages:>4}"
            )
        )
    if len(shown) < len(rows):
        table.append(ScreenLine(f"... and {len(rows) - len(shown)} more stations (a taller terminal shows them)"))

    room = max(height - len(top) - len(table) - len(middle) - len(bottom), 0)
    trio_now, wall_now = clock
    recent = []
    for message in list(model.recent)[-room:] if room else []:
        sender, receiver = message.direction
        route = f"{sender} {arrow} {receiver}"
        recent.append(
            ScreenLine(
                f"{wall_time(message.time_s, trio_now, wall_now)}  {route:<{id_width + 8}}  {message.kind:<6}  "
                f"{message.action:<18} {message.summary}"
            )
        )
    screen = [*top, *table, *middle, *recent, *bottom][:height]
    return [ScreenLine(line.text[: max(width - 1, 0)], line.emphasis) for line in screen]
