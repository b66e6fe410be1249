"""Security profiles 2 and 3 end to end (Part 2 A00, Part 4 §6.5): `ocpp` peers on both legs, over TLS.

The controller is assembled here the way `router/app.py` assembles it, with the two SSL contexts
of `router/tls.py` handed to the station server and the upstream target (the appliance's config has
no TLS keys yet). The CSMS and the stations are the independent test peers (the PyPI `ocpp` library
on `websockets`, in subprocesses), run through `tests/support/certs.py`, which gives them TLS;
certificates are made per module by the same file.

Refusals are timed on the real clock from the station's side, in-process, with a client built on
`trio.SSLStream` and a hand-written upgrade request (no websocket code of ours on that side), because
a subprocess's start-up would swamp a 2-second bound. Where a refused station cannot affect the CSMS,
the upstream is a bare TCP listener that counts connections: there must be none.
"""

from __future__ import annotations

import base64
import logging
import ssl
import warnings
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from router.link import LinkTimings
from router.metrics import RouterMetrics
from router.observers import ObserverHub
from router.server import LinkRegistry, StationServer, UpstreamTarget
from router.tls import CsmsTlsSettings, StationTlsSettings, client_context, server_context
from router.transport import HandshakeFailed, connect
from tests.support.certs import CertifiedKey, Pki, make_pki, peer_ssl_context
from tests.support.peers import Peer, _open_peer
from tests.support.schemas import validate_frames

OCPP_PATH = "/ocpp"

#: Generous for Python subprocesses on a loaded two-core machine; a pass takes a second or two.
TIMEOUT_S = 15.0

#: The issue's bound: a station with a bad or missing certificate is refused within this.
REFUSAL_BOUND_S = 2.0

#: A station's websocket upgrade request, written by hand so no websocket code of ours is involved.
UPGRADE_REQUEST = (
    b"GET /ocpp/CS01 HTTP/1.1\r\n"
    b"Host: 127.0.0.1\r\n"
    b"Upgrade: websocket\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: ocpp2.0.1\r\n"
    b"\r\n"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def station_leg(pki: Pki, profile: int, *, handshake_timeout_s: float = 2.0) -> StationTlsSettings:
    data: dict[str, Any] = {
        "security_profile": profile,
        "cert_file": pki.controller_server.cert_file,
        "key_file": pki.controller_server.key_file,
        "handshake_timeout_s": handshake_timeout_s,
    }
    if profile == 3:
        data["ca_file"] = pki.site_ca.cert_file
    return StationTlsSettings.model_validate(data)


def csms_leg(pki: Pki, profile: int, *, ca_file: Path | None = None) -> CsmsTlsSettings:
    data: dict[str, Any] = {"security_profile": profile, "ca_file": ca_file or pki.cso_ca.cert_file}
    if profile == 3:
        data |= {"cert_file": pki.controller_client.cert_file, "key_file": pki.controller_client.key_file}
    return CsmsTlsSettings.model_validate(data)


# ---------------------------------------------------------------------------------------------------
# The controller, the peers and a tripwire upstream
# ---------------------------------------------------------------------------------------------------


@dataclass
class Controller:
    """The routing core under test: a station server on port 0 with its metrics."""

    port: int
    registry: CollectorRegistry
    server: StationServer

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}{OCPP_PATH}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def refusals(self, reason: str) -> float:
        return self.metric("ocpp_lc_handshake_refusals_total", reason=reason)


