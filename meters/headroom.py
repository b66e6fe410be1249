"""What a meter at a node leaves for the EVs: the node's limit less the non-EV load, per phase.

Theory of operation. A meter at a node measures everything that flows through it: the EVs beneath it
and every other load (the building). The controller knows what its EVs draw from their own meter
values, so the *other load* is the metered current less that EV current, per grid phase (never below
0). It is smoothed asymmetrically: a rise is taken at once (the building switched something on: the EVs
must make room now), a fall only slowly (exponentially, ``fall_time_constant_s``), so a load that
switches on and off does not make the EVs' limits swing, and EV meter values that lag behind a drop of
their current cannot talk the estimate down quickly. The EVs' capacity at the node is then

    headroom = node limit − smoothed other load − safety margin   (per phase, never below 0)

and the balancing loop treats it as one more limit on that node, the lowest of all winning. A node
that also has a power limit (``max_power_watts``: a contracted power below what the fuses carry) loses
the same other load there, converted as the allocator converts power (the sum of the phase currents
at the site's nominal voltage):

    power headroom = node power limit − voltage × (other load + safety margin, summed over the phases)

so the building and the EVs together stay within the node's power limit too.

A reading that cannot be used (no answer, garbage, a wrong SunSpec model, nonsense values) changes
nothing: the last headroom stays in force. Once no valid reading has come for ``stale_after_s``, or
before the first one, the *fallback* holds: the configured static other load
(``fallback_other_load_amperes``, else ``[site] other_load_amperes``) or, with neither, the failsafe
current (``[ems] failsafe_current_amperes``); never "unlimited".

Pure: the caller passes the time (trio's clock, seconds) and the EV current beneath the node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .decode import MeterReading, Phases3


def smooth(previous: float | None, value: float, elapsed_s: float, fall_time_constant_s: float) -> float:
    """The asymmetric filter: a rise at once, a fall by ``1 − exp(−elapsed/τ)`` of the way per step."""
    if previous is None or value >= previous or fall_time_constant_s <= 0:
        return value
    # Clamped: the sum may round one ulp above ``previous`` (found by the property test).
    return min(previous, value + (previous - value) * math.exp(-max(0.0, elapsed_s) / fall_time_constant_s))


@dataclass(frozen=True, slots=True)
class HeadroomPolicy:
    """How one meter's readings become headroom at its node."""

    node_limit_amperes: float
    safety_margin_amperes: float = 2.0
    fall_time_constant_s: float = 30.0
    stale_after_s: float = 5.0
    #: Non-EV load assumed while the meter fails; None: the node's EVs get ``failsafe_amperes``.
    fallback_other_load_amperes: float | None = None
    failsafe_amperes: float = 0.0
    #: The node's configured power limit (W over all phases; None: none) and the site's nominal voltage.
    node_power_watts: float | None = None
    nominal_voltage_volts: float = 230.0

    def power_headroom(self, other_load_amperes: Phases3) -> float | None:
        """The EVs' power at the node with ``other_load_amperes`` elsewhere (None: no power limit)."""
        if self.node_power_watts is None:
            return None
        taken_amperes = sum(other_load_amperes) + 3 * self.safety_margin_amperes
        return max(0.0, self.node_power_watts - self.nominal_voltage_volts * taken_amperes)

    def fallback_power_headroom(self) -> float | None:
        """The EVs' power at the node while the meter cannot be trusted (the failsafe current bounds it
        without a static other load)."""
        if self.fallback_other_load_amperes is None:
            return None
        load = self.fallback_other_load_amperes
        return self.power_headroom((load, load, load))

    def fallback_headroom(self) -> Phases3:
        """The EVs' capacity at the node while the meter cannot be trusted."""
        if self.fallback_other_load_amperes is None:
            value = min(self.node_limit_amperes, self.failsafe_amperes)
        else:
            value = self.node_limit_amperes - self.fallback_other_load_amperes - self.safety_margin_amperes
        value = max(0.0, value)
        return (value, value, value)


class NodeHeadroom:
    """One meter's state: the smoothed other load, the headroom in force and whether it is the fallback."""

    def __init__(self, policy: HeadroomPolicy) -> None:
        self.policy = policy
        self.headroom_amperes: Phases3 = policy.fallback_headroom()
        #: What the EVs may take at the node in watts, if it has a power limit.
        self.power_headroom_watts: float | None = policy.fallback_power_headroom()
        self.other_load_amperes: Phases3 | None = None
        self.metered_amperes: Phases3 | None = None
        self.power_watts: float | None = None
        self.last_valid_at_s: float | None = None
        #: True while the fallback is in force (before the first reading, and once readings are stale).
        self.fallback = True

    def accept(self, reading: MeterReading, ev_amperes: Phases3, now_s: float) -> bool:
        """A valid reading at ``now_s`` with the EV current beneath the node; True if the headroom changed."""
        policy = self.policy
        previous = None if self.fallback else self.other_load_amperes
        elapsed_s = 0.0 if self.last_valid_at_s is None else now_s - self.last_valid_at_s
        other = []
        for phase in range(3):
            raw = max(0.0, reading.phase_current_amperes[phase] - ev_amperes[phase])
            before = None if previous is None else previous[phase]
            other.append(smooth(before, raw, elapsed_s, policy.fall_time_constant_s))
        self.other_load_amperes = (other[0], other[1], other[2])
        self.metered_amperes = reading.phase_current_amperes
        self.power_watts = reading.power_watts
        self.last_valid_at_s = now_s
        self.fallback = False
        room = [max(0.0, policy.node_limit_amperes - load - policy.safety_margin_amperes) for load in other]
        return self._set((room[0], room[1], room[2]), policy.power_headroom(self.other_load_amperes))

    def check_stale(self, now_s: float) -> bool:
        """Fall back if no valid reading came for ``stale_after_s``; True when it falls back now."""
        if self.fallback:
            return False
        if self.last_valid_at_s is not None and now_s - self.last_valid_at_s < self.policy.stale_after_s:
            return False
        self.fallback = True
        self._set(self.policy.fallback_headroom(), self.policy.fallback_power_headroom())
        return True

    def _set(self, headroom: Phases3, power_watts: float | None) -> bool:
        changed = headroom != self.headroom_amperes or power_watts != self.power_headroom_watts
        self.headroom_amperes = headroom
        self.power_headroom_watts = power_watts
        return changed
