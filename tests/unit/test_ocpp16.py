"""OCPP 1.6 stations in the balancing loop (issue 15): the translation seam, and a station that cannot
be steered (SupportedFeatureProfiles without SmartCharging) counted at its maximum.

Every 1.6 payload the seam writes is checked against the OCPP 1.6 JSON schemas the `ocpp` package ships
(`tests.support.schemas.validate_call_16`: draft-04, limits as decimals so that ``multipleOf 0.1``
means what it says); every shape it reads that is not what 1.6 prescribes yields nothing, never an
exception (an exception there would stop the router's observer task, and with it the appliance)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import trio

from balancing import ocpp16
from balancing.loop import Balancer, CallOutcome
from balancing.records import EvseRecord
from router.balancing_wiring import probe_smart_charging
from tests.support.schemas import SchemaError, validate_call_16, validate_frame, validate_result_16
from tests.unit.test_balancing_faults import GRID_SITE, Recording, loop_settings
from tests.unit.test_balancing_loop import row, running, settle, wall_clock


def assert_valid_16(action: str, payload: dict[str, Any]) -> None:
    validate_call_16(action, payload)


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


# --- what the seam writes: every shape the loop sends, valid 1.6 ---------------------------------------


def _balancer() -> Balancer:
    fake = Recording(limit_amperes=40.0)
    return Balancer(GRID_SITE, fake.limits_at, fake, loop_settings(), wall_clock=wall_clock)


@pytest.mark.parametrize("phases", [None, 1, 2, 3])
@pytest.mark.parametrize("purpose", ["TxDefaultProfile", "TxProfile"])
def test_every_profile_the_loop_builds_goes_out_as_a_valid_16_one(purpose: str, phases: int | None) -> None:
    """The loop's own SetChargingProfile (Balancer.profile_payload) for every tenth of an ampere from 0
    to 32 A: the 1.6 form is schema-valid (limits whole tenths), keeps id, stack level, kind, validTo,
    the limit and numberPhases, and a TxProfile names the transaction as the CSMS's integer."""
    balancer = _balancer()
    record = EvseRecord("CS16", 3, transaction_id="4711" if purpose == "TxProfile" else None)
    valid_to = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    for tenths in range(0, 321):
        amperes = round(tenths * 0.1, 9)  # as rollout.round_down hands them over
        payload = balancer.profile_payload(record, purpose, amperes, valid_to, phases)  # type: ignore[arg-type]
        action, converted = ocpp16.outgoing("SetChargingProfile", payload)
        assert action == "SetChargingProfile"
        validate_call_16(action, converted)
        # ...and as the frame the router writes (its text, read back with the frame's own digits).
        validate_frame(json.dumps([2, "lc~1", action, converted]), version="1.6")
        profile = converted["csChargingProfiles"]
        assert converted["connectorId"] == 3
        assert profile["chargingProfileId"] == payload["chargingProfile"]["id"]
        assert profile["chargingProfilePurpose"] == purpose and profile["chargingProfileKind"] == "Relative"
        assert profile["validTo"] == "2026-12-03T12:00:00Z"
        (period,) = profile["chargingSchedule"]["chargingSchedulePeriod"]
        assert period["limit"] == amperes
        assert period.get("numberPhases") == (phases if phases is not None and phases < 3 else None)
        assert profile.get("transactionId") == (4711 if purpose == "TxProfile" else None)
        assert "id" not in profile["chargingSchedule"]  # 1.6's chargingSchedule has no id


