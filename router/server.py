"""The station server: accept a station, open its upstream twin, relay until either ends (Part 4 §6.2).

For each accepted TCP connection the handler reads the station's opening handshake, checks the
identity in the path (not the controller's own; under profile 3, the one its certificate names), and
*before answering* opens ``<csms url>/<identity>?<the station's query>`` with the subprotocols the
station offered and its end-to-end headers unchanged (:mod:`router.passthrough`). The station's
handshake then gets the CSMS's outcome: the subprotocol it chose, or its HTTP refusal with the
headers that matter to a station. Only then does the pair become a :class:`~router.link.StationLink`.
Every stream a handler accepts is closed when it returns.

Station-leg security events (a refused TLS handshake, a certificate that does not name the
identity) are counted, logged, and handed to the optional ``security_event`` callback as
``(OCPP security event type, tech info)``, so the controller's own identity can report them (A04).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, cast
from urllib.parse import unquote

import trio

from .autonomy.service import Autonomy
from .autonomy.upstream import AutonomousUpstream
from .link import OCPP201, CsmsLeg, LinkTimings, StationLink
from .metrics import RouterMetrics
from .observers import ObserverHub
from .passthrough import forwarded_request_headers, mirrored_refusal_headers, upstream_target
from .tls import (
    INVALID_STATION_CERTIFICATE,
    TLS_HANDSHAKE_FAILED,
    peer_certificate_summary,
    security_event,
    station_certificate_problem,
)
from .transport import (
    GOING_AWAY,
    NORMAL,
    PROTOCOL_ERROR,
    HandshakeFailed,
    IncomingHandshake,
    WebSocket,
    connect,
    read_handshake,
    tls_server_handshake,
)

log = logging.getLogger("ocpp_lc.server")

MAX_IDENTITY_CHARS: Final = 48
#: SecurityEventNotification's techInfo is at most 255 characters (Part 2, SecurityEventNotificationRequest).
MAX_TECH_INFO_CHARS: Final = 255

#: Called as ``security_event(event_type, tech_info)``; see :class:`StationServer`.
SecurityEventSink = Callable[[str, str], None]


class IdentityError(ValueError):
    """The request path does not carry a usable station identity."""


def parse_identity(target: str, base_path: str) -> tuple[str, str]:
    """Split ``<base_path>/<identity>`` into (decoded identity, raw path segment) or raise.

    The identity is percent-decoded (Part 4 §3.1.1), at most 48 characters, without ``:`` (it is
    also the Basic-auth user name) and without control characters.
    """
    path = target.split("?", 1)[0]
    prefix = base_path.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise IdentityError(f"path must be {prefix}<identity>")
    raw = path[len(prefix) :]
    if not raw or "/" in raw:
        raise IdentityError(f"path must be {prefix}<identity> with one identity segment")
    try:
        identity = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise IdentityError("identity is not valid percent-encoded UTF-8") from None
    if len(identity) > MAX_IDENTITY_CHARS:
        raise IdentityError(f"identity longer than {MAX_IDENTITY_CHARS} characters")
    if ":" in identity:
        raise IdentityError("identity must not contain ':'")
    if not identity.isprintable():
        raise IdentityError("identity must not contain control characters")
    return identity, raw


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where and how to open upstream connections."""

    host: str
    port: int
    path: str
    ssl_context: ssl.SSLContext | None = None
    connect_timeout_s: float = 10.0


@dataclass
class LinkRegistry:
    """The live links by station identity (one per identity: a newer connection replaces an older)."""

    links: dict[str, StationLink] = field(default_factory=dict)

    def get(self, station_id: str) -> StationLink | None:
        """The live link of ``station_id``, if connected."""
        return self.links.get(station_id)

    def __iter__(self) -> Iterator[StationLink]:
        return iter(list(self.links.values()))

    def __len__(self) -> int:
        return len(self.links)


