"""A minimal OCPP-J endpoint for the demo's simulated peers (stations and the sandbox CSMS).

Theory of operation: one task runs :meth:`RpcEndpoint.serve`, the only reader of the websocket. It
answers every incoming CALL at once from a table of synchronous handlers (a handler that needs to
send a call of its own afterwards schedules it in its owner's nursery), and hands every CALLRESULT or
CALLERROR to the caller waiting for it. Callers use :meth:`RpcEndpoint.call`, which keeps at most one
call of this endpoint outstanding (Part 4 §4.1.1): a second caller waits for the first to be answered.

This is demo scaffolding, not the router: the router relays frames byte-for-byte and never answers
calls itself, so none of this belongs in ``router/link.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import trio

from .. import ocppj
from ..ocppj import Envelope, FrameError, MessageType
from ..transport import ConnectionClosed, WebSocket

#: What a handler gets (the CALL's payload) and returns (the CALLRESULT's payload).
Handler = Callable[[dict[str, Any]], dict[str, Any]]
#: Sees every frame of a connection in order: ``("sent" | "received", text)``.
FrameHook = Callable[[str, str], None]

#: How long a call waits for its answer before the caller gives up.
DEFAULT_CALL_TIMEOUT_S: Final = 30.0


class RpcError(Exception):
    """Base of what :meth:`RpcEndpoint.call` raises."""


class EndpointClosed(RpcError):
    """The connection closed before the call was answered (or before it could be sent)."""


class CallTimedOut(RpcError):
    """No answer came in time."""


class CallError(RpcError):
    """A CALLERROR: raised by a handler to refuse a call, and by :meth:`RpcEndpoint.call` on receipt."""

    def __init__(self, code: str, description: str = "") -> None:
        super().__init__(f"{code}: {description}" if description else code)
        self.code = code
        self.description = description


@dataclass(slots=True)
class _Pending:
    message_id: str
    done: trio.Event
    reply: Envelope | None = None


class RpcEndpoint:
    """Both roles of OCPP-J on one websocket: answer calls, make calls one at a time."""

    def __init__(
        self,
        websocket: WebSocket,
        handlers: Mapping[str, Handler],
        *,
        on_frame: FrameHook | None = None,
        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        self._ws = websocket
        self._handlers = handlers
        self._on_frame = on_frame
        self._call_timeout_s = call_timeout_s
        self._call_lock = trio.Lock()
        self._pending: _Pending | None = None
        self._closed: ConnectionClosed | None = None

    async def _send(self, text: str) -> None:
        if self._on_frame is not None:
            self._on_frame("sent", text)  # before sending: the answer cannot be seen before its call
        await self._ws.send_text(text)

    async def call(self, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Send a CALL and return the CALLRESULT's payload.

        Raises :class:`CallError` for a CALLERROR, :class:`CallTimedOut`, or :class:`EndpointClosed`.
        """
        async with self._call_lock:
            if self._closed is not None:
                raise EndpointClosed(str(self._closed))
            pending = _Pending(str(uuid.uuid4()), trio.Event())
            self._pending = pending
            try:
                try:
                    await self._send(ocppj.encode_call(pending.message_id, action, payload))
                except ConnectionClosed as exc:
                    raise EndpointClosed(str(exc)) from None
                with trio.move_on_after(self._call_timeout_s):
                    await pending.done.wait()
            finally:
                self._pending = None
        reply = pending.reply
        if reply is None:
            if self._closed is not None:
                raise EndpointClosed(str(self._closed))
            raise CallTimedOut(f"{action} not answered within {self._call_timeout_s:g} s")
        if reply.message_type is MessageType.CALLERROR:
            raise CallError(reply.error_code or "GenericError", reply.error_description or "")
        result: dict[str, Any] = reply.payload
        return result

    async def serve(self) -> ConnectionClosed:
        """Read until the connection closes, answering calls and waking callers; return how it closed."""
        try:
            while True:
                try:
                    text = await self._ws.receive_text()
                except ConnectionClosed as closed:
                    self._closed = closed
                    return closed
                if self._on_frame is not None:
                    self._on_frame("received", text)
                try:
                    await self._dispatch(text)
                except ConnectionClosed:
                    continue  # the next read reports how the connection ended
        finally:
            if self._closed is None:
                self._closed = ConnectionClosed(1006, "endpoint stopped", by_peer=False)
            if self._pending is not None:
                self._pending.done.set()  # its caller sees no reply and a closed endpoint

    async def _dispatch(self, text: str) -> None:
        try:
            envelope = ocppj.parse_frame(text)
        except FrameError as exc:
            await self._send(ocppj.error_for(exc))
            return
        if envelope.message_type is not MessageType.CALL:
            pending = self._pending
            if pending is not None and pending.message_id == envelope.message_id:
                pending.reply = envelope
                pending.done.set()
            return  # an answer nobody waits for any more (timed out): dropped
        assert envelope.action is not None
        handler = self._handlers.get(envelope.action)
        if handler is None:
            reply = ocppj.encode_error(envelope.message_id, "NotImplemented", f"{envelope.action} is not supported")
        else:
            try:
                reply = ocppj.encode_result(envelope.message_id, handler(envelope.payload))
            except CallError as exc:
                reply = ocppj.encode_error(envelope.message_id, exc.code, exc.description)
            except (KeyError, TypeError, ValueError) as exc:
                # A payload missing what the handler reads: the sender's fault (Part 4 §4.3). The demo
                # counts CALLERRORs as errors, so a handler bug shows up in the summary all the same.
                reply = ocppj.encode_error(envelope.message_id, "FormatViolation", f"cannot read the payload: {exc!r}")
        await self._send(reply)
