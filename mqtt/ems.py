"""EMS limits over MQTT: one topic per source, the payload of ``PUT /api/v1/limits/{source}`` (K14).

Theory of operation. An EMS publishes on ``<prefix>/ems/<source>/limit`` exactly the JSON document
the HTTP API takes (:class:`balancing.limits.LimitRequest`); :meth:`EmsTopics.handle` hands it to the
same :meth:`balancing.limits.LimitSources.set` the HTTP route calls, so shape, bounds, validity and the
failsafe for a stale source are one code path for both faces (K14.FR.01: the site stays within the
lowest limit in force). MQTT and HTTP share the source names: ``pv`` set over MQTT is ``pv`` in
``GET /api/v1/limits``. An empty payload releases the source (publishing an empty retained message is
also how MQTT deletes the retained one).

Retained messages. A broker hands a new subscriber the last retained message of every topic, flagged
as retained. Such a message is not a new statement by the EMS: the same bytes come again after every
reconnect and every restart. So a retained payload whose digest equals the last one applied for that
source (kept durably beside the limits) changes nothing: the limit it set keeps its own validity and,
once that has passed, the failsafe holds, as it would for an HTTP EMS that fell silent. A retained
payload seen for the first time is applied like a live one, if it is still valid (a ``valid_until``
already passed is refused, outcome ``expired``). Live messages always count: an EMS repeating the same
limit is renewing it.

Bad input (not JSON, wrong shape, out of range, a source that is not accepted) gets a log line and a
count in ``ocpp_lc_mqtt_messages_total{outcome}``; the limit in force is unchanged, because
``LimitSources.set`` changes nothing unless the whole document is valid and stored. An EMS that keeps
publishing nonsense is counted every time but logged on a budget (:class:`router.log_budget.LogBudget`:
10 lines a minute per source, every topic that is not an accepted source's sharing one), the next line
let through saying how many were held back.

Synchronous and free of I/O beyond the store: the MQTT driver calls :meth:`handle` from its read path
and acknowledges a QoS 1 message only after it returns, so PUBACK means the limit is stored durably.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from balancing.limits import SOURCE_NAME, LimitInvalid, LimitSources, LimitStore
from router.log_budget import LogBudget

log = logging.getLogger("ocpp_lc.mqtt.ems")

#: Every outcome of :meth:`EmsTopics.handle` (the label values of ``ocpp_lc_mqtt_messages_total``).
OUTCOMES = ("applied", "cleared", "repeated", "not_json", "invalid", "expired", "unknown_source", "error")
#: What a refused payload may show of itself in a log line.
_SHOWN_BYTES = 64


@dataclass(frozen=True, slots=True)
class Handled:
    """What one message did: its outcome and, when known, the source it concerned."""

    outcome: str
    source: str | None


class EmsTopics:
    """The EMS limit topics under ``prefix``, applied to ``limits``; see the module docstring."""

    def __init__(
        self,
        limits: LimitSources,
        prefix: str,
        *,
        digests: LimitStore,
        accepted_sources: Collection[str] = (),
        log_budget: LogBudget | None = None,
    ) -> None:
        self._limits = limits
        self._prefix = prefix
        self._digests = digests
        self._accepted = frozenset(accepted_sources)
        self._budget = LogBudget() if log_budget is None else log_budget

    def _refused(self, key: str, message: str, *args: object) -> None:
        """A refusal's warning, within the log budget of ``key`` (its source; ``""``: topics of no
        accepted source)."""
        allowed, held_back = self._budget.allow(key)
        if not allowed:
            return
        if held_back:
            message += " (%d more refusals were not logged in the last %g s)"
            args = (*args, held_back, self._budget.window_s)
        log.warning(message, *args)

    def now(self) -> datetime:
        """The wall clock the limits are judged by."""
        return self._limits.now()

    @property
    def subscription(self) -> str:
        """The topic filter to subscribe to."""
        return f"{self._prefix}/ems/+/limit"

    def topic(self, source: str) -> str:
        """The topic of ``source``."""
        return f"{self._prefix}/ems/{source}/limit"

    def source_of(self, topic: str) -> str | None:
        """The source a topic names, or None if it is not an EMS limit topic of an accepted source."""
        head, tail = f"{self._prefix}/ems/", "/limit"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        source = topic[len(head) : len(topic) - len(tail)]
        if not SOURCE_NAME.fullmatch(source) or (self._accepted and source not in self._accepted):
            return None
        return source

    def handle(self, topic: str, payload: bytes, *, retained: bool) -> Handled:
        """Apply one message; never raises for bad input (see the module docstring for the outcomes)."""
        source = self.source_of(topic)
        if source is None:
            accepted = ", ".join(sorted(self._accepted)) if self._accepted else "names of 1 to 64 letters, digits, _-."
            self._refused("", "MQTT: message on %r ignored: not an accepted EMS source (%s)", topic[:200], accepted)
            return Handled("unknown_source", None)
        if not payload:
            released = self._limits.release(source)
            self._digests.delete(source)
            log.info("MQTT: EMS limit for %r %s (empty payload)", source, "released" if released else "had none")
            return Handled("cleared", source)
        digest = hashlib.sha256(payload).hexdigest()
        if retained and self._digests.get(source) == digest:
            log.info("MQTT: retained EMS limit for %r is the one already applied: it keeps its own validity", source)
            return Handled("repeated", source)
        try:
            json.loads(payload)
        except (UnicodeDecodeError, ValueError):
            self._refused(
                source,
                "MQTT: EMS limit for %r refused: not JSON (%r); the limit in force is unchanged",
                source,
                payload[:_SHOWN_BYTES],
            )
            return Handled("not_json", source)
        try:
            limit = self._limits.set(source, payload)
        except LimitInvalid as invalid:
            outcome = "expired" if _only_expired(invalid) else "unknown_source" if _only_source(invalid) else "invalid"
            self._refused(
                source,
                "MQTT: %sEMS limit for %r refused (%s): %s; the limit in force is unchanged",
                "retained " if retained else "",
                source,
                outcome,
                invalid,
            )
            return Handled(outcome, source)
        except Exception:  # the store failed: nothing changed (LimitSources writes before it changes memory)
            log.exception("MQTT: EMS limit for %r could not be stored; the limit in force is unchanged", source)
            return Handled("error", source)
        self._digests.put(source, digest)
        log.info(
            "MQTT: EMS limit for %r set%s: %s %s, valid until %s",
            source,
            " (retained)" if retained else "",
            [value for _, value in limit.periods],
            limit.unit,
            _iso(limit.valid_until),
        )
        return Handled("applied", source)


def _only_expired(invalid: LimitInvalid) -> bool:
    return set(invalid.problems) == {"valid_until"} and invalid.problems["valid_until"].startswith(
        "is not in the future"
    )


def _only_source(invalid: LimitInvalid) -> bool:
    return set(invalid.problems) == {"source"}


def _iso(moment: datetime) -> str:
    return moment.isoformat()