class StationServer:
    """Listens for stations and runs one handler per connection, each owning its pair.

    ``own_identity``: the controller's identity toward the CSMS; a station connecting under it (in
    any letter case) is refused with 404, since the CSMS would see two connections for one identity.
    ``certificate_organization``: under profile 3, the O every station certificate must carry.
    ``security_event``: called with an OCPP security event type (Part 2 appendices) and a short,
    secret-free tech info (at most 255 characters) for each station-leg refusal that is one:
    ``InvalidChargingStationCertificate`` (no, an untrusted or expired certificate, or one that does
    not name the identity), ``InvalidTLSVersion``, ``InvalidTLSCipherSuite``. A TLS failure of no
    such kind (plain HTTP on the TLS port, a peer that hangs up) is counted and logged as
    ``TLSHandshakeFailed`` but not reported: it is not an OCPP event, and port scanners make it.
    The callback must not block; an exception from it is logged and does not affect the station.
    """

    def __init__(
        self,
        *,
        base_path: str,
        upstream: UpstreamTarget,
        timings: LinkTimings,
        metrics: RouterMetrics,
        hub: ObserverHub,
        registry: LinkRegistry,
        max_message_bytes: int,
        handshake_timeout_s: float,
        max_stations: int,
        ssl_context: ssl.SSLContext | None = None,
        tls_handshake_timeout_s: float = 2.0,
        own_identity: str | None = None,
        certificate_organization: str | None = None,
        security_event: SecurityEventSink | None = None,
        autonomy: Autonomy | None = None,
    ) -> None:
        self._base_path = base_path
        self._upstream = upstream
        self._timings = timings
        self._metrics = metrics
        self._hub = hub
        self.registry = registry
        self._max_message_bytes = max_message_bytes
        self._handshake_timeout_s = handshake_timeout_s
        self._max_stations = max_stations
        self._ssl_context = ssl_context
        self._tls_handshake_timeout_s = tls_handshake_timeout_s
        self._own_identity = own_identity.casefold() if own_identity else None
        self._certificate_organization = certificate_organization
        # Profile 3 is the context that requires a certificate: only then is there one to bind.
        self._bind_certificates = ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED
        #: Told ``(event_type, tech_info)`` of every station-leg security event (the own identity reports it).
        self._security_event = security_event
        #: Site autonomy (None: the strict §6.3 rule); see :meth:`_autonomous`.
        self._autonomy = autonomy
        # An autonomous CSMS leg pings the CSMS itself, with ``timings`` (and restores the leg instead of
        # ending the pair): its link must not.
        self._autonomous_timings = dataclasses.replace(timings, csms_ping_interval_s=0)
        self._upstreams: dict[StationLink, AutonomousUpstream] = {}
        if autonomy is not None:
            autonomy.on_change(self._update_gauges)
        self._handlers: trio.Nursery | None = None
        self._listeners: list[trio.SocketListener] = []
        self._accepting = True
        self._in_progress = 0

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` and serve until cancelled; report the bound port when ready."""
        self._listeners = await trio.open_tcp_listeners(port, host=host or None, backlog=1024)
        bound_port = self._listeners[0].socket.getsockname()[1]
        log.info("listening for stations on %s:%d%s/<identity>", host, bound_port, self._base_path)
        async with trio.open_nursery() as nursery:
            self._handlers = nursery
            for listener in self._listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started(bound_port)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while self._accepting:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # Out of file descriptors and the like: back off instead of spinning (trio's own
                    # serve_listeners does the same for these errors).
                    log.error("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                except trio.ClosedResourceError:
                    return
                nursery.start_soon(self._handle, stream)

    async def stop_accepting(self) -> None:
        """Stop taking new connections (shutdown's first step)."""
        self._accepting = False
        for listener in self._listeners:
            await listener.aclose()

    async def close_all(self, grace_s: float) -> None:
        """Close every pair with 1001 and wait up to ``grace_s`` for them to finish."""
        links = list(self.registry)
        for link in links:
            link.close("shutdown", GOING_AWAY, "local controller shutting down")
        with trio.move_on_after(grace_s):
            for link in links:
                await link.done.wait()
        # A station that does not answer the closing handshake must not hold shutdown past the grace.
        async with trio.open_nursery() as nursery:
            for link in links:
                if not link.done.is_set():
                    nursery.start_soon(link.abort)

    def _refuse(self, reason: str) -> None:
        self._metrics.handshake_refusals.labels(reason).inc()

    def _station_security_event(self, event: str, tech_info: str) -> None:
        """Count a station-leg security event and hand it to the callback (OCPP event types only)."""
        self._metrics.security_events.labels(event, "station").inc()
        if self._security_event is None or event == TLS_HANDSHAKE_FAILED:
            return
        text = "".join(char if char.isprintable() else "?" for char in tech_info)
        if len(text) > MAX_TECH_INFO_CHARS:
            text = text[: MAX_TECH_INFO_CHARS - 3] + "..."
        try:
            self._security_event(event, text)
        except Exception:
            log.exception("the security event callback failed for %s", event)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        peer = _peer_name(stream)
        station_id = "?"
        try:
            incoming = await self._open_handshake(stream, peer)
            if incoming is None:
                return
            station_id, link = await self._pair(incoming, peer)
            if link is None:
                return
            try:
                upstream = self._upstreams.get(link)
                if upstream is None:
                    await link.run()
                else:
                    # The autonomous CSMS leg's tasks live and die with the pair.
                    async with trio.open_nursery() as pair:
                        await pair.start(upstream.run)
                        upstream.call_station = link.call
                        await link.run()
                        # In the same step as the link was marked done: leaving the nursery is a
                        # schedule point, and whoever waited for the link to end must find it gone.
                        self._forget(station_id, link)
                        pair.cancel_scope.cancel()
            finally:
                self._forget(station_id, link)
        except Exception:
            # One bad station never harms another: log, count, and let this handler end.
            log.exception("[%s] unexpected error in the station handler (%s)", station_id, peer)
            self._metrics.handler_errors.inc()
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _open_handshake(self, stream: trio.abc.Stream, peer: str) -> IncomingHandshake | None:
        transport: trio.abc.Stream = stream
        if self._ssl_context is not None:
            # TLS first, on its own short clock: a bad or missing certificate is refused at once, and a
            # station that stalls the TLS handshake is cut after tls_handshake_timeout_s.
            with trio.move_on_after(self._tls_handshake_timeout_s) as tls_scope:
                try:
                    transport = await tls_server_handshake(stream, self._ssl_context)
                except HandshakeFailed as exc:
                    event = security_event(exc, "station")
                    self._refuse("tls")
                    log.warning("security event %s: refused TLS from %s: %s", event, peer, exc.reason)
                    self._station_security_event(event, f"TLS from {peer} refused: {exc.reason}")
                    return None
            if tls_scope.cancelled_caught:
                self._refuse("handshake_timeout")
                log.info("%s did not complete TLS within %g s", peer, self._tls_handshake_timeout_s)
                return None
            certificate = peer_certificate_summary(cast(trio.SSLStream[trio.abc.Stream], transport))
            if certificate is not None:
                log.info("%s presented a client certificate: %s", peer, certificate)
        with trio.move_on_after(self._handshake_timeout_s) as scope:
            try:
                return await read_handshake(transport, max_message_bytes=self._max_message_bytes)
            except HandshakeFailed as exc:
                self._refuse("abandoned" if exc.kind == "abandoned" else "not_websocket")
                log.info("refused a connection from %s: %s", peer, exc.reason)
                return None
        if scope.cancelled_caught:
            self._refuse("handshake_timeout")
            log.info("%s did not complete a handshake within %g s", peer, self._handshake_timeout_s)
        return None

    async def _pair(self, incoming: IncomingHandshake, peer: str) -> tuple[str, StationLink | None]:
        try:
            station_id, raw_segment = parse_identity(incoming.target, self._base_path)
        except IdentityError as exc:
            self._refuse("identity")
            log.info("refused %s from %s: %s", incoming.target[:200], peer, exc)
            await incoming.reject(404, str(exc))
            return "?", None
        if self._own_identity is not None and station_id.casefold() == self._own_identity:
            # The CSMS already has the controller under this identity; a relayed twin would make two
            # connections for one identity there, and each would replace the other.
            self._refuse("own_identity")
            log.warning(
                "[%s] refused from %s: that is the controller's own identity toward the CSMS; "
                "give the station another identity",
                station_id,
                peer,
            )
            await incoming.reject(404, "this identity is the local controller's own")
            return station_id, None
        if self._bind_certificates and not await self._certificate_belongs(incoming, station_id, peer):
            return station_id, None
        if len(self.registry) + self._in_progress >= self._max_stations and station_id not in self.registry.links:
            self._refuse("capacity")
            log.warning("[%s] refused: %d stations is the configured maximum", station_id, self._max_stations)
            await incoming.reject(503, "local controller at capacity")
            return station_id, None
        if not incoming.subprotocols:
            # Part 4 §3.2: no OCPP version to agree on. Complete the handshake without a subprotocol and
            # close at once, as a CSMS would; nothing is opened upstream for such a station.
            await self._close_without_subprotocol(incoming, station_id, "the station offered no OCPP subprotocol")
            return station_id, None
        self._in_progress += 1
        try:
            return station_id, await self._open_pair(incoming, station_id, raw_segment)
        finally:
            self._in_progress -= 1

    async def _certificate_belongs(self, incoming: IncomingHandshake, station_id: str, peer: str) -> bool:
        """Under profile 3: does the station's certificate name ``station_id``? Refuse with 403 if not."""
        tls_stream = incoming.stream if isinstance(incoming.stream, trio.SSLStream) else None
        problem = station_certificate_problem(tls_stream, station_id, organization=self._certificate_organization)
        if problem is None:
            return True
        certificate = peer_certificate_summary(tls_stream)
        subject = certificate.subject if certificate is not None else "none"
        self._refuse("certificate_identity")
        log.warning(
            "[%s] security event %s: refused %s: %s (subject %r)",
            station_id,
            INVALID_STATION_CERTIFICATE,
            peer,
            problem,
            subject,
        )
        self._station_security_event(
            INVALID_STATION_CERTIFICATE, f"station {station_id} from {peer}: {problem}; subject {subject}"
        )
        await incoming.reject(403, f"the client certificate does not belong to this station: {problem}")
        return False

    async def _close_without_subprotocol(self, incoming: IncomingHandshake, station_id: str, why: str) -> None:
        self._refuse("no_subprotocol")
        log.info("[%s] %s; closing after the handshake", station_id, why)
        station = await incoming.accept(None)
        await station.aclose(PROTOCOL_ERROR, "no common OCPP subprotocol")

    async def _connect_upstream(
        self, incoming: IncomingHandshake, raw_segment: str, subprotocols: Sequence[str]
    ) -> WebSocket:
        """Open the CSMS leg with the station's handshake; HandshakeFailed (status None on a timeout)."""
        upstream = self._upstream
        with trio.move_on_after(upstream.connect_timeout_s):
            return await connect(
                upstream.host,
                upstream.port,
                upstream_target(upstream.path, raw_segment, incoming.target),
                subprotocols=subprotocols,
                extra_headers=forwarded_request_headers(incoming.headers),
                ssl_context=upstream.ssl_context,
                max_message_bytes=self._max_message_bytes,
                # The CSMS leg is the site's WAN link (often cellular): keep the compression
                # context there, where bytes cost money. Toward stations (the site LAN) the
                # accept below drops it after every message, which saves ~200 KiB per station.
                keep_compression_context=True,
            )
        raise HandshakeFailed(f"CSMS did not answer within {upstream.connect_timeout_s:g} s", kind="timeout")

    def _autonomous(self, incoming: IncomingHandshake, station_id: str) -> bool:
        """Whether ``station_id`` may be served locally while its CSMS is unreachable (errata 4.13 to §6.3)."""
        return (
            self._autonomy is not None
            and OCPP201 in incoming.subprotocols
            and not self._autonomy.past_max_offline(station_id)
        )

    async def _open_pair(self, incoming: IncomingHandshake, station_id: str, raw_segment: str) -> StationLink | None:
        upstream = self._upstream
        csms: WebSocket | None = None
        try:
            csms = await self._connect_upstream(incoming, raw_segment, incoming.subprotocols)
        except HandshakeFailed as exc:
            if exc.status is not None:
                # The CSMS is there and refuses (401, 404, 503 with Retry-After ...): the station sees
                # what it would have seen connecting directly, autonomy or not.
                self._refuse("csms_refused")
                log.info("[%s] CSMS refused the connection with HTTP %d", station_id, exc.status)
                body = exc.body.decode("utf-8", "replace").strip() or f"CSMS refused with HTTP {exc.status}"
                await incoming.reject(exc.status, body, headers=mirrored_refusal_headers(exc.headers))
                return None
            if exc.kind == "tls":
                event = security_event(exc, "csms")
                self._metrics.security_events.labels(event, "csms").inc()
                log.warning("[%s] security event %s: CSMS TLS failed: %s", station_id, event, exc.reason)
            else:
                log.warning("[%s] CSMS unreachable: %s", station_id, exc.reason)
            if self._autonomous(incoming, station_id):
                log.warning("[%s] CSMS unreachable: the station is served locally until it is back", station_id)
                return await self._accept(incoming, station_id, raw_segment, None)
            if exc.kind == "timeout":
                self._refuse("csms_timeout")
                await incoming.reject(504, f"CSMS did not answer within {upstream.connect_timeout_s:g} s")
            else:
                self._refuse("csms_unreachable")
                await incoming.reject(502, f"CSMS unreachable: {exc.reason}")
            return None
        if csms.subprotocol is None:
            # The CSMS agreed to none of the offered versions; it closes its side (§3.2), we close ours.
            with trio.CancelScope(shield=True):
                await csms.aclose(NORMAL, "")
            await self._close_without_subprotocol(
                incoming, station_id, "the CSMS accepted none of the offered subprotocols"
            )
            return None
        return await self._accept(incoming, station_id, raw_segment, csms)

    async def _accept(
        self, incoming: IncomingHandshake, station_id: str, raw_segment: str, csms: WebSocket | None
    ) -> StationLink:
        """Complete the station's handshake and make the pair; ``csms`` None: served locally from the start."""
        subprotocol = csms.subprotocol if csms is not None else OCPP201
        try:
            station = await incoming.accept(subprotocol)
        except BaseException:
            if csms is not None:
                with trio.CancelScope(shield=True):
                    await csms.aclose(GOING_AWAY, "charging station connection lost")
            raise
        if csms is not None and csms.compressed:
            self._metrics.compression.labels("csms").inc()
        if station.compressed:
            self._metrics.compression.labels("station").inc()
        leg: CsmsLeg
        upstream: AutonomousUpstream | None = None
        if self._autonomy is not None and subprotocol == OCPP201:
            assert subprotocol is not None

            async def reconnect() -> WebSocket:
                # The station's original handshake (path, query, Authorization ...), held in memory only.
                return await self._connect_upstream(incoming, raw_segment, [subprotocol])

            upstream = AutonomousUpstream(
                station_id,
                subprotocol,
                csms,
                autonomy=self._autonomy,
                connect=reconnect,
                timings=self._timings,
            )
            leg = upstream
        else:
            assert csms is not None
            leg = csms
        timings = self._timings if upstream is None else self._autonomous_timings
        link = StationLink(station_id, station, leg, metrics=self._metrics, hub=self._hub, timings=timings)
        if upstream is not None:
            self._upstreams[link] = upstream
        previous = self.registry.links.get(station_id)
        if previous is not None:
            log.warning("[%s] connected again; closing the older connection", station_id)
            previous.close("replaced", NORMAL, "replaced by a newer connection")
        self.registry.links[station_id] = link
        self._update_gauges()
        log.info(
            "[%s] connected (subprotocol %s, compression station=%s csms=%s%s)",
            station_id,
            subprotocol,
            station.compressed,
            csms.compressed if csms is not None else None,
            "" if upstream is None else f", autonomy: {upstream.mode}",
        )
        return link

    def _forget(self, station_id: str, link: StationLink) -> None:
        """Drop the ended ``link`` from the registry (if a newer one has not replaced it) and the gauges."""
        self._upstreams.pop(link, None)
        if self.registry.links.get(station_id) is link:
            del self.registry.links[station_id]
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.stations_connected.set(len(self.registry))
        local = 0 if self._autonomy is None else sum(1 for s in self._autonomy.stations() if s.mode == "local")
        self._metrics.upstream_links_up.set(max(0, len(self.registry) - local))


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        address = sock.getpeername() if sock is not None else ("memory", 0)
    except OSError:
        return "unknown peer"
    return f"{address[0]}:{address[1]}"
