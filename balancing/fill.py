"""The allocator's two steps over whole arrays of EVSEs: admission in turn order and water-filling.

Theory of operation. Both work on a constraint matrix: EVSE ``i`` loads constraint ``index[row[i], k]``
with ``weight[row[i], k]`` per ampere (weight 0 pads a row; EVSEs of a station with the same phase count
share a row, so the matrix is never copied out per EVSE). ``slack`` is what every constraint has left; both
functions take what they grant off it, clamping a constraint they touched at 0 as the Python loop
they replace did (:mod:`tests.support.reference_allocator` keeps that loop).

*Admission* (:func:`admit`) takes candidates one by one in turn order and grants ``amount[i]`` to each
whose amount fits on every constraint it loads. Slack only ever shrinks, so a candidate that does not
fit *now* will not fit at its turn either: each round first drops every such candidate at once; for
the rest it computes, per constraint, what the earlier candidates of the round would take (a prefix
sum in turn order); every candidate before the first that would not fit is granted, together. A round
grants at least one candidate, and on a real site a few rounds decide thousands (one per limit that
fills up), where the loop paid a Python iteration per candidate.

*Water-filling* (:func:`water_fill`) raises the admitted EVSEs together from their minimums, ``I_i =
clamp(L, low_i, high_i)``; per constraint the load above the minimums is a piecewise-linear function of
``L`` with breakpoints at the members' lows and highs, and the level where it meets the constraint's
slack is found for every constraint at once (events sorted by constraint and point, prefix sums of
slopes and of areas). The lowest such level freezes the members of the constraints that reach it
(and every EVSE whose maximum is below it); the rest rise again. One round per distinct freezing level.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

# Slack for floating-point sums: far below any resolution a station applies (0.1 A).
EPSILON_AMPERES = 1e-6
# Levels this close count as the same freezing level (as the Python loop did).
LEVEL_TIE = 1e-12


def _take(slack: FloatArray, constraint: IntArray, amperes: FloatArray) -> None:
    """Take each entry's ``amperes`` off its constraint; clamp the constraints touched at 0."""
    taken = np.bincount(constraint, weights=amperes, minlength=len(slack))
    touched = np.bincount(constraint, minlength=len(slack)) > 0
    np.subtract(slack, taken, out=slack, where=touched)
    np.maximum(slack, 0.0, out=slack, where=touched)


def _stable_order(keys: IntArray, bound: int) -> IntArray:
    """``np.argsort(keys, kind="stable")`` for keys in ``[0, bound)``: as 16-bit keys where they fit, which
    numpy sorts by radix (ten times faster than its stable sort of wider integers; the same order)."""
    if bound <= 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys, kind="stable")


def _group_starts(keys: IntArray) -> IntArray:
    """For keys sorted ascending: the position of the first entry of each entry's group."""
    if not len(keys):
        return np.zeros(0, dtype=np.intp)
    first = np.ones(len(keys), dtype=np.bool_)
    first[1:] = keys[1:] != keys[:-1]
    return np.maximum.accumulate(np.where(first, np.arange(len(keys)), 0))


def admit(
    candidates: IntArray, amount: FloatArray, row: IntArray, index: IntArray, weight: FloatArray, slack: FloatArray
) -> IntArray:
    """Grant ``amount`` to the candidates (EVSE numbers in turn order) that fit, in turn; return those granted.

    ``row`` is every EVSE's row (indexed by EVSE number) of ``index``/``weight``; ``slack`` is updated.
    """
    if len(candidates) == 0:
        return candidates
    # What does not fit now never will (slack only shrinks): drop it before any sorting. Column by column,
    # from the last (the rows end with the grid, which every EVSE loads): once a shared constraint is
    # full, the candidates behind it are gone before the wider columns are looked at.
    rows = row[candidates]
    for column in range(index.shape[1] - 1, -1, -1):
        if not len(candidates):
            break
        need = weight[rows, column] * amount[candidates]
        fits = slack[index[rows, column]] + EPSILON_AMPERES >= need
        candidates, rows = candidates[fits], rows[fits]
    count = len(candidates)
    if count == 0:
        return candidates
    rows_index, rows_weight = index[rows], weight[rows]
    need = rows_weight * amount[candidates][:, None]
    used = rows_weight > 0
    entry_position = np.broadcast_to(np.arange(count)[:, None], rows_index.shape)[used]
    entry_constraint = rows_index[used]
    entry_need = need[used]
    # By constraint, then turn: the entries are in turn order already, so a stable sort by constraint.
    order = _stable_order(entry_constraint, len(slack))
    entry_position = entry_position[order]
    entry_constraint = entry_constraint[order]
    entry_need = entry_need[order]
    starts = _group_starts(entry_constraint)
    undecided = np.ones(count, dtype=np.bool_)
    granted = np.zeros(count, dtype=np.bool_)
    positions = np.arange(count)
    while True:
        live = undecided[entry_position]
        # What does not fit now never will: slack only shrinks.
        live &= slack[entry_constraint] + EPSILON_AMPERES >= entry_need
        undecided[entry_position[~live]] = False
        if not undecided.any():
            break
        live &= undecided[entry_position]
        if not live.all():  # keep only the undecided candidates' entries: later rounds cost what is left
            entry_position, entry_constraint = entry_position[live], entry_constraint[live]
            entry_need = entry_need[live]
            starts = _group_starts(entry_constraint)
        inclusive = np.cumsum(entry_need)
        exclusive = inclusive - entry_need
        before = exclusive - exclusive[starts]  # taken by earlier candidates on the same constraint
        misfit = slack[entry_constraint] - before + EPSILON_AMPERES < entry_need
        first_misfit = int(entry_position[misfit].min()) if misfit.any() else count
        now = undecided & (positions < first_misfit)
        taking = now[entry_position]  # every entry of a candidate granted is still there (sorted by constraint)
        _take(slack, entry_constraint[taking], entry_need[taking])
        granted |= now
        undecided &= ~now
        if first_misfit == count:
            break
    return candidates[granted]


