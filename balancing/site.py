"""The site model: what the grid connection, its sub-circuits and the stations on them can carry.

Theory of operation: a site is a tree. Its root is the grid connection (node id ``"grid"``); below it
sit optional sub-circuits (each naming its parent), below those the stations, and below each station its
EVSEs. Every node may carry a per-phase current limit (A, applied to each of L1, L2, L3 separately, as
OCPP's chargingRateUnit A does, K01.FR.51) and/or a power limit (W over all phases together). The
allocator turns a power limit into a limit on the sum of the phase currents at the nominal voltage.

Phases: grid phases are R, S, T (L1, L2, L3 of the connection). A station's phase rotation says which
grid phase each of its own L1, L2, L3 is wired to, as OCPP's PhaseRotation variable does (Part 2
§2.13.5): ``"STR"`` means the station's L1 is grid S, its L2 grid T, its L3 grid R. A 1-phase EV (or a
1-phase station) draws on the station's L1 only, so rotating the wiring of 1-phase loads spreads them
over the grid's phases. Sub-circuits are assumed to keep the grid's phase order.

Stations that are not listed are balanced with :class:`StationDefaults` (32 A max, 6 A min, 3 phases,
on the grid node), so a site works before every station is described.

Everything here is a frozen pydantic model that forbids unknown keys: the appliance's configuration
embeds :class:`SiteConfig` as-is.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GRID_NODE_ID = "grid"
GRID_PHASES = "RST"

PhaseRotation = Literal["RST", "RTS", "SRT", "STR", "TRS", "TSR"]
PhaseCount = Literal[1, 2, 3]

# Bounds that keep typos out: no site connection carries more than 10 kA per phase or 10 MW.
_Amperes = Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)]
_Watts = Annotated[float, Field(ge=0, le=10_000_000, allow_inf_nan=False)]
_NodeId = Annotated[str, Field(min_length=1, max_length=64)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeLimits(_Frozen):
    """Limits of one node of the tree; ``None`` means this node adds no limit of that kind."""

    max_current_amperes: _Amperes | None = None
    max_power_watts: _Watts | None = None


class CircuitConfig(NodeLimits):
    """A sub-circuit (a feeder, a distribution board) below the grid or below another circuit."""

    circuit_id: _NodeId
    parent_id: _NodeId = GRID_NODE_ID


class EvseConfig(_Frozen):
    """Overrides for one EVSE of a station; unset fields take the station's values."""

    evse_id: Annotated[int, Field(ge=1, le=1000)]
    min_current_amperes: _Amperes | None = None
    max_current_amperes: _Amperes | None = None


class StationDefaults(_Frozen):
    """How a station that is not listed in :attr:`SiteConfig.stations` is balanced."""

    circuit_id: _NodeId = GRID_NODE_ID
    phases: PhaseCount = 3
    phase_rotation: PhaseRotation = "RST"
    min_current_amperes: _Amperes = 6.0
    max_current_amperes: _Amperes = 32.0
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0


