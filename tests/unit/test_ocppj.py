"""The OCPP-J codec (Part 4 §4): what it accepts, what it refuses and how it answers."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from router import ocppj
from router.ocppj import FrameError, MessageType
from tests.support.schemas import validate_frame

ids = st.text(min_size=1, max_size=36)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
payloads = st.dictionaries(st.text(max_size=10), json_values, max_size=4)


@given(ids, st.sampled_from(sorted(ocppj.ACTIONS)), payloads)
def test_a_call_round_trips(message_id: str, action: str, payload: dict[str, object]) -> None:
    envelope = ocppj.parse_frame(ocppj.encode_call(message_id, action, payload))
    assert (envelope.message_type, envelope.message_id, envelope.action, envelope.payload) == (
        MessageType.CALL,
        message_id,
        action,
        payload,
    )


@given(ids, payloads)
def test_a_result_round_trips(message_id: str, payload: dict[str, object]) -> None:
    envelope = ocppj.parse_frame(ocppj.encode_result(message_id, payload))
    assert envelope.message_type is MessageType.CALLRESULT
    assert envelope.payload == payload


@given(ids, st.sampled_from(sorted(ocppj.ERROR_CODES)), st.text(max_size=400))
def test_an_error_round_trips_with_the_description_capped(message_id: str, code: str, description: str) -> None:
    envelope = ocppj.parse_frame(ocppj.encode_error(message_id, code, description))
    assert envelope.message_type is MessageType.CALLERROR
    assert envelope.error_code == code
    assert envelope.error_description == description[:255]
    assert envelope.payload == {}


@given(st.text(max_size=200))
def test_any_text_either_parses_or_raises_frame_error(text: str) -> None:
    # The router parses every relayed frame on the side: nothing a peer sends may crash it.
    try:
        ocppj.parse_frame(text)
    except FrameError as exc:
        assert exc.kind in {"json", "shape", "message_type", "id", "action", "payload"}
        answer = json.loads(ocppj.error_for(exc))
        assert answer[0] == 4 and answer[2] in ocppj.ERROR_CODES


@pytest.mark.parametrize(
    ("text", "kind", "answer_id", "code"),
    [
        ("{not json", "json", "-1", "RpcFrameworkError"),
        ('{"a": 1}', "shape", "-1", "RpcFrameworkError"),
        ('[7, "m1", "X", {}]', "message_type", "m1", "MessageTypeNotSupported"),
        ('["2", "m1", "Heartbeat", {}]', "message_type", "m1", "MessageTypeNotSupported"),
        ('[2, 17, "Heartbeat", {}]', "id", "-1", "RpcFrameworkError"),
        ('[2, "' + "x" * 37 + '", "Heartbeat", {}]', "id", "-1", "RpcFrameworkError"),
        ('[2, "m1", "Heartbeat"]', "shape", "m1", "RpcFrameworkError"),
        ('[2, "m1", "", {}]', "action", "m1", "RpcFrameworkError"),
        ('[2, "m1", "Heartbeat", []]', "payload", "m1", "FormatViolation"),
        ('[3, "m1", "oops"]', "payload", "m1", "FormatViolation"),
        ('[4, "m1", "GenericError", "d"]', "shape", "m1", "RpcFrameworkError"),
    ],
)
def test_invalid_frames_are_named_and_answered_as_part_4_says(text: str, kind: str, answer_id: str, code: str) -> None:
    with pytest.raises(FrameError) as caught:
        ocppj.parse_frame(text)
    assert caught.value.kind == kind
    answer = ocppj.error_for(caught.value)
    # §4.2.3: "-1" when the id cannot be read; the answer itself is schema-valid OCPP-J.
    assert json.loads(answer)[1] == answer_id
    assert json.loads(answer)[2] == code
    validate_frame(answer)


def test_controller_ids_have_the_reserved_form_and_never_repeat() -> None:
    made = {ocppj.new_lc_message_id() for _ in range(1000)}
    assert len(made) == 1000
    for message_id in made:
        assert re.fullmatch(r"lc~[0-9a-f]{32}", message_id)
        assert len(message_id) <= 36  # §4.1.4
        assert ocppj.is_lc_message_id(message_id)
    assert not ocppj.is_lc_message_id("19223201")
    assert not ocppj.is_lc_message_id("6f6c3b1e-3a38-4c11-9a36-7d3d6b8e0a55")


def test_action_labels_are_bounded_to_ocpp_names() -> None:
    assert len(ocppj.ACTIONS) == 64
    assert ocppj.action_label("BootNotification") == "BootNotification"
    assert ocppj.action_label("Bogus123") == "other"
    assert ocppj.action_label(None) == "other"


def test_frames_we_write_are_compact_and_schema_valid() -> None:
    frame = ocppj.encode_call("lc~1", "ClearChargingProfile", {"chargingProfileId": 7})
    assert frame == '[2,"lc~1","ClearChargingProfile",{"chargingProfileId":7}]'
    validate_frame(frame)
    with pytest.raises(ValueError, match="not an OCPP-J error code"):
        ocppj.encode_error("1", "Oops")