@asynccontextmanager
async def run_controller(
    stations: StationTlsSettings, csms: CsmsTlsSettings, csms_port: int, **server_options: Any
) -> AsyncIterator[Controller]:
    """Start the station server as `router/app.py` builds it, with each leg's SSL context.

    ``server_options`` are further `StationServer` arguments (e.g. ``security_event``).
    """
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    upstream = UpstreamTarget(
        host="127.0.0.1",
        port=csms_port,
        path=OCPP_PATH,
        ssl_context=client_context(csms),
        connect_timeout_s=5.0,
    )
    server = StationServer(
        base_path=OCPP_PATH,
        upstream=upstream,
        timings=LinkTimings(),
        metrics=metrics,
        hub=ObserverHub(metrics),
        registry=LinkRegistry(),
        max_message_bytes=1_048_576,
        handshake_timeout_s=stations.handshake_timeout_s,
        max_stations=100,
        ssl_context=server_context(stations),
        tls_handshake_timeout_s=stations.handshake_timeout_s,
        certificate_organization=stations.organization,
        **server_options,
    )
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield Controller(port, registry, server)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5.0):
                await server.stop_accepting()
                await server.close_all(1.0)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_tls_csms(pki: Pki, *, client_ca: Path | None = None) -> AsyncIterator[tuple[Peer, int]]:
    """The `ocpp` CSMS peer serving wss:// with its own certificate (with ``client_ca``: profile 3)."""
    args = ["csms", "--cert", str(pki.csms_server.cert_file), "--key", str(pki.csms_server.key_file)]
    if client_ca is not None:
        args += ["--client-ca", str(client_ca)]
    args += ["--", "--host", "127.0.0.1", "--port", "0", "--path-prefix", OCPP_PATH]
    async with _open_peer("tests.support.certs", "csms", args) as peer:
        listening = await peer.wait_for_event("listening")
        yield peer, int(listening["port"])


def open_tls_station(
    pki: Pki, url: str, identity: str, cert: CertifiedKey | None, *args: str
) -> AbstractAsyncContextManager[Peer]:
    """The `ocpp` station peer connecting over wss://, trusting the site CA, with ``cert`` if given."""
    own = ["--cert", str(cert.cert_file), "--key", str(cert.key_file)] if cert else []
    return _open_peer(
        "tests.support.certs",
        f"station {identity}",
        ["station", "--ca", str(pki.site_ca.cert_file), *own, "--", "--url", url, "--identity", identity, *args],
    )


@dataclass
class Tripwire:
    """An upstream that must never be reached: a TCP listener counting connections."""

    port: int = 0
    connections: int = 0


@asynccontextmanager
async def tripwire() -> AsyncIterator[Tripwire]:
    wire = Tripwire()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    wire.port = listeners[0].socket.getsockname()[1]

    async def count(stream: trio.SocketStream) -> None:
        wire.connections += 1
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, count, listeners)
        try:
            yield wire
        finally:
            nursery.cancel_scope.cancel()


async def attempt(port: int, context: ssl.SSLContext | None, request: bytes = UPGRADE_REQUEST) -> tuple[bytes, float]:
    """Connect as a station, do TLS with ``context`` (None: none), send ``request``, read the answer.

    Returns what the controller answered (b"" when it just closed) and the seconds it took.
    """
    started = trio.current_time()
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    try:
        if context is not None:
            stream = trio.SSLStream(stream, context, server_hostname="127.0.0.1", https_compatible=True)
            await stream.do_handshake()
        if request:
            await stream.send_all(request)
        answer = bytes(await stream.receive_some(4096))
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(stream)
    return answer, trio.current_time() - started


def station_context(pki: Pki, cert: CertifiedKey | None) -> ssl.SSLContext:
    return peer_ssl_context(
        "station",
        ca=pki.site_ca.cert_file,
        cert=cert.cert_file if cert else None,
        key=cert.key_file if cert else None,
    )


def server_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "ocpp_lc.server"]


# ---------------------------------------------------------------------------------------------------
# Profiles 2 and 3 relay
# ---------------------------------------------------------------------------------------------------


