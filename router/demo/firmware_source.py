"""The vendor's download server for the demo: one firmware file over plain HTTP on loopback.

The sandbox CSMS tells the controller to publish this file (PublishFirmware, L03); the controller's
firmware cache fetches it from here, and stations then download it from the controller, never from
here. It is deliberately tiny (HTTP/1.1, GET and HEAD of one path, ``Connection: close``): the demo
needs a source outside the controller, not a web server.
"""

from __future__ import annotations

import hashlib
import logging
import random
from functools import partial
from typing import Final

import trio

log = logging.getLogger("ocpp_lc.demo.firmware_source")

#: A request head larger than this is not from an HTTP client the demo knows.
MAX_HEAD_BYTES: Final = 8192
REQUEST_TIMEOUT_S: Final = 10.0
DEFAULT_SIZE_BYTES: Final = 256 * 1024


class FirmwareSource:
    """Serves ``name`` (``size_bytes`` of seeded random bytes); ``port = await nursery.start(source.serve)``."""

    def __init__(self, name: str, *, seed: int = 0, size_bytes: int = DEFAULT_SIZE_BYTES) -> None:
        self.name = name
        self.content = random.Random(f"{seed}-firmware").randbytes(size_bytes)
        self.md5 = hashlib.md5(self.content, usedforsecurity=False).hexdigest()
        self.port = 0
        #: Complete GETs of the file (the controller fetching it to publish).
        self.downloads = 0

    def url(self) -> str:
        """Where the file is (valid once serving)."""
        return f"http://127.0.0.1:{self.port}/{self.name}"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 (a free port) until cancelled; report the port once listening."""
        async with trio.open_nursery() as nursery:
            listeners: list[trio.SocketListener] = await nursery.start(
                partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                head = await _read_head(stream)
                if head is not None:
                    await self._answer(stream, head)
        except trio.BrokenResourceError:
            pass  # the client went away: nothing to answer
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream, head: bytes) -> None:
        method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0]
        if method not in ("GET", "HEAD"):
            await stream.send_all(_response(405, b"only GET and HEAD\n", head_only=False))
        elif path != f"/{self.name}":
            await stream.send_all(_response(404, b"no such file\n", head_only=method == "HEAD"))
        else:
            await stream.send_all(_response(200, self.content, head_only=method == "HEAD"))
            if method == "GET":
                self.downloads += 1
                log.info("firmware source: %s fetched", self.name)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request line and headers, or None if the client sent something else."""
    received = bytearray()
    while b"\r\n\r\n" not in received:
        if len(received) > MAX_HEAD_BYTES:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        received += chunk
    return bytes(received)


def _response(status: int, body: bytes, *, head_only: bool) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body
