"""Site autonomy for the whole appliance: the caches, the queue, the reconnect pacer and who is local.

One :class:`Autonomy` per appliance (built by ``router.app`` when ``[autonomy] enabled``). Each station pair
whose CSMS leg runs under autonomy (:class:`router.autonomy.upstream.AutonomousUpstream`) reports its mode
here; :meth:`Autonomy.stations` is the read-only view operators' tools use (``ocpp-lc status``, metrics).

Modes of a station (only the last two are listed by the view): ``relaying`` (its CSMS leg is up and the
pair forwards byte for byte), ``local`` (the leg is gone: the controller answers), ``replaying`` (the leg
is back and the queue is being delivered; the station is still answered locally).

The reconnect pacer spreads the CSMS connections re-opened after an outage: at most
``reconnect_rate_per_s`` a second over the whole site, each at a random moment within its slot, so that a
thousand stations do not reach the CSMS in one second when it returns. The first station through ends
the others' backoff waits, so the return is paced by the rate, not by the backoff.

Its metrics are in :mod:`.metrics`: :class:`Autonomy` keeps the event-driven ones up to date and gives
the per-scrape gauges what they read (the longest outage, what is left of the replays).
"""

from __future__ import annotations

import datetime
import logging
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import trio
from prometheus_client import CollectorRegistry

from router.store import Store

from .auth_cache import AuthCache
from .boot_cache import BootCache
from .local import LocalService
from .metrics import AutonomyCollector, AutonomyMetrics
from .queue import ReplayQueue
from .responder import LocalResponder
from .settings import AutonomySettings

log = logging.getLogger("ocpp_lc.autonomy")

Mode = Literal["relaying", "local", "replaying"]

#: Store namespaces of the two caches (the queue's are in :mod:`.queue`).
BOOT_NAMESPACE = "autonomy.boot"
AUTH_NAMESPACE = "autonomy.auth"


class ReconnectPacer:
    """Hands out connection attempts at no more than ``rate_per_s`` a second, each jittered in its slot."""

    def __init__(self, rate_per_s: float, rng: random.Random) -> None:
        self._interval_s = 1.0 / rate_per_s
        self._rng = rng
        self._next_slot_s = -math.inf
        self._reached = trio.Event()

    async def turn(self) -> None:
        """Wait for this caller's slot (a random moment within the next free interval)."""
        slot_s = max(trio.current_time(), self._next_slot_s)
        self._next_slot_s = slot_s + self._interval_s
        await trio.sleep_until(slot_s + self._rng.uniform(0.0, self._interval_s))

    async def back_off(self, wait_s: float) -> bool:
        """Wait ``wait_s`` after a failed attempt, or less: True if cut short because a station got through.

        Without this, a site whose attempts do not fill the pacer would sit out each station's backoff
        (up to reconnect_backoff_max_s) after the CSMS is back; now the first station through wakes the
        rest, and :meth:`turn` spreads them at the rate.
        """
        with trio.move_on_after(wait_s):
            await self._reached.wait()
            return True
        return False

    def reached(self) -> None:
        """A station's CSMS connection opened again: wake every station backing off."""
        self._reached.set()
        self._reached = trio.Event()


@dataclass(frozen=True)
class StationAutonomy:
    """One station served locally, as the read-only view shows it."""

    station_id: str
    mode: Mode
    offline_for_s: float
    queued_messages: int


