"""Security events of the controller (A04), told to the CSMS through the durable outbox, rate-limited.

Theory of operation. Whatever notices a security event calls :meth:`SecurityEvents.report` with the
event's name from the security events list (Part 2 appendix 1) and a short techInfo. Every event goes
to the security log (the ``ocpp_lc.security`` logger, A04.FR.04) and is counted in
``ocpp_lc_own_security_events_total{type,source,outcome}``. What happens next depends on the event:

* **non-critical** (and names not on the list, such as our ``TLSHandshakeFailed``): logged and counted
  only (``outcome="logged"``); A04.FR.01 asks for the critical ones;
* **critical**: a SecurityEventNotificationRequest (type, timestamp of the moment it happened,
  techInfo of at most 255 characters) is appended to the own identity's durable outbox
  (``outcome="queued"``), which delivers it once the CSMS has accepted the boot, after an outage or a
  restart too (A04.FR.02);
* **too many of a kind**: each event type has a token bucket (:class:`RatePolicy`: ``burst`` events at
  once, then one per ``refill_s``), so that a hostile station cannot flood the CSMS (or the disk) by
  failing TLS handshakes. An event without a token is held back (``outcome="suppressed"``); held-back
  events of a type are *coalesced*: the next token of that type sends one notification that carries
  the latest one's techInfo and says how many were held back since when. :meth:`SecurityEvents.run`
  spends tokens on waiting summaries as they come, so a flood that stops is still reported in full;
* **the own connection failing again** (:meth:`SecurityEvents.connection_failed`): the same event on
  repeated attempts is sent once per outage (the note to A00.FR.316/419) and counted
  ``outcome="repeated"`` afterwards; :meth:`SecurityEvents.connected` starts the next outage afresh.

Timestamps come from the injected wall clock, the buckets run on trio's clock. Nothing here blocks:
the outbox append is a synchronous store write.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import trio
from prometheus_client import CollectorRegistry, Counter

from router.store import StoreError

log = logging.getLogger("ocpp_lc.security")

ACTION: Final = "SecurityEventNotification"
#: SecurityEventNotificationRequest limits (Part 2 §1.49).
TYPE_CHARS: Final = 50
TECH_INFO_CHARS: Final = 255

#: The events Part 2 appendix 1 marks critical: these must reach the CSMS (A04.FR.01).
CRITICAL: Final = frozenset(
    {
        "FirmwareUpdated",
        "SettingSystemTime",
        "StartupOfTheDevice",
        "ResetOrReboot",
        "SecurityLogWasCleared",
        "MemoryExhaustion",
        "TamperDetectionActivated",
        "InvalidFirmwareSignature",
        "InvalidFirmwareSigningCertificate",
        "InvalidCsmsCertificate",
        "InvalidChargingStationCertificate",
        "InvalidTLSVersion",
        "InvalidTLSCipherSuite",
        "MaintenanceLoginAccepted",
        "MaintenanceLoginFailed",
    }
)
#: The others on the list: logged and counted only.
NON_CRITICAL: Final = frozenset(
    {
        "FailedToAuthenticateAtCsms",
        "CsmsFailedToAuthenticate",
        "ReconfigurationOfSecurityParameters",
        "InvalidMessages",
        "AttemptedReplayAttacks",
        "TLSHandshakeFailed",  # ours (router.tls): a handshake failure none of the listed events names
    }
)
#: Critical, but what an operator expects to see (a start, a reset): the security log has them at INFO,
#: not WARNING.
ROUTINE: Final = frozenset({"StartupOfTheDevice", "ResetOrReboot", "FirmwareUpdated"})
#: The label of any other name, so that the counter's label set stays bounded.
OTHER_LABEL: Final = "other"

#: Who noticed the event: the controller itself (boot, reset, its own connection) or a station's leg.
Source = Literal["own", "station"]
Outcome = Literal["queued", "suppressed", "repeated", "logged", "failed"]


@dataclass(frozen=True)
class RatePolicy:
    """How many notifications of one event type may go: ``burst`` at once, then one per ``refill_s``.

    The defaults let a few genuine events through at once (a boot, a reset, a station or two with an
    expired certificate) and hold a flood to one notification a minute per type, each summarising
    what was held back.
    """

    burst: int = 5
    refill_s: float = 60.0

    def __post_init__(self) -> None:
        if self.burst < 1 or not self.refill_s > 0:
            raise ValueError("a rate policy needs burst >= 1 and refill_s > 0")


#: Tolerance for float arithmetic: a token due "now" is there now, not a rounding error later.
_EPSILON: Final = 1e-9


class TokenBucket:
    """Tokens for one event type, refilled continuously up to ``burst``; no I/O, times on trio's clock."""

    def __init__(self, policy: RatePolicy, now: float) -> None:
        self._policy = policy
        self._tokens = float(policy.burst)
        self._at = now

    def _refill(self, now: float) -> None:
        gained = max(now - self._at, 0.0) / self._policy.refill_s
        self._tokens = min(float(self._policy.burst), self._tokens + gained)
        self._at = max(now, self._at)

    def take(self, now: float) -> bool:
        """Spend a token if there is one."""
        self._refill(now)
        if self._tokens >= 1.0 - _EPSILON:
            self._tokens = max(self._tokens - 1.0, 0.0)
            return True
        return False

    def next_token_at(self, now: float) -> float:
        """When the next whole token will be there (``now`` if it already is)."""
        self._refill(now)
        if self._tokens >= 1.0 - _EPSILON:
            return now
        return now + (1.0 - self._tokens) * self._policy.refill_s


