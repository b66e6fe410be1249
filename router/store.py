"""Durable state: one SQLite file of msgpack values, as namespaced keys and FIFO outboxes.

Theory of operation: the whole appliance keeps what must outlive a restart (EMS limits in force, CSMS
site profiles, the firmware index, LC-set profile ids, messages still to be sent upstream) in one file,
``<state dir>/state.sqlite3``. A :class:`Store` owns the only connection to it. Components never see
SQLite: the router, balancing and the firmware cache are each handed a :class:`Namespace` (the
:class:`KeyValue` protocol) or an :class:`Outbox` (the :class:`Queue` protocol). Values are anything
msgpack encodes (dict, list, str, int, float, bool, None, bytes; tuples come back as lists).

Every call is one short transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) and returns only once it is
durable, so callers may run it straight from trio: a commit is one fsync of the write-ahead log, some
thousands a second on this class of machine (see ``shared/LIBRARIES.md``). The module never imports trio.

What survives what:

* **kill -9, crash, OOM kill.** A transaction is either in the file or not; the write-ahead log (WAL)
  is replayed on the next open. ``tests/integration/test_store_crash.py`` kills a writer with SIGKILL at
  random moments and checks that everything it reported done is there, in order.
* **Power cut.** With ``journal_mode=WAL`` and ``synchronous=FULL`` SQLite fsyncs the WAL before
  ``COMMIT`` returns; a checkpoint fsyncs the WAL before copying pages into the main file and the main
  file before the WAL is reused; the directory is fsync'd when the files are created. So after a power
  cut between any two calls the file holds exactly the calls that had returned. That rests on the
  storage honouring fsync: a card or disk whose write cache lies defeats any software. A power cut
  cannot be simulated in a test here; kill -9 is what the tests prove.
* **Damage** (bit rot, a truncated copy, a foreign file): :meth:`Store.open` runs ``PRAGMA quick_check``,
  checks the schema version and decodes every stored value. If anything is wrong it raises
  :class:`StoreDamaged`, whose message names the file and the way out; nothing is repaired or thrown away
  silently. ``Store.open(..., recover=True)`` moves the damaged file (and its WAL) aside to
  ``state.sqlite3.damaged-<UTC time>`` and starts empty. Damage found later, on a read, raises
  :class:`StoreDamaged` too.

One process at a time: the connection holds SQLite's exclusive lock (``locking_mode=EXCLUSIVE``) for as
long as the store is open, so a second appliance on the same state directory fails with a clear
:class:`StoreError` instead of interleaving writes. The connection is used from the thread that opened it.

Schema changes are numbered migrations (``_MIGRATIONS``), each applied in one transaction; the version is
kept in the ``schema_version`` table. A file from a newer release is reported, not guessed at.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import msgpack  # type: ignore[import-untyped]  # msgpack ships no type information

log = logging.getLogger("ocpp_lc.store")

#: The file inside the state directory.
STATE_FILE = "state.sqlite3"
#: SQLite's companion files that belong to the main file (moved aside with it).
_COMPANIONS = ("-wal", "-shm", "-journal")
#: How long an open waits for a lock another process holds before saying the store is in use.
_BUSY_TIMEOUT_MS = 1000
#: How a damaged store is recovered; named in every StoreDamaged message.
RECOVER_HINT = "start ocpp-lc with --recover-state to move it aside and begin with empty state, or restore a backup"

# Migration n (0-based) takes the schema from version n to n + 1. Append only; never edit a released one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "CREATE TABLE kv (namespace TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
        " PRIMARY KEY (namespace, key)) WITHOUT ROWID",
        # AUTOINCREMENT: a sequence number is never reused, even once every entry has been acked,
        # so an ack for an old delivery can never remove a newer entry.
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, item BLOB NOT NULL)",
        "CREATE INDEX outbox_by_name ON outbox (name, seq)",
    ),
)
SCHEMA_VERSION = len(_MIGRATIONS)
_TABLES = frozenset({"schema_version", "kv", "outbox"})


class StoreError(Exception):
    """The state store cannot be used (the message says which file and why)."""


class StoreDamaged(StoreError):
    """The state file is unreadable or not ours; ``str()`` names the file and what to do about it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(path, reason)

    def __str__(self) -> str:
        return f"state store {self.path} is damaged: {self.reason}; {RECOVER_HINT}"


