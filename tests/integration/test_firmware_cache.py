"""The firmware cache against real HTTP sources on loopback (L03, L04), in-process.

Each test runs a :class:`FirmwareCache` on a real state store with its HTTP face (``serve_http``) on
port 0, and a firmware *source*: a raw trio HTTP/1.1 server on port 0 whose behaviour the test picks
byte for byte (honest, 404, a different file, closing mid-transfer, more bytes than the cap, holding
the response open), plain or behind TLS. The CSMS side is a recorder that validates every status
notification against the OCA schema and lets the test wait for a final status. The full path through
the own identity to an ``ocpp``-library CSMS is in ``tests/e2e/test_firmware.py``; https sources are
in ``test_firmware_https.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from firmware_cache import FirmwareCache, FirmwareSettings, RequestInvalid
from firmware_cache.model import FINAL_STATUSES
from router.http import build_http_app, serve_http
from router.store import Store
from tests.support.schemas import validate_call, validate_result

TIMEOUT_S = 10
FIRMWARE = bytes(range(256)) * 1024  # 256 KiB, several chunks
FIRMWARE_MD5 = hashlib.md5(FIRMWARE).hexdigest()
OTHER = b"not the firmware you are looking for" * 100


# -- the CSMS side -------------------------------------------------------------------------------


class Recorder:
    """Stands in for the own identity's outbox: keeps every status, schema-checked, in order."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def send(self, action: str, payload: dict[str, Any]) -> None:
        assert action == "PublishFirmwareStatusNotification"
        validate_call(action, payload)
        self.sent.append(payload)
        self._changed.set()
        self._changed = trio.Event()

    def statuses(self, request_id: int) -> list[str]:
        return [p["status"] for p in self.sent if p.get("requestId") == request_id]

    async def final(self, request_id: int) -> list[str]:
        """Wait until ``request_id`` has ended; return all its statuses."""
        while not FINAL_STATUSES & set(self.statuses(request_id)):
            await self._changed.wait()
        return self.statuses(request_id)


class CrashingRecorder(Recorder):
    """The controller dies the moment it would send ``status``: that status never leaves."""

    def __init__(self, status: str) -> None:
        super().__init__()
        self.status = status
        self.reached = trio.Event()

    async def send(self, action: str, payload: dict[str, Any]) -> None:
        if payload["status"] == self.status:
            self.reached.set()
            await trio.sleep_forever()  # cancelled with the cache: nothing after this point runs
        await super().send(action, payload)


# -- sources -------------------------------------------------------------------------------------


@dataclass
class Request:
    target: str
    headers: dict[str, str]
    #: When it arrived, on trio's clock (virtual seconds under a MockClock).
    at: float = field(default_factory=trio.current_time)


Behaviour = Callable[[trio.abc.Stream, Request, int], Awaitable[None]]


@dataclass
class Source:
    port: int
    requests: list[Request] = field(default_factory=list)
    scheme: str = "http"

    def url(self, name: str = "fw-1.2.3.bin", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}/files/{name}"


async def _read_request(stream: trio.abc.Stream) -> Request | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(head[0].split(" ")[1], headers)


@asynccontextmanager
async def source(behaviour: Behaviour, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Source]:
    """A raw HTTP server on 127.0.0.1:0: one request per connection, answered by ``behaviour``.

    With ``ssl_context`` (a server context holding the source's certificate) it speaks https.
    """
    tcp_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    found = Source(tcp_listeners[0].socket.getsockname()[1], scheme="https" if ssl_context else "http")
    listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
    if ssl_context is not None:
        listeners = [trio.SSLListener(listener, ssl_context, https_compatible=True) for listener in tcp_listeners]

    async def handle(stream: trio.abc.Stream) -> None:
        async with stream:
            try:
                request = await _read_request(stream)
            except trio.BrokenResourceError:
                return  # a TLS handshake failed: the client rejected our certificate
            if request is None:
                return
            found.requests.append(request)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):  # the controller hung up
                await behaviour(stream, request, len(found.requests))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield found
        nursery.cancel_scope.cancel()