async def test_profile_2_relays_over_tls_on_both_legs_and_basic_auth_passes_through(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ocpp_lc")
    password = "Tls-profile-2-password"  # A00.FR.304: 16..40 characters
    authorization = "Basic " + base64.b64encode(f"CS01:{password}".encode()).decode()
    async with (
        open_tls_csms(pki) as (csms, csms_port),
        run_controller(station_leg(pki, 2), csms_leg(pki, 2), csms_port) as lc,
        open_tls_station(pki, lc.url, "CS01", None, "--basic-auth-password", password) as station,
    ):
        with trio.fail_after(TIMEOUT_S):
            await station.wait_for_event("connected", subprotocol="ocpp2.0.1")
            # The CSMS sees the station's own credentials (A00.FR.301..303), not the controller's,
            # and no client certificate (the controller only presents one under profile 3).
            connected = await csms.wait_for_event("connected", identity="CS01")
            assert connected["authorization"] == authorization
            assert connected["path"] == "/ocpp/CS01"
            tls = await csms.wait_for_event("tls_client", path="/ocpp/CS01")
            assert tls["subject"] is None
            boot = await station.wait_for_event("boot")
            assert boot["payload"]["status"] == "Accepted"
            heartbeat = await station.call(action="Heartbeat", payload={})
            assert heartbeat["event"] == "result"

    station_out = station.frames(direction="out")
    assert csms.frames("CS01", "in") == station_out  # byte for byte through two TLS legs
    assert csms.frames("CS01", "out") == station.frames(direction="in")
    validate_frames(station.frames())
    # The password never reaches a log line, in clear or in base64.
    assert password not in caplog.text
    assert authorization.split()[1] not in caplog.text


async def test_profile_3_relays_with_certificates_on_both_legs(pki: Pki) -> None:
    request = {"getVariableData": [{"component": {"name": "OCPPCommCtrlr"}, "variable": {"name": "HeartbeatInterval"}}]}
    async with (
        open_tls_csms(pki, client_ca=pki.cso_ca.cert_file) as (csms, csms_port),
        run_controller(station_leg(pki, 3), csms_leg(pki, 3), csms_port) as lc,
        open_tls_station(pki, lc.url, "CS01", pki.station) as station,
    ):
        with trio.fail_after(TIMEOUT_S):
            # The CSMS verified a client certificate: the controller's station-role one (Part 4 §6.5),
            # since the station's own certificate ends at the controller.
            tls = await csms.wait_for_event("tls_client", path="/ocpp/CS01")
            assert tls["subject"] == "O=ocpp-lc test CSO,CN=LC01"
            boot = await station.wait_for_event("boot")
            assert boot["payload"]["status"] == "Accepted"
            reply = await csms.call(identity="CS01", action="GetVariables", payload=request)
            assert reply["event"] == "result", reply
            assert reply["payload"]["getVariableResult"][0]["attributeStatus"] == "Accepted"
            assert lc.metric("ocpp_lc_stations_connected") == 1

    validate_frames(station.frames())
    validate_frames(csms.frames("CS01"))
    assert csms.frames("CS01", "in") == station.frames(direction="out")


# ---------------------------------------------------------------------------------------------------
# Stations refused
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "logged"),
    [
        ("none", "peer did not return a certificate"),
        ("rogue", "unable to get local issuer certificate"),
        ("expired", "certificate has expired"),
    ],
)
async def test_station_without_a_valid_certificate_is_refused_within_2_s(
    pki: Pki, caplog: pytest.LogCaptureFixture, which: str, logged: str
) -> None:
    caplog.set_level(logging.INFO, logger="ocpp_lc")
    cert = {"none": None, "rogue": pki.station_rogue, "expired": pki.station_expired}[which]
    async with tripwire() as csms, run_controller(station_leg(pki, 3), csms_leg(pki, 2), csms.port) as lc:
        with trio.fail_after(TIMEOUT_S):
            answer, elapsed_s = await attempt(lc.port, station_context(pki, cert))
            assert answer == b""  # no HTTP answer at all: the TLS session never opened
            assert elapsed_s < REFUSAL_BOUND_S
            # The handler counts and logs right after closing the stream; let it get there.
            await trio.testing.wait_all_tasks_blocked()
            assert lc.refusals("tls") == 1
            assert (
                lc.metric("ocpp_lc_security_events_total", event="InvalidChargingStationCertificate", leg="station")
                == 1
            )
            assert any(logged in line for line in server_lines(caplog)), server_lines(caplog)
            assert csms.connections == 0

            # One bad station does not harm the next one.
            good = peer_ssl_context(
                "station", ca=pki.site_ca.cert_file, cert=pki.station.cert_file, key=pki.station.key_file
            )
            with pytest.raises(HandshakeFailed) as refused:
                await connect("127.0.0.1", lc.port, "/ocpp/CS01", subprotocols=["ocpp2.0.1"], ssl_context=good)
            # It got through TLS and the websocket handshake; the tripwire CSMS is what failed it.
            assert refused.value.status == 502
            assert csms.connections == 1


