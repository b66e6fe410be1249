"""Check OCPP 2.0.1 and OCPP 1.6J messages against the Open Charge Alliance JSON schemas.

The schemas are the ones shipped in the PyPI `ocpp` package (`ocpp/v201/schemas/<Action>Request.json`
and `<Action>Response.json`), so the yardstick is the official one and not our own reading of the
spec. They declare draft-06, so we validate with `Draft6Validator` (the `ocpp` library itself uses
its draft-04 validator on them). Date-times are checked too, as RFC 3339 with a time zone: jsonschema
only checks formats when asked, and its own date-time check needs an optional package.

OCPP 1.6J (issue 15): every function takes ``version="1.6"`` (or use `validate_call_16` and
`validate_result_16`). Its schemas are `ocpp/v16/schemas/<Action>.json` (the request) and
`<Action>Response.json`, draft-04. Their charging schedules constrain limits to ``multipleOf 0.1``,
which only means something in decimal: the schemas and the payloads are read with `decimal.Decimal`
numbers (from the frame's own text where there is one), so ``10.6`` passes and ``10.600000000000001``
or ``10.55`` does not. A 1.6 CALLERROR must carry one of the 1.6 error codes, spelled as OCPP-J 1.6
§4.2.3 spells them (``FormationViolation``, ``OccurenceConstraintViolation``).

Everything raises `SchemaError`, an `AssertionError`, so that a failed check reads as a test failure.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import json
import re
from collections.abc import Iterable
from importlib import resources
from typing import Any, Final

from jsonschema import Draft4Validator, Draft6Validator, FormatChecker
from jsonschema.protocols import Validator

#: The OCPP versions checked here, as the `ocpp` package names them.
OCPP201: Final = "2.0.1"
OCPP16: Final = "1.6"

#: The RPC framework error codes of OCPP-J 2.0.1 (Part 4, section 4.3).
RPC_ERROR_CODES = frozenset(
    {
        "FormatViolation",
        "GenericError",
        "InternalError",
        "MessageTypeNotSupported",
        "NotImplemented",
        "NotSupported",
        "OccurrenceConstraintViolation",
        "PropertyConstraintViolation",
        "ProtocolError",
        "RpcFrameworkError",
        "SecurityError",
        "TypeConstraintViolation",
    }
)
#: The RPC framework error codes of OCPP-J 1.6 (section 4.2.3), with that document's spelling.
RPC_ERROR_CODES_16 = frozenset(
    {
        "FormationViolation",
        "GenericError",
        "InternalError",
        "NotImplemented",
        "NotSupported",
        "OccurenceConstraintViolation",
        "PropertyConstraintViolation",
        "ProtocolError",
        "SecurityError",
        "TypeConstraintViolation",
    }
)
MAX_MESSAGE_ID_CHARS = 36
MAX_ERROR_DESCRIPTION_CHARS = 255
CALL, CALLRESULT, CALLERROR = 2, 3, 4

#: How many schema violations one error message lists.
MAX_REPORTED_VIOLATIONS = 5

_ACTION_NAME = re.compile(r"[A-Za-z0-9]+")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


class SchemaError(AssertionError):
    """A message does not conform to OCPP-J framing (2.0.1 or 1.6) or to its action's JSON schema."""


_FORMATS = FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True  # the schema's "type" keyword reports that
    if not _RFC3339.fullmatch(value):
        raise ValueError("not an RFC 3339 date-time with a time zone")
    # The regex checks the shape; this checks the ranges (month 13, 25 o'clock...).
    datetime.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return True


@functools.cache
def _validator(schema_name: str, version: str = OCPP201) -> Validator:
    """The compiled validator of one schema file, read once per test session."""
    if version not in (OCPP201, OCPP16):
        raise SchemaError(f"no OCPP version {version!r} here (only {OCPP201} and {OCPP16})")
    package = "ocpp.v201" if version == OCPP201 else "ocpp.v16"
    schema_file = resources.files(package).joinpath("schemas", f"{schema_name}.json")
    try:
        raw = schema_file.read_bytes()
    except FileNotFoundError:
        raise SchemaError(f"no OCPP {version} schema named {schema_name}") from None
    # Some OCA schema releases start with a byte order mark; utf-8-sig drops it when present.
    if version == OCPP16:
        # multipleOf 0.1 (charging schedules) is a decimal constraint: read it, and the payloads, as decimals.
        schema16 = json.loads(raw.decode("utf-8-sig"), parse_float=decimal.Decimal)
        Draft4Validator.check_schema(schema16)
        return Draft4Validator(schema16, format_checker=_FORMATS)
    schema = json.loads(raw.decode("utf-8-sig"))
    Draft6Validator.check_schema(schema)
    return Draft6Validator(schema, format_checker=_FORMATS)