def _head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def honest(body: bytes, etag: str = '"v1"') -> Behaviour:
    """Serves ``body`` with Range and If-Range, like a proper static server."""

    async def behave(stream: trio.abc.Stream, request: Request, number: int) -> None:
        ranged = re.fullmatch(r"bytes=(\d+)-", request.headers.get("range", ""))
        if_range = request.headers.get("if-range")
        if ranged and (if_range is None or if_range == etag):
            start = int(ranged[1])
            if start >= len(body):
                await stream.send_all(_head("416 Range Not Satisfiable", {"Content-Range": f"bytes */{len(body)}"}))
                return
            headers = {"Content-Length": str(len(body) - start), "ETag": etag}
            headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
            await stream.send_all(_head("206 Partial Content", headers) + body[start:])
            return
        await stream.send_all(_head("200 OK", {"Content-Length": str(len(body)), "ETag": etag}) + body)

    return behave


def cut_first(body: bytes, at: int) -> Behaviour:
    """The first transfer breaks after ``at`` bytes (the connection closes); later ones are honest."""
    rest = honest(body)

    async def behave(stream: trio.abc.Stream, request: Request, number: int) -> None:
        if number == 1:
            head = _head("200 OK", {"Content-Length": str(len(body)), "ETag": '"v1"'})
            await stream.send_all(head + body[:at])
            return
        await rest(stream, request, number)

    return behave


def always_cut(body: bytes, at: int) -> Behaviour:
    """Every transfer announces the whole ``body`` and breaks after ``at`` bytes (Range ignored)."""

    async def behave(stream: trio.abc.Stream, request: Request, number: int) -> None:
        await stream.send_all(_head("200 OK", {"Content-Length": str(len(body))}) + body[:at])

    return behave


def short_without_length(body: bytes, at: int, times: int = 1_000_000) -> Behaviour:
    """The first ``times`` answers carry no Content-Length and end after ``at`` bytes; later ones are honest.

    Without a length, the end of the connection is the end of the body (RFC 9112 §6.3): the
    controller cannot tell this from a whole file, only the MD5 can.
    """
    rest = honest(body)

    async def behave(stream: trio.abc.Stream, request: Request, number: int) -> None:
        if number <= times:
            await stream.send_all(_head("200 OK", {}) + body[:at])
            return
        await rest(stream, request, number)

    return behave


def status(code: str) -> Behaviour:
    async def behave(stream: trio.abc.Stream, request: Request, number: int) -> None:
        await stream.send_all(_head(code, {"Content-Length": "0"}))

    return behave


def endless(chunk: bytes = b"x" * 65536) -> Behaviour:
    """No Content-Length, bytes until the controller hangs up."""

    async def behave(stream: trio.abc.Stream, request: Request, number: int) -> None:
        await stream.send_all(_head("200 OK", {}))
        while True:
            await stream.send_all(chunk)

    return behave


def held(body: bytes, release: trio.Event, at: int, sent: trio.Event | None = None) -> Behaviour:
    """Sends ``at`` bytes (then sets ``sent``), waits for ``release``, sends the rest (first request only)."""
    rest = honest(body)

    async def behave(stream: trio.abc.Stream, request: Request, number: int) -> None:
        if number > 1:
            await rest(stream, request, number)
            return
        await stream.send_all(_head("200 OK", {"Content-Length": str(len(body)), "ETag": '"v1"'}) + body[:at])
        if sent is not None:
            sent.set()
        await release.wait()
        await stream.send_all(body[at:])

    return behave


# -- the cache ------------------------------------------------------------------------------------


@dataclass
class Cache:
    cache: FirmwareCache
    recorder: Recorder
    registry: CollectorRegistry
    http_port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def publish(self, location: str, checksum: str = FIRMWARE_MD5, request_id: int = 7, **extra: Any) -> dict[str, Any]:
        payload = {"location": location, "checksum": checksum, "requestId": request_id, **extra}
        validate_call("PublishFirmware", payload)
        answer = self.cache.publish(payload)
        validate_result("PublishFirmware", answer.payload)
        answer.sent()
        return answer.payload

    def unpublish(self, checksum: str) -> str:
        answer = self.cache.unpublish({"checksum": checksum})
        validate_result("UnpublishFirmware", answer)
        return str(answer["status"])


