"""The balancing loop as the appliance wires it: settings, the stations' links, relayed traffic.

The loop (``balancing.loop``) imports nothing of the router; this module hands it what it needs. It
builds the loop from ``[balancing]`` and ``[site]``, feeds it the observed traffic of every station
(a 1.6 station's through ``balancing.ocpp16``, so the loop reads and writes 2.0.1 only), calls the
stations for it through their links, asks 1.6 stations whether they do smart charging, and offers the
release of every profile of the controller's (``POST /api/v1/balancing/release``) and, with balancing
off, the clearing of what an earlier run left (``balancing.clearing``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from balancing import ocpp16
from balancing.allocator import SiteLimits
from balancing.clearing import LeftoverProfiles
from balancing.limits import LimitSources
from balancing.loop import Balancer, BalancerState, Caller, CallOutcome, LoopSettings
from balancing.overdraw import OverdrawPolicy
from balancing.rollout import RolloutPolicy
from balancing.scheduling import RoundRunner
from meters.service import MeterService

from .config import Settings
from .link import OCPP16, CallRejected, CallTimeout, LinkClosed, UnsupportedVersion
from .observers import LinkEvent, ObservedMessage, ObserverHub
from .ocppj import MessageType
from .server import LinkRegistry

log = logging.getLogger(__name__)


def build_balancer(
    settings: Settings,
    limits: LimitSources,
    links: LinkRegistry,
    registry: CollectorRegistry,
    state: BalancerState | None = None,
    meters: MeterService | None = None,
) -> Balancer:
    """The balancing loop over the site model, the effective limits and the stations' links; with
    ``meters``, the headroom they leave at their nodes limits it too (``meters.service``)."""
    config = settings.balancing
    loop_settings = LoopSettings(
        stack_level=config.stack_level,
        profile_id_base=config.profile_id_base,
        recompute_interval_s=config.recompute_interval_s,
        forget_disconnected_after_s=config.forget_disconnected_after_s,
        rollout=RolloutPolicy(
            hysteresis_amperes=config.hysteresis_amperes,
            min_interval_s=config.min_interval_s,
            resolution_amperes=config.resolution_amperes,
            idle_current_amperes=config.idle_current_amperes,
        ),
        profile_validity_s=config.profile_validity_s,
        decrease_lead_s=config.decrease_lead_s,
        overdraw=OverdrawPolicy(margin_amperes=config.overdraw_margin_amperes, grace_s=config.overdraw_grace_s),
    )

    def limits_at(now: datetime) -> SiteLimits:
        return limits.effective(now).site_limits()

    balancer = Balancer(
        settings.site,
        limits_at if meters is None else meters.limits_at(limits_at),
        link_caller(links),
        loop_settings,
        next_limit_change=limits.next_change_after,
        wall_clock=limits.now,
        registry=registry,
        state=state,
        is_connected=lambda station_id: links.get(station_id) is not None,
    )
    threshold = config.child_process_from_evses or RoundRunner.NEVER
    balancer.round_runner = RoundRunner(threshold, config.child_process_timeout_s)
    if meters is not None:
        meters.attach(balancer)
    return balancer


def release_document(balancer: Balancer) -> Callable[[], Awaitable[dict[str, Any]]]:
    """``POST /api/v1/balancing/release``: stop balancing and clear the controller's profiles everywhere."""

    async def release() -> dict[str, Any]:
        results = await balancer.release()
        return {
            "released": True,
            "stations": [
                {
                    "station_id": result.station_id,
                    "cleared_profile_ids": list(result.cleared),
                    "failed": [{"profile_id": profile_id, "reason": why} for profile_id, why in result.failed],
                }
                for result in results
            ],
        }

    return release


def link_caller(links: LinkRegistry) -> Caller:
    """The balancing loop's way to call a station: the router's LC-call API, outcomes as values.

    The loop speaks OCPP 2.0.1; a call to a 1.6 station is translated to its 1.6 form on the way
    (:func:`balancing.ocpp16.outgoing`), and its answer (the same status words) comes back as it is.
    """

    async def call(station_id: str, action: str, payload: dict[str, Any]) -> CallOutcome:
        link = links.get(station_id)
        if link is None:
            return CallOutcome("gone", detail="not connected")
        if link.subprotocol == OCPP16:
            action, payload = ocpp16.outgoing(action, payload)
        try:
            return CallOutcome("answered", await link.call(action, payload))
        except CallRejected as error:
            return CallOutcome("error", detail=f"{error.code}: {error.description}"[:200])
        except CallTimeout:
            return CallOutcome("timeout", detail="no answer in time")
        except (LinkClosed, UnsupportedVersion) as error:
            return CallOutcome("gone", detail=str(error)[:200] or type(error).__name__)

    return call


