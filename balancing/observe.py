"""Reading the balancing loop's inputs out of relayed OCPP 2.0.1 payloads, without I/O.

Theory of operation. The loop sees every message a station and the CSMS exchange (as the router
observed it). What it needs from them is small and tolerant of whatever a station writes: a payload
that does not have the expected shape yields nothing here (the far end answers the sender; the
controller only relays), never an exception.

* TransactionEvent (E01–E15): the transaction id, the EVSE (the first event of a transaction names it;
  later ones may not), the event type, chargingState and numberOfPhasesUsed.
* Meter values, in MeterValues and in TransactionEvent: the highest per-phase current
  (``Current.Import``) and the active power (``Power.Active.Import``), with the unit's multiplier
  applied (Part 2 §2.x UnitOfMeasure: value × 10^multiplier) and kW/kA scaled.
* TransactionEventResponse: chargingPriority (K03.FR.04–06: −9…9, 0 when absent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Measurands we read; the default measurand (Energy.Active.Import.Register) tells nothing about draw.
CURRENT_MEASURAND = "Current.Import"
POWER_MEASURAND = "Power.Active.Import"
_SCALE = {"A": 1.0, "kA": 1000.0, "mA": 0.001, "W": 1.0, "kW": 1000.0, "MW": 1_000_000.0}
#: Plausibility bounds: a reading beyond these is a broken meter, not a load.
_MAX_AMPERES = 10_000.0
_MAX_WATTS = 10_000_000.0


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one batch of meter values says about the draw of an EVSE (``None``: not reported)."""

    current_amperes: float | None = None  # highest per-phase current
    power_watts: float | None = None


@dataclass(frozen=True, slots=True)
class TransactionFacts:
    """The facts of one TransactionEventRequest the loop acts on."""

    event_type: str  # Started, Updated, Ended
    transaction_id: str
    evse_id: int | None
    charging_state: str | None
    phases_used: int | None
    measurement: Measurement | None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _scaled(sample: Mapping[str, Any], default_unit: str) -> float | None:
    value = _number(sample.get("value"))
    if value is None:
        return None
    unit_of_measure = sample.get("unitOfMeasure")
    unit, multiplier = default_unit, 0
    if isinstance(unit_of_measure, Mapping):
        unit = str(unit_of_measure.get("unit", default_unit))
        found = unit_of_measure.get("multiplier", 0)
        multiplier = found if isinstance(found, int) and not isinstance(found, bool) and -3 <= found <= 3 else 0
    scale = _SCALE.get(unit)
    if scale is None:
        return None
    return value * scale * 10.0**multiplier


def measurement(meter_values: Any) -> Measurement | None:
    """The draw the last meter value of a list reports; ``None`` when it reports neither current nor power."""
    if not isinstance(meter_values, list) or not meter_values:
        return None
    latest = meter_values[-1]
    if not isinstance(latest, Mapping):
        return None
    samples = latest.get("sampledValue")
    if not isinstance(samples, list):
        return None
    currents: list[float] = []
    total_power: float | None = None
    phase_power: float | None = None
    for sample in samples:
        if not isinstance(sample, Mapping):
            continue
        measurand = sample.get("measurand")
        if measurand == CURRENT_MEASURAND:
            # "N" is the neutral conductor: not a phase the site's limits are about.
            if sample.get("phase") == "N":
                continue
            value = _scaled(sample, "A")
            if value is not None and 0 <= value <= _MAX_AMPERES:
                currents.append(value)
        elif measurand == POWER_MEASURAND:
            value = _scaled(sample, "W")
            phase = sample.get("phase")
            if value is None or not 0 <= value <= _MAX_WATTS:
                continue
            # An unphased sample is the total; per-phase ones add up to it (the total wins if both come).
            if phase is None:
                total_power = value
            else:
                phase_power = (phase_power or 0.0) + value
    power = total_power if total_power is not None else phase_power
    if not currents and power is None:
        return None
    return Measurement(max(currents) if currents else None, power)


def transaction_facts(payload: Any) -> TransactionFacts | None:
    """The facts of a TransactionEventRequest payload, or ``None`` if it lacks what they need."""
    if not isinstance(payload, Mapping):
        return None
    event_type = payload.get("eventType")
    info = payload.get("transactionInfo")
    if event_type not in ("Started", "Updated", "Ended") or not isinstance(info, Mapping):
        return None
    transaction_id = info.get("transactionId")
    # identifierString of at most 36 characters: a longer one could not be put in our TxProfile.
    if not isinstance(transaction_id, str) or not transaction_id or len(transaction_id) > 36:
        return None
    evse = payload.get("evse")
    evse_id = evse.get("id") if isinstance(evse, Mapping) else None
    if not isinstance(evse_id, int) or isinstance(evse_id, bool) or not 1 <= evse_id <= 1000:
        evse_id = None
    state = info.get("chargingState")
    phases = payload.get("numberOfPhasesUsed")
    if not isinstance(phases, int) or isinstance(phases, bool) or not 1 <= phases <= 3:
        phases = None
    return TransactionFacts(
        event_type=event_type,
        transaction_id=transaction_id,
        evse_id=evse_id,
        charging_state=state if isinstance(state, str) else None,
        phases_used=phases,
        measurement=measurement(payload.get("meterValue")),
    )


def charging_priority(response: Any) -> int | None:
    """chargingPriority of a TransactionEventResponse (K03.FR.05), or ``None`` if it names none."""
    if not isinstance(response, Mapping):
        return None
    # K03.FR.05/06: the response's own chargingPriority first, else the one in its idTokenInfo.
    token_info = response.get("idTokenInfo")
    from_token = token_info.get("chargingPriority") if isinstance(token_info, Mapping) else None
    for value in (response.get("chargingPriority"), from_token):
        if isinstance(value, int) and not isinstance(value, bool) and -9 <= value <= 9:
            return value
    return None


def evse_of(payload: Any) -> int | None:
    """The evseId of a StatusNotification / MeterValues payload (1…1000), if it names one."""
    if not isinstance(payload, Mapping):
        return None
    value = payload.get("evseId")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000:
        return value
    return None
