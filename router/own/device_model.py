"""The own identity's device model (Part 1 §4, Part 2 B05–B08), without I/O.

Theory of operation. The controller reports a handful of components, each with a fixed list of
:class:`Variable` definitions (:func:`standard_variables`): ``LocalController``, ``SecurityCtrlr``,
``OCPPCommCtrlr``, ``SmartChargingCtrlr`` and ``DeviceDataCtrlr``. Every variable has one attribute,
``Actual`` (so Target/MinSet/MaxSet are ``NotSupportedAttributeType``), a mutability, a data type and
its limits. Its value is one of:

* a constant from the configuration (ReadOnly: Identity, MessageTimeout, ItemsPerMessage …);
* a live value computed on every read (ReadOnly: the identities of the connected stations);
* a setting (ReadWrite or WriteOnly): the configured default until the CSMS sets it with
  SetVariables; an accepted value is kept in the store namespace handed in (``device_model``) and so
  survives a restart, taking precedence over the configured default from then on.

Names are compared case-insensitively (the schemas say so); answers echo the component and variable
exactly as they were asked for (B05.FR.02, B06.FR.02). Values are exchanged as OCPP strings and
checked against the variable's data type and limits before anything is stored (B05.FR.07/08); a
request's accepted values are stored in one transaction. WriteOnly values (BasicAuthPassword) are
never reported, logged or echoed.

Reports (GetBaseReport, GetReport) become lists of ReportData; :func:`notify_report_parts` cuts
them into NotifyReport payloads of at most ItemsPerMessage[GetReport] entries and
BytesPerMessage[GetReport] bytes per frame, with ``seqNo`` counting from 0 and ``tbc`` on all but
the last (B07.FR.10, B08.FR.14).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, NotRequired

from pydantic import ConfigDict, Field, TypeAdapter, with_config
from typing_extensions import TypedDict  # pydantic reads TypedDicts from here before Python 3.12

from router.store import KeyValue, StoreError

log = logging.getLogger("ocpp_lc.own.device_model")

DataType = Literal["string", "decimal", "integer", "dateTime", "boolean", "OptionList", "SequenceList", "MemberList"]
Mutability = Literal["ReadOnly", "ReadWrite", "WriteOnly"]
AttributeType = Literal["Actual", "Target", "MinSet", "MaxSet"]
ReportBase = Literal["ConfigurationInventory", "FullInventory", "SummaryInventory"]
ComponentCriterion = Literal["Active", "Available", "Enabled", "Problem"]

#: The schema limits of SetVariableData.attributeValue and of reported values (Part 2 §2.1.20/21).
CONFIGURATION_VALUE_SIZE: Final = 1000
REPORTING_VALUE_SIZE: Final = 2500
#: Room for the message id of a NotifyReport frame when measuring it (ids are at most 36 characters).
_MESSAGE_ID_ROOM: Final = 36

_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")  # Part 2 §2.1.2: no leading zeros, no plus sign
_DECIMAL = re.compile(r"-?[0-9]+(\.[0-9]{1,6})?")  # at most six decimal places toward a station
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,3})?([Zz]|[+-]\d{2}:\d{2})")
#: passwordString (Part 2 §2.1.2).
PASSWORD_STRING: Final = re.compile(r"[A-Za-z0-9*\-_=:+|@.]*")
_INT32 = 2**31


# -- requests (validated with connection.parse_payload) ------------------------------------------

Str50 = Annotated[str, Field(max_length=50)]


@with_config(ConfigDict(extra="forbid"))
class EvseRef(TypedDict):
    """EVSEType."""

    id: int
    connectorId: NotRequired[int]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class ComponentRef(TypedDict):
    """ComponentType."""

    name: Str50
    instance: NotRequired[Str50]
    evse: NotRequired[EvseRef]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class VariableRef(TypedDict):
    """VariableType."""

    name: Str50
    instance: NotRequired[Str50]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class GetVariableData(TypedDict):
    """GetVariableDataType."""

    component: ComponentRef
    variable: VariableRef
    attributeType: NotRequired[AttributeType]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class GetVariablesRequest(TypedDict):
    """GetVariablesRequest."""

    getVariableData: Annotated[list[GetVariableData], Field(min_length=1)]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class SetVariableData(TypedDict):
    """SetVariableDataType."""

    component: ComponentRef
    variable: VariableRef
    attributeValue: Annotated[str, Field(max_length=CONFIGURATION_VALUE_SIZE)]
    attributeType: NotRequired[AttributeType]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class SetVariablesRequest(TypedDict):
    """SetVariablesRequest."""

    setVariableData: Annotated[list[SetVariableData], Field(min_length=1)]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class GetBaseReportRequest(TypedDict):
    """GetBaseReportRequest."""

    requestId: int
    reportBase: ReportBase
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class ComponentVariable(TypedDict):
    """ComponentVariableType."""

    component: ComponentRef
    variable: NotRequired[VariableRef]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class GetReportRequest(TypedDict):
    """GetReportRequest."""

    requestId: int
    componentVariable: NotRequired[Annotated[list[ComponentVariable], Field(min_length=1)]]
    componentCriteria: NotRequired[Annotated[list[ComponentCriterion], Field(min_length=1, max_length=4)]]
    customData: NotRequired[dict[str, Any]]


GET_VARIABLES: Final = TypeAdapter(GetVariablesRequest)
SET_VARIABLES: Final = TypeAdapter(SetVariablesRequest)
GET_BASE_REPORT: Final = TypeAdapter(GetBaseReportRequest)
GET_REPORT: Final = TypeAdapter(GetReportRequest)


# -- variables -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variable:
    """One component variable with its single ``Actual`` attribute.

    ``default`` is the value until the CSMS sets one (ReadWrite/WriteOnly), the value (ReadOnly), or a
    callable giving the value at every read (a live ReadOnly value). For string-like types
    ``max_limit`` is the maximum length, as VariableCharacteristics defines it.
    """

    component: str
    name: str
    data_type: DataType
    mutability: Mutability
    default: str | Callable[[], str] = ""
    instance: str | None = None
    unit: str | None = None
    min_limit: float | None = None
    max_limit: float | None = None
    values_list: tuple[str, ...] = ()
    min_length: int = 0
    charset: re.Pattern[str] | None = None
    #: Reported by GetBaseReport(SummaryInventory): availability and problem conditions (B07.FR.09).
    summary: bool = False

    @property
    def key(self) -> str:
        """How the value is keyed in the store: ``Component.Variable`` or ``Component.Variable[Instance]``."""
        return f"{self.component}.{self.name}" + (f"[{self.instance}]" if self.instance else "")

    @property
    def live(self) -> bool:
        """The value is computed at every read (and never stored)."""
        return callable(self.default)

    @property
    def constant(self) -> bool:
        """The value never changes while the controller runs."""
        return self.mutability == "ReadOnly" and not self.live


def check_value(variable: Variable, text: str) -> tuple[str | None, str, str]:
    """``(value, "", "")`` if ``text`` suits ``variable``, else ``(None, reasonCode, additionalInfo)``.

    The reason codes are those of Part 2 appendix "Reason codes" (InvalidValue, ValueOutOfRange,
    ValueTooLow, ValueTooHigh). Nothing here quotes a WriteOnly value back.
    """
    kind = variable.data_type
    if kind == "integer":
        if not _INTEGER.fullmatch(text) or not -_INT32 <= int(text) < _INT32:
            return None, "InvalidValue", "expected a 32-bit integer without leading zeros"
        return _in_limits(variable, int(text), text)
    if kind == "decimal":
        if not _DECIMAL.fullmatch(text):
            return None, "InvalidValue", "expected a decimal number with at most six decimal places"
        return _in_limits(variable, float(text), text)
    if kind == "boolean":
        if text not in ("true", "false"):
            return None, "InvalidValue", "expected true or false"
        return text, "", ""
    if kind == "dateTime":
        try:
            valid = bool(_RFC3339.fullmatch(text)) and bool(datetime.datetime.fromisoformat(text.upper()))
        except ValueError:
            valid = False
        return (text, "", "") if valid else (None, "InvalidValue", "expected an RFC 3339 date-time")
    # string, OptionList, MemberList, SequenceList: max_limit is the maximum length of the text.
    if variable.max_limit is not None and len(text) > variable.max_limit:
        return None, "ValueTooHigh", f"at most {variable.max_limit:g} characters"
    if len(text) < variable.min_length:
        return None, "ValueTooLow", f"at least {variable.min_length} characters"
    if variable.charset is not None and not variable.charset.fullmatch(text):
        return None, "InvalidValue", "contains characters that are not allowed"
    if kind == "OptionList" and text not in variable.values_list:
        return None, "InvalidValue", f"must be one of {','.join(variable.values_list)}"
    if kind in ("MemberList", "SequenceList") and variable.values_list and text:
        members = text.split(",")
        if any(member not in variable.values_list for member in members) or len(set(members)) != len(members):
            return None, "InvalidValue", f"must be distinct members of {','.join(variable.values_list)}"
    return text, "", ""


def _in_limits(variable: Variable, number: float, text: str) -> tuple[str | None, str, str]:
    if variable.min_limit is not None and number < variable.min_limit:
        return None, "ValueTooLow", f"must be at least {variable.min_limit:g}"
    if variable.max_limit is not None and number > variable.max_limit:
        return None, "ValueTooHigh", f"must be at most {variable.max_limit:g}"
    return text, "", ""


# -- the model -----------------------------------------------------------------------------------

ChangeListener = Callable[[Variable, str], None]
_Index = tuple[str, str, str]


def _index_key(component: str, name: str, instance: str | None) -> _Index:
    return component.lower(), name.lower(), (instance or "").lower()


class DeviceModel:
    """The variables, their current values, and the answers to GetVariables/SetVariables/reports."""

    def __init__(self, variables: Iterable[Variable], store: KeyValue) -> None:
        self._variables = list(variables)
        self._store = store
        self._index: dict[_Index, Variable] = {}
        self._components: set[str] = set()
        self._values: dict[str, str] = {}
        self._listeners: list[ChangeListener] = []
        for variable in self._variables:
            key = _index_key(variable.component, variable.name, variable.instance)
            if key in self._index:
                raise ValueError(f"{variable.key} is defined twice")
            self._index[key] = variable
            self._components.add(variable.component.lower())
            if not variable.live:
                self._values[variable.key] = self._initial_value(variable)

    def _initial_value(self, variable: Variable) -> str:
        assert isinstance(variable.default, str)
        if variable.mutability == "ReadOnly":
            return variable.default
        stored = self._store.get(variable.key)
        if stored is None:
            return variable.default
        value = check_value(variable, stored)[0] if isinstance(stored, str) else None
        if value is None:
            # E.g. the limits changed with a new release: fall back to the configured default.
            log.warning("device model: the stored value of %s no longer fits it; using the default", variable.key)
            return variable.default
        return value

    @property
    def variables(self) -> list[Variable]:
        """Every variable, in report order."""
        return list(self._variables)

    def on_change(self, listener: ChangeListener) -> None:
        """Call ``listener(variable, value)`` after every accepted change."""
        self._listeners.append(listener)

    def find(self, component: str, name: str, instance: str | None = None) -> Variable:
        """The variable so named (case-insensitive); KeyError if there is none."""
        return self._index[_index_key(component, name, instance)]

    def value(self, component: str, name: str, instance: str | None = None) -> str:
        """The current value, WriteOnly ones included (for the controller's own use, never for reports)."""
        variable = self.find(component, name, instance)
        if callable(variable.default):
            return variable.default()
        return self._values[variable.key]

    def int_value(self, component: str, name: str, instance: str | None = None) -> int:
        """The current value of an integer variable."""
        return int(self.value(component, name, instance))

    def float_value(self, component: str, name: str, instance: str | None = None) -> float:
        """The current value of a decimal or integer variable."""
        return float(self.value(component, name, instance))

    def set_internal(self, component: str, name: str, value: str, instance: str | None = None) -> None:
        """Change a value from inside the controller (e.g. the boot interval): checked, not stored.

        Used for values the CSMS hands over otherwise than by SetVariables, which are handed over
        again after every restart. ValueError if the value does not fit.
        """
        variable = self.find(component, name, instance)
        checked, reason, info = check_value(variable, value)
        if checked is None or variable.live:
            raise ValueError(f"{variable.key}: {reason or 'live value'} {info}".strip())
        self._apply({variable: checked})

    def _apply(self, values: Mapping[Variable, str]) -> None:
        for variable, value in values.items():
            self._values[variable.key] = value
        for variable, value in values.items():
            for listener in self._listeners:
                listener(variable, value)

    def _lookup(self, component: ComponentRef, variable: VariableRef) -> tuple[Variable | None, str]:
        # Our components exist once, at station level: an instance or an EVSE names another one
        # (B06.FR.15). An empty instance counts as none.
        if component["name"].lower() not in self._components or component.get("instance") or "evse" in component:
            return None, "UnknownComponent"
        found = self._index.get(_index_key(component["name"], variable["name"], variable.get("instance")))
        return (found, "") if found is not None else (None, "UnknownVariable")

    def _reported_value(self, variable: Variable) -> tuple[str, str]:
        """The value as reported, and a note when it had to be cut to ReportingValueSize."""
        value = self.value(variable.component, variable.name, variable.instance)
        if len(value) <= REPORTING_VALUE_SIZE:
            return value, ""
        if variable.data_type in ("MemberList", "SequenceList"):
            members = value.split(",")
            kept = value[: REPORTING_VALUE_SIZE + 1].rsplit(",", 1)[0][:REPORTING_VALUE_SIZE]
            shown = kept.count(",") + 1
            return kept, f"list cut to ReportingValueSize: {shown} of {len(members)} entries shown"
        return value[:REPORTING_VALUE_SIZE], "value cut to ReportingValueSize"

    # -- B06 -------------------------------------------------------------------------------------

    def get_variables(self, request: GetVariablesRequest) -> dict[str, Any]:
        """The GetVariablesResponse payload: one result per requested item, in order (B06.FR.01)."""
        results = []
        for item in request["getVariableData"]:
            attribute = item.get("attributeType", "Actual")
            result: dict[str, Any] = {
                "attributeType": attribute,  # B06.FR.03/11: as asked, Actual when not asked
                "component": item["component"],
                "variable": item["variable"],
            }
            variable, problem = self._lookup(item["component"], item["variable"])
            if variable is None:
                result["attributeStatus"] = problem  # B06.FR.06/07
            elif attribute != "Actual":
                result["attributeStatus"] = "NotSupportedAttributeType"  # B06.FR.08
            elif variable.mutability == "WriteOnly":
                result["attributeStatus"] = "Rejected"  # B06.FR.09
                result["attributeStatusInfo"] = {"reasonCode": "WriteOnly"}
            else:
                value, note = self._reported_value(variable)
                result["attributeStatus"] = "Accepted"  # B06.FR.10
                result["attributeValue"] = value
                if note:
                    result["attributeStatusInfo"] = {"reasonCode": "TooLargeElement", "additionalInfo": note}
            results.append(result)
        return {"getVariableResult": results}

    # -- B05 -------------------------------------------------------------------------------------

    def set_variables(self, request: SetVariablesRequest) -> dict[str, Any]:
        """Check and apply a SetVariablesRequest; the response payload (one result per item, B05.FR.01).

        Accepted values are stored together before they take effect; should the store fail, each of
        them is answered Rejected (InternalError) and nothing changes.
        """
        results: list[dict[str, Any]] = []
        accepted: dict[Variable, str] = {}
        accepted_results: list[dict[str, Any]] = []
        for item in request["setVariableData"]:
            attribute = item.get("attributeType", "Actual")
            result: dict[str, Any] = {
                "attributeType": attribute,  # B05.FR.03/12
                "component": item["component"],
                "variable": item["variable"],
            }
            results.append(result)
            variable, problem = self._lookup(item["component"], item["variable"])
            if variable is None:
                result["attributeStatus"] = problem  # B05.FR.04/05
                continue
            if attribute != "Actual":
                result["attributeStatus"] = "NotSupportedAttributeType"  # B05.FR.06
                continue
            if variable.mutability == "ReadOnly":
                result["attributeStatus"] = "Rejected"  # B05.FR.09
                result["attributeStatusInfo"] = {"reasonCode": "ReadOnly"}
                continue
            value, reason, info = check_value(variable, item["attributeValue"])
            if value is None:
                result["attributeStatus"] = "Rejected"  # B05.FR.07/08
                result["attributeStatusInfo"] = {"reasonCode": reason, "additionalInfo": info}
                continue
            result["attributeStatus"] = "Accepted"  # B05.FR.10
            accepted[variable] = value
            accepted_results.append(result)
        if accepted:
            try:
                self._store.put_many({variable.key: value for variable, value in accepted.items()})
            except StoreError:
                log.exception("device model: cannot store the values set by the CSMS")
                for result in accepted_results:
                    result["attributeStatus"] = "Rejected"
                    result["attributeStatusInfo"] = {"reasonCode": "InternalError"}
                return {"setVariableResult": results}
            for variable in accepted:
                log.info("device model: %s set by the CSMS", variable.key)  # never the value: it may be secret
            self._apply(accepted)
        return {"setVariableResult": results}

    # -- B07, B08 ---------------------------------------------------------------------------------

    def report_data(self, variable: Variable) -> dict[str, Any]:
        """ReportDataType for one variable, with its characteristics (B08.FR.12)."""
        attribute: dict[str, Any] = {
            "type": "Actual",
            "mutability": variable.mutability,
            "persistent": not variable.live,
            "constant": variable.constant,
        }
        if variable.mutability != "WriteOnly":
            attribute["value"] = self._reported_value(variable)[0]
        characteristics: dict[str, Any] = {"dataType": variable.data_type, "supportsMonitoring": False}
        if variable.unit is not None:
            characteristics["unit"] = variable.unit
        if variable.min_limit is not None:
            characteristics["minLimit"] = variable.min_limit
        if variable.max_limit is not None:
            characteristics["maxLimit"] = variable.max_limit
        if variable.values_list:
            characteristics["valuesList"] = ",".join(variable.values_list)
        reference: dict[str, Any] = {"name": variable.name}
        if variable.instance:
            reference["instance"] = variable.instance
        return {
            "component": {"name": variable.component},
            "variable": reference,
            "variableAttribute": [attribute],
            "variableCharacteristics": characteristics,
        }

    def base_report(self, report_base: ReportBase) -> list[dict[str, Any]]:
        """The ReportData of a base report (B07.FR.07-09)."""
        if report_base == "FullInventory":
            chosen = self._variables
        elif report_base == "ConfigurationInventory":
            chosen = [variable for variable in self._variables if variable.mutability != "ReadOnly"]
        else:
            chosen = [variable for variable in self._variables if variable.summary]
        return [self.report_data(variable) for variable in chosen]

    def custom_report(self, request: GetReportRequest) -> list[dict[str, Any]]:
        """The ReportData GetReport asks for; empty means EmptyResultSet (B08.FR.15)."""
        criteria = request.get("componentCriteria", [])
        wanted = request.get("componentVariable", [])
        chosen = [
            variable
            for variable in self._variables
            if (not criteria or self._meets(variable.component, criteria))
            and (not wanted or any(_selects(entry, variable) for entry in wanted))
        ]
        return [self.report_data(variable) for variable in chosen]

    def _flag(self, component: str, name: str) -> bool | None:
        variable = self._index.get(_index_key(component, name, None))
        if variable is None or variable.data_type != "boolean":
            return None
        return self.value(variable.component, variable.name) == "true"

    def _meets(self, component: str, criteria: Iterable[ComponentCriterion]) -> bool:
        """B08.FR.07-10, 13: any criterion (OR); a component without the variable meets all but Problem."""
        for criterion in criteria:
            flag = self._flag(component, criterion)
            if flag is True or (flag is None and criterion != "Problem"):
                return True
        return False


def _selects(entry: ComponentVariable, variable: Variable) -> bool:
    """Whether a componentVariable entry of GetReport covers ``variable`` (B08.FR.20-25)."""
    component = entry["component"]
    if component["name"].lower() != variable.component.lower() or component.get("instance") or "evse" in component:
        return False
    reference = entry.get("variable")
    if reference is None:
        return True  # B08.FR.20: every variable of the component
    if reference["name"].lower() != variable.name.lower():
        return False
    instance = reference.get("instance")
    return not instance or instance.lower() == (variable.instance or "").lower()  # B08.FR.21


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def notify_report_parts(
    report_data: list[dict[str, Any]],
    *,
    request_id: int,
    generated_at: str,
    items_per_message: int,
    bytes_per_message: int,
) -> list[dict[str, Any]]:
    """NotifyReport payloads for one report, each within the item and byte limits of its frame.

    A single ReportData larger than ``bytes_per_message`` still goes, alone: a report must be
    complete. An empty report gives no parts (GetReport answers EmptyResultSet instead).
    """
    items_per_message = max(items_per_message, 1)
    # Bytes of a frame around an empty reportData list: [2,"<id>","NotifyReport",{...}] with tbc true.
    skeleton = {"requestId": request_id, "generatedAt": generated_at, "tbc": True, "seqNo": 0, "reportData": []}
    overhead = _json_bytes([2, "x" * _MESSAGE_ID_ROOM, "NotifyReport", skeleton]) + 8  # seqNo grows
    parts: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = overhead
    for item in report_data:
        item_size = _json_bytes(item) + (1 if current else 0)  # the comma between entries
        if current and (len(current) >= items_per_message or size + item_size > bytes_per_message):
            parts.append(current)
            current, size, item_size = [], overhead, item_size - 1
        current.append(item)
        size += item_size
    if current:
        parts.append(current)
    return [
        {
            "requestId": request_id,
            "generatedAt": generated_at,
            "tbc": number < len(parts) - 1,
            "seqNo": number,
            "reportData": part,
        }
        for number, part in enumerate(parts)
    ]
