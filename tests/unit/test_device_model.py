"""The own identity's device model: what GetVariables, SetVariables and the reports answer (B05-B08).

The model is pure; it is tested here with the real state store in a temporary directory, so that
"values set survive a restart" means what it says: the store is closed and opened again. Every
answer and every NotifyReport is checked against the OCA schemas.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.app import build_app
from router.config import parse_settings
from router.ocppj import encode_call
from router.own.catalogue import LiveSources, StandardValues, standard_variables
from router.own.device_model import (
    GET_REPORT,
    GET_VARIABLES,
    SET_VARIABLES,
    DeviceModel,
    Variable,
    notify_report_parts,
)
from router.own.service import OwnIdentitySettings
from router.store import Store
from router.tls import CsmsTlsSettings, client_context
from tests.support.certs import make_pki
from tests.support.schemas import validate_call, validate_result

VALUES = StandardValues(identity="LC01", vendor_name="ocpp-lc", model="LC-1", firmware_version="1.0.0")
GENERATED_AT = "2026-11-25T10:00:00.000Z"


class Site:
    """The stations connected right now (what the LocalController component lists)."""

    def __init__(self) -> None:
        self.stations = ["CS02", "CS01"]

    def connected(self) -> list[str]:
        return list(self.stations)


@pytest.fixture
def site() -> Site:
    return Site()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as opened:
        yield opened


def open_model(store: Store, site: Site, values: StandardValues = VALUES) -> DeviceModel:
    return DeviceModel(standard_variables(values, site.connected), store.namespace("device_model"))


def get(model: DeviceModel, *items: dict[str, Any]) -> list[dict[str, Any]]:
    request = GET_VARIABLES.validate_python({"getVariableData": list(items)})
    response = model.get_variables(request)
    validate_result("GetVariables", response)
    results: list[dict[str, Any]] = response["getVariableResult"]
    assert len(results) == len(items)  # B06.FR.01
    return results


def set_(model: DeviceModel, *items: dict[str, Any]) -> list[dict[str, Any]]:
    request = SET_VARIABLES.validate_python({"setVariableData": list(items)})
    response = model.set_variables(request)
    validate_result("SetVariables", response)
    results: list[dict[str, Any]] = response["setVariableResult"]
    assert len(results) == len(items)  # B05.FR.01
    return results


def cv(component: str, variable: str, instance: str | None = None, **extra: Any) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": variable}
    if instance is not None:
        ref["instance"] = instance
    return {"component": {"name": component}, "variable": ref, **extra}


def value_of(model: DeviceModel, component: str, variable: str, instance: str | None = None) -> str | None:
    result = get(model, cv(component, variable, instance))[0]
    assert result["attributeStatus"] == "Accepted", result
    return result.get("attributeValue")


# -- GetVariables -----------------------------------------------------------------------------------


def test_get_variables_answers_each_item_with_the_spec_statuses(store: Store, site: Site) -> None:
    model = open_model(store, site)
    results = get(
        model,
        cv("localcontroller", "IDENTITY"),  # names are case-insensitive
        cv("OCPPCommCtrlr", "HeartbeatInterval", attributeType="Target"),
        cv("SecurityCtrlr", "BasicAuthPassword"),
        cv("EVSE", "AvailabilityState"),
        cv("OCPPCommCtrlr", "NoSuchThing"),
        cv("OCPPCommCtrlr", "MessageTimeout"),  # exists only as instance Default (B06.FR.15)
        cv("OCPPCommCtrlr", "MessageTimeout", "Default"),
        {"component": {"name": "OCPPCommCtrlr", "evse": {"id": 1}}, "variable": {"name": "HeartbeatInterval"}},
    )
    assert [r["attributeStatus"] for r in results] == [
        "Accepted",
        "NotSupportedAttributeType",  # B06.FR.08
        "Rejected",  # B06.FR.09: write-only
        "UnknownComponent",  # B06.FR.06
        "UnknownVariable",  # B06.FR.07
        "UnknownVariable",
        "Accepted",
        "UnknownComponent",  # our components have no EVSE
    ]
    # B06.FR.02/03/11: the component and variable as asked, attributeType Actual when not asked.
    assert results[0]["component"] == {"name": "localcontroller"} and results[0]["variable"] == {"name": "IDENTITY"}
    assert results[0]["attributeType"] == "Actual" and results[0]["attributeValue"] == "LC01"
    assert results[1]["attributeType"] == "Target"
    assert results[6]["attributeValue"] == "30"
    # A value is given only when Accepted; the password never.
    assert all("attributeValue" not in r for r in results if r["attributeStatus"] != "Accepted")
    assert results[2]["attributeStatusInfo"] == {"reasonCode": "WriteOnly"}


def test_local_controller_lists_the_stations_connected_now(store: Store, site: Site) -> None:
    model = open_model(store, site)
    assert value_of(model, "LocalController", "ChargingStation") == "CS01,CS02"
    site.stations.append("CS00")
    assert value_of(model, "LocalController", "ChargingStation") == "CS00,CS01,CS02"
    site.stations.clear()
    assert value_of(model, "LocalController", "ChargingStation") == ""


def test_a_station_list_longer_than_reporting_value_size_is_cut_at_a_whole_identity(store: Store, site: Site) -> None:
    site.stations = [f"STATION-{n:04d}-{'x' * 30}" for n in range(200)]  # 44 characters each, 8,999 in all
    model = open_model(store, site)
    result = get(model, cv("LocalController", "ChargingStation"))[0]
    assert result["attributeStatus"] == "Accepted"
    shown = result["attributeValue"].split(",")
    assert len(result["attributeValue"]) <= 2500
    assert shown == sorted(site.stations)[: len(shown)]  # whole identities, in order
    assert result["attributeStatusInfo"]["reasonCode"] == "TooLargeElement"
    assert f"{len(shown)} of 200" in result["attributeStatusInfo"]["additionalInfo"]


# -- SetVariables -----------------------------------------------------------------------------------


def test_set_variables_enforces_mutability_type_and_limits(store: Store, site: Site) -> None:
    model = open_model(store, site)
    results = set_(
        model,
        cv("OCPPCommCtrlr", "HeartbeatInterval", attributeValue="120"),
        cv("OCPPCommCtrlr", "HeartbeatInterval", attributeValue="0"),  # below minLimit 1
        cv("OCPPCommCtrlr", "WebSocketPingInterval", attributeValue="012"),  # no leading zeros
        cv("OCPPCommCtrlr", "RetryBackOffRepeatTimes", attributeValue="2.5"),
        cv("SmartChargingCtrlr", "LimitChangeSignificance", attributeValue="7.25"),
        cv("SmartChargingCtrlr", "LimitChangeSignificance", attributeValue="101"),
        cv("SmartChargingCtrlr", "Enabled", attributeValue="TRUE"),  # only "true" and "false"
        cv("SmartChargingCtrlr", "NotifyChargingLimitWithSchedules", attributeValue="true"),
        cv("LocalController", "Identity", attributeValue="LC02"),  # read-only
        cv("SmartChargingCtrlr", "RateUnit", attributeValue="A"),  # read-only
        cv("OCPPCommCtrlr", "HeartbeatInterval", attributeValue="60", attributeType="MaxSet"),
        cv("Connector", "Enabled", attributeValue="true"),
        cv("SmartChargingCtrlr", "Colour", attributeValue="red"),
    )
    statuses = [(r["attributeStatus"], r.get("attributeStatusInfo", {}).get("reasonCode")) for r in results]
    assert statuses == [
        ("Accepted", None),  # B05.FR.10
        ("Rejected", "ValueTooLow"),  # B05.FR.08
        ("Rejected", "InvalidValue"),  # B05.FR.07
        ("Rejected", "InvalidValue"),
        ("Accepted", None),
        ("Rejected", "ValueTooHigh"),
        ("Rejected", "InvalidValue"),
        ("Accepted", None),
        ("Rejected", "ReadOnly"),  # B05.FR.09
        ("Rejected", "ReadOnly"),
        ("NotSupportedAttributeType", None),  # B05.FR.06
        ("UnknownComponent", None),  # B05.FR.04
        ("UnknownVariable", None),  # B05.FR.05
    ]
    assert results[10]["attributeType"] == "MaxSet" and results[0]["attributeType"] == "Actual"  # B05.FR.03/12
    assert value_of(model, "OCPPCommCtrlr", "HeartbeatInterval") == "120"
    assert value_of(model, "SmartChargingCtrlr", "LimitChangeSignificance") == "7.25"
    assert value_of(model, "SmartChargingCtrlr", "Enabled") == "true"  # unchanged by the rejected "TRUE"
    assert value_of(model, "LocalController", "Identity") == "LC01"


def test_accepted_values_survive_a_restart_and_defaults_apply_until_then(tmp_path: Path, site: Site) -> None:
    with Store.open(tmp_path / "state") as store:
        model = open_model(store, site)
        assert value_of(model, "OCPPCommCtrlr", "RetryBackOffWaitMinimum") == "5"  # the configured default
        set_(
            model,
            cv("OCPPCommCtrlr", "RetryBackOffWaitMinimum", attributeValue="17"),
            cv("SmartChargingCtrlr", "Enabled", attributeValue="false"),
            cv("OCPPCommCtrlr", "HeartbeatInterval", attributeValue="-5"),  # rejected: not stored
        )
    with Store.open(tmp_path / "state") as store:
        # A new configuration default does not override what the CSMS set; the rejected value left no trace.
        model = open_model(store, site, StandardValues(**{**VALUES.__dict__, "retry_wait_minimum_s": 9}))
        assert value_of(model, "OCPPCommCtrlr", "RetryBackOffWaitMinimum") == "17"
        assert value_of(model, "SmartChargingCtrlr", "Enabled") == "false"
        assert value_of(model, "OCPPCommCtrlr", "HeartbeatInterval") == "300"


def test_a_stored_value_that_no_longer_fits_falls_back_to_the_default(store: Store, site: Site) -> None:
    store.namespace("device_model").put("OCPPCommCtrlr.RetryBackOffRepeatTimes", "99")  # maxLimit is 16
    model = open_model(store, site)
    assert value_of(model, "OCPPCommCtrlr", "RetryBackOffRepeatTimes") == "5"


def test_basic_auth_password_is_write_only_and_must_be_a_password_string(store: Store, site: Site) -> None:
    model = open_model(store, site)
    changes: list[tuple[str, str]] = []
    model.on_change(lambda variable, value: changes.append((variable.key, value)))
    results = set_(
        model,
        cv("SecurityCtrlr", "BasicAuthPassword", attributeValue="short"),
        cv("SecurityCtrlr", "BasicAuthPassword", attributeValue="has spaces in it, not allowed"),
        cv("SecurityCtrlr", "BasicAuthPassword", attributeValue="x" * 41),
        cv("SecurityCtrlr", "BasicAuthPassword", attributeValue="Correct-Horse:Battery|42"),
    )
    assert [r["attributeStatus"] for r in results] == ["Rejected", "Rejected", "Rejected", "Accepted"]
    # Nothing in an answer repeats a password, accepted or not.
    assert "Correct-Horse" not in repr(results) and "short" not in repr(results)
    assert get(model, cv("SecurityCtrlr", "BasicAuthPassword"))[0]["attributeStatus"] == "Rejected"
    # The controller itself uses it (for the next connection's Basic auth).
    assert model.value("SecurityCtrlr", "BasicAuthPassword") == "Correct-Horse:Battery|42"
    assert changes == [("SecurityCtrlr.BasicAuthPassword", "Correct-Horse:Battery|42")]


def test_internal_changes_are_checked_and_heard(store: Store, site: Site) -> None:
    model = open_model(store, site)
    heard: list[str] = []
    model.on_change(lambda variable, value: heard.append(f"{variable.key}={value}"))
    model.set_internal("OCPPCommCtrlr", "HeartbeatInterval", "45")
    with pytest.raises(ValueError):
        model.set_internal("OCPPCommCtrlr", "HeartbeatInterval", "0")
    assert heard == ["OCPPCommCtrlr.HeartbeatInterval=45"]
    assert value_of(model, "OCPPCommCtrlr", "HeartbeatInterval") == "45"


# -- reports --------------------------------------------------------------------------------------


def reported(report: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Report entries by 'Component.Variable[Instance]'."""
    entries = {}
    for entry in report:
        key = f"{entry['component']['name']}.{entry['variable']['name']}"
        if "instance" in entry["variable"]:
            key += f"[{entry['variable']['instance']}]"
        entries[key] = entry
    return entries


