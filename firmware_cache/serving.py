"""Serving published files to stations: ``GET|HEAD /firmware/<md5>/<name>`` with Range, If-Range and ETag.

The transfer itself is Starlette's :class:`~starlette.responses.FileResponse` (it streams 64 KiB
chunks from the file, never the whole file in memory, and answers Range, If-Range and HEAD; a bad
range gets 416, a malformed one 400). What this module adds:

* **Lookup, not paths.** The URL's MD5 is looked up in the cache's index and the file name must be
  the one published with it; the path served comes from the index alone. ``../``, ``%2e%2e``,
  encoded slashes (the server decodes ``%2F`` into ``/``, which the route's ``{name}`` never
  matches) and unknown files all end in 404.
* **Who is downloading.** :class:`StationDownloads` counts transfers in progress per file, from the
  moment the request is looked up until the last byte has gone (or the client went away), so that
  UnpublishFirmware can answer DownloadOngoing (L04.FR.04) and never deletes a file under a reader.
* **ETag = the MD5** (strong, content-based): a station that resumes with If-Range gets the rest of
  the same file even across a restart of the controller, when the file's mtime has changed.
* **Range units.** A Range field in a unit other than ``bytes`` (or with no unit at all) is dropped
  before Starlette sees it, so the whole file is served with 200, as RFC 9110 §14.2 requires of a
  server that does not understand the unit; Starlette alone would answer 400.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Final

from starlette.responses import FileResponse, JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import Message, Receive, Scope, Send

from .metrics import FirmwareMetrics

log = logging.getLogger("ocpp_lc.firmware")

#: The URL path under which files are served.
ROUTE_PATH: Final = "/firmware/{md5}/{name}"
#: Status labels kept apart in the metric; anything else is counted as "other".
_STATUS_LABELS: Final = frozenset({200, 206, 304, 400, 404, 405, 412, 416, 500})

#: Finds a published file: (path on disk, published name) for an MD5, or None.
Lookup = Callable[[str], tuple[Path, str] | None]


def _foreign_range(name: bytes, value: bytes) -> bool:
    """Whether a header is a Range field whose unit is not ``bytes`` (RFC 9110 §14.2: ignore it)."""
    if name.lower() != b"range":
        return False
    unit, equals, _ = value.partition(b"=")
    return not equals or unit.strip().lower() != b"bytes"


class StationDownloads:
    """Transfers to stations in progress, per MD5."""

    def __init__(self, metrics: FirmwareMetrics) -> None:
        self._active: Counter[str] = Counter()
        self._metrics = metrics

    def active(self, md5: str) -> int:
        """How many transfers of ``md5`` are in progress."""
        return self._active[md5]

    def total(self) -> int:
        """How many transfers are in progress in all."""
        return sum(self._active.values())

    def begin(self, md5: str) -> None:
        self._active[md5] += 1
        self._metrics.station_downloads.inc()

    def end(self, md5: str) -> None:
        self._active[md5] -= 1
        if self._active[md5] <= 0:
            del self._active[md5]
        self._metrics.station_downloads.dec()


class FirmwareFiles:
    """The ASGI endpoint behind :data:`ROUTE_PATH`."""

    def __init__(self, lookup: Lookup, downloads: StationDownloads, metrics: FirmwareMetrics) -> None:
        self._lookup = lookup
        self._downloads = downloads
        self._metrics = metrics

    def routes(self) -> list[BaseRoute]:
        """The routes to hand to the HTTP face."""
        return [Route(ROUTE_PATH, self, methods=["GET", "HEAD"])]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope.get("path_params", {})
        md5, name = str(params.get("md5", "")), str(params.get("name", ""))
        found = self._lookup(md5)
        if found is None or found[1] != name:
            log.info("firmware cache: %s %s: no such published file", scope.get("method"), scope.get("path", "")[:200])
            self._metrics.http_responses.labels("404").inc()
            await JSONResponse({"error": "not found"}, status_code=404)(scope, receive, send)
            return
        path, _ = found
        metrics = self._metrics

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                metrics.http_responses.labels(str(status) if status in _STATUS_LABELS else "other").inc()
            elif message["type"] == "http.response.body":
                metrics.served_bytes.inc(len(message.get("body", b"")))
            await send(message)

        response = FileResponse(
            path,
            media_type="application/octet-stream",
            headers={"etag": f'"{md5}"', "cache-control": "public, max-age=86400, immutable"},
        )
        # Starlette runs a file transfer beside a wait for the client's disconnect unless the server
        # speaks ASGI 2.4; under hypercorn (2.1) that wait outlived the transfer, and a station that
        # had finished looked as if it were still downloading (L04 would answer DownloadOngoing). A
        # client that goes away is noticed by the send failing or being dropped, which ends the loop.
        scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.4"}}
        scope["headers"] = [(key, value) for key, value in scope.get("headers", []) if not _foreign_range(key, value)]
        self._downloads.begin(md5)
        try:
            await response(scope, receive, counting_send)
        finally:
            self._downloads.end(md5)