@asynccontextmanager
async def running_cache(
    tmp_path: Path, *, recorder: Recorder | None = None, public_base: str | None = "", **overrides: Any
) -> AsyncIterator[Cache]:
    settings = FirmwareSettings(cache_dir=tmp_path / "firmware", **{"default_retry_interval_s": 0.0, **overrides})
    registry = CollectorRegistry()
    recorder = recorder or Recorder()
    with Store.open(tmp_path / "state") as store:
        async with trio.open_nursery() as nursery:
            cache = FirmwareCache(settings, state=store.namespace("firmware"), notifier=recorder, registry=registry)
            await nursery.start(cache.run)
            app = build_http_app(registry, lambda: (True, {}), cache.routes())
            port = await nursery.start(serve_http, app, "127.0.0.1", 0)
            cache.public_base_url = f"http://127.0.0.1:{port}" if public_base == "" else public_base
            yield Cache(cache, recorder, registry, port)
            nursery.cancel_scope.cancel()


async def fetch_bytes(url: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(url, headers=headers)


async def raw_get(port: int, target: str) -> bytes:
    """The status line a request for exactly ``target`` gets (httpx would normalise '../' away)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n" not in data and (chunk := await stream.receive_some(65536)):
            data += chunk
    return data.split(b"\r\n", 1)[0]


SUCCESS = ["Downloading", "Downloaded", "ChecksumVerified", "Published"]


# -- L03 success, serving -------------------------------------------------------------------------


async def test_publish_downloads_verifies_and_serves_the_file_with_one_request_id(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path) as fw:
            assert fw.publish(src.url(), request_id=42) == {"status": "Accepted"}
            assert await fw.recorder.final(42) == SUCCESS  # TC_L_17
            published = fw.recorder.sent[-1]
            url = f"{fw.base}/firmware/{FIRMWARE_MD5}/fw-1.2.3.bin"
            assert published["location"] == [url]  # L03.FR.04
            assert all(p["requestId"] == 42 for p in fw.recorder.sent)
            response = await fetch_bytes(url)
            assert response.status_code == 200
            assert hashlib.md5(response.content).hexdigest() == FIRMWARE_MD5
            assert fw.metric("ocpp_lc_firmware_downloaded_bytes_total") == len(FIRMWARE)
            assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="published") == 1
            assert fw.metric("ocpp_lc_firmware_cached_files") == 1
            assert fw.metric("ocpp_lc_firmware_cached_bytes") == len(FIRMWARE)
            assert fw.metric("ocpp_lc_firmware_served_bytes_total") == len(FIRMWARE)
            # Nothing partial is left behind.
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []


async def test_files_are_served_with_range_if_range_etag_and_head(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url())
            await fw.recorder.final(7)
            url = fw.recorder.sent[-1]["location"][0]
            async with httpx.AsyncClient(trust_env=False) as client:
                head = await client.head(url)
                assert head.status_code == 200 and head.content == b""
                assert head.headers["content-length"] == str(len(FIRMWARE))
                assert head.headers["etag"] == f'"{FIRMWARE_MD5}"'
                assert head.headers["accept-ranges"] == "bytes"
                part = await client.get(url, headers={"Range": "bytes=1000-1999"})
                assert part.status_code == 206 and part.content == FIRMWARE[1000:2000]
                resumed = await client.get(url, headers={"Range": "bytes=1000-", "If-Range": f'"{FIRMWARE_MD5}"'})
                assert resumed.status_code == 206 and resumed.content == FIRMWARE[1000:]
                changed = await client.get(url, headers={"Range": "bytes=1000-", "If-Range": '"something-else"'})
                assert changed.status_code == 200 and changed.content == FIRMWARE
                beyond = await client.get(url, headers={"Range": f"bytes={len(FIRMWARE) + 10}-"})
                assert beyond.status_code == 416
                assert beyond.headers["content-range"] == f"bytes */{len(FIRMWARE)}"
            assert fw.metric("ocpp_lc_firmware_http_responses_total", code="416") == 1
            assert fw.metric("ocpp_lc_firmware_http_responses_total", code="206") == 2


@pytest.mark.parametrize("value", ["items=0-99", "lines=2-3", "0-99", "Bytes0-99"])
async def test_a_range_in_a_unit_we_do_not_know_is_ignored_and_the_whole_file_served(
    tmp_path: Path, value: str
) -> None:
    # RFC 9110 §14.2: a server must ignore a Range field whose range unit it does not understand.
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url())
            await fw.recorder.final(7)
            url = fw.recorder.sent[-1]["location"][0]
            response = await fetch_bytes(url, Range=value)
            assert response.status_code == 200
            assert "content-range" not in response.headers
            assert response.content == FIRMWARE
            # A byte range still works beside it, and a malformed one in bytes is still refused.
            assert (await fetch_bytes(url, Range="BYTES=0-9")).content == FIRMWARE[:10]
            assert (await fetch_bytes(url, Range="bytes=abc")).status_code == 400
            assert fw.metric("ocpp_lc_firmware_http_responses_total", code="200") == 1


@pytest.mark.parametrize(
    "target",
    [
        "/firmware/{md5}/../../state/state.sqlite3",
        "/firmware/{md5}/%2e%2e/%2e%2e/state/state.sqlite3",
        "/firmware/{md5}/..%2F..%2Fstate%2Fstate.sqlite3",
        "/firmware/{md5}/%2e%2e%2f%2e%2e%2fstate%2fstate.sqlite3",
        "/firmware/../state/state.sqlite3",
        "/firmware/{md5}/other-name.bin",
        "/firmware/00000000000000000000000000000000/fw-1.2.3.bin",
        "/firmware/{upper}/fw-1.2.3.bin",
        "/firmware/{md5}/",
        "/firmware/partial/{md5}.part",
    ],
)
async def test_paths_never_leave_the_cache_and_unknown_files_are_404(tmp_path: Path, target: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url())
            await fw.recorder.final(7)
            status_line = await raw_get(fw.http_port, target.format(md5=FIRMWARE_MD5, upper=FIRMWARE_MD5.upper()))
            assert status_line.startswith(b"HTTP/1.1 404"), status_line
            # The genuine URL still works.
            assert (await raw_get(fw.http_port, f"/firmware/{FIRMWARE_MD5}/fw-1.2.3.bin")).startswith(b"HTTP/1.1 200")


# -- resuming ---------------------------------------------------------------------------------


async def test_a_transfer_broken_halfway_resumes_with_range_and_verifies(tmp_path: Path) -> None:
    half = len(FIRMWARE) // 2
    with trio.fail_after(TIMEOUT_S):
        async with source(cut_first(FIRMWARE, half)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), retries=2, retryInterval=0)
            statuses = await fw.recorder.final(7)
            assert statuses == ["Downloading", "DownloadPaused", "Downloading", *SUCCESS[1:]]
            assert len(src.requests) == 2
            assert src.requests[1].headers["range"] == f"bytes={half}-"
            assert src.requests[1].headers["if-range"] == '"v1"'
            # Only the missing half came the second time.
            assert fw.metric("ocpp_lc_firmware_downloaded_bytes_total") == len(FIRMWARE)
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="broken_transfer") == 1
            response = await fetch_bytes(fw.recorder.sent[-1]["location"][0])
            assert hashlib.md5(response.content).hexdigest() == FIRMWARE_MD5


async def settle() -> None:
    """Until every task (the source's, the controller's) waits: bytes sent on loopback have arrived."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)


async def test_a_restart_in_the_middle_of_a_download_resumes_it(tmp_path: Path) -> None:
    release, sent = trio.Event(), trio.Event()  # release never set: the transfer hangs until the controller stops
    with trio.fail_after(TIMEOUT_S):
        async with source(held(FIRMWARE, release, 100_000, sent)) as src:
            async with running_cache(tmp_path) as fw:
                fw.publish(src.url(), request_id=9)
                await sent.wait()
                await settle()
                assert fw.metric("ocpp_lc_firmware_downloaded_bytes_total") == 100_000
                recorder = fw.recorder
            assert recorder.statuses(9) == ["Downloading"]
            # Started again on the same state: the job resumes from the partial file.
            async with running_cache(tmp_path, recorder=recorder) as again:
                statuses = await again.recorder.final(9)
                assert statuses == ["Downloading", "Downloading", *SUCCESS[1:]]
                assert src.requests[-1].headers["range"] == "bytes=100000-"
                response = await fetch_bytes(again.recorder.sent[-1]["location"][0])
                assert hashlib.md5(response.content).hexdigest() == FIRMWARE_MD5


async def test_a_download_interrupted_by_a_restart_that_cannot_resume_ends_in_download_failed(
    tmp_path: Path,
) -> None:
    release, sent = trio.Event(), trio.Event()
    with trio.fail_after(TIMEOUT_S):
        async with source(held(FIRMWARE, release, 1000, sent)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), request_id=11, retries=0)
            await sent.wait()
            await settle()
            assert fw.metric("ocpp_lc_firmware_downloaded_bytes_total") == 1000
            recorder = fw.recorder
        # The source is gone when the controller comes back.
        async with running_cache(tmp_path, recorder=recorder) as again:
            assert await again.recorder.final(11) == ["Downloading", "Downloading", "DownloadFailed"]
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []
            assert again.cache.trigger_payload() == {"status": "DownloadFailed", "requestId": 11}