class StationConfig(NodeLimits):
    """A station: where it hangs in the tree, its wiring and the current range of its EVSEs.

    ``max_current_amperes`` / ``max_power_watts`` (inherited) limit the station as a whole (all its
    EVSEs together); ``evse_min/max_current_amperes`` bound each EVSE. ``priority`` is added to the
    chargingPriority of its transactions (K03.FR.04): a site may favour a fleet's own stations.
    """

    station_id: Annotated[str, Field(min_length=1, max_length=48)]
    circuit_id: _NodeId = GRID_NODE_ID
    phases: PhaseCount = 3
    phase_rotation: PhaseRotation = "RST"
    evse_min_current_amperes: _Amperes = 6.0
    evse_max_current_amperes: _Amperes = 32.0
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    evses: tuple[EvseConfig, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> StationConfig:
        ids = [evse.evse_id for evse in self.evses]
        if len(ids) != len(set(ids)):
            raise ValueError("evses: each evse_id may appear only once")
        for evse in self.evses:
            low = self.evse_min_current_amperes if evse.min_current_amperes is None else evse.min_current_amperes
            high = self.evse_max_current_amperes if evse.max_current_amperes is None else evse.max_current_amperes
            if low > high:
                raise ValueError(f"evse {evse.evse_id}: min_current_amperes {low} exceeds max_current_amperes {high}")
        if self.evse_min_current_amperes > self.evse_max_current_amperes:
            raise ValueError("evse_min_current_amperes exceeds evse_max_current_amperes")
        return self

    def evse_range_amperes(self, evse_id: int) -> tuple[float, float]:
        """The (minimum, maximum) per-phase current of one EVSE of this station."""
        for evse in self.evses:
            if evse.evse_id == evse_id:
                low = self.evse_min_current_amperes if evse.min_current_amperes is None else evse.min_current_amperes
                high = self.evse_max_current_amperes if evse.max_current_amperes is None else evse.max_current_amperes
                return low, high
        return self.evse_min_current_amperes, self.evse_max_current_amperes

    def grid_phases(self, phases_used: int | None) -> tuple[int, ...]:
        """Grid phase indexes (0=R/L1, 1=S/L2, 2=T/L3) an EV drawing on ``phases_used`` phases loads.

        An unknown phase count counts as all the station's phases: the conservative assumption.
        """
        count = self.phases if phases_used is None else max(1, min(phases_used, self.phases))
        return tuple(GRID_PHASES.index(letter) for letter in self.phase_rotation[:count])


class AllocationPolicy(_Frozen):
    """How the allocator treats EVs that draw less than offered and sessions that must take turns."""

    # An EV measured below its allocation for this long has its share capped near what it draws...
    underdraw_grace_s: Annotated[float, Field(ge=0, le=86_400)] = 60.0
    # ...plus this much room to ramp up; once it draws into that room it gets its full share back.
    underdraw_headroom_amperes: Annotated[float, Field(gt=0, le=100)] = 2.0
    # When minimums do not all fit, a served session keeps its turn at least this long.
    rotation_period_s: Annotated[float, Field(ge=0, le=86_400)] = 900.0


class SiteConfig(_Frozen):
    """The whole site: grid limits, circuits, stations, defaults and the nominal voltage."""

    nominal_voltage_volts: Annotated[float, Field(ge=50, le=1000, allow_inf_nan=False)] = 230.0
    #: Non-EV load (A per phase) assumed at a metered node while its meter fails (``meters``); None: the
    #: EVs there get the failsafe current instead.
    other_load_amperes: _Amperes | None = None
    grid: NodeLimits = NodeLimits()
    circuits: tuple[CircuitConfig, ...] = ()
    stations: tuple[StationConfig, ...] = ()
    defaults: StationDefaults = StationDefaults()
    policy: AllocationPolicy = AllocationPolicy()

    @model_validator(mode="after")
    def _check_tree(self) -> SiteConfig:
        circuit_ids = [circuit.circuit_id for circuit in self.circuits]
        if GRID_NODE_ID in circuit_ids:
            raise ValueError(f"circuits: {GRID_NODE_ID!r} is the grid connection's id and cannot name a circuit")
        if len(circuit_ids) != len(set(circuit_ids)):
            raise ValueError("circuits: each circuit_id may appear only once")
        known = {GRID_NODE_ID, *circuit_ids}
        parents = {circuit.circuit_id: circuit.parent_id for circuit in self.circuits}
        for circuit in self.circuits:
            if circuit.parent_id not in known:
                raise ValueError(f"circuit {circuit.circuit_id!r}: parent_id {circuit.parent_id!r} is not a circuit")
            seen = {circuit.circuit_id}
            node = circuit.parent_id
            while node != GRID_NODE_ID:
                if node in seen:
                    raise ValueError(f"circuit {circuit.circuit_id!r}: its parents form a loop")
                seen.add(node)
                node = parents[node]
        station_ids = [station.station_id for station in self.stations]
        if len(station_ids) != len(set(station_ids)):
            raise ValueError("stations: each station_id may appear only once")
        for station in self.stations:
            if station.circuit_id not in known:
                raise ValueError(f"station {station.station_id!r}: circuit_id {station.circuit_id!r} is not a circuit")
        if self.defaults.circuit_id not in known:
            raise ValueError(f"defaults: circuit_id {self.defaults.circuit_id!r} is not a circuit")
        if self.defaults.min_current_amperes > self.defaults.max_current_amperes:
            raise ValueError("defaults: min_current_amperes exceeds max_current_amperes")
        return self

    @cached_property
    def _stations_by_id(self) -> dict[str, StationConfig]:
        return {station.station_id: station for station in self.stations}

    @cached_property
    def _circuits_by_id(self) -> dict[str, CircuitConfig]:
        return {circuit.circuit_id: circuit for circuit in self.circuits}

    @cached_property
    def _unlisted(self) -> dict[str, StationConfig]:
        # Built once per unlisted station: the allocator asks for every EVSE on every reallocation.
        return {}

    @cached_property
    def derived_cache(self) -> dict[str, object]:
        """Structures derived from this (immutable) configuration, kept with it: the allocator's compiled
        site (:mod:`balancing.site_index`). Not configuration: never compared, copied or serialised."""
        return {}

    def station(self, station_id: str) -> StationConfig:
        """The configuration of a station, or one built from :attr:`defaults` if it is not listed."""
        found = self._stations_by_id.get(station_id) or self._unlisted.get(station_id)
        if found is not None:
            return found
        defaults = self.defaults
        found = self._unlisted[station_id] = StationConfig(
            station_id=station_id,
            circuit_id=defaults.circuit_id,
            phases=defaults.phases,
            phase_rotation=defaults.phase_rotation,
            evse_min_current_amperes=defaults.min_current_amperes,
            evse_max_current_amperes=defaults.max_current_amperes,
            priority=defaults.priority,
        )
        return found

    def circuit_path(self, circuit_id: str) -> tuple[str, ...]:
        """Node ids from ``circuit_id`` up to and including the grid node."""
        path = [circuit_id]
        while path[-1] != GRID_NODE_ID:
            path.append(self._circuits_by_id[path[-1]].parent_id)
        return tuple(path)

    def node_limits(self, node_id: str) -> NodeLimits:
        """The configured limits of the grid node or of a circuit."""
        if node_id == GRID_NODE_ID:
            return self.grid
        return self._circuits_by_id[node_id]
