"""The own identity's catalogue: which components and variables it has, with their defaults.

The values come from the configuration (:class:`StandardValues`); :mod:`router.own.device_model`
enforces mutability, types and limits, and persists what the CSMS sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from router.own.device_model import (
    CONFIGURATION_VALUE_SIZE,
    PASSWORD_STRING,
    REPORTING_VALUE_SIZE,
    DataType,
    Variable,
)


@dataclass(frozen=True)
class StandardValues:
    """What the configuration says about the standard variables (defaults and constants)."""

    identity: str
    vendor_name: str
    model: str
    firmware_version: str
    serial_number: str | None = None
    security_profile: int = 1
    basic_auth_password: str | None = None
    heartbeat_interval_s: int = 300
    websocket_ping_interval_s: int = 60
    retry_wait_minimum_s: int = 5
    retry_random_range_s: int = 10
    retry_repeat_times: int = 5
    message_timeout_s: int = 30
    file_transfer_protocols: tuple[str, ...] = ("HTTP", "HTTPS")
    smart_charging_enabled: bool = True
    limit_change_significance_percent: float = 5.0
    notify_charging_limit_with_schedules: bool = False
    rate_units: tuple[str, ...] = ("A", "W")
    profile_stack_level: int = 8
    periods_per_schedule: int = 24
    items_per_message_get_report: int = 100
    bytes_per_message_get_report: int = 65_536
    items_per_message_get_variables: int = 50
    bytes_per_message_get_variables: int = 65_536
    items_per_message_set_variables: int = 50
    bytes_per_message_set_variables: int = 65_536


def _bool(value: bool) -> str:
    return "true" if value else "false"


def standard_variables(values: StandardValues, connected_stations: Callable[[], Iterable[str]]) -> list[Variable]:
    """The own identity's components and variables (Part 2 appendix 3, Part 2 §2 referenced variables).

    Mutabilities are those the specification gives; where it leaves the choice (SecurityCtrlr.Identity)
    the value is the configured one and read-only.
    """

    def stations() -> str:
        return ",".join(sorted(connected_stations()))

    def ro(component: str, name: str, data_type: DataType, value: str | Callable[[], str], **more: Any) -> Variable:
        return Variable(component, name, data_type, "ReadOnly", value, **more)

    def rw(component: str, name: str, data_type: DataType, value: str, **more: Any) -> Variable:
        return Variable(component, name, data_type, "ReadWrite", value, **more)

    v = values
    lc, security, comm, smart, data = (
        "LocalController",
        "SecurityCtrlr",
        "OCPPCommCtrlr",
        "SmartChargingCtrlr",
        "DeviceDataCtrlr",
    )
    password = Variable(security, "BasicAuthPassword", "string", "WriteOnly", v.basic_auth_password or "",
                        max_limit=40, min_length=16, charset=PASSWORD_STRING)  # fmt: skip
    variables = [
        ro(lc, "Identity", "string", v.identity, max_limit=48),
        # Nothing can take the controller out of service yet, so Enabled is a fact, not a setting.
        ro(lc, "Enabled", "boolean", "true", summary=True),
        ro(lc, "Problem", "boolean", "false", summary=True),
        ro(lc, "Manufacturer", "string", v.vendor_name),
        ro(lc, "Model", "string", v.model),
        *([ro(lc, "SerialNumber", "string", v.serial_number)] if v.serial_number else []),
        ro(lc, "FirmwareVersion", "string", v.firmware_version),
        ro(lc, "ChargingStation", "MemberList", stations, max_limit=REPORTING_VALUE_SIZE),
        ro(security, "Identity", "string", v.identity, max_limit=48),
        ro(security, "SecurityProfile", "integer", str(v.security_profile), min_limit=1, max_limit=3),
        password,
        rw(comm, "HeartbeatInterval", "integer", str(v.heartbeat_interval_s), unit="s", min_limit=1, max_limit=86_400),
        rw(comm, "WebSocketPingInterval", "integer", str(v.websocket_ping_interval_s), unit="s",
           min_limit=0, max_limit=86_400),
        rw(comm, "RetryBackOffWaitMinimum", "integer", str(v.retry_wait_minimum_s), unit="s",
           min_limit=1, max_limit=3600),
        rw(comm, "RetryBackOffRandomRange", "integer", str(v.retry_random_range_s), unit="s",
           min_limit=0, max_limit=3600),
        rw(comm, "RetryBackOffRepeatTimes", "integer", str(v.retry_repeat_times), min_limit=0, max_limit=16),
        ro(comm, "MessageTimeout", "integer", str(v.message_timeout_s), instance="Default", unit="s", min_limit=1),
        ro(comm, "FileTransferProtocols", "MemberList", ",".join(v.file_transfer_protocols),
           values_list=("FTP", "FTPS", "HTTP", "HTTPS", "SFTP")),
        rw(smart, "Enabled", "boolean", _bool(v.smart_charging_enabled)),
        ro(smart, "Available", "boolean", "true"),
        rw(smart, "LimitChangeSignificance", "decimal", f"{v.limit_change_significance_percent:g}", unit="Percent",
           min_limit=0, max_limit=100),
        rw(smart, "NotifyChargingLimitWithSchedules", "boolean", _bool(v.notify_charging_limit_with_schedules)),
        ro(smart, "RateUnit", "MemberList", ",".join(v.rate_units), values_list=("A", "W")),
        ro(smart, "ProfileStackLevel", "integer", str(v.profile_stack_level), min_limit=0),
        ro(smart, "PeriodsPerSchedule", "integer", str(v.periods_per_schedule), min_limit=1),
    ]  # fmt: skip
    limits = (
        ("GetReport", v.items_per_message_get_report, v.bytes_per_message_get_report),
        ("GetVariables", v.items_per_message_get_variables, v.bytes_per_message_get_variables),
        ("SetVariables", v.items_per_message_set_variables, v.bytes_per_message_set_variables),
    )
    for message, items, size in limits:
        variables.append(ro(data, "ItemsPerMessage", "integer", str(items), instance=message, min_limit=1))
        variables.append(ro(data, "BytesPerMessage", "integer", str(size), instance=message, min_limit=1))
    variables.append(ro(data, "ConfigurationValueSize", "integer", str(CONFIGURATION_VALUE_SIZE),
                        max_limit=CONFIGURATION_VALUE_SIZE))  # fmt: skip
    variables.append(
        ro(data, "ReportingValueSize", "integer", str(REPORTING_VALUE_SIZE), max_limit=REPORTING_VALUE_SIZE)
    )
    return variables