async def test_a_crash_after_indexing_before_published_was_sent_sends_it_at_restart(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src:
            crashing = CrashingRecorder("Published")
            async with running_cache(tmp_path, recorder=crashing) as fw:
                fw.publish(src.url(), request_id=12)
                await crashing.reached.wait()
            assert crashing.statuses(12) == SUCCESS[:-1]  # the CSMS never heard Published
            async with running_cache(tmp_path) as again:
                # L03.FR.09: published, so the CSMS hears it, with where (L03.FR.04), once back.
                assert await again.recorder.final(12) == ["Published"]
                url = f"{again.base}/firmware/{FIRMWARE_MD5}/fw-1.2.3.bin"
                assert again.recorder.sent[-1]["location"] == [url]
                assert (await fetch_bytes(url)).content == FIRMWARE
                assert len(src.requests) == 1  # nothing was downloaded again
                assert again.cache.trigger_payload() == {"status": "Idle"}  # L03.FR.10
            # Once said, it is not said again at the next start.
            async with running_cache(tmp_path) as third:
                await settle()
                assert third.recorder.sent == []
                assert set(third.cache.published()) == {FIRMWARE_MD5}


async def test_a_crash_after_the_file_was_moved_into_place_before_it_was_indexed_publishes_it(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src:
            crashing = CrashingRecorder("Published")
            async with running_cache(tmp_path, recorder=crashing) as fw:
                fw.publish(src.url(), request_id=13)
                await crashing.reached.wait()
            # What a crash one step earlier leaves: the verified file in place, the job, no index entry.
            with Store.open(tmp_path / "state") as store:
                assert store.namespace("firmware").delete(f"file:{FIRMWARE_MD5}")
            async with running_cache(tmp_path) as again:
                assert await again.recorder.final(13) == ["Published"]
                assert (await fetch_bytes(again.recorder.sent[-1]["location"][0])).content == FIRMWARE
                assert len(src.requests) == 1  # the file was checked, not fetched again


async def test_published_files_survive_a_restart_after_their_md5_is_checked_again(tmp_path: Path) -> None:
    other = b"second firmware" * 1000
    other_md5 = hashlib.md5(other).hexdigest()
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, source(honest(other)) as src2, running_cache(tmp_path) as fw:
            fw.publish(src.url(), request_id=1)
            fw.publish(src2.url("other.bin"), checksum=other_md5, request_id=2)
            await fw.recorder.final(1)
            await fw.recorder.final(2)
        # Damage one file while the controller is down.
        damaged = tmp_path / "firmware" / "files" / other_md5
        damaged.write_bytes(b"bit rot")
        async with running_cache(tmp_path) as again:
            assert set(again.cache.published()) == {FIRMWARE_MD5}
            good = await fetch_bytes(f"{again.base}/firmware/{FIRMWARE_MD5}/fw-1.2.3.bin")
            assert good.status_code == 200 and hashlib.md5(good.content).hexdigest() == FIRMWARE_MD5
            bad = await fetch_bytes(f"{again.base}/firmware/{other_md5}/other.bin")
            assert bad.status_code == 404
            assert not damaged.exists()
            assert again.metric("ocpp_lc_firmware_dropped_at_start_total") == 1
            assert again.metric("ocpp_lc_firmware_cached_files") == 1


# -- L04 ------------------------------------------------------------------------------------------


async def test_unpublish_answers_unpublished_no_firmware_and_download_ongoing(tmp_path: Path) -> None:
    big = bytes(range(256)) * 32 * 1024  # 8 MiB: more than loopback socket buffers hold
    big_md5 = hashlib.md5(big).hexdigest()
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(big)) as src, running_cache(tmp_path) as fw:
            assert fw.unpublish(big_md5) == "NoFirmware"  # TC_L_22, L04.FR.03
            assert fw.unpublish("not-an-md5") == "NoFirmware"
            fw.publish(src.url(), checksum=big_md5)
            await fw.recorder.final(7)
            # A station reads the first bytes, then stalls with the transfer open.
            stream = await trio.open_tcp_stream("127.0.0.1", fw.http_port)
            async with stream:
                request = f"GET /firmware/{big_md5}/fw-1.2.3.bin HTTP/1.1\r\nHost: x\r\n\r\n"
                await stream.send_all(request.encode())
                assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
                assert fw.metric("ocpp_lc_firmware_station_downloads") == 1
                assert fw.unpublish(big_md5.upper()) == "DownloadOngoing"  # TC_L_23, L04.FR.04
                # Still served to others meanwhile.
                assert (await fetch_bytes(f"{fw.base}/firmware/{big_md5}/fw-1.2.3.bin")).status_code == 200
            # The station went away: its transfer ends, and the file can go.
            await settle()
            assert fw.metric("ocpp_lc_firmware_station_downloads") == 0
            assert fw.unpublish(big_md5) == "Unpublished"  # TC_L_21, L04.FR.01/02
            assert not (tmp_path / "firmware" / "files" / big_md5).exists()
            assert (await fetch_bytes(f"{fw.base}/firmware/{big_md5}/fw-1.2.3.bin")).status_code == 404
            assert fw.metric("ocpp_lc_firmware_cached_files") == 0
            assert fw.metric("ocpp_lc_firmware_cached_bytes") == 0
            assert fw.unpublish(big_md5) == "NoFirmware"


async def test_unpublish_during_the_controllers_own_download_stops_it_and_nothing_is_published(
    tmp_path: Path,
) -> None:
    release, sent = trio.Event(), trio.Event()
    with trio.fail_after(TIMEOUT_S):
        async with source(held(FIRMWARE, release, 100_000, sent)) as src:
            async with running_cache(tmp_path) as fw:
                fw.publish(src.url(), request_id=31)
                await sent.wait()  # the controller is downloading: nothing is published yet
                # L04.FR.03: there is no published file. The download is stopped, so none will be.
                assert fw.unpublish(FIRMWARE_MD5) == "NoFirmware"
                release.set()  # the source would now send the rest
                # L03.FR.01: the process left Downloading; it is over, nothing published: Idle.
                assert await fw.recorder.final(31) == ["Downloading", "Idle"]
                await settle()
                assert fw.recorder.statuses(31) == ["Downloading", "Idle"]  # and never Published
                assert fw.cache.published() == {}
                assert list((tmp_path / "firmware" / "partial").iterdir()) == []
                assert list((tmp_path / "firmware" / "files").iterdir()) == []
                response = await fetch_bytes(f"{fw.base}/firmware/{FIRMWARE_MD5}/fw-1.2.3.bin")
                assert response.status_code == 404
                assert fw.cache.trigger_payload() == {"status": "Idle"}
                assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="unpublished") == 1
                assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="published") == 0
                recorder = fw.recorder
            # The stopped job is not resumed by a restart either.
            async with running_cache(tmp_path, recorder=recorder) as again:
                await settle()
                assert recorder.statuses(31) == ["Downloading", "Idle"]
                assert again.cache.published() == {}
                # A new PublishFirmware for the same file is a new process, and it publishes.
                assert again.publish(src.url(), request_id=32) == {"status": "Accepted"}
                assert await again.recorder.final(32) == SUCCESS


