"""One MQTT session: paho-mqtt's client driven by trio, without a thread of paho's own.

How paho lives beside trio. paho-mqtt (2.x) offers an "external event loop" mode: the application
waits for its socket and calls ``loop_read`` / ``loop_write`` / ``loop_misc``, which then never block
(the socket is non-blocking). We wait with ``trio.lowlevel.wait_readable`` / ``wait_writable``, so
every paho callback (a message, the CONNACK, a lost connection) runs on the trio thread, between two
awaits: the limit sources need no locks and nothing is handed across threads. The one blocking step,
``connect()`` (name lookup, TCP connect, TLS handshake, writing CONNECT), runs in a worker thread under
a deadline (``trio.to_thread.run_sync(..., abandon_on_cancel=True)``); the client is new for every
attempt and untouched by trio until that thread returns, so an abandoned attempt harms nothing.
paho's own reconnect machinery is off (``reconnect_on_failure=False``): it would block; back-off is the
caller's (:mod:`mqtt.service`).

Three tasks share a session's nursery: the reader (socket readable, or TLS bytes already decrypted
and pending → ``loop_read``), the writer (paho has bytes queued → socket writable → ``loop_write``;
woken by paho's register-write callback and after everything we ask of paho) and the keepalive
(``loop_misc`` every second: PINGREQ, and a lost connection when PINGRESP is overdue). Any of them
seeing the connection fail raises :class:`SessionLost`, which ends the session.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
import trio
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

log = logging.getLogger("ocpp_lc.mqtt")

#: How often paho's timers run (keepalive pings, PINGRESP deadline).
MISC_INTERVAL_S = 1.0


class SessionLost(Exception):
    """The connection to the broker failed or was refused; ``reason`` says why in a few words."""

    def __init__(self, reason: str, outcome: str = "lost") -> None:
        super().__init__(reason)
        self.reason = reason
        #: For the connection-attempt counter: unreachable, timeout, tls, refused, lost.
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Broker:
    """Where and how to connect (the password is only ever handed to paho)."""

    host: str
    port: int
    client_id: str
    keepalive_s: int
    connect_timeout_s: float
    username: str | None = None
    password: str | None = None
    ssl_context: ssl.SSLContext | None = None
    will_topic: str | None = None
    will_payload: bytes = b""


MessageHandler = Callable[[str, bytes, bool], None]


class Session:
    """A connected client; :meth:`publish` and :meth:`subscribe` may be called from any trio task."""

    def __init__(self, client: paho.Client, on_message: MessageHandler, will: tuple[str, bytes] | None = None) -> None:
        self._client = client
        self._will = will
        self._sock: Any = client.socket()
        self._on_message = on_message
        self._kick = trio.Event()
        self._connack: trio.Event = trio.Event()
        self._refused: str | None = None
        self._lost: str | None = None
        client.on_connect = self._connected
        client.on_message = self._message
        client.on_disconnect = self._disconnected
        client.on_socket_register_write = lambda _client, _userdata, _sock: self._kick.set()
        client.on_socket_close = self._closing

    # --- paho's callbacks (on the trio thread, inside loop_read / loop_write / loop_misc) ----------

    def _connected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._connack.set()

    def _message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        try:
            self._on_message(message.topic, bytes(message.payload), bool(message.retain))
        except Exception:  # a handler bug must not take the session (or the appliance) down
            log.exception("MQTT: handling a message on %r failed", message.topic[:200])

    def _disconnected(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._lost = str(reason)

    def _closing(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Wake (with ClosedResourceError) any task waiting on this socket before paho closes it.
        trio.lowlevel.notify_closing(sock)

    # --- driving -----------------------------------------------------------------------------------

    def _check(self, rc: MQTTErrorCode) -> None:
        self._kick.set()
        if self._refused is not None:
            raise SessionLost(f"refused by the broker: {self._refused}", "refused")
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise SessionLost(paho.error_string(rc).rstrip("."))

    async def _read(self) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(self._sock)
            except trio.ClosedResourceError:
                raise SessionLost(self._lost or "connection closed") from None
            self._check(self._client.loop_read())
            # TLS: a record may hold more than paho read; those bytes never make the socket readable.
            pending = getattr(self._sock, "pending", None)
            while pending is not None and self._client.socket() is not None and pending() > 0:
                self._check(self._client.loop_read())

    async def _write(self) -> None:
        while True:
            if self._client.want_write():
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except trio.ClosedResourceError:
                    raise SessionLost(self._lost or "connection closed") from None
                self._check(self._client.loop_write())
            else:
                self._kick = trio.Event()
                if not self._client.want_write():
                    await self._kick.wait()

    async def _keepalive(self) -> None:
        while True:
            await trio.sleep(MISC_INTERVAL_S)
            self._check(self._client.loop_misc())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the session until it fails (SessionLost) or is cancelled; reports once CONNACK accepted it.

        Whatever ends it, the socket is closed on the way out. A cancelled session first publishes what
        the will says (``offline``) and sends DISCONNECT, within a second: after a clean DISCONNECT the
        broker drops the will, so the controller says it itself.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read)
                nursery.start_soon(self._write)
                nursery.start_soon(self._keepalive)
                await self._connack.wait()
                if self._refused is not None:
                    raise SessionLost(f"refused by the broker: {self._refused}", "refused")
                task_status.started()
        except* SessionLost as group:
            raise group.exceptions[0] from None
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self._goodbye()
            self._close()

    async def _goodbye(self) -> None:
        if self._client.socket() is None or self._lost is not None or not self._connack.is_set():
            return
        if self._will is not None:
            self._client.publish(self._will[0], self._will[1], qos=1, retain=True)
        self._client.disconnect()
        while self._client.want_write() and self._client.socket() is not None:
            await trio.lowlevel.wait_writable(self._sock)
            if self._client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def _close(self) -> None:
        if self._client.socket() is not None:
            trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1) -> None:
        """Queue a message; it leaves when the socket is writable (lost with the session if it fails)."""
        self._client.publish(topic, payload, qos=qos, retain=retain)
        self._kick.set()

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Queue a subscription (the broker then sends the topics' retained messages)."""
        self._client.subscribe(topic_filter, qos=qos)
        self._kick.set()


