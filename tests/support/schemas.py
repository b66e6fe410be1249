"""Check OCPP 2.0.1 messages against the Open Charge Alliance JSON schemas.

The schemas are the ones shipped in the PyPI `ocpp` package (`ocpp/v201/schemas/<Action>Request.json`
and `<Action>Response.json`), so the yardstick is the official one and not our own reading of the
spec. They declare draft-06, so we validate with `Draft6Validator` (the `ocpp` library itself uses
its draft-04 validator on them). Date-times are checked too, as RFC 3339 with a time zone: jsonschema
only checks formats when asked, and its own date-time check needs an optional package.

Everything raises `SchemaError`, an `AssertionError`, so that a failed check reads as a test failure.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
from collections.abc import Iterable
from importlib import resources
from typing import Any

from jsonschema import Draft6Validator, FormatChecker

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
MAX_MESSAGE_ID_CHARS = 36
MAX_ERROR_DESCRIPTION_CHARS = 255
CALL, CALLRESULT, CALLERROR = 2, 3, 4

#: How many schema violations one error message lists.
MAX_REPORTED_VIOLATIONS = 5

_ACTION_NAME = re.compile(r"[A-Za-z0-9]+")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


class SchemaError(AssertionError):
    """A message does not conform to OCPP-J 2.0.1 framing or to its action's JSON schema."""


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
def _validator(schema_name: str) -> Draft6Validator:
    """The compiled validator of one schema file, read once per test session."""
    schema_file = resources.files("ocpp.v201").joinpath("schemas", f"{schema_name}.json")
    try:
        raw = schema_file.read_bytes()
    except FileNotFoundError:
        raise SchemaError(f"no OCPP 2.0.1 schema named {schema_name}") from None
    # Some OCA schema releases start with a byte order mark; utf-8-sig drops it when present.
    schema = json.loads(raw.decode("utf-8-sig"))
    Draft6Validator.check_schema(schema)
    return Draft6Validator(schema, format_checker=_FORMATS)


def _check(action: str, kind: str, payload: object) -> None:
    if not isinstance(action, str) or not _ACTION_NAME.fullmatch(action):
        raise SchemaError(f"not an OCPP action name: {action!r}")
    validator = _validator(f"{action}{kind}")
    errors = sorted(validator.iter_errors(payload), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    lines = [f"{action} {kind.lower()} violates its schema:"]
    for error in errors[:MAX_REPORTED_VIOLATIONS]:
        lines.append(f"  at {error.json_path}: {error.message}")
    if len(errors) > MAX_REPORTED_VIOLATIONS:
        lines.append(f"  ... and {len(errors) - MAX_REPORTED_VIOLATIONS} more")
    text = json.dumps(payload)
    lines.append(f"  payload: {text if len(text) <= 500 else text[:500] + '...'}")
    raise SchemaError("\n".join(lines))


def validate_call(action: str, payload: dict[str, Any]) -> None:
    """Check the payload of a CALL against `<action>Request.json`."""
    _check(action, "Request", payload)


def validate_result(action: str, payload: dict[str, Any]) -> None:
    """Check the payload of a CALLRESULT against `<action>Response.json`."""
    _check(action, "Response", payload)


def _check_message_id(message: list[Any], frame_text: str) -> str:
    message_id = message[1]
    if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID_CHARS:
        raise SchemaError(f"messageId must be a string of 1..{MAX_MESSAGE_ID_CHARS} chars: {frame_text}")
    return message_id


def validate_frame(frame_text: str, action_of_id: dict[str, str] | None = None) -> list[Any]:
    """Check one OCPP-J text frame: its framing, then its payload against the action's schema.

    A CALLRESULT carries no action, so its schema is found through `action_of_id` (message id to
    action). When that dict is given, CALLs seen here are added to it, so that validating a
    connection's frames in order with one dict checks every result; without it, a CALLRESULT's payload
    is only checked to be an object. Returns the parsed frame.
    """
    try:
        message = json.loads(frame_text)
    except ValueError as exc:
        raise SchemaError(f"frame is not JSON ({exc}): {frame_text!r}") from None
    if not isinstance(message, list) or not message or type(message[0]) is not int:
        raise SchemaError(f"frame is not an OCPP-J array with a MessageTypeId: {frame_text}")
    message_type = message[0]
    expected_length = {CALL: 4, CALLRESULT: 3, CALLERROR: 5}.get(message_type)
    if expected_length is None:
        raise SchemaError(f"MessageTypeId {message_type} is not one of OCPP-J 2.0.1: {frame_text}")
    if len(message) != expected_length:
        raise SchemaError(f"MessageTypeId {message_type} needs {expected_length} elements: {frame_text}")
    message_id = _check_message_id(message, frame_text)

    if message_type == CALL:
        _, _, action, payload = message
        if not isinstance(payload, dict):
            raise SchemaError(f"CALL payload must be an object: {frame_text}")
        validate_call(action, payload)
        if action_of_id is not None:
            action_of_id[message_id] = action
    elif message_type == CALLRESULT:
        payload = message[2]
        if not isinstance(payload, dict):
            raise SchemaError(f"CALLRESULT payload must be an object: {frame_text}")
        if action_of_id is not None:
            if message_id not in action_of_id:
                raise SchemaError(f"CALLRESULT answers no CALL seen before: {frame_text}")
            validate_result(action_of_id[message_id], payload)
    else:
        _, _, code, description, details = message
        if code not in RPC_ERROR_CODES:
            raise SchemaError(f"CALLERROR code {code!r} is not an OCPP-J error code: {frame_text}")
        if not isinstance(description, str) or len(description) > MAX_ERROR_DESCRIPTION_CHARS:
            raise SchemaError(
                f"CALLERROR description must be a string of at most {MAX_ERROR_DESCRIPTION_CHARS} chars: {frame_text}"
            )
        if not isinstance(details, dict):
            raise SchemaError(f"CALLERROR details must be an object: {frame_text}")
    return message


def validate_frames(frame_texts: Iterable[str]) -> None:
    """Check the frames of one connection, in order (both directions), results included."""
    action_of_id: dict[str, str] = {}
    for frame_text in frame_texts:
        validate_frame(frame_text, action_of_id)
