"""The ``[[meters]]`` configuration: where a meter is, what it measures and how far to trust it.

Each entry names a Modbus TCP meter (host, port, unit id), the site node it measures (``grid`` or a
circuit id: the whole current through that node, EVs included), how often it is read, how long a read
may take, and how its readings become headroom (safety margin, smoothing, plausibility bound). A meter
speaks SunSpec unless it has a ``registers`` table, the explicit map for meters that do not.

The cross-checks against ``[site]`` (the node exists and has a per-phase current limit) are in
:func:`site_problems`, called by the appliance's settings model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from balancing.site import GRID_NODE_ID, SiteConfig

_MODEL = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
#: Where a SunSpec device may start its register map ("SunS" marker), tried in this order.
SUNSPEC_BASES = (40000, 40001, 0, 1, 50000)

DataType = Literal["int16", "uint16", "int32", "uint32", "float32"]
Order = Literal["big", "little"]
_Address = Annotated[int, Field(ge=0, le=65535)]
_Amperes = Annotated[float, Field(ge=0, le=10_000)]
#: Register counts of each data type.
WIDTH = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2}


class RegisterMap(BaseModel):
    """Where a non-SunSpec meter keeps its values (addresses as sent on the wire, counted from 0).

    ``current_scale`` / ``power_scale`` multiply the raw value (0.001 for a meter that counts mA);
    a ``*_scale_factor_register`` holds a signed power of ten (int16) applied on top, as SunSpec does.
    Values at adjacent addresses are read in one request, others each in their own.
    """

    model_config = _MODEL
    table: Literal["holding", "input"] = Field(default="holding", description="register table (function 3 or 4)")
    data_type: DataType = Field(default="float32", description="how each value is encoded")
    byte_order: Order = Field(default="big", description="byte order inside each 16-bit register")
    word_order: Order = Field(default="big", description="register order of a 32-bit value (big: high first)")
    current_l1: _Address = Field(description="address of the L1 current")
    current_l2: _Address | None = Field(default=None, description="address of the L2 current (none: 1-phase)")
    current_l3: _Address | None = Field(default=None, description="address of the L3 current (none: 1-phase)")
    power: _Address | None = Field(default=None, description="address of the total active power (W)")
    current_scale: float = Field(default=1.0, gt=0, le=1000, description="multiplier to amperes")
    power_scale: float = Field(default=1.0, gt=0, le=1_000_000, description="multiplier to watts")
    current_scale_factor_register: _Address | None = Field(default=None, description="int16 power of ten (A)")
    power_scale_factor_register: _Address | None = Field(default=None, description="int16 power of ten (W)")

    def value_addresses(self) -> list[tuple[int, int]]:
        """(address, register count) of everything read."""
        width = WIDTH[self.data_type]
        spans = [(address, width) for address in (self.current_l1, self.current_l2, self.current_l3, self.power)]
        spans += [(address, 1) for address in (self.current_scale_factor_register, self.power_scale_factor_register)]
        return [(address, count) for address, count in spans if address is not None]

    def reads(self) -> list[tuple[int, int]]:
        """(first address, register count) of each request: values that touch share one, gaps are not read
        (many meters refuse a read that spans registers they do not have)."""
        merged: list[list[int]] = []
        for address, count in sorted(set(self.value_addresses())):
            if merged and address <= merged[-1][0] + merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], address + count - merged[-1][0])
            else:
                merged.append([address, count])
        return [(address, count) for address, count in merged]

    @model_validator(mode="after")
    def _within_the_map(self) -> RegisterMap:
        if any(address + count > 65536 for address, count in self.value_addresses()):
            raise ValueError("a value runs past register 65535")
        return self


class MeterSettings(BaseModel):
    """One ``[[meters]]`` entry: a Modbus TCP meter on a node of the site."""

    model_config = _MODEL
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="shown in logs and metric labels")
    host: str = Field(min_length=1, max_length=253, description="the meter's (or its gateway's) address")
    port: int = Field(default=502, ge=1, le=65535, description="Modbus TCP port")
    unit_id: int = Field(default=1, ge=0, le=255, description="Modbus unit (device) id")
    node: str = Field(default=GRID_NODE_ID, min_length=1, max_length=64, description="'grid' or a circuit_id")
    poll_interval_s: float = Field(default=1.0, ge=0.1, le=3600, description="time between reads (s)")
    timeout_s: float = Field(default=1.0, ge=0.05, le=60, description="a read that takes longer failed (s)")
    stale_after_s: float = Field(
        default=5.0, ge=0.1, le=86_400, description="without a valid reading this long, the fallback holds (s)"
    )
    safety_margin_amperes: _Amperes = Field(default=2.0, description="kept free at the node, per phase (A)")
    fall_time_constant_s: float = Field(
        default=30.0, ge=0, le=3600, description="non-EV load falls this slowly (s, exponential); rises at once"
    )
    plausible_max_amperes: _Amperes | None = Field(
        default=None, description="a phase current above this is nonsense (A; default twice the node's limit)"
    )
    fallback_other_load_amperes: _Amperes | None = Field(
        default=None, description="non-EV load assumed while the meter fails (A; default [site] other_load_amperes)"
    )
    sunspec_base_address: _Address | None = Field(
        default=None, description="where the 'SunS' marker is (default: try 40000, 40001, 0, 1, 50000)"
    )
    registers: RegisterMap | None = Field(default=None, description="explicit map; none: the meter speaks SunSpec")

    @model_validator(mode="after")
    def _timing(self) -> MeterSettings:
        if self.timeout_s > self.poll_interval_s * 10:
            raise ValueError("timeout_s must be at most ten poll intervals")
        if self.stale_after_s < self.poll_interval_s:
            raise ValueError("stale_after_s must be at least poll_interval_s")
        if self.registers is not None and self.sunspec_base_address is not None:
            raise ValueError("sunspec_base_address is for SunSpec meters; this one has a registers map")
        return self


def site_problems(meters: tuple[MeterSettings, ...], site: SiteConfig) -> list[tuple[str, str]]:
    """(field relative to the settings root, message) for every meter that does not fit the site."""
    problems: list[tuple[str, str]] = []
    names: set[str] = set()
    nodes: set[str] = set()
    circuit_ids = {circuit.circuit_id for circuit in site.circuits}
    for index, meter in enumerate(meters):
        where = f"meters.{index}"
        if meter.name in names:
            problems.append((f"{where}.name", f"{meter.name!r} is the name of another meter"))
        names.add(meter.name)
        if meter.node != GRID_NODE_ID and meter.node not in circuit_ids:
            problems.append(
                (f"{where}.node", f"{meter.node!r} is neither 'grid' nor a circuit_id of [[site.circuits]]")
            )
            continue
        if meter.node in nodes:
            problems.append((f"{where}.node", f"{meter.node!r} already has a meter"))
        nodes.add(meter.node)
        if site.node_limits(meter.node).max_current_amperes is None:
            problems.append(
                (f"{where}.node", f"{meter.node!r} has no max_current_amperes: a meter needs a limit to subtract from")
            )
    return problems