async def test_unpublish_before_the_first_status_stops_the_process_silently(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path) as fw:
            payload = {"location": src.url(), "checksum": FIRMWARE_MD5, "requestId": 33}
            answer = fw.cache.publish(payload)  # Accepted, but not yet written to the CSMS
            assert fw.unpublish(FIRMWARE_MD5) == "NoFirmware"
            answer.sent()
            assert await fw.recorder.final(33) == ["Idle"]
            await settle()
            assert fw.recorder.statuses(33) == ["Idle"]
            assert src.requests == [] and fw.cache.published() == {}


async def test_trigger_message_gives_idle_after_published_and_else_the_last_status(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            source(honest(FIRMWARE)) as src,
            source(status("404 Not Found")) as missing,
            running_cache(tmp_path) as fw,
        ):
            assert fw.cache.trigger_payload() == {"status": "Idle"}
            fw.publish(src.url(), request_id=3)
            await fw.recorder.final(3)
            assert fw.cache.trigger_payload() == {"status": "Idle"}  # L03.FR.10
            fw.publish(missing.url(), checksum="0" * 32, request_id=4)
            await fw.recorder.final(4)
            assert fw.cache.trigger_payload() == {"status": "DownloadFailed", "requestId": 4}  # L03.FR.11
            validate_call("PublishFirmwareStatusNotification", fw.cache.trigger_payload())


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("checksum", "location", "reason"),
    [
        ("abc", "http://127.0.0.1:1/fw.bin", "InvalidChecksum"),
        ("z" * 32, "http://127.0.0.1:1/fw.bin", "InvalidChecksum"),
        (FIRMWARE_MD5, "ftp://127.0.0.1/fw.bin", "UnsupportedScheme"),
        (FIRMWARE_MD5, "file:///etc/passwd", "UnsupportedScheme"),
        (FIRMWARE_MD5, "http:///no-host", "InvalidURL"),
        (FIRMWARE_MD5, "http://127.0.0.1:99999/fw.bin", "InvalidURL"),
    ],
)
async def test_unusable_requests_are_rejected_with_a_reason_and_counted(
    tmp_path: Path, checksum: str, location: str, reason: str
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_cache(tmp_path) as fw:
            answer = fw.publish(location, checksum=checksum)
            assert answer["status"] == "Rejected"
            assert answer["statusInfo"]["reasonCode"] == reason
            assert fw.metric("ocpp_lc_firmware_requests_rejected_total", reason=reason) == 1
            assert fw.recorder.sent == []


async def test_a_payload_that_breaks_the_schema_is_a_call_error(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_cache(tmp_path) as fw:
            with pytest.raises(RequestInvalid) as too_long:
                fw.cache.publish({"location": "http://x/f", "checksum": "a" * 33, "requestId": 1})
            assert too_long.value.code == "PropertyConstraintViolation"
            with pytest.raises(RequestInvalid) as missing:
                fw.cache.publish({"location": "http://x/f", "checksum": "a" * 32})
            assert missing.value.code == "OccurrenceConstraintViolation"
            with pytest.raises(RequestInvalid):
                fw.cache.unpublish({"checksum": 5})


async def test_publishing_needs_a_public_url(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_cache(tmp_path, public_base=None) as fw:
            answer = fw.publish("http://127.0.0.1:1/fw.bin")
            assert (answer["status"], answer["statusInfo"]["reasonCode"]) == ("Rejected", "NoPublicURL")


async def test_an_unreachable_host_is_retried_then_download_failed(tmp_path: Path) -> None:
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there any more: connection refused
    with trio.fail_after(TIMEOUT_S):
        async with running_cache(tmp_path) as fw:
            fw.publish(f"http://127.0.0.1:{port}/fw.bin", retries=1, retryInterval=0)
            statuses = await fw.recorder.final(7)
            assert statuses == ["Downloading", "DownloadPaused", "Downloading", "DownloadFailed"]  # TC_L_24
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="unreachable") == 2
            assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="download_failed") == 1


async def test_a_server_error_is_retried(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(status("503 Service Unavailable")) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), retries=2, retryInterval=0)
            statuses = await fw.recorder.final(7)
            assert statuses[-1] == "DownloadFailed" and len(src.requests) == 3