async def probe_smart_charging(caller: Caller, balancer: Balancer, station_id: str) -> None:
    """Ask a 1.6 station whether it does smart charging (SupportedFeatureProfiles); one that says it does
    not is counted at its maximum and never sent profiles. Until it answers it is counted at its maximum
    and sent nothing; no answer (or one that does not say): it is tried like any station."""
    balancer.station_asked_steerable(station_id)
    outcome = await caller(station_id, "GetConfiguration", {"key": ["SupportedFeatureProfiles"]})
    supported = ocpp16.smart_charging_supported(outcome.payload) if outcome.status == "answered" else None
    if supported is not None:
        balancer.station_steerable(station_id, supported, "SupportedFeatureProfiles without SmartCharging")
    else:
        why = outcome.detail or outcome.status
        log.info("[%s] did not say whether it does smart charging (%s): tried like any station", station_id, why)
        balancer.station_steerable(station_id, True, known=False)


def observe(balancer: Balancer, item: ObservedMessage) -> None:
    """One relayed message to the loop: a 2.0.1 one as it is, a 1.6 one translated (balancing.ocpp16)."""
    if item.subprotocol == OCPP16:
        _observe_16(balancer, item)
    elif item.source == "station":
        if item.message_type is MessageType.CALL:
            balancer.station_call(item.station_id, item.action, item.payload)
        elif item.message_type is MessageType.CALLRESULT:
            balancer.station_answer(item.station_id, item.action, item.payload, item.request)
    elif item.source == "csms" and item.message_type is MessageType.CALLRESULT:
        balancer.csms_answer(item.station_id, item.action, item.payload, item.request)


def _observe_16(balancer: Balancer, item: ObservedMessage) -> None:
    """A 1.6 station's traffic, as the 2.0.1 messages the loop reads (balancing.ocpp16)."""
    translated: tuple[str, dict[str, Any]] | None = None
    if item.source == "station" and item.message_type is MessageType.CALL:
        translated = ocpp16.station_call(item.action, item.payload)
    elif item.source == "station" and item.message_type is MessageType.CALLRESULT:
        request = ocpp16.station_answer_request(item.action, item.request)
        if request is not None:
            balancer.station_answer(item.station_id, item.action, item.payload, request)
    elif item.source == "csms" and item.message_type is MessageType.CALLRESULT:
        translated = ocpp16.csms_answer(item.action, item.payload, item.request)
    if translated is not None:
        balancer.station_call(item.station_id, *translated)


async def feed_balancer(
    hub: ObserverHub,
    balancer: Balancer,
    capacity: int,
    caller: Caller | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hand the relayed traffic the loop reads to it; subscribed before the first station can connect.
    With ``caller``, each 1.6 station that connects is asked whether it does smart charging."""
    with hub.subscribe("balancing", capacity) as observations:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for item in observations:
                if isinstance(item, ObservedMessage):
                    try:
                        observe(balancer, item)
                    except Exception:  # defence in depth: one message must never stop the appliance
                        log.exception("[%s] balancing could not read a %s; relayed all the same", *_what(item))
                        balancer.metrics.ignored.labels(item.action or "unknown").inc()
                elif isinstance(item, LinkEvent):
                    if item.kind == "connected":
                        balancer.station_connected(item.station_id, item.subprotocol)
                        if caller is not None and item.subprotocol == OCPP16:
                            # Unknown from this instant, before the loop can plan anything for it.
                            balancer.station_asked_steerable(item.station_id)
                            nursery.start_soon(probe_smart_charging, caller, balancer, item.station_id)
                    else:
                        balancer.station_disconnected(item.station_id)


def _what(item: ObservedMessage) -> tuple[str, str]:
    return item.station_id, f"{item.subprotocol or 'unknown'} {item.action or 'message'}"


async def clear_leftovers(
    hub: ObserverHub, leftovers: LeftoverProfiles, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """With balancing off: clear the profiles an earlier run left on each station when it connects."""
    with hub.subscribe("balancing-leftovers", 1000) as observations:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for item in observations:
                if isinstance(item, LinkEvent) and item.kind == "connected":
                    leftovers.connected(item.station_id, nursery)
                if not leftovers.pending:
                    return
