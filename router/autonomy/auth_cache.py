"""The authorization cache: the CSMS's verdicts on idTokens, learned while online, answered from while not.

Theory of operation: every idTokenInfo the CSMS sends a station (AuthorizeResponse, and a
TransactionEventResponse to a request that carried an idToken: C10.FR.04, C10.FR.05) is fed to
:meth:`AuthCache.learn_from_exchange`, whatever its status (C10.FR.01). While the CSMS is unreachable the
local responder asks :meth:`AuthCache.authorize` for the idTokenInfo to answer. It is one cache for the
whole site, so a driver known from one station can charge at another during an outage.

Semantics (Part 2 C10, C12, C15):

* An entry keeps the CSMS's status, cacheExpiryDateTime, groupIdToken, chargingPriority, languages and
  evseId. personalMessage and customData are not kept: the first may carry tariff or balance text
  (C10.FR.09), the second means nothing here. An entry with an evseId list is valid only at the station
  it was learned from (the EVSE ids are that station's); elsewhere the token counts as unknown.
* Expiry: at cacheExpiryDateTime if the CSMS gave one (C10.FR.13), else ``lifetime_s`` after the token
  was last seen (AuthCacheLifeTime, C10.FR.08). An expired entry is removed (C10.FR.10) and the token is
  then unknown.
* Unknown tokens follow the installer's ``unknown_id_tokens`` policy, as a station's
  OfflineTxForUnknownIdEnabled would (C15.FR.08): ``reject`` answers status Unknown; ``accept`` answers
  Accepted with a cacheExpiryDateTime of now, so that the station does not put a token the CSMS never
  judged into its own cache (the intent of C15.FR.01). Neither is written to this cache.
* Tokens of type NoAuthorization (nothing to check) and Central (issued by the CSMS itself, e.g. for a
  remote start accepted before the outage) are answered Accepted.
* Bounded to ``max_entries``, least recently used first (C10.FR.07). Under the ``reject`` policy entries
  other than Accepted go first, as C10.FR.07 suggests: a forgotten Blocked token is refused anyway.
  Under ``accept`` a Blocked entry is what stops a blocked card, so eviction is plain LRU.
* Durable (C10.FR.02) in one store namespace, keyed by a SHA-256 of the token (C10.FR.12: no idToken is
  written in clear, and none is logged). Values are msgpack-friendly dicts. An entry that does not read
  back is dropped with a warning rather than stopping the start: it is a cache, the CSMS teaches it again.

Synchronous, like the store: a write is one short transaction. To keep fsyncs off the relaying path, a
token seen again with the same verdict is written only when its stored last-seen time is an hour old.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from router.own.catalogue import rfc3339
from router.store import KeyValue

from .settings import UnknownIdTokenPolicy

log = logging.getLogger("ocpp_lc.autonomy.auth")

#: AuthorizationStatusEnumType (Part 2 §3).
AUTHORIZATION_STATUSES: Final = frozenset(
    {
        "Accepted",
        "Blocked",
        "ConcurrentTx",
        "Expired",
        "Invalid",
        "NoCredit",
        "NotAllowedTypeEVSE",
        "NotAtThisLocation",
        "NotAtThisTime",
        "Unknown",
    }
)
#: The parts of an idTokenInfo kept (see the module docstring for what is left out and why).
_KEPT_FIELDS: Final = ("status", "cacheExpiryDateTime", "chargingPriority", "language1", "language2", "groupIdToken")
#: Tokens that are not checked against anything (see the module docstring).
_EXEMPT_TYPES: Final = frozenset({"NoAuthorization", "Central"})
#: A token seen again is re-written only when its stored last-seen time is older than this.
_TOUCH_WRITE_S: Final = 3600.0

Outcome = Literal["cached", "exempt", "unknown_accepted", "unknown_rejected"]


@dataclass(frozen=True)
class LocalAuthorization:
    """What to answer for an idToken while the CSMS is gone, and how it was decided (a metric label)."""

    id_token_info: dict[str, Any]
    outcome: Outcome

    @property
    def status(self) -> str:
        """The authorization status answered."""
        return str(self.id_token_info["status"])


@dataclass
class _Entry:
    info: dict[str, Any]
    last_seen: float  # POSIX seconds
    station_id: str | None  # set when the verdict holds only at that station (evseId given)
    stored_last_seen: float


def token_key(id_token: Mapping[str, Any]) -> str | None:
    """The cache key of an IdTokenType (a hash of its type and value), or None if it is not one."""
    value, kind = id_token.get("idToken"), id_token.get("type")
    if not isinstance(value, str) or not isinstance(kind, str):
        return None
    return hashlib.sha256(f"{kind}\x00{value}".encode()).hexdigest()


def _parse_time(text: object) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


class AuthCache:
    """The site's authorization cache, on one store namespace (give it ``store.namespace("autonomy.auth")``)."""

    def __init__(
        self,
        keys: KeyValue,
        *,
        max_entries: int,
        lifetime_s: float,
        unknown_id_tokens: UnknownIdTokenPolicy,
        wall_clock: Callable[[], datetime.datetime],
    ) -> None:
        self._keys = keys
        self._max_entries = max_entries
        self._lifetime_s = lifetime_s
        self._policy: UnknownIdTokenPolicy = unknown_id_tokens
        self._wall_clock = wall_clock
        # Least recently seen first; Accepted entries apart from the rest (eviction order, C10.FR.07).
        self._accepted: OrderedDict[str, _Entry] = OrderedDict()
        self._others: OrderedDict[str, _Entry] = OrderedDict()
        loaded = []
        for key, value in keys.items().items():
            entry = self._entry_from(value)
            if entry is None:
                log.warning("authorization cache: dropping an unreadable entry %s", key[:12])
                keys.delete(key)
                continue
            loaded.append((entry.last_seen, key, entry))
        for _, key, entry in sorted(loaded, key=lambda item: item[0]):
            self._bucket(entry.info)[key] = entry
        self._evict_down_to(max_entries)

    def __len__(self) -> int:
        return len(self._accepted) + len(self._others)

    # -- learning (online) ------------------------------------------------------------------------

    def learn_from_exchange(
        self, station_id: str, action: str, request: Mapping[str, Any], response: Mapping[str, Any]
    ) -> None:
        """Feed one answered station CALL: Authorize, or TransactionEvent with an idToken; others are ignored."""
        if action not in ("Authorize", "TransactionEvent"):
            return
        id_token, info = request.get("idToken"), response.get("idTokenInfo")
        if isinstance(id_token, Mapping) and isinstance(info, Mapping):
            self.learn(station_id, id_token, info)

    def learn(self, station_id: str, id_token: Mapping[str, Any], id_token_info: Mapping[str, Any]) -> None:
        """Remember the CSMS's ``id_token_info`` for ``id_token`` (C10.FR.04/05); durable when it returns."""
        key = token_key(id_token)
        if key is None or id_token_info.get("status") not in AUTHORIZATION_STATUSES or self._max_entries == 0:
            return
        info = {name: id_token_info[name] for name in _KEPT_FIELDS if name in id_token_info}
        evse_ids = id_token_info.get("evseId")
        if isinstance(evse_ids, list) and evse_ids:
            info["evseId"] = list(evse_ids)
        now = self._now()
        old = self._pop(key)
        entry = _Entry(info, now, station_id if "evseId" in info else None, now)
        if old is not None and old.info == entry.info and old.station_id == entry.station_id:
            entry.stored_last_seen = old.stored_last_seen
            if now - old.stored_last_seen >= _TOUCH_WRITE_S:
                self._write(key, entry)
        else:
            self._write(key, entry)
        self._bucket(info)[key] = entry
        self._evict_down_to(self._max_entries)

    # -- answering (offline) ----------------------------------------------------------------------

    def authorize(self, station_id: str, id_token: Mapping[str, Any]) -> LocalAuthorization:
        """The idTokenInfo to answer for ``id_token`` at ``station_id`` while the CSMS is unreachable."""
        if id_token.get("type") in _EXEMPT_TYPES:
            return LocalAuthorization({"status": "Accepted"}, "exempt")
        key = token_key(id_token)
        entry = None if key is None else self._live_entry(key, station_id)
        if entry is not None and key is not None:
            entry.last_seen = self._now()
            self._bucket(entry.info).move_to_end(key)
            if entry.last_seen - entry.stored_last_seen >= _TOUCH_WRITE_S:
                self._write(key, entry)
            return LocalAuthorization(dict(entry.info), "cached")
        if self._policy == "accept":
            return LocalAuthorization(
                {"status": "Accepted", "cacheExpiryDateTime": rfc3339(self._wall_clock())}, "unknown_accepted"
            )
        return LocalAuthorization({"status": "Unknown"}, "unknown_rejected")

    # -- internals --------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._wall_clock().timestamp()

    def _live_entry(self, key: str, station_id: str) -> _Entry | None:
        entry = self._accepted.get(key) or self._others.get(key)
        if entry is None:
            return None
        now = self._now()
        expiry = _parse_time(entry.info.get("cacheExpiryDateTime"))
        expired = now >= expiry if expiry is not None else now - entry.last_seen > self._lifetime_s
        if expired:
            self._pop(key)
            self._keys.delete(key)  # C10.FR.10: an expired entry is removed
            return None
        if entry.station_id is not None and entry.station_id != station_id:
            return None  # its evseId list names another station's EVSEs
        return entry

    def _bucket(self, info: Mapping[str, Any]) -> OrderedDict[str, _Entry]:
        return self._accepted if info.get("status") == "Accepted" else self._others

    def _pop(self, key: str) -> _Entry | None:
        return self._accepted.pop(key, None) or self._others.pop(key, None)

    def _write(self, key: str, entry: _Entry) -> None:
        self._keys.put(key, {"info": entry.info, "seen": entry.last_seen, "station": entry.station_id})
        entry.stored_last_seen = entry.last_seen

    def _evict_down_to(self, limit: int) -> None:
        while len(self) > limit:
            if self._others and (self._policy == "reject" or not self._accepted):
                bucket = self._others
            elif not self._others:
                bucket = self._accepted
            else:  # plain LRU over both
                oldest_other = next(iter(self._others.values())).last_seen
                oldest_accepted = next(iter(self._accepted.values())).last_seen
                bucket = self._others if oldest_other <= oldest_accepted else self._accepted
            key, _ = bucket.popitem(last=False)
            self._keys.delete(key)

    @staticmethod
    def _entry_from(value: object) -> _Entry | None:
        if not isinstance(value, dict):
            return None
        info, seen, station_id = value.get("info"), value.get("seen"), value.get("station")
        if not isinstance(info, dict) or info.get("status") not in AUTHORIZATION_STATUSES:
            return None
        if not isinstance(seen, int | float) or not (station_id is None or isinstance(station_id, str)):
            return None
        return _Entry(info, float(seen), station_id, float(seen))