def _decimals(value: Any) -> Any:
    """``value`` with every float a Decimal of its shortest text, as `json.dumps` would write it."""
    if isinstance(value, float):
        return decimal.Decimal(repr(value))
    if isinstance(value, dict):
        return {key: _decimals(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decimals(item) for item in value]
    return value


def _check(action: str, kind: str, payload: object, version: str = OCPP201) -> None:
    if not isinstance(action, str) or not _ACTION_NAME.fullmatch(action):
        raise SchemaError(f"not an OCPP action name: {action!r}")
    if version == OCPP16:
        # 1.6 names a request's schema after the action alone.
        validator = _validator(action if kind == "Request" else f"{action}{kind}", OCPP16)
        payload = _decimals(payload)
    else:
        validator = _validator(f"{action}{kind}", version)
    errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = [f"{action} {kind.lower()} violates its OCPP {version} schema:"]
    for error in errors[:MAX_REPORTED_VIOLATIONS]:
        lines.append(f"  at {error.json_path}: {error.message}")
    if len(errors) > MAX_REPORTED_VIOLATIONS:
        lines.append(f"  ... and {len(errors) - MAX_REPORTED_VIOLATIONS} more")
    text = json.dumps(payload, default=str)
    lines.append(f"  payload: {text if len(text) <= 500 else text[:500] + '...'}")
    raise SchemaError("\n".join(lines))


def validate_call(action: str, payload: dict[str, Any], *, version: str = OCPP201) -> None:
    """Check the payload of a CALL against `<action>Request.json` (1.6: `<action>.json`)."""
    _check(action, "Request", payload, version)


def validate_result(action: str, payload: dict[str, Any], *, version: str = OCPP201) -> None:
    """Check the payload of a CALLRESULT against `<action>Response.json`."""
    _check(action, "Response", payload, version)


def validate_call_16(action: str, payload: dict[str, Any]) -> None:
    """Check the payload of an OCPP 1.6 CALL against `ocpp/v16/schemas/<action>.json`."""
    _check(action, "Request", payload, OCPP16)


def validate_result_16(action: str, payload: dict[str, Any]) -> None:
    """Check the payload of an OCPP 1.6 CALLRESULT against `ocpp/v16/schemas/<action>Response.json`."""
    _check(action, "Response", payload, OCPP16)


def _check_message_id(message: list[Any], frame_text: str) -> str:
    message_id = message[1]
    if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS:
        raise SchemaError(f"messageId must be a string of 1..{MAX_MESSAGE_ID_CHARS} chars: {frame_text}")
    return message_id


def validate_frame(frame_text: str, action_of_id: dict[str, str] | None = None, *, version: str = OCPP201) -> list[Any]:
    """Check one OCPP-J text frame: its framing, then its payload against the action's schema.

    A CALLRESULT carries no action, so its schema is found through `action_of_id` (message id to
    action). When that dict is given, CALLs seen here are added to it, so that validating a
    connection's frames in order with one dict checks every result; without it, a CALLRESULT's payload
    is only checked to be an object. Returns the parsed frame (1.6: its fractions as Decimals, read
    from the frame's own digits).
    """
    try:
        message = json.loads(frame_text, parse_float=decimal.Decimal if version == OCPP16 else float)
    except ValueError as exc:
        raise SchemaError(f"frame is not JSON ({exc}): {frame_text!r}") from None
    if not isinstance(message, list) or not message or type(message[0]) is not int:
        raise SchemaError(f"frame is not an OCPP-J array with a MessageTypeId: {frame_text}")
    message_type = message[0]
    expected_length = {CALL: 4, CALLRESULT: 3, CALLERROR: 5}.get(message_type)
    if expected_length is None:
        raise SchemaError(f"MessageTypeId {message_type} is not one of OCPP-J {version}: {frame_text}")
    if len(message) != expected_length:
        raise SchemaError(f"MessageTypeId {message_type} needs {expected_length} elements: {frame_text}")
    message_id = _check_message_id(message, frame_text)

    if message_type == CALL:
        _, _, action, payload = message
        if not isinstance(payload, dict):
            raise SchemaError(f"CALL payload must be an object: {frame_text}")
        validate_call(action, payload, version=version)
        if action_of_id is not None:
            action_of_id[message_id] = action
    elif message_type == CALLRESULT:
        payload = message[2]
        if not isinstance(payload, dict):
            raise SchemaError(f"CALLRESULT payload must be an object: {frame_text}")
        if action_of_id is not None:
            if message_id not in action_of_id:
                raise SchemaError(f"CALLRESULT answers no CALL seen before: {frame_text}")
            validate_result(action_of_id[message_id], payload, version=version)
    else:
        _, _, code, description, details = message
        if code not in (RPC_ERROR_CODES_16 if version == OCPP16 else RPC_ERROR_CODES):
            raise SchemaError(f"CALLERROR code {code!r} is not an OCPP-J {version} error code: {frame_text}")
        if not isinstance(description, str) or len(description) > MAX_ERROR_DESCRIPTION_CHARS:
            raise SchemaError(
                f"CALLERROR description must be a string of at most {MAX_ERROR_DESCRIPTION_CHARS} chars: {frame_text}"
            )
        if not isinstance(details, dict):
            raise SchemaError(f"CALLERROR details must be an object: {frame_text}")
    return message


def validate_frames(frame_texts: Iterable[str], *, version: str = OCPP201) -> None:
    """Check the frames of one connection, in order (both directions), results included."""
    action_of_id: dict[str, str] = {}
    for frame_text in frame_texts:
        validate_frame(frame_text, action_of_id, version=version)
