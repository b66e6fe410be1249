"""From Modbus registers to a meter reading: data types, byte and word order, scale factors, SunSpec.

Theory of operation. A Modbus register is 16 bits, sent high byte first; meters disagree on how wider
values are laid over registers, so a value is rebuilt from its registers in the configured word order
(``big``: the first register holds the high word) and byte order (``big``: each register as sent;
``little``: its two bytes swapped), then unpacked as the configured type. A scale factor register
holds a signed power of ten, as SunSpec's ``sunssf``.

SunSpec devices start their map with the marker ``SunS`` (0x5375 0x6E53) at one of a few base
addresses, followed by a chain of models, each ``ID``, ``L`` (its length in registers) and ``L``
registers, ended by ID 0xFFFF. The meter models 201 (single phase), 202 (split phase), 203 (wye) and 204
(delta) share one integer-and-scale-factor layout; we read their first points: ``A`` (total current),
``AphA``..``AphC``, ``A_SF``, and ``W`` with ``W_SF``. SunSpec marks a point it does not implement
with 0x8000 (int16 and sunssf); a meter model with a missing phase current that its kind should have,
or a missing scale factor, is unusable.

Nothing here does I/O. Every problem raises :class:`MeterFault` with an ``outcome`` word that becomes
the ``outcome`` label of ``ocpp_lc_meter_readings_total``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .settings import WIDTH, DataType, Order, RegisterMap

SUNSPEC_MARKER = (0x5375, 0x6E53)
SUNSPEC_END = 0xFFFF
METER_MODELS = (201, 202, 203, 204)
#: Registers read of a meter model: ID, L and the points up to W_SF (data offsets 0..20).
METER_MODEL_READ = 2 + 21
INT16_NOT_IMPLEMENTED = 0x8000
#: Scale factors outside this are not a meter's (SunSpec allows -10..10).
MAX_SCALE_EXPONENT = 10
#: Phases a meter model measures: 201 one, 202 two (split phase), 203 and 204 three.
MODEL_PHASES = {201: 1, 202: 2, 203: 3, 204: 3}

Phases3 = tuple[float, float, float]


class MeterFault(Exception):
    """A read that cannot be used; ``outcome`` is the metric label (``timeout``, ``wrong_model``, …)."""

    def __init__(self, outcome: str, detail: str) -> None:
        self.outcome = outcome
        self.detail = detail
        super().__init__(f"{outcome}: {detail}")


@dataclass(frozen=True, slots=True)
class MeterReading:
    """What a meter says: the current on each grid phase (A), and total active power (W) if it has it."""

    phase_current_amperes: Phases3
    power_watts: float | None = None
    #: SunSpec's total current ``A`` where the meter gives one.
    total_current_amperes: float | None = None


def decode_value(registers: Sequence[int], data_type: DataType, byte_order: Order, word_order: Order) -> float:
    """One value from the first registers of ``registers`` (as many as ``data_type`` takes)."""
    width = WIDTH[data_type]
    if len(registers) < width:
        raise MeterFault("short_read", f"{data_type} needs {width} registers, got {len(registers)}")
    words = list(registers[:width])
    if any(not 0 <= word <= 0xFFFF for word in words):
        raise MeterFault("garbage", "a register outside 0..65535")
    if word_order == "little":
        words.reverse()
    raw = b"".join(word.to_bytes(2, "big" if byte_order == "big" else "little") for word in words)
    code = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}[data_type]
    return float(struct.unpack(code, raw)[0])


def scale_exponent(register: int) -> int:
    """A ``sunssf`` register's power of ten; MeterFault if not implemented or out of range."""
    if register == INT16_NOT_IMPLEMENTED:
        raise MeterFault("not_implemented", "a scale factor the meter does not implement")
    value = register - 0x10000 if register >= 0x8000 else register
    if abs(value) > MAX_SCALE_EXPONENT:
        raise MeterFault("garbage", f"scale factor 10^{value} is not a meter's")
    return value


def _int16(register: int) -> int:
    return register - 0x10000 if register >= 0x8000 else register


def is_sunspec_marker(registers: Sequence[int]) -> bool:
    """True if the two registers are SunSpec's ``SunS``."""
    return tuple(registers[:2]) == SUNSPEC_MARKER