def parts_of(report: list[dict[str, Any]], items: int = 100, size: int = 65_536) -> list[dict[str, Any]]:
    parts = notify_report_parts(
        report, request_id=7, generated_at=GENERATED_AT, items_per_message=items, bytes_per_message=size
    )
    for part in parts:
        validate_call("NotifyReport", part)
    return parts


def test_full_inventory_reports_every_variable_with_its_characteristics(store: Store, site: Site) -> None:
    model = open_model(store, site)
    entries = reported(model.base_report("FullInventory"))
    assert set(entries) == {variable.key for variable in model.variables}
    assert {"LocalController.ChargingStation", "DeviceDataCtrlr.ItemsPerMessage[GetReport]"} <= set(entries)
    heartbeat = entries["OCPPCommCtrlr.HeartbeatInterval"]
    assert heartbeat["variableAttribute"] == [
        {"type": "Actual", "mutability": "ReadWrite", "persistent": True, "constant": False, "value": "300"}
    ]
    assert heartbeat["variableCharacteristics"] == {
        "dataType": "integer",
        "supportsMonitoring": False,
        "unit": "s",
        "minLimit": 1,
        "maxLimit": 86_400,
    }
    password = entries["SecurityCtrlr.BasicAuthPassword"]["variableAttribute"][0]
    assert password["mutability"] == "WriteOnly" and "value" not in password
    stations = entries["LocalController.ChargingStation"]["variableAttribute"][0]
    assert stations["value"] == "CS01,CS02" and stations["persistent"] is False
    assert entries["SmartChargingCtrlr.RateUnit"]["variableCharacteristics"]["valuesList"] == "A,W"
    parts_of(list(entries.values()))