class KeyValue(Protocol):
    """Durable keys of one namespace (what balancing and the firmware cache are handed)."""

    def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        ...

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; durable when it returns."""
        ...

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Store several keys at once: after a crash either all of them are there or none."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""
        ...

    def items(self) -> dict[str, Any]:
        """Every key and value of the namespace."""
        ...


class Queue(Protocol):
    """A durable FIFO: append, look at the oldest, remove each one once it has been delivered."""

    def append(self, item: Any) -> int:
        """Add ``item`` at the end; durable when it returns; returns its sequence number."""
        ...

    def peek(self, limit: int = 1) -> list[tuple[int, Any]]:
        """Up to ``limit`` oldest entries as (sequence number, item), not removed."""
        ...

    def ack(self, seq: int) -> bool:
        """Remove the entry ``seq`` (call it once the entry was delivered); True if it was there."""
        ...

    def __len__(self) -> int: ...


class Store:
    """The appliance's durable state; construct with :meth:`open`, end with :meth:`close`."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        """Use :meth:`open`; this takes over an already checked connection."""
        self._db: sqlite3.Connection | None = db
        self.path = path

    # -- opening and closing --------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, *, recover: bool = False) -> Store:
        """Open (or create) the store in ``state_dir`` and check it.

        Creates the directory (mode 0700) and the file (mode 0600) if missing. Raises
        :class:`StoreDamaged` if the file is unreadable, not an ocpp-lc store, from a newer release or
        holds a value that does not decode; with ``recover=True`` it instead moves the file aside to
        ``state.sqlite3.damaged-<UTC time>``, logs a warning and starts empty. Raises
        :class:`StoreError` if the directory or file cannot be created or opened, or another process has
        the store open. ``recover=True`` on a sound store changes nothing.
        """
        state_dir = Path(state_dir)
        path = state_dir / STATE_FILE
        _prepare(state_dir, path)
        try:
            return cls._open_checked(path)
        except StoreDamaged as damaged:
            if not recover:
                raise
            aside = _move_aside(path)
            log.warning(
                "state store %s was damaged (%s); moved it aside to %s and started empty",
                path,
                damaged.reason,
                aside.name,
            )
        _prepare(state_dir, path)
        return cls._open_checked(path)

    @classmethod
    def _open_checked(cls, path: Path) -> Store:
        try:
            db = sqlite3.connect(path, isolation_level=None)  # autocommit: we issue BEGIN/COMMIT ourselves
        except sqlite3.Error as error:
            raise _translate(error, path, "cannot open") from None
        store = cls(db, path)
        try:
            with _translated(path, "cannot open"):
                db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
                # Before the first read: the WAL index then lives in private memory, not a -shm file,
                # and the lock is held until close.
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
                db.execute("PRAGMA synchronous = FULL")
                # Checks that only read come first: a damaged or foreign file is left exactly as found.
                problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
                if problems != ["ok"]:
                    raise StoreDamaged(path, "SQLite finds it inconsistent (" + "; ".join(problems) + ")")
                version = store._schema_version()
                (mode,) = db.execute("PRAGMA journal_mode = WAL").fetchone()  # a no-op once the file is ours
                if mode != "wal":
                    raise StoreError(f"state store {path}: cannot use write-ahead logging (journal mode {mode})")
                store._migrate(version)
                store._check_values()
        except BaseException:
            db.close()
            raise
        return store

    def close(self) -> None:
        """Close the file (checkpointing the WAL into it); later calls raise StoreError. Idempotent."""
        if self._db is not None:
            db, self._db = self._db, None
            with _translated(self.path, "cannot close"):
                db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- namespaced keys ------------------------------------------------------------------------

    def get(self, namespace: str, key: str, default: Any = None) -> Any:
        """The value under ``namespace``/``key``, or ``default``; StoreDamaged if it does not decode."""
        with self._reading() as db:
            row = db.execute("SELECT value FROM kv WHERE namespace = ? AND key = ?", (namespace, key)).fetchone()
        return default if row is None else self._decode(row[0], f"key {key!r} of namespace {namespace!r}")

    def put(self, namespace: str, key: str, value: Any) -> None:
        """Store ``value`` under ``namespace``/``key``; durable when it returns. TypeError if not encodable."""
        self.put_many(namespace, {key: value})

    def put_many(self, namespace: str, items: Mapping[str, Any]) -> None:
        """Store every key of ``items`` in one transaction: after a crash all of them are there or none."""
        _check_name("namespace", namespace)
        rows = []
        for key, value in items.items():
            _check_name("key", key)
            rows.append((namespace, key, _encode(value, f"key {key!r} of namespace {namespace!r}")))
        if not rows:
            return
        with self._writing() as db:
            db.executemany("INSERT OR REPLACE INTO kv (namespace, key, value) VALUES (?, ?, ?)", rows)

    def delete(self, namespace: str, key: str) -> bool:
        """Remove ``namespace``/``key``; True if it was there. Durable when it returns."""
        with self._writing() as db:
            cursor = db.execute("DELETE FROM kv WHERE namespace = ? AND key = ?", (namespace, key))
        return cursor.rowcount > 0

    def items(self, namespace: str) -> dict[str, Any]:
        """Every key of ``namespace`` with its value, in key order."""
        with self._reading() as db:
            rows = db.execute("SELECT key, value FROM kv WHERE namespace = ? ORDER BY key", (namespace,)).fetchall()
        return {key: self._decode(blob, f"key {key!r} of namespace {namespace!r}") for key, blob in rows}

    def namespace(self, name: str) -> Namespace:
        """The keys of ``name`` alone, as the :class:`KeyValue` a component is handed."""
        _check_name("namespace", name)
        return Namespace(self, name)

    def outbox(self, name: str) -> Outbox:
        """The durable FIFO ``name`` (a :class:`Queue`); it exists as long as it holds entries."""
        _check_name("outbox name", name)
        return Outbox(self, name)

    # -- sizes (for components that bound what they keep, e.g. router.autonomy.queue) --------------

    def outbox_sizes(self, prefix: str) -> dict[str, tuple[int, int]]:
        """Every non-empty outbox whose name starts with ``prefix``: (entries, bytes stored), by name."""
        return self._sizes(
            "SELECT name, count(*), sum(length(item)) FROM outbox WHERE substr(name, 1, ?) = ? GROUP BY name", prefix
        )

    def namespace_sizes(self, prefix: str) -> dict[str, tuple[int, int]]:
        """Every non-empty namespace whose name starts with ``prefix``: (keys, bytes of values), by name."""
        return self._sizes(
            "SELECT namespace, count(*), sum(length(value)) FROM kv"
            " WHERE substr(namespace, 1, ?) = ? GROUP BY namespace",
            prefix,
        )

    def _sizes(self, sql: str, prefix: str) -> dict[str, tuple[int, int]]:
        _check_name("prefix", prefix)
        with self._reading() as db:
            rows = db.execute(sql, (len(prefix), prefix)).fetchall()
        return {name: (int(count), int(size)) for name, count, size in rows}

    # -- outboxes (through Outbox) --------------------------------------------------------------

    def _append(self, name: str, item: Any) -> int:
        blob = _encode(item, f"an item for outbox {name!r}")
        with self._writing() as db:
            seq = db.execute("INSERT INTO outbox (name, item) VALUES (?, ?)", (name, blob)).lastrowid
        assert seq is not None  # an INSERT into a rowid table always sets it
        return seq

    def _peek(self, name: str, limit: int) -> list[tuple[int, Any]]:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        with self._reading() as db:
            rows = db.execute(
                "SELECT seq, item FROM outbox WHERE name = ? ORDER BY seq LIMIT ?", (name, limit)
            ).fetchall()
        return [(seq, self._decode(blob, f"entry {seq} of outbox {name!r}")) for seq, blob in rows]

    def _ack(self, name: str, seq: int) -> bool:
        with self._writing() as db:
            cursor = db.execute("DELETE FROM outbox WHERE name = ? AND seq = ?", (name, seq))
        return cursor.rowcount > 0

    def _count(self, name: str) -> int:
        with self._reading() as db:
            (count,) = db.execute("SELECT count(*) FROM outbox WHERE name = ?", (name,)).fetchone()
        return int(count)

    # -- internals ------------------------------------------------------------------------------

    def _live(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"state store {self.path} is closed")
        return self._db

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        db = self._live()
        with _translated(self.path, "cannot read"):
            yield db

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One transaction; committed (and fsync'd) when the block ends, rolled back if it raises."""
        db = self._live()
        with _translated(self.path, "cannot write"):
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise

    def _decode(self, blob: object, where: str) -> Any:
        if not isinstance(blob, bytes):
            raise StoreDamaged(self.path, f"{where} holds {type(blob).__name__} where a msgpack value belongs")
        try:
            return msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception as error:  # msgpack raises several unrelated types for bad input
            detail = f" ({error})" if str(error) else ""
            raise StoreDamaged(self.path, f"{where} is not a readable msgpack value{detail}") from None

    def _migrate(self, version: int) -> None:
        db = self._live()
        for next_version in range(version + 1, SCHEMA_VERSION + 1):
            with self._writing():
                for statement in _MIGRATIONS[next_version - 1]:
                    db.execute(statement)
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (next_version,))
            log.info("state store %s: schema version %d", self.path, next_version)
        missing = _TABLES - self._tables()
        if missing:
            raise StoreDamaged(self.path, f"table {', '.join(sorted(missing))} is missing")

    def _schema_version(self) -> int:
        tables = self._tables()
        if not tables:
            return 0  # a new file, or one whose creation a crash cut short before the first commit
        if "schema_version" not in tables:
            raise StoreDamaged(self.path, f"it is not an ocpp-lc state store (tables: {', '.join(sorted(tables))})")
        rows = self._live().execute("SELECT version FROM schema_version").fetchall()
        if len(rows) != 1 or not isinstance(rows[0][0], int) or rows[0][0] < 1:
            raise StoreDamaged(self.path, f"its schema version is unreadable ({rows[:3]!r})")
        version: int = rows[0][0]
        if version > SCHEMA_VERSION:
            raise StoreDamaged(
                self.path,
                f"it was written by a newer ocpp-lc (state schema {version}; this one reads up to {SCHEMA_VERSION})",
            )
        return version

    def _tables(self) -> set[str]:
        rows = self._live().execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name for (name,) in rows if not name.startswith("sqlite_")}

    def _check_values(self) -> None:
        """Decode every stored value once, so damage stops the start rather than a component later."""
        db = self._live()
        for namespace, key, blob in db.execute("SELECT namespace, key, value FROM kv"):
            self._decode(blob, f"key {key!r} of namespace {namespace!r}")
        for name, seq, blob in db.execute("SELECT name, seq, item FROM outbox"):
            self._decode(blob, f"entry {seq} of outbox {name!r}")