async def test_a_different_file_is_invalid_checksum_and_not_served(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(OTHER)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), retries=0)
            assert await fw.recorder.final(7) == ["Downloading", "Downloaded", "InvalidChecksum"]  # TC_L_19
            assert fw.cache.published() == {}
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []
            response = await fetch_bytes(f"{fw.base}/firmware/{FIRMWARE_MD5}/fw-1.2.3.bin")
            assert response.status_code == 404
            assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="invalid_checksum") == 1


async def test_more_bytes_than_the_size_cap_fail_the_download(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(endless()) as src, running_cache(tmp_path, max_file_bytes=200_000) as fw:
            fw.publish(src.url(), retries=1)
            # Like every failure, it costs one attempt of the request's (test_firmware_retries.py).
            assert await fw.recorder.final(7) == ["Downloading", "DownloadPaused", "Downloading", "DownloadFailed"]
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="too_large") == 2
            assert fw.metric("ocpp_lc_firmware_downloaded_bytes_total") <= 2 * 200_000
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []


async def test_a_declared_size_over_the_cap_fails_before_any_byte_is_stored(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path, max_file_bytes=1024) as fw:
            fw.publish(src.url(), retries=0)
            assert await fw.recorder.final(7) == ["Downloading", "DownloadFailed"]
            assert fw.metric("ocpp_lc_firmware_downloaded_bytes_total") == 0