async def test_an_ocpp_station_with_an_expired_certificate_is_refused(pki: Pki) -> None:
    async with (
        tripwire() as csms,
        run_controller(station_leg(pki, 3), csms_leg(pki, 2), csms.port) as lc,
        open_tls_station(pki, lc.url, "CS01", pki.station_expired) as station,
    ):
        with trio.fail_after(TIMEOUT_S):
            failed = await station.wait_for(lambda e: e["event"] in ("connected", "rejected", "connect_failed"))
            assert failed["event"] == "connect_failed", failed
            await trio.testing.wait_all_tasks_blocked()
            assert lc.refusals("tls") == 1
            assert csms.connections == 0


async def test_tls_older_than_1_2_is_refused(pki: Pki) -> None:
    context = station_context(pki, pki.station)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 would not offer TLS 1.1 otherwise
    async with tripwire() as csms, run_controller(station_leg(pki, 2), csms_leg(pki, 2), csms.port) as lc:
        with trio.fail_after(TIMEOUT_S):
            answer, elapsed_s = await attempt(lc.port, context)
            assert answer == b""
            assert elapsed_s < REFUSAL_BOUND_S
            await trio.testing.wait_all_tasks_blocked()
            assert lc.refusals("tls") == 1  # A00.FR.315
            assert lc.metric("ocpp_lc_security_events_total", event="InvalidTLSVersion", leg="station") == 1
            assert csms.connections == 0


async def test_plain_websocket_on_the_tls_port_is_refused(pki: Pki) -> None:
    async with tripwire() as csms, run_controller(station_leg(pki, 2), csms_leg(pki, 2), csms.port) as lc:
        with trio.fail_after(TIMEOUT_S):
            # A profile-1 station talking plain HTTP to a TLS port (A00.FR.002: one profile at a time).
            answer, elapsed_s = await attempt(lc.port, None)
            assert answer == b""
            assert elapsed_s < REFUSAL_BOUND_S
            await trio.testing.wait_all_tasks_blocked()
            assert lc.refusals("tls") == 1
            assert csms.connections == 0


async def test_a_station_that_stalls_the_tls_handshake_is_cut_at_the_limit(pki: Pki) -> None:
    limit_s = 0.5
    async with (
        tripwire() as csms,
        run_controller(station_leg(pki, 3, handshake_timeout_s=limit_s), csms_leg(pki, 2), csms.port) as lc,
    ):
        with trio.fail_after(TIMEOUT_S):
            # Connect, then send nothing at all (a slow-loris station).
            answer, elapsed_s = await attempt(lc.port, None, request=b"")
            assert answer == b""
            assert limit_s <= elapsed_s < REFUSAL_BOUND_S
            await trio.testing.wait_all_tasks_blocked()
            assert lc.refusals("handshake_timeout") == 1


# ---------------------------------------------------------------------------------------------------
# The CSMS leg refused
# ---------------------------------------------------------------------------------------------------


async def test_controller_refuses_a_csms_it_cannot_verify_and_is_refused_without_its_certificate(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ocpp_lc")
    station = station_context(pki, None)
    async with open_tls_csms(pki, client_ca=pki.cso_ca.cert_file) as (csms, csms_port):
        # Trusting the wrong CA: the CSMS's certificate does not verify (A00.FR.308, .311).
        async with run_controller(
            station_leg(pki, 2), csms_leg(pki, 2, ca_file=pki.site_ca.cert_file), csms_port
        ) as lc:
            with trio.fail_after(TIMEOUT_S), pytest.raises(HandshakeFailed) as refused:
                await connect("127.0.0.1", lc.port, "/ocpp/CS01", subprotocols=["ocpp2.0.1"], ssl_context=station)
            assert refused.value.status == 502
            assert lc.refusals("csms_unreachable") == 1
            assert lc.metric("ocpp_lc_security_events_total", event="InvalidCsmsCertificate", leg="csms") == 1
            assert any("certificate verify failed" in line for line in server_lines(caplog))

        # Profile 2 toward a CSMS that wants profile 3: the CSMS refuses the controller (A00.FR.407).
        async with run_controller(station_leg(pki, 2), csms_leg(pki, 2), csms_port) as lc:
            with trio.fail_after(TIMEOUT_S), pytest.raises(HandshakeFailed) as refused:
                await connect("127.0.0.1", lc.port, "/ocpp/CS01", subprotocols=["ocpp2.0.1"], ssl_context=station)
            assert refused.value.status == 502
            assert lc.refusals("csms_unreachable") == 1

    assert not [e for e in csms.events if e["event"] in ("tls_client", "connected")]