def test_clear_and_get_configuration_go_out_valid_and_other_shapes_are_refused() -> None:
    action, payload = ocpp16.outgoing("GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
    assert (action, payload) == ("GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
    validate_call_16(action, payload)
    assert ocpp16.outgoing("ClearChargingProfile", {"chargingProfileId": 7}) == ("ClearChargingProfile", {"id": 7})
    validate_call_16("ClearChargingProfile", {"id": 7})
    # The loop clears by id only; anything else has no 1.6 form here and must not go out half-translated.
    with pytest.raises(ValueError):
        ocpp16.outgoing("ClearChargingProfile", {"chargingProfileCriteria": {"evseId": 1}})
    with pytest.raises(ValueError):
        ocpp16.outgoing("GetCompositeSchedule", {"evseId": 1, "duration": 60})


def test_the_16_validator_reads_limits_as_decimals_and_knows_16_names() -> None:
    """The yardstick itself: 10.6 is a multiple of 0.1 (a float check says it is not), 10.55 and the
    binary noise 10.600000000000001 are not; 1.6 request schemas are named after the action; 1.6
    CALLERRORs carry 1.6's error codes; the 2.0.1 behaviour is untouched."""

    def profile(limit: Any) -> dict[str, Any]:
        return {
            "connectorId": 1,
            "csChargingProfiles": {
                "chargingProfileId": 1,
                "stackLevel": 0,
                "chargingProfilePurpose": "TxDefaultProfile",
                "chargingProfileKind": "Relative",
                "chargingSchedule": {
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}],
                },
            },
        }

    for good in (0, 0.3, 10.6, 16.0, 31.9):
        validate_call_16("SetChargingProfile", profile(good))
    for bad in (10.55, 10.600000000000001, "16"):
        with pytest.raises(SchemaError):
            validate_call_16("SetChargingProfile", profile(bad))
    frame = '[2,"a","SetChargingProfile",' + json.dumps(profile(1.0)).replace("1.0", "10.600000000000001") + "]"
    with pytest.raises(SchemaError, match="multiple of"):
        validate_frame(frame, version="1.6")
    validate_result_16("GetConfiguration", {"configurationKey": [{"key": "K", "readonly": True, "value": "v"}]})
    with pytest.raises(SchemaError):
        validate_result_16("GetConfiguration", {"configurationKey": 5})
    validate_frame('[4,"a","FormationViolation","",{}]', version="1.6")
    with pytest.raises(SchemaError):
        validate_frame('[4,"a","RpcFrameworkError","",{}]', version="1.6")  # 2.0.1 only
    validate_frame('[4,"a","RpcFrameworkError","",{}]')
    with pytest.raises(SchemaError):
        validate_frame('[2,"a","SetChargingProfile",' + json.dumps(profile(16.0)) + "]")  # not a 2.0.1 one


# --- what the seam reads: every translation, and every bad shape read as nothing ------------------------


def test_a_16_station_answer_to_the_csms_reads_as_the_201_request_it_amounts_to() -> None:
    max_profile = {
        "connectorId": 0,
        "csChargingProfiles": {
            "chargingProfileId": 3,
            "stackLevel": 1,
            "chargingProfilePurpose": "ChargePointMaxProfile",
            "chargingProfileKind": "Absolute",
            "validFrom": "2026-12-03T10:00:00Z",
            "chargingSchedule": {
                "startSchedule": "2026-12-03T10:00:00Z",
                "chargingRateUnit": "A",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 20.0}],
            },
        },
    }
    validate_call_16("SetChargingProfile", max_profile)
    assert ocpp16.station_answer_request("SetChargingProfile", max_profile) == {
        "evseId": 0,
        "chargingProfile": {
            "id": 3,
            "stackLevel": 1,
            "chargingProfilePurpose": "ChargingStationMaxProfile",
            "chargingProfileKind": "Absolute",
            "validFrom": "2026-12-03T10:00:00Z",
            "chargingSchedule": [
                {
                    "id": 3,
                    "startSchedule": "2026-12-03T10:00:00Z",
                    "chargingRateUnit": "A",
                    "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 20.0}],
                }
            ],
        },
    }
    tx = ocpp16.station_answer_request(
        "SetChargingProfile",
        {"connectorId": 2, "csChargingProfiles": {**max_profile["csChargingProfiles"], "transactionId": 9}},
    )
    assert tx is not None and tx["chargingProfile"]["transactionId"] == "9"
    assert ocpp16.station_answer_request("ClearChargingProfile", {"id": 3}) == {"chargingProfileId": 3}
    assert ocpp16.station_answer_request(
        "ClearChargingProfile", {"connectorId": 0, "chargingProfilePurpose": "ChargePointMaxProfile", "stackLevel": 1}
    ) == {
        "chargingProfileCriteria": {"evseId": 0, "chargingProfilePurpose": "ChargingStationMaxProfile", "stackLevel": 1}
    }
    assert ocpp16.station_answer_request("ClearChargingProfile", {}) == {}  # clear all: no criteria
    assert ocpp16.station_answer_request("GetConfiguration", {"key": []}) is None


