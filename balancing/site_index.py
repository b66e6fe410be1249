"""The site tree compiled for the allocator: one numbered constraint per (node, phase-or-power) and one
row of (constraint, weight) pairs per (station, number of grid phases used).

Theory of operation. The allocator's constraints (see :mod:`balancing.allocator`) depend only on the
site configuration, never on the sessions: node ``n``'s capacity on grid phase ``p`` (or on power, as
summed phase amperes) is constraint ``4 n + p``. A station's EVSE that loads ``k`` grid phases loads
the constraints of its own node and of every circuit up to the grid, each phase constraint with weight 1
and each power constraint with weight ``k``: that is one *row*, shared by every EVSE of the station
with the same phase count. Building rows is Python work per station, so it is done once per site
(cached on the frozen :class:`~balancing.site.SiteConfig`) and per set of grid limit kinds in force
(an outside limit can add a grid constraint the configuration lacks); a station the configuration
does not list gets its rows the first time it is seen. Rows are padded to a common width with a
sentinel constraint (the last, of infinite capacity) at weight 0, so a session's row is one integer.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .site import GRID_NODE_ID, NodeLimits, SiteConfig, StationConfig

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

#: Which of the grid's four constraints (L1, L2, L3, power) are in force: rows differ by it.
GridKinds = tuple[bool, bool, bool, bool]


def _static_capacities(site: SiteConfig, limits: NodeLimits) -> tuple[float | None, ...]:
    """A circuit's or station's capacity on grid phases 0..2 and for power (summed phase amperes)."""
    power = limits.max_power_watts
    current = limits.max_current_amperes
    return (current, current, current, None if power is None else power / site.nominal_voltage_volts)


@dataclass(slots=True)
class StationColumns:
    """Per-station values the allocator reads per EVSE, as parallel lists indexed by station number."""

    stations: list[StationConfig] = field(default_factory=list)
    number: dict[str, int] = field(default_factory=dict)
    priority: list[int] = field(default_factory=list)
    phases: list[int] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    has_evse_overrides: list[bool] = field(default_factory=list)


@dataclass(slots=True)
class RowTable:
    """Rows for one set of grid kinds: ``row = 3 * station number + phase count - 1``."""

    grid_kinds: GridKinds
    constraint_count: int
    rows_index: list[list[int]] = field(default_factory=list)
    rows_weight: list[list[float]] = field(default_factory=list)
    rows_mask: list[tuple[bool, bool, bool]] = field(default_factory=list)
    _arrays: tuple[IntArray, FloatArray, BoolArray] | None = None

    def arrays(self) -> tuple[IntArray, FloatArray, BoolArray]:
        """(index, weight, grid phase mask) as padded arrays; rebuilt only after rows were added."""
        if self._arrays is None or len(self._arrays[0]) != len(self.rows_index):
            width = max((len(row) for row in self.rows_index), default=1) or 1
            sentinel = self.constraint_count - 1
            index = np.full((len(self.rows_index), width), sentinel, dtype=np.intp)
            weight = np.zeros((len(self.rows_index), width), dtype=np.float64)
            for number, (row, weights) in enumerate(zip(self.rows_index, self.rows_weight, strict=True)):
                index[number, : len(row)] = row
                weight[number, : len(row)] = weights
            mask = np.array(self.rows_mask, dtype=np.bool_).reshape(len(self.rows_mask), 3)
            self._arrays = (index, weight, mask)
        return self._arrays


class SiteIndex:
    """The compiled site; get it with :func:`site_index` (one per :class:`SiteConfig`)."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        #: Held by each allocation: stations seen for the first time extend the tables below.
        self.lock = threading.Lock()
        self._node_number: dict[str, int] = {GRID_NODE_ID: 0}
        for circuit in site.circuits:
            self._node_number["circuit:" + circuit.circuit_id] = len(self._node_number)
        for station in site.stations:
            self._node_number["station:" + station.station_id] = len(self._node_number)
        self._static: dict[str, tuple[float | None, ...]] = {}
        self.columns = StationColumns()
        self._tables: dict[GridKinds, RowTable] = {}
        self._capacity_base: FloatArray | None = None
        self._station_arrays: tuple[IntArray, IntArray, FloatArray, FloatArray, BoolArray] | None = None
        self._station_ranks: IntArray | None = None

    # Constraint numbers: 4 per node; nodes of unlisted stations are appended as they are seen.
    def _node(self, node_id: str) -> int:
        found = self._node_number.get(node_id)
        if found is None:
            found = self._node_number[node_id] = len(self._node_number)
            self._capacity_base = None
        return found

    def station_numbers(self, station_ids: list[str]) -> list[int]:
        """The station number of each id, adding stations seen for the first time."""
        number = self.columns.number
        found = list(map(number.get, station_ids))
        if None in found:
            for position, value in enumerate(found):
                if value is None:
                    found[position] = self._add_station(station_ids[position])
        return found  # type: ignore[return-value]

    def known_station_numbers(self, station_ids: list[str]) -> list[int] | None:
        """The station number of each id, or ``None`` if one is seen for the first time (nothing is added)."""
        found = list(map(self.columns.number.get, station_ids))
        return None if None in found else found  # type: ignore[return-value]

    def station_ranks(self) -> IntArray:
        """Per station number, the rank of its id among the known stations' ids (``str`` order): EVSEs in
        (rank, EVSE id) order are in (station id, EVSE id) order."""
        count = len(self.columns.stations)
        if self._station_ranks is None or len(self._station_ranks) != count:
            ids = list(self.columns.number)  # in number order
            ranks = np.empty(count, dtype=np.intp)
            ranks[sorted(range(count), key=ids.__getitem__)] = np.arange(count)
            self._station_ranks = ranks
        return self._station_ranks

    def _add_station(self, station_id: str) -> int:
        columns = self.columns
        found = columns.number.get(station_id)
        if found is not None:
            return found
        station = self.site.station(station_id)
        found = columns.number[station_id] = len(columns.stations)
        columns.stations.append(station)
        columns.priority.append(station.priority)
        columns.phases.append(station.phases)
        columns.low.append(station.evse_min_current_amperes)
        columns.high.append(station.evse_max_current_amperes)
        columns.has_evse_overrides.append(bool(station.evses))
        self._node("station:" + station_id)
        for table in self._tables.values():
            self._add_rows(table, station)
        return found

    def station_arrays(self) -> tuple[IntArray, IntArray, FloatArray, FloatArray, BoolArray]:
        """(priority, phases, EVSE min, EVSE max, has EVSE overrides) per station number, as arrays."""
        columns = self.columns
        if self._station_arrays is None or len(self._station_arrays[0]) != len(columns.stations):
            self._station_arrays = (
                np.array(columns.priority, dtype=np.intp),
                np.array(columns.phases, dtype=np.intp),
                np.array(columns.low, dtype=np.float64),
                np.array(columns.high, dtype=np.float64),
                np.array(columns.has_evse_overrides, dtype=np.bool_),
            )
        return self._station_arrays

    def _node_limits(self, node_id: str) -> tuple[float | None, ...]:
        found = self._static.get(node_id)
        if found is None:
            kind, _, name = node_id.partition(":")
            limits: NodeLimits = self.site.station(name) if kind == "station" else self.site.node_limits(name)
            found = self._static[node_id] = _static_capacities(self.site, limits)
        return found

    def _path(self, station: StationConfig) -> list[str]:
        return ["station:" + station.station_id] + [
            GRID_NODE_ID if node == GRID_NODE_ID else "circuit:" + node
            for node in self.site.circuit_path(station.circuit_id)
        ]

    def _add_rows(self, table: RowTable, station: StationConfig) -> None:
        path = self._path(station)
        for count in (1, 2, 3):
            grid_phases = station.grid_phases(count)  # clamps to the station's own phase count
            row: list[int] = []
            weights: list[float] = []
            for node_id in path:
                base = 4 * self._node(node_id)
                present: tuple[bool, ...] = (
                    table.grid_kinds
                    if node_id == GRID_NODE_ID
                    else tuple(value is not None for value in self._node_limits(node_id))
                )
                for phase in grid_phases:
                    if present[phase]:
                        row.append(base + phase)
                        weights.append(1.0)
                if present[3]:
                    row.append(base + 3)
                    weights.append(float(len(grid_phases)))
            table.rows_index.append(row)
            table.rows_weight.append(weights)
            table.rows_mask.append((0 in grid_phases, 1 in grid_phases, 2 in grid_phases))

    def rows(self, grid_kinds: GridKinds) -> RowTable:
        """The row table for these grid kinds (built on first use)."""
        table = self._tables.get(grid_kinds)
        if table is None:
            table = self._tables[grid_kinds] = RowTable(grid_kinds, 0)
            for station in self.columns.stations:
                self._add_rows(table, station)
        # One constraint more than the nodes need: the sentinel, at infinite capacity.
        table.constraint_count = 4 * len(self._node_number) + 1
        return table

    def capacities(self, grid: tuple[float | None, float | None, float | None, float | None]) -> FloatArray:
        """Every constraint's capacity (``inf`` where none), with the grid's four given."""
        if self._capacity_base is None or len(self._capacity_base) != 4 * len(self._node_number) + 1:
            base = np.full(4 * len(self._node_number) + 1, math.inf)
            for node_id, number in self._node_number.items():
                if node_id != GRID_NODE_ID:
                    for kind, value in enumerate(self._node_limits(node_id)):
                        if value is not None:
                            base[4 * number + kind] = value
            self._capacity_base = base
        result = self._capacity_base.copy()
        for kind, value in enumerate(grid):
            if value is not None:
                result[kind] = value
        return result


def site_index(site: SiteConfig) -> SiteIndex:
    """The compiled form of ``site``, kept with it (the configuration is immutable)."""
    cache = site.derived_cache
    found = cache.get("site_index")
    if not isinstance(found, SiteIndex):
        found = cache["site_index"] = SiteIndex(site)
    return found
