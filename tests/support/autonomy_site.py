"""One or more stations behind the appliance's own link and autonomous CSMS leg, over in-memory websockets.

Shared by the unit tests of site autonomy (issue #12): the station and the CSMS are plain websocket ends
a test drives; the link (:class:`router.link.StationLink`) and the leg
(:class:`router.autonomy.upstream.AutonomousUpstream`) are the appliance's own. Timers run on trio's
virtual clock; every frame the controller writes to the station is validated by :meth:`Site.station_receives`.
"""

from __future__ import annotations

import datetime
import json
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from router import ocppj
from router.autonomy.service import Autonomy, Mode
from router.autonomy.settings import AutonomySettings
from router.autonomy.upstream import AutonomousUpstream, Connect
from router.link import LinkTimings, StationLink
from router.metrics import RouterMetrics
from router.observers import ObserverHub
from router.store import Store
from router.transport import HandshakeFailed, WebSocket
from tests.support.schemas import validate_frame
from tests.unit.test_link import ws_pair

NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC)
T = "2026-12-03T12:00:00Z"
TOKEN = {"idToken": "TAG1", "type": "ISO14443"}
BOOT = {"reason": "PowerUp", "chargingStation": {"model": "M", "vendorName": "V"}}
#: One step of a scripted reconnection: unreachable, an HTTP refusal (an int), or success (anything else).
UNREACHABLE = "unreachable"
#: The link's timings beside an autonomous leg: the leg pings the CSMS itself, and the tests ping nobody.
LINK_TIMINGS = LinkTimings(station_ping_interval_s=0, csms_ping_interval_s=0)


def tx(event_type: str, seq_no: int, **extra: Any) -> dict[str, Any]:
    """A TransactionEvent payload of transaction tx-1."""
    return {
        "eventType": event_type,
        "timestamp": T,
        "triggerReason": "Authorized" if event_type == "Started" else "MeterValuePeriodic",
        "seqNo": seq_no,
        "transactionInfo": {"transactionId": "tx-1"},
        **extra,
    }


def make_autonomy(store: Store, registry: CollectorRegistry, *, seed: int = 7, **settings: Any) -> Autonomy:
    """The autonomy service over ``store``, its wall clock stopped at :data:`NOW`, its jitter seeded."""
    return Autonomy(
        AutonomySettings(**settings), store, registry=registry, wall_clock=lambda: NOW, rng=random.Random(seed)
    )


def autonomous_pair(
    station_id: str,
    lc_station: WebSocket,
    real: WebSocket | None,
    *,
    autonomy: Autonomy,
    connect: Connect,
    metrics: RouterMetrics,
    timings: LinkTimings,
    hub: ObserverHub | None = None,
) -> tuple[AutonomousUpstream, StationLink]:
    """The leg (with ``timings``) and the link (with :data:`LINK_TIMINGS`) of one station, as the server pairs them."""
    upstream = AutonomousUpstream(station_id, "ocpp2.0.1", real, autonomy=autonomy, connect=connect, timings=timings)
    link = StationLink(
        station_id, lc_station, upstream, metrics=metrics, hub=hub or ObserverHub(metrics), timings=LINK_TIMINGS
    )
    return upstream, link


async def wait_for_mode(autonomy: Autonomy, station_id: str, mode: Mode) -> None:
    """Until ``station_id``'s current pair reports ``mode``."""
    while autonomy.mode_of(station_id) != mode:
        changed = trio.Event()
        autonomy.on_change(changed.set)
        await changed.wait()


async def receive_call(csms: WebSocket) -> tuple[list[Any], float]:
    """The next frame at the CSMS, which must be a call of the controller's own, and when it came."""
    frame = json.loads(await csms.receive_text())
    assert frame[0] == 2 and ocppj.is_lc_message_id(frame[1]), frame
    return frame, trio.current_time()


@dataclass
class Site:
    autonomy: Autonomy
    upstream: AutonomousUpstream
    link: StationLink
    station: WebSocket  # the station's own end
    csms: WebSocket | None  # the CSMS's end of the first leg
    restored: trio.MemoryReceiveChannel[WebSocket]  # the CSMS's ends of the legs re-opened
    attempts_s: list[float] = field(default_factory=list)
    sent: dict[str, str] = field(default_factory=dict)  # station call id -> action
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)  # what /metrics would show

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        assert value is not None, (name, labels)
        return value

    async def station_call(self, message_id: str, action: str, payload: dict[str, Any]) -> str:
        frame = ocppj.encode_call(message_id, action, payload)
        self.sent[message_id] = action
        await self.station.send_text(frame)
        return frame

    async def station_receives(self) -> list[Any]:
        text = await self.station.receive_text()
        return validate_frame(text, self.sent)

    async def mode(self, mode: Mode) -> None:
        while self.upstream.mode != mode:
            changed = trio.Event()
            self.autonomy.on_change(changed.set)
            await changed.wait()


@asynccontextmanager
async def open_site(
    tmp_path: Path, *, online: bool = True, script: list[str | int] | None = None, **settings: Any
) -> AsyncIterator[Site]:
    """Station CS01 paired (online: with a first CSMS leg open); its reconnections follow ``script``."""
    with Store.open(tmp_path / "state") as store:
        registry = CollectorRegistry()
        autonomy = make_autonomy(store, registry, **{"reconnect_backoff_max_s": 8.0, **settings})
        station_end, lc_station = await ws_pair()
        real, csms_end = await ws_pair() if online else (None, None)
        restored_send, restored = trio.open_memory_channel[WebSocket](8)
        steps = list(script or [])
        attempts_s: list[float] = []

        async def connect() -> WebSocket:
            attempts_s.append(trio.current_time())
            step = steps.pop(0) if steps else "ok"
            if step == UNREACHABLE:
                raise HandshakeFailed("connection refused", kind="unreachable")
            if isinstance(step, int):
                raise HandshakeFailed(f"HTTP {step}", status=step, kind="refused")
            client, server = await ws_pair()
            await restored_send.send(server)
            return client

        timings = LinkTimings(csms_ping_interval_s=10, csms_ping_timeout_s=5, lc_call_timeout_s=20)
        upstream, link = autonomous_pair(
            "CS01",
            lc_station,
            real,
            autonomy=autonomy,
            connect=connect,
            metrics=RouterMetrics(registry),
            timings=timings,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(upstream.run)
            upstream.call_station = link.call
            nursery.start_soon(link.run)
            yield Site(autonomy, upstream, link, station_end, csms_end, restored, attempts_s, registry=registry)
            nursery.cancel_scope.cancel()


async def boot_online(site: Site) -> None:
    """The station boots and starts a transaction through the CSMS: the caches learn both verdicts."""
    assert site.csms is not None
    frame = await site.station_call("b-1", "BootNotification", BOOT)
    assert await site.csms.receive_text() == frame  # byte for byte
    answer = ocppj.encode_result("b-1", {"currentTime": T, "interval": 300, "status": "Accepted"})
    await site.csms.send_text(answer)
    assert await site.station.receive_text() == answer
    frame = await site.station_call("t-0", "TransactionEvent", tx("Started", 0, idToken=TOKEN))
    assert await site.csms.receive_text() == frame
    await site.csms.send_text(ocppj.encode_result("t-0", {"idTokenInfo": {"status": "Accepted"}}))
    await site.station.receive_text()