def model_header(registers: Sequence[int]) -> tuple[int, int]:
    """(model ID, length in registers) from a model's first two registers."""
    if len(registers) < 2:
        raise MeterFault("short_read", "a SunSpec model header needs 2 registers")
    return registers[0], registers[1]


def decode_meter_model(registers: Sequence[int]) -> MeterReading:
    """A reading from a meter model read from its header on (:data:`METER_MODEL_READ` registers)."""
    if len(registers) < METER_MODEL_READ:
        raise MeterFault("short_read", f"a meter model read needs {METER_MODEL_READ} registers, got {len(registers)}")
    model_id, length = model_header(registers)
    if model_id not in METER_MODELS:
        raise MeterFault("wrong_model", f"SunSpec model {model_id} where a meter model (201-204) was")
    if length < METER_MODEL_READ - 2:
        raise MeterFault("wrong_model", f"SunSpec model {model_id} of length {length} is too short for a meter")
    data = registers[2:]
    current_exponent = scale_exponent(data[4])
    current_scale = 10.0**current_exponent
    phases: list[float] = []
    for phase in range(3):
        register = data[1 + phase]
        if register == INT16_NOT_IMPLEMENTED:
            if phase < MODEL_PHASES[model_id]:
                raise MeterFault("not_implemented", f"model {model_id} without the current of phase {'ABC'[phase]}")
            phases.append(0.0)  # a single- or split-phase meter: nothing flows on the phases it lacks
        else:
            phases.append(_int16(register) * current_scale)
    total = None if data[0] == INT16_NOT_IMPLEMENTED else _int16(data[0]) * current_scale
    power = None
    if data[16] != INT16_NOT_IMPLEMENTED and data[20] != INT16_NOT_IMPLEMENTED:
        power = _int16(data[16]) * 10.0 ** scale_exponent(data[20])
    return MeterReading((phases[0], phases[1], phases[2]), power_watts=power, total_current_amperes=total)


def decode_register_map(registers: Mapping[int, int], layout: RegisterMap) -> MeterReading:
    """A reading from the registers read (address → value) of ``layout.reads()``."""

    def at(address: int, data_type: DataType) -> float:
        words = [registers.get(address + offset) for offset in range(WIDTH[data_type])]
        if any(word is None for word in words):
            raise MeterFault("short_read", f"register {address} is not in the read")
        return decode_value(
            [word for word in words if word is not None], data_type, layout.byte_order, layout.word_order
        )

    current_scale = layout.current_scale
    if layout.current_scale_factor_register is not None:
        current_scale *= 10.0 ** scale_exponent(int(at(layout.current_scale_factor_register, "uint16")))
    power_scale = layout.power_scale
    if layout.power_scale_factor_register is not None:
        power_scale *= 10.0 ** scale_exponent(int(at(layout.power_scale_factor_register, "uint16")))
    phases = [
        0.0 if address is None else at(address, layout.data_type) * current_scale
        for address in (layout.current_l1, layout.current_l2, layout.current_l3)
    ]
    power = None if layout.power is None else at(layout.power, layout.data_type) * power_scale
    return MeterReading((phases[0], phases[1], phases[2]), power_watts=power)


def check_reading(reading: MeterReading, plausible_max_amperes: float) -> None:
    """MeterFault if the reading is nonsense: not a number, a negative current, beyond what the node carries.

    Power may be negative (the site exports, e.g. from PV); currents are magnitudes.
    """
    values = [*reading.phase_current_amperes, reading.total_current_amperes, reading.power_watts]
    if not all(value is None or math.isfinite(value) for value in values):
        raise MeterFault("not_finite", f"a value is not a number: {reading}")
    currents = [*reading.phase_current_amperes]
    if reading.total_current_amperes is not None:
        currents.append(reading.total_current_amperes)
    if any(value < 0 for value in currents):
        raise MeterFault("negative", f"a negative current: {reading}")
    highest = max(reading.phase_current_amperes)
    if highest > plausible_max_amperes:
        raise MeterFault(
            "implausible", f"{highest:g} A on one phase is beyond what the node can carry ({plausible_max_amperes:g} A)"
        )
