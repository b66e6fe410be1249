"""Meter decoding (meters/decode.py) and the headroom it makes (meters/headroom.py): pure, no I/O.

The register images come from tests/support/modbus_meter.py, which lays values out with its own
encoder, so a decoder that read the wrong word, byte, offset or scale would disagree with it.
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meters.decode import (
    METER_MODEL_READ,
    MeterFault,
    MeterReading,
    check_reading,
    decode_meter_model,
    decode_register_map,
    decode_value,
    scale_exponent,
)
from meters.headroom import HeadroomPolicy, NodeHeadroom, smooth
from meters.settings import WIDTH, RegisterMap
from tests.support.modbus_meter import encode_value, plain_image, sunspec_image, sunspec_model_address

ORDERS = ("big", "little")


def model_registers(image: dict[int, int], base: int = 40000) -> list[int]:
    start = sunspec_model_address(base)
    return [image[start + offset] for offset in range(METER_MODEL_READ)]


# --- data types, byte and word order ----------------------------------------------------------------


def test_word_and_byte_orders_of_one_32_bit_value() -> None:
    """0x11223344 as the four layouts meters use: ABCD, CDAB (words swapped), BADC (bytes swapped), DCBA."""
    assert decode_value([0x1122, 0x3344], "uint32", "big", "big") == 0x11223344
    assert decode_value([0x3344, 0x1122], "uint32", "big", "little") == 0x11223344
    assert decode_value([0x2211, 0x4433], "uint32", "little", "big") == 0x11223344
    assert decode_value([0x4433, 0x2211], "uint32", "little", "little") == 0x11223344


def test_float32_and_signed_types() -> None:
    """A float32 of 12.5 A is 0x41480000; int16 0xFFFE is -2; uint16 keeps it at 65534."""
    assert decode_value([0x4148, 0x0000], "float32", "big", "big") == 12.5
    assert decode_value([0x0000, 0x4148], "float32", "big", "little") == 12.5
    assert decode_value([0xFFFE], "int16", "big", "big") == -2
    assert decode_value([0xFFFE], "uint16", "big", "big") == 65534
    assert decode_value([0xFFFF, 0xFFFE], "int32", "big", "big") == -2


@given(
    value=st.integers(min_value=-(2**31), max_value=2**31 - 1),
    byte_order=st.sampled_from(ORDERS),
    word_order=st.sampled_from(ORDERS),
)
def test_int32_round_trips_in_every_order(value: int, byte_order: str, word_order: str) -> None:
    registers = encode_value(value, "int32", byte_order, word_order)
    assert decode_value(registers, "int32", byte_order, word_order) == value  # type: ignore[arg-type]


@given(
    value=st.floats(width=32, allow_nan=False, allow_infinity=False),
    byte_order=st.sampled_from(ORDERS),
    word_order=st.sampled_from(ORDERS),
)
def test_float32_round_trips_in_every_order(value: float, byte_order: str, word_order: str) -> None:
    registers = encode_value(value, "float32", byte_order, word_order)
    assert decode_value(registers, "float32", byte_order, word_order) == value  # type: ignore[arg-type]


def test_a_short_read_is_a_fault() -> None:
    with pytest.raises(MeterFault) as caught:
        decode_value([0x4148], "float32", "big", "big")
    assert caught.value.outcome == "short_read"


# --- scale factors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("register", "exponent"), [(0, 0), (1, 1), (0xFFFF, -1), (0xFFFD, -3), (10, 10)])
def test_scale_factor_is_a_signed_power_of_ten(register: int, exponent: int) -> None:
    assert scale_exponent(register) == exponent


@pytest.mark.parametrize(("register", "outcome"), [(0x8000, "not_implemented"), (11, "garbage"), (0xFFF5, "garbage")])
def test_unusable_scale_factors(register: int, outcome: str) -> None:
    with pytest.raises(MeterFault) as caught:
        scale_exponent(register)
    assert caught.value.outcome == outcome


# --- SunSpec meter models -------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [-2, -1, 0])
def test_sunspec_203_currents_and_power_with_their_scale_factors(exponent: int) -> None:
    image = sunspec_image((12.0, 7.0, 30.0), current_exponent=exponent, power_watts=-4500, power_exponent=1)
    reading = decode_meter_model(model_registers(image))
    assert reading.phase_current_amperes == pytest.approx((12.0, 7.0, 30.0))
    assert reading.total_current_amperes == pytest.approx(49.0)
    assert reading.power_watts == -4500  # exporting: power may be negative


def test_sunspec_201_single_phase_meter_has_nothing_on_the_phases_it_lacks() -> None:
    image = sunspec_image((16.0, 0.0, 0.0), model_id=201)
    start = sunspec_model_address() + 2
    image[start + 2] = image[start + 3] = 0x8000  # AphB, AphC not implemented on a single-phase meter
    assert decode_meter_model(model_registers(image)).phase_current_amperes == (16.0, 0.0, 0.0)


def test_sunspec_203_without_a_phase_current_is_unusable() -> None:
    image = sunspec_image((16.0, 5.0, 5.0))
    image[sunspec_model_address() + 2 + 3] = 0x8000  # AphC
    with pytest.raises(MeterFault) as caught:
        decode_meter_model(model_registers(image))
    assert caught.value.outcome == "not_implemented"


def test_an_inverter_model_where_the_meter_was_is_the_wrong_model() -> None:
    image = sunspec_image((1.0, 1.0, 1.0), model_id=103)
    with pytest.raises(MeterFault) as caught:
        decode_meter_model(model_registers(image))
    assert caught.value.outcome == "wrong_model"


def test_power_is_absent_when_the_meter_does_not_implement_it() -> None:
    image = sunspec_image((1.0, 2.0, 3.0))  # W and W_SF left at 0x8000
    assert decode_meter_model(model_registers(image)).power_watts is None


# --- explicit register maps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("data_type", ["int16", "uint16", "int32", "uint32", "float32"])
@pytest.mark.parametrize("word_order", ORDERS)
def test_register_map_in_every_type_and_word_order(data_type: str, word_order: str) -> None:
    layout = RegisterMap.model_validate(
        {
            "data_type": data_type,
            "word_order": word_order,
            "current_l1": 3000,
            "current_l2": 3002,
            "current_l3": 3004,
            "power": 3010,
            "current_scale": 0.01,
        }
    )
    image = plain_image(layout, (12.34, 0.5, 99.99), power_watts=20_000)
    width = WIDTH[layout.data_type]
    if width == 2:  # the currents touch: one request for them, one for the power
        assert layout.reads() == [(3000, 6), (3010, 2)]
    else:
        assert layout.reads() == [(3000, 1), (3002, 1), (3004, 1), (3010, 1)]
    reading = decode_register_map(image, layout)
    assert reading.phase_current_amperes == pytest.approx((12.34, 0.5, 99.99), abs=1e-6)
    assert reading.power_watts == pytest.approx(20_000)


def test_register_map_scale_factor_register() -> None:
    """A register holding 10^-2 scales the currents, on top of current_scale."""
    layout = RegisterMap(
        data_type="uint16", current_l1=10, current_l2=11, current_l3=12, current_scale_factor_register=13
    )
    assert layout.reads() == [(10, 4)]
    registers = {10: 1234, 11: 50, 12: 0, 13: 0xFFFE}
    assert decode_register_map(registers, layout).phase_current_amperes == pytest.approx((12.34, 0.5, 0.0))


def test_a_value_past_the_last_register_is_refused() -> None:
    with pytest.raises(ValueError, match="past register 65535"):
        RegisterMap(current_l1=65535)


# --- nonsense ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reading", "outcome"),
    [
        (MeterReading((math.nan, 1.0, 1.0)), "not_finite"),
        (MeterReading((1.0, 1.0, 1.0), power_watts=math.inf), "not_finite"),
        (MeterReading((-3.0, 1.0, 1.0)), "negative"),
        (MeterReading((3.0, 1.0, 1.0), total_current_amperes=-5.0), "negative"),
        (MeterReading((1.0, 1.0, 201.0)), "implausible"),
    ],
)
def test_nonsense_readings_are_faults(reading: MeterReading, outcome: str) -> None:
    with pytest.raises(MeterFault) as caught:
        check_reading(reading, plausible_max_amperes=200.0)
    assert caught.value.outcome == outcome


def test_a_float_meter_sending_nan() -> None:
    nan = struct.unpack(">HH", struct.pack(">f", math.nan))
    layout = RegisterMap(current_l1=0, current_l2=2, current_l3=4)
    reading = decode_register_map(dict(enumerate([*nan, 0, 0, 0, 0])), layout)
    with pytest.raises(MeterFault) as caught:
        check_reading(reading, 100.0)
    assert caught.value.outcome == "not_finite"


# --- the asymmetric filter --------------------------------------------------------------------------------

loads = st.floats(min_value=0, max_value=1000, allow_nan=False)


@given(previous=loads, value=loads, elapsed_s=st.floats(0, 3600), tau_s=st.floats(0, 3600))
def test_smoothing_rises_at_once_and_falls_no_faster_than_the_load(
    previous: float, value: float, elapsed_s: float, tau_s: float
) -> None:
    result = smooth(previous, value, elapsed_s, tau_s)
    if value >= previous:
        assert result == value  # a rise is taken whole, at once
    else:
        assert value <= result <= previous  # a fall moves toward the load, never past it


def test_smoothing_falls_with_its_time_constant() -> None:
    """From 50 A to 10 A with τ = 30 s: after 30 s, 1/e of the 40 A step is left."""
    assert smooth(50.0, 10.0, 30.0, 30.0) == pytest.approx(10.0 + 40.0 / math.e)
    assert smooth(50.0, 10.0, 5.0, 0.0) == 10.0  # τ = 0: no smoothing
    assert smooth(None, 10.0, 5.0, 30.0) == 10.0  # the first reading is taken as it is


# --- headroom ------------------------------------------------------------------------------------------


def test_headroom_is_the_limit_less_other_load_less_margin_per_phase() -> None:
    """100 A grid, 2 A margin: metered 40/30/20 A with the EVs drawing 16 A on each phase → other load
    24/14/4 A, so the EVs may have 74/84/94 A."""
    state = NodeHeadroom(HeadroomPolicy(node_limit_amperes=100, safety_margin_amperes=2, fall_time_constant_s=0))
    assert state.accept(MeterReading((40.0, 30.0, 20.0)), (16.0, 16.0, 16.0), now_s=0.0)
    assert state.other_load_amperes == (24.0, 14.0, 4.0)
    assert state.headroom_amperes == (74.0, 84.0, 94.0)


def test_ev_draw_above_the_metered_current_is_no_negative_load() -> None:
    state = NodeHeadroom(HeadroomPolicy(node_limit_amperes=50, safety_margin_amperes=0, fall_time_constant_s=0))
    state.accept(MeterReading((10.0, 10.0, 10.0)), (16.0, 16.0, 16.0), now_s=0.0)
    assert state.headroom_amperes == (50.0, 50.0, 50.0)


def test_fallback_before_the_first_reading_and_once_stale() -> None:
    """Static other load 30 A on a 100 A node with 2 A margin → 68 A while the meter cannot be trusted;
    a reading within stale_after_s keeps its headroom."""
    policy = HeadroomPolicy(node_limit_amperes=100, fallback_other_load_amperes=30, stale_after_s=5)
    state = NodeHeadroom(policy)
    assert state.fallback and state.headroom_amperes == (68.0, 68.0, 68.0)
    state.accept(MeterReading((10.0, 10.0, 10.0)), (0.0, 0.0, 0.0), now_s=0.0)
    assert not state.fallback and state.headroom_amperes == (88.0, 88.0, 88.0)
    assert not state.check_stale(4.9)
    assert state.headroom_amperes == (88.0, 88.0, 88.0)
    assert state.check_stale(5.0)
    assert state.fallback and state.headroom_amperes == (68.0, 68.0, 68.0)


def test_fallback_without_a_static_load_is_the_failsafe_never_unlimited() -> None:
    assert HeadroomPolicy(node_limit_amperes=100, failsafe_amperes=6).fallback_headroom() == (6.0, 6.0, 6.0)
    assert HeadroomPolicy(node_limit_amperes=100).fallback_headroom() == (0.0, 0.0, 0.0)
    # A static load above the limit leaves nothing, not a negative limit.
    assert HeadroomPolicy(node_limit_amperes=100, fallback_other_load_amperes=150).fallback_headroom() == (0, 0, 0)
