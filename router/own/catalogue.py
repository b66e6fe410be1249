"""The own identity's catalogue: which components and variables it has, with their defaults.

The values come from the configuration (:class:`StandardValues`); :mod:`router.own.device_model`
enforces mutability, types and limits, and persists what the CSMS sets.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

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
    offline_threshold_s: int = 600
    reset_retries: int = 0
    network_profile_connection_attempts: int = 3
    organization_name: str = ""
    #: The most CSMS site profiles the controller keeps (SmartChargingCtrlr.Entries[ChargingProfiles] maxLimit).
    max_charging_profiles: int = 16


#: The controller's one network connection profile: the ``[csms]`` section of its configuration. It
#: does not implement SetNetworkProfile (B09), so this is the only slot there is.
NETWORK_PROFILE_SLOT: Final = "1"
#: Where the controller's time comes from: the host's system clock, which it reads and never sets
#: (keeping it right, e.g. with NTP, is the host's business). It takes no time from Heartbeat answers.
TIME_SOURCES: Final = ("RealTimeClock",)


@dataclass(frozen=True)
class LiveSources:
    """Where the live ReadOnly values come from; each is read at every GetVariables or report."""

    #: The identities of the stations connected right now (LocalController.ChargingStation).
    connected_stations: Callable[[], Iterable[str]]
    #: How many certificates the own connection has installed: CA certificates it trusts and its own
    #: client certificate (SecurityCtrlr.CertificateEntries).
    installed_certificates: Callable[[], int] = lambda: 0
    #: How many site charging profiles the controller holds (SmartChargingCtrlr.Entries[ChargingProfiles]).
    charging_profiles: Callable[[], int] = lambda: 0
    #: The wall clock, UTC (ClockCtrlr.DateTime).
    wall_clock: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC)


def rfc3339(moment: datetime.datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as OCPP wants it."""
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bool(value: bool) -> str:
    return "true" if value else "false"


def standard_variables(
    values: StandardValues,
    connected_stations: Callable[[], Iterable[str]] | LiveSources,
) -> list[Variable]:
    """The own identity's components and variables (Part 2 appendix 3, Part 2 §2 referenced variables).

    Every variable the referenced-components list marks *required* is here where it applies to a
    station without EVSEs; those about connectors, EVSEs and transactions (TxCtrlr, SampledDataCtrlr,
    MessageAttempts[TransactionEvent] …) and about functional blocks the controller does not implement
    (local authorisation list, display messages, tariffs, ISO 15118, monitoring) are left out.
    Mutabilities are those the specification gives; where it leaves the choice (SecurityCtrlr.Identity)
    the value is the configured one and read-only.
    """
    sources = connected_stations if isinstance(connected_stations, LiveSources) else LiveSources(connected_stations)

    def stations() -> str:
        return ",".join(sorted(sources.connected_stations()))

    def count(source: Callable[[], int]) -> Callable[[], str]:
        return lambda: str(source())

    def ro(component: str, name: str, data_type: DataType, value: str | Callable[[], str], **more: Any) -> Variable:
        return Variable(component, name, data_type, "ReadOnly", value, **more)

    def rw(component: str, name: str, data_type: DataType, value: str, **more: Any) -> Variable:
        return Variable(component, name, data_type, "ReadWrite", value, **more)

    v = values
    lc, security, comm, smart, data, clock = (
        "LocalController",
        "SecurityCtrlr",
        "OCPPCommCtrlr",
        "SmartChargingCtrlr",
        "DeviceDataCtrlr",
        "ClockCtrlr",
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
        # Used for the O of a certificate signing request, which the controller does not make (A00.FR.509):
        # empty until the CSMS sets it.
        rw(security, "OrganizationName", "string", v.organization_name, max_limit=64),
        ro(security, "CertificateEntries", "integer", count(sources.installed_certificates), min_limit=0),
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
        # The controller has no connectors to report after an outage, nor a reset that can fail, nor a
        # second network profile to switch to: these three are kept and reported, and change nothing.
        rw(comm, "OfflineThreshold", "integer", str(v.offline_threshold_s), unit="s", min_limit=0, max_limit=86_400),
        rw(comm, "ResetRetries", "integer", str(v.reset_retries), min_limit=0, max_limit=10),
        rw(comm, "NetworkConfigurationPriority", "SequenceList", NETWORK_PROFILE_SLOT,
           values_list=(NETWORK_PROFILE_SLOT,), min_length=1),
        rw(comm, "NetworkProfileConnectionAttempts", "integer", str(v.network_profile_connection_attempts),
           min_limit=1, max_limit=100),
        rw(smart, "Enabled", "boolean", _bool(v.smart_charging_enabled)),
        ro(smart, "Available", "boolean", "true"),
        rw(smart, "LimitChangeSignificance", "decimal", f"{v.limit_change_significance_percent:g}", unit="Percent",
           min_limit=0, max_limit=100),
        rw(smart, "NotifyChargingLimitWithSchedules", "boolean", _bool(v.notify_charging_limit_with_schedules)),
        ro(smart, "RateUnit", "MemberList", ",".join(v.rate_units), values_list=("A", "W")),
        ro(smart, "ProfileStackLevel", "integer", str(v.profile_stack_level), min_limit=0),
        ro(smart, "PeriodsPerSchedule", "integer", str(v.periods_per_schedule), min_limit=1),
        ro(smart, "Entries", "integer", count(sources.charging_profiles), instance="ChargingProfiles",
           min_limit=0, max_limit=v.max_charging_profiles),
        ro(clock, "DateTime", "dateTime", lambda: rfc3339(sources.wall_clock())),
        rw(clock, "TimeSource", "SequenceList", ",".join(TIME_SOURCES), values_list=TIME_SOURCES, min_length=1),
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