class Namespace(KeyValue):
    """The keys of one namespace of a :class:`Store`: a :class:`KeyValue` to hand to a component."""

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self.name = name

    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key``, or ``default``."""
        return self._store.get(self.name, key, default)

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``; durable when it returns."""
        self._store.put(self.name, key, value)

    def put_many(self, items: Mapping[str, Any]) -> None:
        """Store several keys in one transaction."""
        self._store.put_many(self.name, items)

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it was there."""
        return self._store.delete(self.name, key)

    def items(self) -> dict[str, Any]:
        """Every key with its value, in key order."""
        return self._store.items(self.name)


class Outbox(Queue):
    """A durable FIFO in a :class:`Store`: what the controller must still send, kept until delivered.

    Sequence numbers only grow (across restarts, and across outboxes of the same store). A sender
    peeks the oldest entry, delivers it, then acks it; a crash in between delivers it again after the
    restart (at least once), never loses it. On a StoreError from :meth:`append` the item may or may
    not have been stored (the disk failed mid-commit).
    """

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self.name = name

    def append(self, item: Any) -> int:
        """Add ``item`` at the end; durable when it returns; returns its sequence number."""
        return self._store._append(self.name, item)

    def peek(self, limit: int = 1) -> list[tuple[int, Any]]:
        """Up to ``limit`` (>= 1) oldest entries as (sequence number, item), oldest first, not removed."""
        return self._store._peek(self.name, limit)

    def ack(self, seq: int) -> bool:
        """Remove entry ``seq`` of this outbox, and only it; True if it was there (else nothing happens)."""
        return self._store._ack(self.name, seq)

    def __len__(self) -> int:
        return self._store._count(self.name)


# -- helpers -----------------------------------------------------------------------------------


def _check_name(what: str, name: object) -> None:
    # SQLite would store an int key as-is, and get("1") would then never find put(1): refuse early.
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")


def _encode(value: Any, where: str) -> bytes:
    try:
        blob: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise TypeError(f"cannot store {where}: {error}") from None
    return blob


@contextmanager
def _translated(path: Path, doing: str) -> Iterator[None]:
    """Turn SQLite's exceptions into StoreError / StoreDamaged with the file named."""
    try:
        yield
    except sqlite3.ProgrammingError:
        raise  # our own mistake, not the store's condition
    except sqlite3.DatabaseError as error:
        raise _translate(error, path, doing) from None


