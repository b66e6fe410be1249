"""Observation of relayed traffic: bounded subscriptions that can never slow forwarding.

Publishing never blocks: each subscriber has a bounded channel, and an event that does not fit is
dropped for that subscriber and counted. Balancing, the status view and traces read from here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import trio

from .metrics import RouterMetrics
from .ocppj import MessageType

Source = Literal["station", "csms", "lc"]


@dataclass(frozen=True, slots=True)
class ObservedMessage:
    """One OCPP message (2.0.1 or 1.6) that passed through (or was sent by) the controller.

    ``source`` is who sent it. For a CALLRESULT or CALLERROR, ``action`` is the action of the call
    it answers and ``request`` that call's payload (so a TransactionEventResponse can be read
    together with the transaction it answers), when the call was seen.
    """

    station_id: str
    source: Source
    message_type: MessageType
    message_id: str
    action: str | None
    payload: Any
    request: Any
    time_s: float
    #: The station's OCPP version (its websocket subprotocol): ``ocpp2.0.1`` or ``ocpp1.6``.
    subprotocol: str | None = "ocpp2.0.1"


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """A station pair came up or went down."""

    station_id: str
    kind: Literal["connected", "disconnected"]
    subprotocol: str | None
    time_s: float
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RawFrame:
    """A relayed frame exactly as it travelled (for ``trace``), with its direction."""

    station_id: str
    direction: str
    text: str
    time_s: float


Observation = ObservedMessage | LinkEvent | RawFrame


@dataclass
class _Subscriber:
    name: str
    send: trio.MemorySendChannel[Observation]
    capacity: int
    station_id: str | None
    raw: bool


class ObserverHub:
    """Fan-out of observations to bounded subscribers."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self._subscribers: list[_Subscriber] = []

    @property
    def has_subscribers(self) -> bool:
        """Whether anyone listens (lets the router skip building events nobody reads)."""
        return bool(self._subscribers)

    @property
    def wants_raw(self) -> bool:
        """Whether any subscriber asked for raw frames."""
        return any(sub.raw for sub in self._subscribers)

    @contextmanager
    def subscribe(
        self, name: str, capacity: int, *, station_id: str | None = None, raw: bool = False
    ) -> Iterator[trio.MemoryReceiveChannel[Observation]]:
        """Subscribe for as long as the ``with`` block runs.

        ``name`` labels the drop counter (keep it to a fixed set). ``station_id`` limits the
        subscription to one station; ``raw`` adds :class:`RawFrame` events (costly: for traces).
        """
        send, receive = trio.open_memory_channel[Observation](capacity)
        subscriber = _Subscriber(name, send, capacity, station_id, raw)
        self._subscribers.append(subscriber)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.remove(subscriber)
            send.close()

    def publish(self, event: Observation) -> None:
        """Offer ``event`` to every interested subscriber without ever waiting."""
        for sub in self._subscribers:
            if sub.station_id is not None and sub.station_id != event.station_id:
                continue
            if isinstance(event, RawFrame) and not sub.raw:
                continue
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                self._metrics.observer_dropped.labels(sub.name).inc()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue

    def update_fill_gauges(self) -> None:
        """Refresh the queue fill metric (called at scrape time)."""
        for sub in self._subscribers:
            stats = sub.send.statistics()
            self._metrics.observer_queue_fill.labels(sub.name).set(stats.current_buffer_used / sub.capacity)