def test_meter_values_of_a_16_station_keep_what_the_loop_reads() -> None:
    """Current per phase, power with its unit (kW stays kW for the loop to scale); unreadable values dropped."""
    translated = ocpp16.station_call(
        "MeterValues",
        {
            "connectorId": 1,
            "transactionId": 5,
            "meterValue": [
                {
                    "timestamp": "2026-12-03T10:00:00Z",
                    "sampledValue": [
                        {"value": "16.2", "measurand": "Current.Import", "phase": "L2", "unit": "A"},
                        {
                            "value": "11.0",
                            "measurand": "Power.Active.Import",
                            "unit": "kW",
                            "context": "Sample.Periodic",
                        },
                        {"value": "1234"},  # 1.6's default measurand: Energy.Active.Import.Register
                        {"value": "NaN", "measurand": "Current.Import", "phase": "L1", "unit": "A"},
                        {"value": "1e400", "measurand": "Current.Import", "phase": "L3", "unit": "A"},
                        {"value": "lots", "measurand": "Current.Import"},
                        {"value": True},
                        "not a sample",
                    ],
                },
                "not an entry",
            ],
        },
    )
    assert translated == (
        "MeterValues",
        {
            "evseId": 1,
            "meterValue": [
                {
                    "timestamp": "2026-12-03T10:00:00Z",
                    "sampledValue": [
                        {"value": 16.2, "measurand": "Current.Import", "phase": "L2", "unitOfMeasure": {"unit": "A"}},
                        {
                            "value": 11.0,
                            "measurand": "Power.Active.Import",
                            "context": "Sample.Periodic",
                            "unitOfMeasure": {"unit": "kW"},
                        },
                        {"value": 1234.0},
                    ],
                }
            ],
        },
    )
    # The station's main meter (connector 0) is not an EVSE's draw.
    assert ocpp16.station_call("MeterValues", {"connectorId": 0, "meterValue": []}) is None


NONSENSE: list[Any] = [None, 5.5, "x", True, [], [1], {"a": 1}, {"connectorId": None}]