def test_configuration_and_summary_inventories(store: Store, site: Site) -> None:
    model = open_model(store, site)
    configuration = reported(model.base_report("ConfigurationInventory"))
    assert configuration  # B07.FR.07: what the operator can set, and nothing else
    assert all(e["variableAttribute"][0]["mutability"] in ("ReadWrite", "WriteOnly") for e in configuration.values())
    assert "OCPPCommCtrlr.RetryBackOffRandomRange" in configuration and "SecurityCtrlr.Identity" not in configuration
    summary = reported(model.base_report("SummaryInventory"))
    assert set(summary) == {"LocalController.Enabled", "LocalController.Problem"}
    parts_of(list(configuration.values()))
    parts_of(list(summary.values()))


def report(model: DeviceModel, **request: Any) -> dict[str, dict[str, Any]]:
    return reported(model.custom_report(GET_REPORT.validate_python({"requestId": 3, **request})))


def test_get_report_by_component_and_variable(store: Store, site: Site) -> None:
    model = open_model(store, site)
    # B08.FR.20: no variable, every variable of the component.
    whole = report(model, componentVariable=[{"component": {"name": "SmartChargingCtrlr"}}])
    assert set(whole) == {v.key for v in model.variables if v.component == "SmartChargingCtrlr"}
    # B08.FR.21: a variable without instance, every instance of it.
    items = report(
        model, componentVariable=[{"component": {"name": "DeviceDataCtrlr"}, "variable": {"name": "ItemsPerMessage"}}]
    )
    assert set(items) == {
        f"DeviceDataCtrlr.ItemsPerMessage[{m}]" for m in ("GetReport", "GetVariables", "SetVariables")
    }
    one = report(
        model,
        componentVariable=[
            {
                "component": {"name": "DeviceDataCtrlr"},
                "variable": {"name": "ItemsPerMessage", "instance": "GetReport"},
            },
            {"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "heartbeatinterval"}},
            {"component": {"name": "EVSE"}},
        ],
    )
    assert set(one) == {"DeviceDataCtrlr.ItemsPerMessage[GetReport]", "OCPPCommCtrlr.HeartbeatInterval"}
    assert report(model, componentVariable=[{"component": {"name": "OCPPCommCtrlr", "instance": "2"}}]) == {}


def test_get_report_by_component_criteria(store: Store, site: Site) -> None:
    model = open_model(store, site)
    everything = {v.key for v in model.variables}
    # B08.FR.09: Enabled true, or no Enabled variable at all: every component while all are enabled.
    assert set(report(model, componentCriteria=["Enabled"])) == everything
    set_(model, cv("SmartChargingCtrlr", "Enabled", attributeValue="false"))
    enabled = report(model, componentCriteria=["Enabled"])
    assert not any(key.startswith("SmartChargingCtrlr.") for key in enabled)
    assert any(key.startswith("LocalController.") for key in enabled)
    # B08.FR.10: Problem only where Problem is true; nothing has a problem.
    assert report(model, componentCriteria=["Problem"]) == {}
    # B08.FR.13: criteria are ORed; B08.FR.05: componentVariable narrows the result further.
    both = report(
        model,
        componentCriteria=["Problem", "Available"],
        componentVariable=[{"component": {"name": "SmartChargingCtrlr"}, "variable": {"name": "Available"}}],
    )
    assert set(both) == {"SmartChargingCtrlr.Available"}


# -- NotifyReport parts ---------------------------------------------------------------------------


def frame_bytes(part: dict[str, Any]) -> int:
    return len(encode_call(str(uuid.uuid4()), "NotifyReport", part).encode())


def test_parts_respect_items_per_message_and_number_the_sequence(store: Store, site: Site) -> None:
    model = open_model(store, site)
    full = model.base_report("FullInventory")
    parts = parts_of(full, items=4)
    assert [len(p["reportData"]) for p in parts[:-1]] == [4] * (len(parts) - 1)
    assert 1 <= len(parts[-1]["reportData"]) <= 4
    assert [p["seqNo"] for p in parts] == list(range(len(parts)))  # B07.FR.10
    assert [p["tbc"] for p in parts] == [True] * (len(parts) - 1) + [False]
    assert {p["requestId"] for p in parts} == {7}  # B07.FR.04
    assert [entry for p in parts for entry in p["reportData"]] == full  # nothing lost, nothing reordered


def test_parts_respect_bytes_per_message(store: Store, site: Site) -> None:
    model = open_model(store, site)
    full = model.base_report("FullInventory")
    limit = 1200
    parts = parts_of(full, size=limit)
    assert len(parts) > 2
    assert all(frame_bytes(p) <= limit for p in parts)
    assert [entry for p in parts for entry in p["reportData"]] == full
    # An entry larger than the limit on its own still goes, alone.
    huge = parts_of(full[:3], size=100)
    assert [len(p["reportData"]) for p in huge] == [1, 1, 1]


def test_a_variable_definition_is_unique() -> None:
    duplicate = [Variable("X", "Y", "integer", "ReadOnly", "1"), Variable("x", "y", "integer", "ReadOnly", "2")]
    with pytest.raises(ValueError, match="defined twice"):
        DeviceModel(duplicate, {})  # type: ignore[arg-type]  # never read: construction fails first


# -- the variables Part 2 requires of every station (#13.10) ----------------------------------------

#: Part 2, "Referenced Components and Variables": every variable marked required that applies to a
#: station without EVSEs, connectors or transactions (see router/own/catalogue.py for what is left out).
REQUIRED_OF_A_STATION_WITHOUT_EVSES = {
    "ClockCtrlr.DateTime",
    "ClockCtrlr.TimeSource",
    "DeviceDataCtrlr.BytesPerMessage[GetReport]",
    "DeviceDataCtrlr.BytesPerMessage[GetVariables]",
    "DeviceDataCtrlr.BytesPerMessage[SetVariables]",
    "DeviceDataCtrlr.ItemsPerMessage[GetReport]",
    "DeviceDataCtrlr.ItemsPerMessage[GetVariables]",
    "DeviceDataCtrlr.ItemsPerMessage[SetVariables]",
    "OCPPCommCtrlr.FileTransferProtocols",
    "OCPPCommCtrlr.MessageTimeout[Default]",
    "OCPPCommCtrlr.NetworkConfigurationPriority",
    "OCPPCommCtrlr.NetworkProfileConnectionAttempts",
    "OCPPCommCtrlr.OfflineThreshold",
    "OCPPCommCtrlr.ResetRetries",
    "SecurityCtrlr.CertificateEntries",
    "SecurityCtrlr.OrganizationName",
    "SecurityCtrlr.SecurityProfile",
    "SmartChargingCtrlr.Entries[ChargingProfiles]",
    "SmartChargingCtrlr.LimitChangeSignificance",
    "SmartChargingCtrlr.PeriodsPerSchedule",
    "SmartChargingCtrlr.ProfileStackLevel",
    "SmartChargingCtrlr.RateUnit",
}


class Live:
    """What the live values read: certificates, site profiles, the wall clock."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.certificates = 2
        self.profiles = 0
        self.now = datetime.datetime(2026, 11, 25, 10, 0, 0, 250_000, tzinfo=datetime.UTC)

    def sources(self) -> LiveSources:
        return LiveSources(
            self.site.connected,
            installed_certificates=lambda: self.certificates,
            charging_profiles=lambda: self.profiles,
            wall_clock=lambda: self.now,
        )


def open_live_model(store: Store, live: Live) -> DeviceModel:
    return DeviceModel(standard_variables(VALUES, live.sources()), store.namespace("device_model"))


def test_full_inventory_has_every_required_variable_of_a_station_without_evses(store: Store, site: Site) -> None:
    model = open_live_model(store, Live(site))
    entries = reported(model.base_report("FullInventory"))
    assert set(entries) >= REQUIRED_OF_A_STATION_WITHOUT_EVSES, REQUIRED_OF_A_STATION_WITHOUT_EVSES - set(entries)
    # The mutabilities Part 2 gives them.
    mutability = {key: entries[key]["variableAttribute"][0]["mutability"] for key in entries}
    assert {key for key in REQUIRED_OF_A_STATION_WITHOUT_EVSES if mutability[key] == "ReadWrite"} == {
        "ClockCtrlr.TimeSource",
        "OCPPCommCtrlr.NetworkConfigurationPriority",
        "OCPPCommCtrlr.NetworkProfileConnectionAttempts",
        "OCPPCommCtrlr.OfflineThreshold",
        "OCPPCommCtrlr.ResetRetries",
        "SecurityCtrlr.OrganizationName",
        "SmartChargingCtrlr.LimitChangeSignificance",
    }
    clock = entries["ClockCtrlr.DateTime"]
    assert clock["variableCharacteristics"]["dataType"] == "dateTime"
    assert clock["variableAttribute"][0]["persistent"] is False and clock["variableAttribute"][0]["constant"] is False
    priority = entries["OCPPCommCtrlr.NetworkConfigurationPriority"]["variableCharacteristics"]
    assert priority["dataType"] == "SequenceList" and priority["valuesList"] == "1"  # the slots there are
    assert entries["SmartChargingCtrlr.Entries[ChargingProfiles]"]["variableCharacteristics"]["maxLimit"] == 16
    # The whole inventory goes out as schema-valid NotifyReport frames.
    for part in parts_of(list(entries.values()), items=10):
        validate_call("NotifyReport", part)


def test_live_values_count_what_the_controller_holds_and_tell_the_time(store: Store, site: Site) -> None:
    live = Live(site)
    model = open_live_model(store, live)
    assert value_of(model, "SecurityCtrlr", "CertificateEntries") == "2"
    assert value_of(model, "SmartChargingCtrlr", "Entries", "ChargingProfiles") == "0"
    assert value_of(model, "ClockCtrlr", "DateTime") == "2026-11-25T10:00:00.250Z"
    assert value_of(model, "ClockCtrlr", "TimeSource") == "RealTimeClock"
    live.profiles, live.certificates = 3, 1
    live.now += datetime.timedelta(seconds=90)
    assert value_of(model, "SmartChargingCtrlr", "Entries", "ChargingProfiles") == "3"
    assert value_of(model, "SecurityCtrlr", "CertificateEntries") == "1"
    assert value_of(model, "ClockCtrlr", "DateTime") == "2026-11-25T10:01:30.250Z"
    # Reports read them at the moment they are made, too.
    entries = reported(model.base_report("FullInventory"))
    assert entries["SmartChargingCtrlr.Entries[ChargingProfiles]"]["variableAttribute"][0]["value"] == "3"


def test_the_new_read_only_variables_refuse_writes_and_the_settings_keep_to_their_limits(
    store: Store, site: Site
) -> None:
    model = open_live_model(store, Live(site))
    results = set_(
        model,
        cv("SecurityCtrlr", "CertificateEntries", attributeValue="5"),
        cv("SmartChargingCtrlr", "Entries", "ChargingProfiles", attributeValue="0"),
        cv("ClockCtrlr", "DateTime", attributeValue="2027-01-01T00:00:00Z"),
        cv("ClockCtrlr", "TimeSource", attributeValue="Heartbeat"),  # not a source the controller has
        cv("ClockCtrlr", "TimeSource", attributeValue="RealTimeClock"),
        cv("OCPPCommCtrlr", "NetworkConfigurationPriority", attributeValue="2"),  # no such slot
        cv("OCPPCommCtrlr", "NetworkConfigurationPriority", attributeValue=""),
        cv("OCPPCommCtrlr", "OfflineThreshold", attributeValue="-1"),
        cv("OCPPCommCtrlr", "OfflineThreshold", attributeValue="900"),
        cv("OCPPCommCtrlr", "ResetRetries", attributeValue="2"),
        cv("OCPPCommCtrlr", "NetworkProfileConnectionAttempts", attributeValue="0"),
        cv("SecurityCtrlr", "OrganizationName", attributeValue="Example CPO Ltd"),
    )
    statuses = [(r["attributeStatus"], r.get("attributeStatusInfo", {}).get("reasonCode")) for r in results]
    assert statuses == [
        ("Rejected", "ReadOnly"),  # B05.FR.09
        ("Rejected", "ReadOnly"),
        ("Rejected", "ReadOnly"),
        ("Rejected", "InvalidValue"),  # B05.FR.07
        ("Accepted", None),
        ("Rejected", "InvalidValue"),
        ("Rejected", "ValueTooLow"),
        ("Rejected", "ValueTooLow"),  # B05.FR.08
        ("Accepted", None),
        ("Accepted", None),
        ("Rejected", "ValueTooLow"),
        ("Accepted", None),
    ]
    assert value_of(model, "SecurityCtrlr", "CertificateEntries") == "2"
    assert value_of(model, "OCPPCommCtrlr", "OfflineThreshold") == "900"
    assert value_of(model, "SecurityCtrlr", "OrganizationName") == "Example CPO Ltd"


def test_certificate_entries_counts_the_certificates_of_the_own_connection(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")

    def own(profile: int, **tls: Path) -> OwnIdentitySettings:
        settings = CsmsTlsSettings.model_validate({"security_profile": profile, **tls})
        return OwnIdentitySettings(
            identity="LC01", csms_host="127.0.0.1", csms_port=1, ssl_context=client_context(settings),
            security_profile=profile,
        )  # fmt: skip

    assert own(1).installed_certificates() == 0  # plain ws://: no certificates at all
    # Profile 2: the CSO CA it trusts; profile 3: that and its own client certificate.
    assert own(2, ca_file=pki.cso_ca.cert_file).installed_certificates() == 1
    three = own(
        3,
        ca_file=pki.cso_ca.cert_file,
        cert_file=pki.controller_client.cert_file,
        key_file=pki.controller_client.key_file,
    )
    assert three.installed_certificates() == 2


async def test_the_appliance_counts_the_site_profiles_it_holds(tmp_path: Path) -> None:
    settings = parse_settings(
        {
            "csms": {"url": "ws://127.0.0.1:9/ocpp"},
            "stations": {"listen": "127.0.0.1:0"},
            "http": {"listen": "127.0.0.1:0"},
            "state": {"dir": str(tmp_path / "state")},
        }
    )
    entries = cv("SmartChargingCtrlr", "Entries", "ChargingProfiles")
    with Store.open(tmp_path / "state") as store:
        own = build_app(settings, store).own
        assert own is not None
        dispatch = own.connection.dispatcher.dispatch

        def count() -> str:
            answer = dispatch("GetVariables", {"getVariableData": [entries]}).payload
            validate_result("GetVariables", answer)
            value: str = answer["getVariableResult"][0]["attributeValue"]
            return value

        assert count() == "0"
        for profile_id in (1, 2):
            schedule = {
                "id": profile_id,
                "chargingRateUnit": "A",
                "startSchedule": "2020-01-01T00:00:00Z",
                "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 100.0}],
            }
            profile = {
                "id": profile_id,
                "stackLevel": profile_id,
                "chargingProfilePurpose": "ChargingStationMaxProfile",
                "chargingProfileKind": "Absolute",
                "chargingSchedule": [schedule],
            }
            answer = dispatch("SetChargingProfile", {"evseId": 0, "chargingProfile": profile}).payload
            assert answer["status"] == "Accepted", answer
        assert count() == "2"  # the CSMS's site profiles the controller holds (K01 on the own identity)
        dispatch("ClearChargingProfile", {"chargingProfileId": 1})
        assert count() == "1"
