"""OCPP 1.6J stations in the balancing loop: the messages the loop reads and writes, translated.

Theory of operation. The loop (:mod:`balancing.loop`) speaks OCPP 2.0.1. A 1.6 station takes part in
the same balancing through this adapter, which turns what the loop reads of it into the 2.0.1
messages that say the same thing, and what the loop sends it into the 1.6 message that does the same
thing. Nothing here does I/O, and the loop itself never branches on the version. For 1.6, a
connector (``connectorId`` ≥ 1) is what 2.0.1 calls an EVSE; connector 0 is the station as a whole.

Read (OCPP 1.6 → the loop's 2.0.1):

* StatusNotification.req(connectorId) → StatusNotification(evseId): the EVSE becomes known.
* StartTransaction: the transaction id is the CSMS's to give, so the session starts when the
  StartTransaction.conf arrives (its ``transactionId``, as text) → TransactionEvent Started on that
  connector. Until then the connector is held by its TxDefaultProfile, as any idle EVSE is.
* StopTransaction.req(transactionId) → TransactionEvent Ended.
* MeterValues.req(connectorId, meterValue) → MeterValues(evseId, meterValue), the sampled values'
  text values made numbers and their ``unit`` a unitOfMeasure (1.6 has ``A``, ``W``, ``kW`` …).
* The CSMS's own SetChargingProfile / ClearChargingProfile to the station, once accepted, in their
  2.0.1 shapes, so the loop caps or yields to them as it does for 2.0.1 stations (ChargePointMaxProfile
  is the 1.6 name of ChargingStationMaxProfile).

Written (the loop's 2.0.1 → OCPP 1.6): SetChargingProfile → SetChargingProfile.req with
``csChargingProfiles`` (one chargingSchedule, an integer transactionId for a TxProfile, the same id,
stack level, kind, validTo and periods with numberPhases), ClearChargingProfile by id → by ``id``.

1.6 has no chargingPriority, so a 1.6 transaction has priority 0 (plus its station's). A 1.6 station
whose ``SupportedFeatureProfiles`` (GetConfiguration) lacks SmartCharging cannot be steered: the
loop counts it at its maximum (:meth:`balancing.loop.Balancer.station_steerable`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Final

PROTOCOL: Final = "ocpp1.6"
#: What the loop reads of a 1.6 station's calls, CSMS answers and station answers.
STATION_CALLS: Final = frozenset({"StatusNotification", "MeterValues", "StopTransaction"})

Translated = tuple[str, dict[str, Any]]


def _connector(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1000:
        return value
    return None


def _transaction_id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _number(text: Any) -> float | None:
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _meter_values(meter_values: Any) -> list[dict[str, Any]]:
    """1.6 meterValue entries in the 2.0.1 shape the loop reads (values numeric, unit in unitOfMeasure)."""
    result: list[dict[str, Any]] = []
    for entry in meter_values if isinstance(meter_values, list) else []:
        if not isinstance(entry, Mapping):
            continue
        samples = []
        sampled = entry.get("sampledValue")
        for sample in sampled if isinstance(sampled, list) else []:
            if not isinstance(sample, Mapping):
                continue
            value = _number(sample.get("value"))
            if value is None:
                continue
            converted: dict[str, Any] = {"value": value}
            for key in ("measurand", "phase", "context", "location"):
                if isinstance(sample.get(key), str):
                    converted[key] = sample[key]
            if isinstance(sample.get("unit"), str):
                converted["unitOfMeasure"] = {"unit": sample["unit"]}
            samples.append(converted)
        result.append({"timestamp": entry.get("timestamp"), "sampledValue": samples})
    return result


def station_call(action: str | None, payload: Any) -> Translated | None:
    """A 1.6 station's CALL as the 2.0.1 CALL the loop reads, or ``None`` if the loop needs nothing of it."""
    if not isinstance(payload, Mapping):
        return None
    if action == "StatusNotification":
        connector = _connector(payload.get("connectorId"))
        return None if connector is None else ("StatusNotification", {"evseId": connector})
    if action == "MeterValues":
        connector = _connector(payload.get("connectorId"))
        if connector is None:
            return None  # connector 0: the station's main meter, not an EVSE's draw
        return "MeterValues", {"evseId": connector, "meterValue": _meter_values(payload.get("meterValue"))}
    if action == "StopTransaction":
        transaction_id = _transaction_id(payload.get("transactionId"))
        if transaction_id is None:
            return None
        return "TransactionEvent", {"eventType": "Ended", "transactionInfo": {"transactionId": transaction_id}}
    return None


def csms_answer(action: str | None, payload: Any, request: Any) -> Translated | None:
    """The CSMS's answer to a 1.6 station's call, as the 2.0.1 station CALL it amounts to for the loop."""
    if action != "StartTransaction" or not isinstance(payload, Mapping) or not isinstance(request, Mapping):
        return None
    transaction_id = _transaction_id(payload.get("transactionId"))
    connector = _connector(request.get("connectorId"))
    if transaction_id is None or connector is None:
        return None
    return "TransactionEvent", {
        "eventType": "Started",
        "transactionInfo": {"transactionId": transaction_id},
        "evse": {"id": connector},
    }


def _profile_201(profile: Any, connector: int) -> dict[str, Any] | None:
    if not isinstance(profile, Mapping):
        return None
    schedule = profile.get("chargingSchedule")
    purpose = profile.get("chargingProfilePurpose")
    converted: dict[str, Any] = {
        "id": profile.get("chargingProfileId"),
        "stackLevel": profile.get("stackLevel"),
        "chargingProfilePurpose": "ChargingStationMaxProfile" if purpose == "ChargePointMaxProfile" else purpose,
        "chargingProfileKind": profile.get("chargingProfileKind"),
        "chargingSchedule": [schedule] if isinstance(schedule, Mapping) else schedule,
    }
    for key in ("recurrencyKind", "validFrom", "validTo"):
        if key in profile:
            converted[key] = profile[key]
    transaction_id = _transaction_id(profile.get("transactionId"))
    if transaction_id is not None:
        converted["transactionId"] = transaction_id
    if isinstance(schedule, Mapping):
        converted["chargingSchedule"] = [{"id": converted["id"], **schedule}]
    return {"evseId": connector, "chargingProfile": converted}


def station_answer_request(action: str | None, request: Any) -> dict[str, Any] | None:
    """The CSMS's Set/ClearChargingProfile.req to a 1.6 station as the 2.0.1 request the loop reads."""
    if not isinstance(request, Mapping):
        return None
    if action == "SetChargingProfile":
        connector = request.get("connectorId")
        if not isinstance(connector, int) or isinstance(connector, bool) or connector < 0:
            return None
        return _profile_201(request.get("csChargingProfiles"), connector)
    if action == "ClearChargingProfile":
        criteria: dict[str, Any] = {}
        if "connectorId" in request:
            criteria["evseId"] = request["connectorId"]
        if "chargingProfilePurpose" in request:
            purpose = request["chargingProfilePurpose"]
            criteria["chargingProfilePurpose"] = (
                "ChargingStationMaxProfile" if purpose == "ChargePointMaxProfile" else purpose
            )
        if "stackLevel" in request:
            criteria["stackLevel"] = request["stackLevel"]
        converted: dict[str, Any] = {}
        if "id" in request:
            converted["chargingProfileId"] = request["id"]
        if criteria:
            converted["chargingProfileCriteria"] = criteria
        return converted
    return None


def outgoing(action: str, payload: Mapping[str, Any]) -> Translated:
    """One of the loop's 2.0.1 calls (SetChargingProfile, ClearChargingProfile by id) as its 1.6 call."""
    if action == "SetChargingProfile":
        profile = payload["chargingProfile"]
        (schedule,) = profile["chargingSchedule"]
        converted: dict[str, Any] = {
            "chargingProfileId": profile["id"],
            "stackLevel": profile["stackLevel"],
            "chargingProfilePurpose": profile["chargingProfilePurpose"],
            "chargingProfileKind": profile["chargingProfileKind"],
            "chargingSchedule": {key: value for key, value in schedule.items() if key != "id"},
        }
        if "validTo" in profile:
            converted["validTo"] = profile["validTo"]
        if "transactionId" in profile:
            converted["transactionId"] = int(profile["transactionId"])  # ours come from a 1.6 integer id
        return "SetChargingProfile", {"connectorId": payload["evseId"], "csChargingProfiles": converted}
    if action == "ClearChargingProfile" and set(payload) == {"chargingProfileId"}:
        return "ClearChargingProfile", {"id": payload["chargingProfileId"]}
    if action == "GetConfiguration":
        return action, dict(payload)
    raise ValueError(f"the balancing loop sends no {action} of this shape to a 1.6 station")


def smart_charging_supported(configuration: Any) -> bool | None:
    """From a GetConfiguration.conf for SupportedFeatureProfiles: whether SmartCharging is among them
    (``None``: the station did not say)."""
    if not isinstance(configuration, Mapping):
        return None
    keys = configuration.get("configurationKey")
    for item in keys if isinstance(keys, list) else []:
        if isinstance(item, Mapping) and item.get("key") == "SupportedFeatureProfiles":
            value = item.get("value")
            if not isinstance(value, str):
                return None
            return "SmartCharging" in {part.strip() for part in value.split(",")}
    return None