class Autonomy:
    """The site's autonomy parts, built once from ``[autonomy]`` on the open store."""

    def __init__(
        self,
        settings: AutonomySettings,
        store: Store,
        *,
        registry: CollectorRegistry,
        wall_clock: Callable[[], datetime.datetime],
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.rng = rng if rng is not None else random.Random()
        self.boots = BootCache(store.namespace(BOOT_NAMESPACE))
        self.auth = AuthCache(
            store.namespace(AUTH_NAMESPACE),
            max_entries=settings.auth_cache_max_entries,
            lifetime_s=settings.auth_cache_lifetime_s,
            unknown_id_tokens=settings.unknown_id_tokens,
            wall_clock=wall_clock,
        )
        # Raises StoreDamaged for a row that is not ours: `ocpp-lc run` reports it like a damaged store.
        self.queue = ReplayQueue(
            store,
            max_messages_per_station=settings.queue_max_messages_per_station,
            max_bytes=settings.queue_max_bytes,
        )
        self.metrics = AutonomyMetrics(
            registry,
            queue_max_bytes=settings.queue_max_bytes,
            queue_max_messages_per_station=settings.queue_max_messages_per_station,
            max_offline_s=settings.max_offline_s,
        )
        self.local = LocalService(
            LocalResponder(self.boots, self.auth, wall_clock=wall_clock),
            self.queue,
            wall_clock=wall_clock,
            on_authorized=self.metrics.count_authorization,
        )
        self.pacer = ReconnectPacer(settings.reconnect_rate_per_s, self.rng)
        registry.register(AutonomyCollector(self))
        self._modes: dict[str, Mode] = {}
        self._owners: dict[str, object] = {}
        # When each station's CSMS leg was lost (trio clock), until it is relayed again. Kept across the
        # station's reconnections, so that max_offline_s bounds the outage, not one connection.
        self._offline_since_s: dict[str, float] = {}
        # When each replaying station's CSMS leg came back (trio clock), for the replay duration.
        self._replay_since_s: dict[str, float] = {}
        self._listeners: list[Callable[[], None]] = []
        self._replay_locks: dict[str, trio.Lock] = {}
        self.refresh_gauges()

    # -- the view ----------------------------------------------------------------------------------

    def stations(self) -> list[StationAutonomy]:
        """The stations served locally right now (local or replaying), sorted by id."""
        now_s = trio.current_time()
        return [
            StationAutonomy(
                station_id,
                mode,
                round(now_s - self._offline_since_s.get(station_id, now_s), 3),
                self.queue.messages(station_id),
            )
            for station_id, mode in sorted(self._modes.items())
            if mode != "relaying"
        ]

    def status(self) -> dict[str, Any]:
        """A JSON-friendly summary (for a status API)."""
        return {
            "enabled": True,
            "stations": [vars(station) for station in self.stations()],
            "queue_messages": self.queue.total_messages,
            "queue_bytes": self.queue.total_bytes,
            "queue_max_bytes": self.settings.queue_max_bytes,
            "queue_max_messages_per_station": self.settings.queue_max_messages_per_station,
        }

    def mode_of(self, station_id: str) -> Mode | None:
        """The mode of ``station_id``'s pair, None if it has none under autonomy."""
        return self._modes.get(station_id)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever a station changes mode."""
        self._listeners.append(listener)

    # -- what pairs report -------------------------------------------------------------------------

    def claim(self, station_id: str, owner: object, mode: Mode) -> None:
        """A new pair ``owner`` of ``station_id`` begins in ``mode``; from now on only it reports the station.

        A station that connects again replaces its older pair, which ends after the new one began: what
        the older one still reports must not overwrite what the newer one did, hence the owner.
        """
        self._owners[station_id] = owner
        self.set_mode(station_id, mode, owner)

    def set_mode(self, station_id: str, mode: Mode | None, owner: object) -> None:
        """Record ``station_id``'s mode as its current pair ``owner`` reports it (None: that pair ended)."""
        if self._owners.get(station_id) is not owner:
            return
        self._time_replay(station_id, self._modes.get(station_id), mode)
        if mode is None:
            self._owners.pop(station_id, None)
            self._modes.pop(station_id, None)
        else:
            self._modes[station_id] = mode
            if mode == "relaying":
                self._offline_since_s.pop(station_id, None)
            else:
                self._offline_since_s.setdefault(station_id, trio.current_time())
        self.refresh_gauges()
        for listener in self._listeners:
            listener()

    def _time_replay(self, station_id: str, before: Mode | None, after: Mode | None) -> None:
        """Start the replay clock when the CSMS comes back; observe it when the replay is done."""
        if after == "replaying":
            if before != "replaying":
                self._replay_since_s[station_id] = trio.current_time()
            return
        since_s = self._replay_since_s.pop(station_id, None)
        if since_s is not None and after == "relaying":
            self.metrics.replay_duration.observe(trio.current_time() - since_s)

    def offline_deadline_s(self, station_id: str) -> float:
        """When ``station_id`` stops being served locally (trio clock): max_offline_s after its loss."""
        since_s = self._offline_since_s.setdefault(station_id, trio.current_time())
        return since_s + self.settings.max_offline_s

    def csms_holds_pending(self, station_id: str) -> None:
        """The CSMS answered ``station_id``'s replayed boot Pending: it is there, so time offline starts again.

        The CSMS may hold a station Pending for as long as it wants (B02.FR.01), the connection open
        (B02.FR.06): that is no outage. max_offline_s bounds time *without* the CSMS, so it must not run
        out during the hold, nor take a station that loses its leg after a long hold at once.
        """
        if station_id in self._offline_since_s:
            self._offline_since_s[station_id] = trio.current_time()

    def past_max_offline(self, station_id: str) -> bool:
        """Whether ``station_id`` has been without its CSMS for longer than max_offline_s (strict rule)."""
        since_s = self._offline_since_s.get(station_id)
        return since_s is not None and trio.current_time() - since_s >= self.settings.max_offline_s

    def replay_lock(self, station_id: str) -> trio.Lock:
        """Held by the pair that replays ``station_id``'s kept messages: one replay per station at a time."""
        return self._replay_locks.setdefault(station_id, trio.Lock())

    def has_kept(self, station_id: str) -> bool:
        """Whether anything waits for ``station_id``'s CSMS (then the pair replays before it relays)."""
        return self.queue.messages(station_id) > 0

    def learn(self, station_id: str, action: str, request: Mapping[str, Any], response: Mapping[str, Any]) -> None:
        """Take in a CSMS answer to a station call (relayed or replayed): boot verdicts and idTokenInfo."""
        if action == "BootNotification":
            self.boots.learn(station_id, response)
        else:
            self.auth.learn_from_exchange(station_id, action, request, response)

    # -- what the per-scrape gauges read (metrics.AutonomyReading) ---------------------------------

    def longest_offline_s(self) -> float:
        """How long the station served locally for the longest has been without its CSMS (0: none)."""
        since_s = [
            self._offline_since_s[station_id]
            for station_id, mode in self._modes.items()
            if mode != "relaying" and station_id in self._offline_since_s
        ]
        # (Read trio's clock only when someone is offline: a registry may be read outside trio, e.g. by
        # a test of another part, and then nobody is.)
        return trio.current_time() - min(since_s) if since_s else 0.0

    def replay_remaining_messages(self) -> int:
        """Messages still to deliver to the CSMS for the stations whose replay is under way."""
        return sum(self.queue.messages(station_id) for station_id, mode in self._modes.items() if mode == "replaying")

    def fullest_station_messages(self) -> int:
        """The most messages kept for any one station."""
        return max((self.queue.messages(station_id) for station_id in self.queue.stations()), default=0)

    def refresh_gauges(self) -> None:
        """Bring the mode and queue gauges up to date."""
        for mode in ("local", "replaying"):
            self.metrics.stations.labels(mode).set(sum(1 for m in self._modes.values() if m == mode))
        self.metrics.queue_messages.set(self.queue.total_messages)
        self.metrics.queue_bytes.set(self.queue.total_bytes)
