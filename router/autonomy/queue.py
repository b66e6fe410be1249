"""The durable per-station replay queue and latest-state table, on the state store.

Theory of operation: while a station is served locally, every message the CSMS must still learn is kept
on disk *before* the station is answered (the caller appends, then replies), so that a kill -9 or a power
cut loses nothing the station was told had been received. Two kinds are kept, per station:

* the **queue**: messages delivered later exactly in the order they came (TransactionEvent, MeterValues,
  security events, reports ...). One store outbox per station, ``autonomy.queue/<station id>``; its
  sequence numbers only grow (see :class:`router.store.Outbox`).
* the **latest** table: state-type messages where only the newest per key matters (StatusNotification per
  connector, FirmwareStatusNotification ...). One store namespace per station,
  ``autonomy.latest/<station id>``, one key each; a newer message under a key replaces the older one.

Replay (the caller's job): peek the oldest queued entry, deliver it, :meth:`ReplayQueue.ack` it; the latest
entries likewise with :meth:`ReplayQueue.ack_latest`, which removes an entry only if no newer message
replaced it in the meantime. A crash between delivery and ack delivers that message again: at least once,
never lost (the CSMS spots a repeated TransactionEvent by its seqNo).

Bounds: per station, queued plus latest messages (``max_messages_per_station``); over all stations, their
stored bytes (``max_bytes``, the msgpack size the store writes). Messages other than transaction data
(:data:`TRANSACTION_ACTIONS`) may fill only ``1 - reserve_fraction`` of either bound, so that a station
flooding reports or events cannot take the room its transactions need. A message that does not fit
raises :class:`QueueFull` and nothing is stored: the caller answers the station with a CALLERROR, so the
station keeps the message itself.

Damage: the store already refuses to open when a row is not readable msgpack, naming the row. This
module also checks, when it is constructed and on every read, that each row has the shape it writes,
and raises :class:`router.store.StoreDamaged` naming the station and the row otherwise: ``ocpp-lc run``
reports it like any damaged store. Everything here is synchronous, like the store; no trio.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

from router.store import Store, StoreDamaged

log = logging.getLogger("ocpp_lc.autonomy.queue")

QUEUE_PREFIX: Final = "autonomy.queue/"
LATEST_PREFIX: Final = "autonomy.latest/"
#: Transaction data: these may use the whole of the bounds, every other message only a part of them.
TRANSACTION_ACTIONS: Final = frozenset({"TransactionEvent", "MeterValues"})


class QueueFull(Exception):
    """A message does not fit: nothing was stored. ``str()`` says which bound, for the log and the CALLERROR."""

    def __init__(self, station_id: str, bound: str, limit: int) -> None:
        self.station_id = station_id
        self.bound = bound
        self.limit = limit
        super().__init__(station_id, bound, limit)

    def __str__(self) -> str:
        return f"the controller's queue for the CSMS is full ({self.bound}, limit {self.limit})"


@dataclass(frozen=True)
class StationMessage:
    """A station's CALL as kept for the CSMS: its own action and payload, untouched.

    ``message_id`` is the station's id of the CALL (for logs; a replay uses a fresh id of the controller's,
    since the CSMS's answer stays in the controller). ``received_at`` is when the controller took it (RFC
    3339). ``local_id_token_status`` is the authorization status the controller answered for its idToken,
    if it carried one, so that a replay can tell a token the CSMS refuses after it was accepted locally.
    """

    action: str
    payload: Mapping[str, Any]
    message_id: str
    received_at: str
    local_id_token_status: str | None = None

    def record(self) -> dict[str, Any]:
        """The msgpack-friendly form stored."""
        return {
            "action": self.action,
            "payload": dict(self.payload),
            "id": self.message_id,
            "at": self.received_at,
            "auth": self.local_id_token_status,
        }

    @classmethod
    def from_record(cls, record: object) -> StationMessage:
        """Read a stored record back; ValueError says what is wrong with it."""
        if not isinstance(record, dict):
            raise ValueError(f"a {type(record).__name__} where a message record belongs")
        action, payload = record.get("action"), record.get("payload")
        message_id, received_at, auth = record.get("id"), record.get("at"), record.get("auth")
        if not isinstance(action, str) or not action:
            raise ValueError("no action")
        if not isinstance(payload, dict):
            raise ValueError("no payload object")
        if not isinstance(message_id, str) or not isinstance(received_at, str):
            raise ValueError("no message id or reception time")
        if auth is not None and not isinstance(auth, str):
            raise ValueError("an authorization status that is not text")
        return cls(action, payload, message_id, received_at, auth)


@dataclass(frozen=True)
class QueuedEntry:
    """One queued message, oldest first when peeked; hand it back to :meth:`ReplayQueue.ack`."""

    station_id: str
    seq: int
    message: StationMessage
    stored_bytes: int


@dataclass(frozen=True)
class LatestEntry:
    """The newest message under one key; ``version`` tells it from a later replacement."""

    station_id: str
    key: str
    version: int
    message: StationMessage
    stored_bytes: int


def _size(value: Any) -> int:
    # Exactly what the store writes (router.store._encode), so the sums here match ``length()`` in SQL.
    return len(msgpack.packb(value, use_bin_type=True))


class ReplayQueue:
    """Every station's queue and latest table; one per appliance, handed the open :class:`Store`.

    Construction reads what a previous run left (sizes, and every row once for its shape): StoreDamaged
    if a row is not one of ours. Each write is one store transaction, durable when it returns.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_messages_per_station: int,
        max_bytes: int,
        reserve_fraction: float = 0.25,
    ) -> None:
        if max_messages_per_station < 1 or max_bytes < 1 or not 0 <= reserve_fraction < 1:
            raise ValueError("bounds must be positive and reserve_fraction in [0, 1)")
        self._store = store
        self.max_messages_per_station = max_messages_per_station
        self.max_bytes = max_bytes
        self._reserve_fraction = reserve_fraction
        self._queued: dict[str, tuple[int, int]] = {}  # station -> (entries, bytes)
        self._latest: dict[str, dict[str, tuple[int, int]]] = {}  # station -> key -> (version, bytes)
        self._total_bytes = 0
        self._next_version = 1
        self._load()

    # -- what is kept -----------------------------------------------------------------------------

    def stations(self) -> list[str]:
        """Stations with anything kept for their CSMS (queued or latest), sorted."""
        return sorted(set(self._queued) | set(self._latest))

    def messages(self, station_id: str) -> int:
        """How many messages are kept for ``station_id`` (queued plus latest)."""
        return self._queued.get(station_id, (0, 0))[0] + len(self._latest.get(station_id, {}))

    def queued_messages(self, station_id: str) -> int:
        """How many messages wait in ``station_id``'s queue (latest entries not counted)."""
        return self._queued.get(station_id, (0, 0))[0]

    @property
    def total_messages(self) -> int:
        """Messages kept for every station (a gauge for operators)."""
        return sum(count for count, _ in self._queued.values()) + sum(len(keys) for keys in self._latest.values())

    @property
    def total_bytes(self) -> int:
        """Stored bytes of every kept message (a gauge for operators; compared with ``max_bytes``)."""
        return self._total_bytes

    # -- the queue --------------------------------------------------------------------------------

    def append(self, station_id: str, message: StationMessage) -> int:
        """Queue ``message`` at the end of ``station_id``'s queue; durable when it returns; its sequence number.

        QueueFull (nothing stored) if it would pass a bound; StoreError if the disk fails (then it may or
        may not be stored: the caller answers with a CALLERROR either way and the station sends it again).
        """
        record = message.record()
        size = _size(record)
        self._check_room(station_id, message.action, added_messages=1, added_bytes=size)
        seq = self._store.outbox(QUEUE_PREFIX + station_id).append(record)
        count, stored = self._queued.get(station_id, (0, 0))
        self._queued[station_id] = (count + 1, stored + size)
        self._total_bytes += size
        return seq

    def peek(self, station_id: str, limit: int = 1) -> list[QueuedEntry]:
        """Up to ``limit`` oldest queued entries of ``station_id``, oldest first, not removed."""
        name = QUEUE_PREFIX + station_id
        entries = []
        for seq, record in self._store.outbox(name).peek(limit):
            entries.append(
                QueuedEntry(station_id, seq, self._message(record, f"entry {seq} of outbox {name!r}"), _size(record))
            )
        return entries

    def ack(self, entry: QueuedEntry) -> bool:
        """Remove a delivered entry; True if it was still there (acking twice does nothing)."""
        if not self._store.outbox(QUEUE_PREFIX + entry.station_id).ack(entry.seq):
            return False
        count, stored = self._queued[entry.station_id]
        if count <= 1:
            del self._queued[entry.station_id]
        else:
            self._queued[entry.station_id] = (count - 1, stored - entry.stored_bytes)
        self._total_bytes -= entry.stored_bytes
        return True

    # -- the latest table -------------------------------------------------------------------------

    def put_latest(self, station_id: str, key: str, message: StationMessage) -> int:
        """Keep ``message`` as the newest under ``key`` for ``station_id``, replacing an older one; its version.

        Durable when it returns; QueueFull (nothing changed) if it would pass a bound.
        """
        version = self._next_version
        value = {"v": version, "m": message.record()}
        size = _size(value)
        keys = self._latest.get(station_id, {})
        old = keys.get(key)
        added_messages = 0 if old is not None else 1
        self._check_room(station_id, message.action, added_messages, size - (old[1] if old else 0))
        self._store.namespace(LATEST_PREFIX + station_id).put(key, value)
        self._next_version += 1
        self._latest.setdefault(station_id, {})[key] = (version, size)
        self._total_bytes += size - (old[1] if old else 0)
        return version

    def latest(self, station_id: str) -> list[LatestEntry]:
        """Every latest entry of ``station_id``, in the order they were last replaced (oldest first)."""
        name = LATEST_PREFIX + station_id
        entries = []
        for key, value in self._store.namespace(name).items().items():
            version, message = self._latest_value(value, f"key {key!r} of namespace {name!r}")
            entries.append(LatestEntry(station_id, key, version, message, _size(value)))
        return sorted(entries, key=lambda entry: entry.version)

    def ack_latest(self, entry: LatestEntry) -> bool:
        """Remove a delivered latest entry unless a newer message replaced it since; True if removed."""
        keys = self._latest.get(entry.station_id, {})
        current = keys.get(entry.key)
        if current is None or current[0] != entry.version:
            return False
        self._store.namespace(LATEST_PREFIX + entry.station_id).delete(entry.key)
        del keys[entry.key]
        if not keys:
            del self._latest[entry.station_id]
        self._total_bytes -= current[1]
        return True

    # -- internals --------------------------------------------------------------------------------

    def _check_room(self, station_id: str, action: str, added_messages: int, added_bytes: int) -> None:
        share = 1.0 if action in TRANSACTION_ACTIONS else 1.0 - self._reserve_fraction
        message_limit = int(self.max_messages_per_station * share)
        byte_limit = int(self.max_bytes * share)
        if added_messages and self.messages(station_id) + added_messages > message_limit:
            raise QueueFull(station_id, "messages for this station", message_limit)
        if added_bytes > 0 and self._total_bytes + added_bytes > byte_limit:
            raise QueueFull(station_id, "bytes for all stations", byte_limit)

    def _message(self, record: object, where: str) -> StationMessage:
        try:
            return StationMessage.from_record(record)
        except ValueError as error:
            raise StoreDamaged(self._store.path, f"{where} is not a queued station message ({error})") from None

    def _latest_value(self, value: object, where: str) -> tuple[int, StationMessage]:
        version = value.get("v") if isinstance(value, dict) else None
        if not isinstance(version, int) or version < 1:
            raise StoreDamaged(self._store.path, f"{where} is not a latest-state entry (no version)")
        assert isinstance(value, dict)
        return version, self._message(value.get("m"), where)

    def _load(self) -> None:
        for name, (count, size) in self._store.outbox_sizes(QUEUE_PREFIX).items():
            station_id = name[len(QUEUE_PREFIX) :]
            self._queued[station_id] = (count, size)
            self._total_bytes += size
            # Every row once, for its shape (one station's queue is bounded by max_messages_per_station).
            for seq, record in self._store.outbox(name).peek(count):
                self._message(record, f"entry {seq} of outbox {name!r}")
        for name in self._store.namespace_sizes(LATEST_PREFIX):
            station_id = name[len(LATEST_PREFIX) :]
            keys: dict[str, tuple[int, int]] = {}
            for key, value in self._store.namespace(name).items().items():
                version, _ = self._latest_value(value, f"key {key!r} of namespace {name!r}")
                keys[key] = (version, _size(value))
                self._next_version = max(self._next_version, version + 1)
            if keys:
                self._latest[station_id] = keys
                self._total_bytes += sum(size for _, size in keys.values())
        if self._queued or self._latest:
            log.info(
                "autonomy: %d messages (%d bytes) kept for the CSMS of %d stations from before the restart",
                self.total_messages,
                self._total_bytes,
                len(self.stations()),
            )
