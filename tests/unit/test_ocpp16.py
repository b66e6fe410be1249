"""OCPP 1.6 stations in the balancing loop (issue 15): the translation seam, and a station that cannot
be steered (SupportedFeatureProfiles without SmartCharging) counted at its maximum."""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import pytest
import trio
from jsonschema import Draft4Validator

from balancing import ocpp16
from balancing.loop import Balancer
from tests.unit.test_balancing_faults import GRID_SITE, Recording, loop_settings
from tests.unit.test_balancing_loop import row, running, settle, wall_clock


@functools.cache
def _schema(name: str) -> Draft4Validator:
    return Draft4Validator(json.loads(resources.files("ocpp").joinpath("v16", "schemas", f"{name}.json").read_text()))


def assert_valid_16(action: str, payload: dict[str, Any]) -> None:
    errors = [error.message for error in _schema(action).iter_errors(payload)]
    assert not errors, errors


def tx_profile(**extra: Any) -> dict[str, Any]:
    return {
        "evseId": 2,
        "chargingProfile": {
            "id": 900_004,
            "stackLevel": 8,
            "chargingProfilePurpose": "TxProfile",
            "chargingProfileKind": "Relative",
            "validTo": "2026-12-03T12:00:00Z",
            "transactionId": "4711",
            "chargingSchedule": [
                {
                    "id": 900_004,
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 16.0, "numberPhases": 1}],
                }
            ],
            **extra,
        },
    }


def test_our_profile_goes_out_as_a_valid_16_set_charging_profile() -> None:
    action, payload = ocpp16.outgoing("SetChargingProfile", tx_profile())
    assert action == "SetChargingProfile"
    assert_valid_16(action, payload)
    profile = payload["csChargingProfiles"]
    assert payload["connectorId"] == 2
    assert profile["transactionId"] == 4711  # 1.6: the CSMS's integer id
    assert profile["chargingProfileId"] == 900_004 and profile["validTo"] == "2026-12-03T12:00:00Z"
    assert profile["chargingSchedule"]["chargingSchedulePeriod"] == [
        {"startPeriod": 0, "limit": 16.0, "numberPhases": 1}
    ]
    clear_action, clear = ocpp16.outgoing("ClearChargingProfile", {"chargingProfileId": 900_005})
    assert (clear_action, clear) == ("ClearChargingProfile", {"id": 900_005})
    assert_valid_16(clear_action, clear)


def test_what_a_16_station_says_reaches_the_loop_as_its_201_meaning() -> None:
    assert ocpp16.station_call(
        "StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Available"}
    ) == (
        "StatusNotification",
        {"evseId": 1},
    )
    assert ocpp16.station_call("StatusNotification", {"connectorId": 0, "status": "Available"}) is None
    started = ocpp16.csms_answer(
        "StartTransaction", {"transactionId": 17, "idTagInfo": {"status": "Accepted"}}, {"connectorId": 2}
    )
    assert started == (
        "TransactionEvent",
        {"eventType": "Started", "transactionInfo": {"transactionId": "17"}, "evse": {"id": 2}},
    )
    assert ocpp16.station_call("StopTransaction", {"transactionId": 17, "meterStop": 5, "timestamp": "x"}) == (
        "TransactionEvent",
        {"eventType": "Ended", "transactionInfo": {"transactionId": "17"}},
    )
    meter = ocpp16.station_call(
        "MeterValues",
        {
            "connectorId": 2,
            "meterValue": [
                {
                    "timestamp": "t",
                    "sampledValue": [{"value": "15.5", "measurand": "Current.Import", "phase": "L1", "unit": "A"}],
                }
            ],
        },
    )
    assert meter is not None and meter[1]["meterValue"][0]["sampledValue"] == [
        {"value": 15.5, "measurand": "Current.Import", "phase": "L1", "unitOfMeasure": {"unit": "A"}}
    ]


@pytest.mark.parametrize(
    "payload",
    [None, [], {"connectorId": "1"}, {"connectorId": True}, {"transactionId": "x"}, {"meterValue": "nope"}],
)
def test_bad_shapes_yield_nothing_and_raise_nothing(payload: Any) -> None:
    for action in ("StatusNotification", "MeterValues", "StopTransaction", "Authorize"):
        result = ocpp16.station_call(action, payload)
        assert result is None or result[1].get("meterValue") == []
    assert ocpp16.csms_answer("StartTransaction", payload, payload) is None
    assert ocpp16.station_answer_request("SetChargingProfile", payload) is None


def test_supported_feature_profiles_say_whether_it_does_smart_charging() -> None:
    def conf(value: str) -> dict[str, Any]:
        return {"configurationKey": [{"key": "SupportedFeatureProfiles", "readonly": True, "value": value}]}

    assert ocpp16.smart_charging_supported(conf("Core,FirmwareManagement,SmartCharging")) is True
    assert ocpp16.smart_charging_supported(conf("Core, Reservation")) is False
    assert ocpp16.smart_charging_supported({"unknownKey": ["SupportedFeatureProfiles"]}) is None


async def test_a_station_without_smart_charging_is_counted_at_its_maximum_and_never_sent_to(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Issue 15 Done-when 3 (unit): an unsteerable 1.6 station's EVSE counts at its 32 A maximum, is shown
    unsteerable with its protocol, and receives no profile; the 2.0.1 station shares what is left."""
    fake = Recording(limit_amperes=40.0)
    settings = loop_settings(min_interval_s=0, idle_current_amperes=6.0)
    balancer = Balancer(GRID_SITE, fake.limits_at, fake, settings, wall_clock=wall_clock)
    async with running(balancer):
        balancer.station_connected("OLD", "ocpp1.6")
        balancer.station_steerable("OLD", False, "SupportedFeatureProfiles without SmartCharging")
        for station_id, message in [("OLD", {"connectorId": 1, "errorCode": "NoError", "status": "Charging"})]:
            translated = ocpp16.station_call("StatusNotification", message)
            assert translated is not None
            balancer.station_call(station_id, *translated)
        balancer.station_connected("NEW", "ocpp2.0.1")
        balancer.station_call(
            "NEW",
            "StatusNotification",
            {"evseId": 1, "connectorId": 1, "connectorStatus": "Occupied", "timestamp": "2026-03-02T08:00:00Z"},
        )
        started = ocpp16.csms_answer(
            "StartTransaction", {"transactionId": 5, "idTagInfo": {"status": "Accepted"}}, {"connectorId": 1}
        )
        assert started is not None
        balancer.station_call("OLD", *started)
        await settle()
        await trio.sleep(60)
        assert fake.set_profiles("OLD") == []
        old = row(balancer, "OLD")
        assert (old["protocol"], old["steerable"], old["compliant"], old["transaction_id"]) == (
            "ocpp1.6",
            False,
            False,
            "5",
        )
        assert balancer.phase_bounds_amperes()[0] <= 40.0
        assert row(balancer, "NEW")["installed_amperes"] == 6.0  # the idle NEW EVSE: what OLD's 32 A leaves (8 A)