@dataclass
class _HeldBack:
    """Events of one type held back by the rate limit since the last notification of that type."""

    count: int
    first_at: datetime.datetime
    last_at: datetime.datetime
    last_tech_info: str
    source: Source


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(text: str, limit: int) -> str:
    """Printable, one line, at most ``limit`` characters (techInfo ends up in the CSMS's logs too)."""
    flat = "".join(char if char.isprintable() else " " for char in text)
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def type_label(event_type: str) -> str:
    """The counter label of an event type: its name if it is on the list (or ours), else ``other``."""
    return event_type if event_type in CRITICAL or event_type in NON_CRITICAL else OTHER_LABEL


class SecurityEvents:
    """Logs, counts, rate-limits and queues the controller's security events (see the module docstring)."""

    def __init__(
        self,
        enqueue: Callable[[str, dict[str, Any]], object],
        registry: CollectorRegistry,
        *,
        wall_clock: Callable[[], datetime.datetime],
        policy: RatePolicy | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        """``enqueue(action, payload)`` appends to the durable outbox (StoreError when it cannot)."""
        self._enqueue = enqueue
        self._wall_clock = wall_clock
        self._policy = policy or RatePolicy()
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._held: dict[str, _HeldBack] = {}
        self._this_outage: set[str] = set()
        self._changed = trio.Event()
        self.counter = Counter(
            "ocpp_lc_own_security_events_total",
            "Security events (Part 2 appendix 1) by type, source (own, station) and outcome: queued for the "
            "CSMS, suppressed by the rate limit (reported later in a summary), repeated (the own connection "
            "failing again in the same outage), logged (not critical: security log only), failed (not stored).",
            ["type", "source", "outcome"],
            registry=registry,
        )

    # -- what the rest of the controller calls ---------------------------------------------------

    def report(self, event_type: str, tech_info: str = "", *, source: Source = "own") -> Outcome:
        """A security event happened now; returns what became of it."""
        event_type = _clean(event_type, TYPE_CHARS)
        tech_info = _clean(tech_info, TECH_INFO_CHARS)
        moment = self._wall_clock()
        if event_type not in CRITICAL:
            log.warning("security event %s (%s, not critical: logged only): %s", event_type, source, tech_info)
            return self._count(event_type, source, "logged")
        bucket = self._bucket(event_type)
        if not bucket.take(self._clock()):
            return self._hold_back(event_type, tech_info, moment, source)
        held = self._held.pop(event_type, None)
        if held is not None:
            # A token again after a flood: this one notification also tells of those held back.
            held.count += 1
            held.last_at, held.last_tech_info = moment, tech_info
            tech_info = self._summary(event_type, held, held.count - 1)
        level = logging.INFO if event_type in ROUTINE else logging.WARNING
        log.log(level, "security event %s (%s): %s", event_type, source, tech_info)
        return self._queue(event_type, tech_info, moment, source)

    def connection_failed(self, event_type: str, tech_info: str) -> Outcome:
        """The own connection failed with ``event_type``: reported once per outage (A00.FR.316, .419)."""
        if event_type in self._this_outage:
            log.info("security event %s (own) again on a reconnection attempt: %s", event_type, tech_info[:200])
            return self._count(event_type, "own", "repeated")
        self._this_outage.add(event_type)
        return self.report(event_type, tech_info, source="own")

    def connected(self) -> None:
        """The own connection is open again: the next failure is news again."""
        self._this_outage.clear()

    @property
    def held_back(self) -> int:
        """How many events are waiting to be summarised (all types)."""
        return sum(held.count for held in self._held.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the summaries of held-back events as their types get tokens again; until cancelled."""
        task_status.started()
        while True:
            now = self._clock()
            due = min((self._bucket(kind).next_token_at(now) for kind in self._held), default=math.inf)
            changed = self._changed
            with trio.move_on_at(due):
                await changed.wait()
            if changed.is_set():
                self._changed = trio.Event()
            self._send_due_summaries()

    # -- inside ---------------------------------------------------------------------------------

    def _bucket(self, event_type: str) -> TokenBucket:
        bucket = self._buckets.get(event_type)
        if bucket is None:
            bucket = self._buckets[event_type] = TokenBucket(self._policy, self._clock())
        return bucket

    def _hold_back(self, event_type: str, tech_info: str, moment: datetime.datetime, source: Source) -> Outcome:
        held = self._held.get(event_type)
        if held is None:
            self._held[event_type] = _HeldBack(1, moment, moment, tech_info, source)
            log.warning(
                "security event %s (%s): %s; more than %d in a row: further ones are held back and summarised "
                "(at most one notification per %g s)",
                event_type,
                source,
                tech_info,
                self._policy.burst,
                self._policy.refill_s,
            )
            self._changed.set()
        else:
            held.count += 1
            held.last_at, held.last_tech_info, held.source = moment, tech_info, source
            log.debug("security event %s (%s) held back: %s", event_type, source, tech_info)
        return self._count(event_type, source, "suppressed")

    def _send_due_summaries(self) -> None:
        now = self._clock()
        for event_type in list(self._held):
            if self._bucket(event_type).take(now):
                held = self._held.pop(event_type)
                tech_info = self._summary(event_type, held, held.count)
                log.warning("security event %s (%s), summary: %s", event_type, held.source, tech_info)
                # Not counted as queued: each event it covers was counted when it was held back.
                self._store(event_type, tech_info, held.last_at)

    def _summary(self, event_type: str, held: _HeldBack, held_back: int) -> str:
        span = f"from {_iso(held.first_at)} to {_iso(held.last_at)}"
        text = f"{held.count} {event_type} events {span}, {held_back} held back by the rate limit"
        return _clean(f"{text}; last: {held.last_tech_info}", TECH_INFO_CHARS)

    def _queue(self, event_type: str, tech_info: str, moment: datetime.datetime, source: Source) -> Outcome:
        if not self._store(event_type, tech_info, moment):
            return self._count(event_type, source, "failed")
        return self._count(event_type, source, "queued")

    def _store(self, event_type: str, tech_info: str, moment: datetime.datetime) -> bool:
        payload: dict[str, Any] = {"type": event_type, "timestamp": _iso(moment)}
        if tech_info:
            payload["techInfo"] = tech_info
        try:
            self._enqueue(ACTION, payload)
        except StoreError:
            log.exception("security event %s could not be queued for the CSMS (the store failed)", event_type)
            return False
        return True

    def _count(self, event_type: str, source: Source, outcome: Outcome) -> Outcome:
        self.counter.labels(type_label(event_type), source, outcome).inc()
        return outcome
