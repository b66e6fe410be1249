"""The router's Prometheus metrics, registered on a registry handed in (no global state).

Label values are bounded: actions are the 64 OCPP 2.0.1 names plus ``other``; reasons and outcomes
come from small fixed sets in the code; a station id is fine as a label on one site, a message id
never is.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Directions a frame can travel. ``lc_to_station`` and ``station_to_lc`` are the controller's own calls
#: and the station's answers to them, which are never relayed.
DIRECTIONS = ("station_to_csms", "csms_to_station", "lc_to_station", "station_to_lc")

_RTT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RouterMetrics:
    """Every metric of the routing core."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.stations_connected = Gauge(
            "ocpp_lc_stations_connected", "Station pairs currently relayed.", registry=registry
        )
        self.upstream_links_up = Gauge(
            "ocpp_lc_upstream_links_up",
            "Websocket connections to the CSMS that are open (one per relayed station).",
            registry=registry,
        )
        self.frames = Counter(
            "ocpp_lc_frames_total",
            "OCPP-J messages handled, by direction and action (answers count under their call's action).",
            ["direction", "action"],
            registry=registry,
        )
        self.frame_bytes = Counter(
            "ocpp_lc_frame_bytes_total",
            "Uncompressed size of OCPP-J messages handled, by direction and action.",
            ["direction", "action"],
            registry=registry,
        )
        self.wire_bytes = Counter(
            "ocpp_lc_wire_bytes_total",
            "Bytes the controller sent and received on the network (after compression), "
            "by leg (station, csms) and direction (sent, received).",
            ["leg", "direction"],
            registry=registry,
        )
        self.call_duration = Histogram(
            "ocpp_lc_call_duration_seconds",
            "Time from relaying a call to relaying its answer; leg 'csms' for calls the CSMS answers, "
            "'station' for calls a station answers.",
            ["leg", "action"],
            buckets=_RTT_BUCKETS_S,
            registry=registry,
        )
        self.invalid_frames = Counter(
            "ocpp_lc_invalid_frames_total",
            "Frames that are not valid OCPP-J (relayed unchanged all the same), by direction and kind.",
            ["direction", "kind"],
            registry=registry,
        )
        self.handshake_refusals = Counter(
            "ocpp_lc_handshake_refusals_total",
            "Station handshakes refused, by reason.",
            ["reason"],
            registry=registry,
        )
        self.security_events = Counter(
            "ocpp_lc_security_events_total",
            "TLS handshakes refused, by OCPP security event (Part 2 appendices) and leg (station, csms, own).",
            ["event", "leg"],
            registry=registry,
        )
        self.pair_closes = Counter(
            "ocpp_lc_pair_closes_total",
            "Station pairs closed, by reason (which side ended it and how).",
            ["reason"],
            registry=registry,
        )
        self.compression = Counter(
            "ocpp_lc_compression_negotiated_total",
            "Connections on which permessage-deflate was negotiated, by leg.",
            ["leg"],
            registry=registry,
        )
        self.lc_calls = Counter(
            "ocpp_lc_lc_calls_total",
            "Calls the controller itself sent to stations, by action and outcome.",
            ["action", "outcome"],
            registry=registry,
        )
        self.late_replies = Counter(
            "ocpp_lc_late_replies_total",
            "Station answers to controller calls that came after the call had timed out (dropped).",
            registry=registry,
        )
        self.held_calls = Counter(
            "ocpp_lc_held_csms_calls_total",
            "CSMS calls held back until the station answered an outstanding call (OCPP-J §4.1.1).",
            registry=registry,
        )
        self.unanswered_calls = Counter(
            "ocpp_lc_unanswered_calls_total",
            "Calls to a station that were never answered within the configured hold time.",
            registry=registry,
        )
        self.observer_dropped = Counter(
            "ocpp_lc_observer_dropped_total",
            "Observed messages an observer lost because it fell behind.",
            ["observer"],
            registry=registry,
        )
        self.observer_queue_fill = Gauge(
            "ocpp_lc_observer_queue_fill_ratio",
            "How full each observer's queue is (0..1).",
            ["observer"],
            registry=registry,
        )
        self.handler_errors = Counter(
            "ocpp_lc_handler_errors_total",
            "Unexpected errors in a station's handler (the pair was closed, others unaffected).",
            registry=registry,
        )
        # Label lookups take a lock and build a key; the relay path counts every frame, so it keeps
        # the children it has used. Bounded: 4 directions x 65 action labels.
        self._frame_children: dict[tuple[str, str], tuple[Counter, Counter]] = {}

    def count_frame(self, direction: str, action_label: str, size_bytes: int) -> None:
        """Count one OCPP-J message of ``size_bytes`` in ``direction`` under ``action_label``."""
        key = (direction, action_label)
        children = self._frame_children.get(key)
        if children is None:
            children = (self.frames.labels(direction, action_label), self.frame_bytes.labels(direction, action_label))
            self._frame_children[key] = children
        children[0].inc()
        children[1].inc(size_bytes)