def _translate(error: sqlite3.Error, path: Path, doing: str) -> StoreError:
    code = getattr(error, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF  # extended codes carry the primary in the low byte
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreDamaged(path, str(error))
    if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(
            f"state store {path} is in use by another process (is another ocpp-lc running with this state directory?)"
        )
    if primary == sqlite3.SQLITE_FULL:
        return StoreError(f"state store {path}: {doing}: the disk is full")
    return StoreError(f"state store {path}: {doing}: {error}")


def _prepare(state_dir: Path, path: Path) -> None:
    """Create the directory (0700) and an empty file (0600) if missing, durably; check access."""
    try:
        if not state_dir.is_dir():
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _fsync_dir(state_dir.parent)
        try:
            # Created here rather than by SQLite so that it (and the WAL, which SQLite gives the main
            # file's mode) is never readable by others, whatever the umask. O_EXCL: an existing file is
            # never opened and closed here, which would drop SQLite's POSIX locks held in this process.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            if not path.is_file():
                raise StoreError(f"state store {path} is not a regular file") from None
            if not os.access(path, os.R_OK | os.W_OK):
                raise StoreError(f"state store {path}: no permission to read and write it") from None
        else:
            _fsync_dir(state_dir)
    except OSError as error:
        raise StoreError(f"state directory {state_dir}: {error.strerror or error}") from None


def _move_aside(path: Path) -> Path:
    """Rename the damaged file and its companions to ``<name>.damaged-<UTC time>[-wal|-shm]``."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside, attempt = path.with_name(f"{path.name}.damaged-{stamp}"), 1
    while any(Path(f"{aside}{suffix}").exists() for suffix in ("", *_COMPANIONS)):
        attempt += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{attempt}")
    try:
        # Main file first: should a crash cut this short, the next start finds no main file and begins
        # empty, as asked (SQLite discards a WAL beside an empty file). The other order could leave the
        # main file alone, looking sound but without the commits still in its WAL.
        for suffix in ("", *_COMPANIONS):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.rename(f"{aside}{suffix}")
        _fsync_dir(path.parent)
    except OSError as error:
        raise StoreError(f"state store {path}: cannot move it aside: {error.strerror or error}") from None
    return aside


def _fsync_dir(directory: Path) -> None:
    """Make a created or renamed directory entry survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