async def test_a_full_disk_budget_fails_the_download_and_keeps_the_cache_consistent(tmp_path: Path) -> None:
    other = b"x" * 100_000
    with trio.fail_after(TIMEOUT_S):
        async with (
            source(honest(other)) as first,
            source(honest(FIRMWARE)) as second,
            running_cache(tmp_path, disk_budget_bytes=300_000) as fw,
        ):
            fw.publish(first.url("a.bin"), checksum=hashlib.md5(other).hexdigest(), request_id=1)
            assert (await fw.recorder.final(1))[-1] == "Published"
            # 100 000 bytes used, 262 144 more do not fit into 300 000.
            fw.publish(second.url(), request_id=2, retries=0)
            assert await fw.recorder.final(2) == ["Downloading", "DownloadFailed"]
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="disk_budget") == 1
            assert set(fw.cache.published()) == {hashlib.md5(other).hexdigest()}
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []


async def test_a_file_system_that_refuses_writes_fails_the_download(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path) as fw:
            # What the partial file's path leads to cannot be written (as with ENOSPC or EIO).
            (tmp_path / "firmware" / "partial" / f"{FIRMWARE_MD5}.part").mkdir()
            fw.publish(src.url(), retries=1)
            assert await fw.recorder.final(7) == ["Downloading", "DownloadPaused", "Downloading", "DownloadFailed"]
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="disk_error") == 2
            assert fw.cache.published() == {}