@pytest.mark.parametrize("junk", NONSENSE)
def test_any_shape_in_any_field_reads_as_nothing_and_raises_nothing(junk: Any) -> None:
    """Relayed traffic is not schema-checked before the loop reads it: whatever a station or CSMS puts in
    a field, the seam answers with nothing it cannot stand behind, and never raises. (A MeterValues whose
    sampledValue was a number, or a GetConfiguration answer whose configurationKey was, raised TypeError
    and stopped the router's observer task, and with it the whole appliance.)"""
    meter_fields = ["connectorId", "meterValue"]
    for field_name in meter_fields:
        payload = {"connectorId": 1, "meterValue": [{"timestamp": "t", "sampledValue": []}], field_name: junk}
        ocpp16.station_call("MeterValues", payload)
    for entry_field in ("sampledValue", "timestamp"):
        entry = {"timestamp": "t", "sampledValue": [{"value": "1"}], entry_field: junk}
        ocpp16.station_call("MeterValues", {"connectorId": 1, "meterValue": [entry]})
        ocpp16.station_call("MeterValues", {"connectorId": 1, "meterValue": [{"sampledValue": [junk]}]})
        sample = {"value": junk, "measurand": junk, "phase": junk, "unit": junk}
        ocpp16.station_call("MeterValues", {"connectorId": 1, "meterValue": [{"sampledValue": [sample]}]})
    for action in ("StatusNotification", "StopTransaction", "Authorize", "BootNotification", None):
        assert ocpp16.station_call(action, junk) is None or action == "StatusNotification"
        result = ocpp16.station_call(action, {"connectorId": junk, "transactionId": junk})
        plausible = isinstance(junk, int) and not isinstance(junk, bool)  # connector 5, transaction 5
        assert result is None or plausible, (action, junk, result)
    assert ocpp16.csms_answer("StartTransaction", junk, {"connectorId": 1}) is None
    assert ocpp16.csms_answer("StartTransaction", {"transactionId": junk}, {"connectorId": 1}) is None
    assert ocpp16.csms_answer("StartTransaction", {"transactionId": 1}, {"connectorId": junk}) is None
    assert ocpp16.csms_answer("StartTransaction", {"transactionId": 1}, junk) is None
    assert ocpp16.smart_charging_supported(junk) is None
    assert ocpp16.smart_charging_supported({"configurationKey": junk}) is None
    assert ocpp16.smart_charging_supported({"configurationKey": [junk]}) is None
    assert ocpp16.smart_charging_supported(
        {"configurationKey": [{"key": "SupportedFeatureProfiles", "value": junk}]}
    ) in (
        None,
        False,  # a text value without SmartCharging in it
    )
    for action in ("SetChargingProfile", "ClearChargingProfile"):
        ocpp16.station_answer_request(action, junk)
        ocpp16.station_answer_request(action, {"connectorId": 1, "csChargingProfiles": junk, "id": junk})
        ocpp16.station_answer_request(
            action, {"connectorId": 1, "csChargingProfiles": {"chargingSchedule": junk, "transactionId": junk}}
        )
    assert ocpp16.station_answer_request("SetChargingProfile", {"connectorId": junk, "csChargingProfiles": {}}) is None


async def test_a_16_station_being_asked_about_smart_charging_is_counted_at_its_maximum_and_sent_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Issue 15 Done-when 3, a slow answer: while the GetConfiguration is unanswered the station's EVSE
    counts at its maximum and nothing is sent to it (a profile planned meanwhile would reach a station
    that may lack SmartCharging); once it says SmartCharging it is balanced like any other."""
    fake = Recording(limit_amperes=40.0)
    answer = trio.Event()

    async def caller(station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        if action == "GetConfiguration":
            await answer.wait()
            value = "Core,SmartCharging"
            return CallOutcome(
                "answered",
                {"configurationKey": [{"key": "SupportedFeatureProfiles", "readonly": True, "value": value}]},
            )
        return await fake(station_id, action, payload)

    settings = loop_settings(min_interval_s=0, idle_current_amperes=6.0)
    balancer = Balancer(GRID_SITE, fake.limits_at, caller, settings, wall_clock=wall_clock)
    async with running(balancer), trio.open_nursery() as nursery:
        balancer.station_connected("OLD", "ocpp1.6")
        balancer.station_asked_steerable("OLD")  # as the router's feed does, before the probe task runs
        nursery.start_soon(probe_smart_charging, caller, balancer, "OLD")
        translated = ocpp16.station_call(
            "StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Available"}
        )
        assert translated is not None
        balancer.station_call("OLD", *translated)
        await settle()
        await trio.sleep(60)
        assert fake.set_profiles("OLD") == []
        old = row(balancer, "OLD")
        assert (old["steerable"], old["compliant"]) == (None, False)
        assert balancer.phase_bounds_amperes()[0] >= 32.0  # counted at its maximum meanwhile
        answer.set()
        await settle()
        await trio.sleep(60)
        assert row(balancer, "OLD")["steerable"] is True
        assert [p["chargingProfilePurpose"] for p in fake.set_profiles("OLD")] == ["TxDefaultProfile"]
        assert row(balancer, "OLD")["installed_amperes"] == 6.0