def new_client(broker: Broker) -> paho.Client:
    """A paho client for one attempt: MQTT 3.1.1, clean session, the will set, paho's retries off."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=broker.client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,
        reconnect_on_failure=False,
    )
    client.suppress_exceptions = True
    client.connect_timeout = broker.connect_timeout_s
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.ssl_context is not None:
        client.tls_set_context(broker.ssl_context)
    if broker.will_topic is not None:
        client.will_set(broker.will_topic, broker.will_payload, qos=1, retain=True)
    return client


async def connect(broker: Broker, on_message: MessageHandler) -> Session:
    """Open the TCP (and TLS) connection and send CONNECT; SessionLost if that fails in time.

    The CONNACK is awaited by :meth:`Session.run`.
    """
    client = new_client(broker)
    try:
        with trio.fail_after(broker.connect_timeout_s):
            await trio.to_thread.run_sync(
                client.connect, broker.host, broker.port, broker.keepalive_s, abandon_on_cancel=True
            )
    except trio.TooSlowError:
        raise SessionLost(f"no connection within {broker.connect_timeout_s:g} s", "timeout") from None
    except ssl.SSLError as error:
        raise SessionLost(f"TLS failed: {error.reason or error}", "tls") from None
    except (OSError, ValueError) as error:
        raise SessionLost(
            f"cannot connect: {error.strerror or error}" if isinstance(error, OSError) else str(error), "unreachable"
        ) from None
    will = None if broker.will_topic is None else (broker.will_topic, broker.will_payload)
    return Session(client, on_message, will)
