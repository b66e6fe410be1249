"""One download attempt: fetch a firmware file into its partial file, resuming with Range.

The policy around attempts (how many, how long between them, which status to send) is the service's;
this module moves bytes and says how an attempt ended. A failed attempt raises :class:`DownloadError`
with a short ``reason`` (a metric label: ``unreachable``, ``http_4xx``, ``broken_transfer``,
``certificate`` for an https source that fails verification, ``too_large`` …) and a detail for the
log. Every failure costs one attempt of the request's budget, whatever its reason: the CSMS's
``retries`` says how often to try before giving up, and a 404 or a certificate can be mended at the
source between two attempts as well as a dropped connection can.

Resuming: when the partial file already holds bytes, the request asks for the rest with
``Range: bytes=<n>-`` and, if the source gave a validator before, ``If-Range`` with it, so a source
whose file changed answers with the whole new file (200) rather than the tail of it. A 206 must
start exactly at ``n``; a 200 means start over. Either way the MD5 over the whole file decides in the
end (L03.FR.02), so a source that lies about ranges cannot get a wrong file published.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger("ocpp_lc.firmware")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(Exception):
    """An attempt failed: ``reason`` is a bounded label (a metric's), ``detail`` says more for the log."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Progress:
    """The partial file's state: its bytes so far and the MD5 object fed with exactly those bytes."""

    digest: Any
    size_bytes: int
    #: The source's validator for these bytes (strong ETag, else Last-Modified), for If-Range.
    validator: str | None = None
    #: Set when the source started over: the partial file must be emptied before writing.
    truncate: bool = False

    def start_over(self, digest: Any) -> None:
        """Forget the bytes so far (``digest`` is a fresh MD5 object): the next write starts the file anew."""
        self.digest = digest
        self.size_bytes = 0
        self.validator = None
        self.truncate = True


@dataclass(frozen=True)
class Limits:
    """What one download may take: a size cap, and the room left in the disk budget."""

    max_file_bytes: int
    #: Bytes this download may still add to the cache directory (the disk budget minus everything else).
    budget_left_bytes: Callable[[], int]


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    partial: os.PathLike[str],
    progress: Progress,
    limits: Limits,
    new_digest: Callable[[], Any],
    on_bytes: Callable[[int], None],
) -> None:
    """Download ``url`` into ``partial`` from ``progress.size_bytes`` on, updating ``progress``.

    Returns when the source has sent the whole file. Raises :class:`DownloadError`; the partial file
    then holds every byte received so far (a later attempt resumes from there), except after a
    source's answer that invalidated it (a 200 to a Range request), when it holds the new bytes.
    """
    headers = {"Accept-Encoding": "identity"}  # the MD5 is over the file, not over a compressed form
    if progress.size_bytes:
        headers["Range"] = f"bytes={progress.size_bytes}-"
        if progress.validator:
            headers["If-Range"] = progress.validator
    try:
        async with client.stream("GET", url, headers=headers) as response:
            expected_total = _check_start(response, progress, new_digest)
            if expected_total is not None:
                _check_size(expected_total, progress.size_bytes, limits)
            if response.status_code == 416:
                return  # _check_start found the partial file already complete
            progress.validator = _validator(response)
            await _receive(response, partial, progress, limits, on_bytes)
    except httpx.ConnectError as error:
        tls_error = _tls_cause(error)
        if isinstance(tls_error, ssl.SSLCertVerificationError):
            detail = tls_error.verify_message or str(tls_error)
            raise DownloadError("certificate", f"{url} failed certificate verification: {detail}") from None
        if tls_error is not None:
            raise DownloadError("tls_error", f"TLS with {url} failed: {tls_error}") from None
        raise DownloadError("unreachable", str(error) or type(error).__name__) from None
    except httpx.TimeoutException as error:
        raise DownloadError("timeout", str(error) or type(error).__name__) from None
    except (httpx.RemoteProtocolError, httpx.ReadError) as error:
        raise DownloadError("broken_transfer", str(error) or type(error).__name__) from None
    except httpx.HTTPError as error:
        raise DownloadError("http_error", str(error) or type(error).__name__) from None


def _tls_cause(error: BaseException) -> ssl.SSLError | None:
    """The TLS error under an httpx error (httpx wraps it, and says nothing of it in its message)."""
    seen: BaseException | None = error
    for _ in range(10):  # the chain is short (httpx -> httpcore -> trio/anyio -> ssl); never loop on a cycle
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _check_start(response: httpx.Response, progress: Progress, new_digest: Callable[[], Any]) -> int | None:
    """Judge the status line; reset ``progress`` if the source starts over. Returns the total size if known."""
    status = response.status_code
    length = _int_header(response, "content-length")
    if status == 206 and progress.size_bytes:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None or int(match[1]) != progress.size_bytes:
            asked = progress.size_bytes
            progress.start_over(new_digest())  # this source cannot resume: the next attempt asks for the whole file
            raise DownloadError(
                "bad_range", f"asked for bytes {asked}- and got {response.headers.get('content-range')!r}"
            )
        return int(match[3]) if match[3] != "*" else None
    if status == 416 and progress.size_bytes:
        total = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("content-range", "").strip())
        if total is not None and int(total[1]) == progress.size_bytes:
            return progress.size_bytes  # we already hold every byte (the break came after the last one)
        progress.start_over(new_digest())
        raise DownloadError("bad_range", "the source refused to resume (416)")
    if status == 200:
        if progress.size_bytes:
            log.info("firmware cache: %s sent the whole file again instead of a range; starting over", response.url)
            progress.start_over(new_digest())
        return length
    raise DownloadError(f"http_{status // 100}xx", f"{response.url} answered {status}")


def _check_size(total_bytes: int, have_bytes: int, limits: Limits) -> None:
    if total_bytes > limits.max_file_bytes:
        raise DownloadError("too_large", f"the file has {total_bytes} bytes; the cap is {limits.max_file_bytes}")
    if total_bytes - have_bytes > limits.budget_left_bytes():
        raise DownloadError("disk_budget", f"{total_bytes} bytes do not fit into the cache's disk budget")


async def _receive(
    response: httpx.Response,
    partial: os.PathLike[str],
    progress: Progress,
    limits: Limits,
    on_bytes: Callable[[int], None],
) -> None:
    truncate, progress.truncate = progress.truncate, False
    try:
        # Plain writes, not a thread per chunk: a 64 KiB write into the page cache takes microseconds,
        # far less than a thread hop; the one blocking step (fsync) happens once, when publishing.
        with open(partial, "wb" if truncate else "ab") as file:  # noqa: ASYNC230
            file.truncate(progress.size_bytes)
            async for chunk in response.aiter_bytes():
                if progress.size_bytes + len(chunk) > limits.max_file_bytes:
                    raise DownloadError("too_large", f"more than the cap of {limits.max_file_bytes} bytes arrived")
                if len(chunk) > limits.budget_left_bytes():
                    raise DownloadError("disk_budget", "the cache's disk budget is used up")
                file.write(chunk)
                progress.digest.update(chunk)
                progress.size_bytes += len(chunk)
                on_bytes(len(chunk))
            file.flush()
    except OSError as error:
        raise DownloadError("disk_error", f"cannot write {partial}: {error.strerror or error}") from None


def _validator(response: httpx.Response) -> str | None:
    etag: str | None = response.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    last_modified: str | None = response.headers.get("last-modified")
    return last_modified


def _int_header(response: httpx.Response, name: str) -> int | None:
    value = response.headers.get(name, "")
    return int(value) if value.isdigit() else None