def water_fill(
    members: IntArray,
    low: FloatArray,
    high: FloatArray,
    row: IntArray,
    index: IntArray,
    weight: FloatArray,
    slack: FloatArray,
    allocated: FloatArray,
) -> None:
    """Raise ``members`` (admitted EVSE numbers, at ``low`` already taken off ``slack``) max-min fairly.

    Writes their allocations into ``allocated`` and takes what they get above ``low`` off ``slack``.
    """
    active = members[high[members] > low[members]]
    count = len(active)
    if count == 0:
        return
    lows, highs = low[active], high[active]
    rows_index, rows_weight = index[row[active]], weight[row[active]]
    used = rows_weight > 0
    entry_member = np.broadcast_to(np.arange(count)[:, None], rows_index.shape)[used]
    entry_constraint = rows_index[used]
    entry_weight = rows_weight[used]
    # Two events per entry: the slope rises by the weight at the member's low, falls back at its high.
    event_constraint = np.concatenate((entry_constraint, entry_constraint))
    event_point = np.concatenate((lows[entry_member], highs[entry_member]))
    event_change = np.concatenate((entry_weight, -entry_weight))
    event_member = np.concatenate((entry_member, entry_member))
    # By constraint, then point (at one point the order of changes does not move the level found): the
    # members' lows and highs ranked (two points a member, not two an entry), the events sorted stably by
    # that rank, then by constraint.
    point_rank = np.empty(2 * count, dtype=np.intp)
    point_rank[np.argsort(np.concatenate((lows, highs)), kind="stable")] = np.arange(2 * count)
    event_rank = np.concatenate((point_rank[:count][entry_member], point_rank[count:][entry_member]))
    order = _stable_order(event_rank, 2 * count)
    order = order[_stable_order(event_constraint[order], len(slack))]
    event_constraint = event_constraint[order]
    event_point = event_point[order]
    event_change = event_change[order]
    event_member = event_member[order]
    starts, previous_point, step, last = _layout(event_constraint, event_point)
    alive = np.ones(count, dtype=np.bool_)
    while True:
        slope = np.cumsum(event_change) - event_change
        slope -= slope[starts]  # slope just before each event, within its constraint
        area = slope * step
        area_inclusive = np.cumsum(area)
        # The load above the minimums at each event's point (the area under the slope so far).
        filled = area_inclusive - (area_inclusive[starts] - area[starts])
        group_slack = slack[event_constraint]
        total = np.zeros(len(slack))
        total[event_constraint[last]] = filled[last]
        crossing = (total[event_constraint] > group_slack) & (filled >= group_slack) & (slope > 0)
        level = math.inf
        if crossing.any():
            where = np.flatnonzero(crossing)
            crossed = event_constraint[where]
            first = np.ones(len(where), dtype=np.bool_)
            first[1:] = crossed[1:] != crossed[:-1]  # the first crossing of each constraint
            at = where[first]
            level_of = np.full(len(slack), math.inf)
            level_of[crossed[first]] = previous_point[at] + (group_slack[at] - (filled[at] - area[at])) / slope[at]
            level = float(level_of.min())
        if math.isinf(level):
            frozen = alive.copy()
        else:
            tight = level_of <= level + LEVEL_TIE
            hit = np.zeros(count, dtype=np.bool_)
            hit[entry_member[tight[entry_constraint]]] = True
            frozen = alive & (hit | (highs <= level))
            if not frozen.any():  # cannot happen (the lowest level is some live constraint's); never spin
                frozen = alive.copy()
        target = highs[frozen] if math.isinf(level) else np.minimum(highs[frozen], np.maximum(lows[frozen], level))
        allocated[active[frozen]] = target
        rise = np.zeros(count)
        rise[frozen] = target - lows[frozen]
        taking = frozen[entry_member]
        _take(slack, entry_constraint[taking], entry_weight[taking] * rise[entry_member[taking]])
        alive &= ~frozen
        if not alive.any():
            return
        # Only the members still rising take part in the next round.
        keep = alive[event_member]
        event_constraint, event_point = event_constraint[keep], event_point[keep]
        event_change, event_member = event_change[keep], event_member[keep]
        starts, previous_point, step, last = _layout(event_constraint, event_point)
        keep = alive[entry_member]
        entry_member, entry_constraint, entry_weight = entry_member[keep], entry_constraint[keep], entry_weight[keep]


def _layout(constraint: IntArray, point: FloatArray) -> tuple[IntArray, FloatArray, FloatArray, BoolArray]:
    """For events sorted by constraint then point: group starts, the previous event's point, the step
    from it (0 at a group's start) and whether each event is its group's last."""
    starts = _group_starts(constraint)
    previous = np.empty_like(point)
    if len(point):
        previous[0] = point[0]
        previous[1:] = point[:-1]
    step = np.where(starts == np.arange(len(point)), 0.0, point - previous)
    last = np.ones(len(constraint), dtype=np.bool_)
    last[:-1] = constraint[1:] != constraint[:-1]
    return starts, previous, step, last