async def test_a_second_publish_of_the_same_file_while_the_first_runs_is_rejected(tmp_path: Path) -> None:
    release = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        async with source(held(FIRMWARE, release, 1000)) as src, running_cache(tmp_path) as fw:
            assert fw.publish(src.url(), request_id=1)["status"] == "Accepted"
            second = fw.publish(src.url(), request_id=2)
            assert (second["status"], second["statusInfo"]["reasonCode"]) == ("Rejected", "AlreadyInProgress")
            release.set()
            assert await fw.recorder.final(1) == SUCCESS
            assert fw.recorder.statuses(2) == []
            # Once published, publishing it again is accepted and ends Published at once.
            assert fw.publish(src.url(), request_id=3)["status"] == "Accepted"
            assert (await fw.recorder.final(3))[-1] == "Published"


async def test_a_url_too_long_to_announce_is_publish_failed(tmp_path: Path) -> None:
    base = "http://192.0.2.1:8080/" + "p" * 470
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE)) as src, running_cache(tmp_path, public_base=base) as fw:
            fw.publish(src.url())
            assert await fw.recorder.final(7) == ["Downloading", "Downloaded", "ChecksumVerified", "PublishFailed"]
            assert fw.cache.published() == {}
            assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="publish_failed") == 1
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []
