"""FirmwareCache: the L03/L04 state machine, the index that survives restarts, and the jobs that download.

Theory of operation. The wiring hands the cache a :class:`KeyValue` (its index), a :class:`Notifier`
(the own identity's durable outbox) and a registry; it routes the CSMS's PublishFirmware and
UnpublishFirmware on the controller's own identity to :meth:`FirmwareCache.publish` and
:meth:`FirmwareCache.unpublish`, TriggerMessage(PublishFirmwareStatusNotification) to
:meth:`FirmwareCache.trigger_payload`, and serves :meth:`FirmwareCache.routes` on the HTTP face.
:meth:`FirmwareCache.run` owns a nursery in which every download runs.

A PublishFirmware is answered at once (L03.FR.05): Rejected with a reason for a checksum that is no
MD5, a location we do not fetch, a file already being published, or no public URL to publish at;
otherwise Accepted, and a job is stored (``job:<md5>``) and started. The job waits until the answer
has been written (the wiring calls :meth:`PublishAnswer.sent`), so the CSMS sees the answer before
the first status, then runs::

    Downloading ─┬─▶ Downloaded ─┬─▶ ChecksumVerified ─┬─▶ Published (location: every URL)
                 │               └─▶ InvalidChecksum    └─▶ PublishFailed
                 ├─▶ DownloadPaused ─▶ Downloading …   (a failed attempt with attempts left)
                 └─▶ DownloadFailed                    (no attempts left)

A whole file whose MD5 is wrong is a failed attempt too: Downloaded ─▶ DownloadPaused ─▶ Downloading
(from the first byte) while attempts are left, Downloaded ─▶ InvalidChecksum after the last one. So
DownloadFailed and InvalidChecksum are only ever sent once the request's attempts are spent.

Every status goes out as a PublishFirmwareStatusNotification with the request's ``requestId``
through the notifier (L03.FR.01); the last one is remembered for TriggerMessage (L03.FR.10/11).
Published files are stored as ``file:<md5>`` and served at ``<public base>/firmware/<md5>/<name>``.
An UnpublishFirmware that finds the job still running cancels it (its cancel scope), deletes its
record and bytes, and the job's last status is Idle: nothing of it is published (L04).

Restarts. Every step of a job is in the index before the next begins (its record stays until its
final status has been handed to the durable outbox). At start the cache re-hashes every published
file and serves only those that still match (a file that does not is deleted, logged and counted).
A job found in the index was interrupted, and goes on: if its file was published (or moved into
place, not yet indexed, and matches) it sends Published, which the crash may have kept from the
CSMS (it may then hear it twice, as with anything in the outbox); otherwise it resumes from its
partial file (Range) with the attempts it had left, sending Downloading again, and if it cannot
finish it ends in DownloadFailed, so the CSMS always hears how it ended. Files and partial files no
index entry accounts for are deleted.

``retries`` counts attempts after the first (retries=0: one attempt); ``retryInterval`` is the wait
between attempts. Defaults for both come from the configuration.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import trio
from prometheus_client import CollectorRegistry
from starlette.routing import BaseRoute

from .content import ContentStore
from .download import DownloadError, Limits, Progress, fetch
from .metrics import FirmwareMetrics
from .model import (
    MAX_LOCATION_CHARS,
    CachedFile,
    Job,
    PublishStatus,
    file_name_for,
    location_problem,
    normalise_md5,
    parse_publish,
    parse_unpublish,
    published_url,
)
from .serving import FirmwareFiles, StationDownloads

log = logging.getLogger("ocpp_lc.firmware")

STATUS_ACTION: Final = "PublishFirmwareStatusNotification"
_FILE_PREFIX: Final = "file:"
_JOB_PREFIX: Final = "job:"
_LAST_KEY: Final = "last_status"


class KeyValue(Protocol):
    """Durable keys (the store's namespace for the firmware index)."""

    def get(self, key: str, default: Any = None) -> Any: ...

    def put(self, key: str, value: Any) -> None: ...

    def delete(self, key: str) -> bool: ...

    def items(self) -> dict[str, Any]: ...


class Notifier(Protocol):
    """Sends a message to the CSMS on the controller's own identity, durably (the outbox)."""

    async def send(self, action: str, payload: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class FirmwareSettings:
    """What the cache needs from the configuration."""

    cache_dir: Path
    max_file_bytes: int = 512 * 1024 * 1024
    disk_budget_bytes: int = 2 * 1024 * 1024 * 1024
    #: Connect and per-read timeout of a download (a source silent this long fails the attempt).
    download_timeout_s: float = 60.0
    default_retries: int = 3
    default_retry_interval_s: float = 30.0
    #: How long a job waits for its Accepted answer to be written before sending statuses anyway.
    answer_wait_s: float = 10.0
    #: CA certificates (PEM) an https source's certificate must chain to; None: the system's CAs.
    ca_file: Path | None = None


@dataclass
class PublishAnswer:
    """The PublishFirmwareResponse payload; call :meth:`sent` once it has been written to the CSMS."""

    payload: dict[str, Any]
    _answered: trio.Event | None = None

    def sent(self) -> None:
        """The answer is on its way: the job may send its first status."""
        if self._answered is not None:
            self._answered.set()


class FirmwareCache:
    """Publishes firmware for stations on the site network (see the module docstring)."""

    def __init__(
        self,
        settings: FirmwareSettings,
        *,
        state: KeyValue,
        notifier: Notifier,
        registry: CollectorRegistry,
        public_base_url: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = FirmwareMetrics(registry)
        self.content = ContentStore(settings.cache_dir)
        self.downloads = StationDownloads(self.metrics)
        self._public_base_url = public_base_url
        #: Set once the public URL is decided (given here, or assigned once the HTTP face is up).
        self._public_url_known = trio.Event()
        if public_base_url is not None:
            self._public_url_known.set()
        self._state = state
        self._notifier = notifier
        #: How https sources are verified (chain and host name): ``ssl_context`` if given, else
        #: ``settings.ca_file``, else the system's CAs. An unusable ca_file fails here, at start.
        self._ssl_context = ssl_context if ssl_context is not None else download_context(settings.ca_file)
        self._files: dict[str, CachedFile] = {}
        #: The publishing process under way per MD5, with the cancel scope UnpublishFirmware uses.
        self._jobs: dict[str, _Running] = {}
        self._partial_bytes: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        self._files_view = FirmwareFiles(self._lookup, self.downloads, self.metrics)

    # -- what the wiring uses -------------------------------------------------------------------

    @property
    def public_base_url(self) -> str | None:
        """Where stations reach the HTTP face, e.g. "http://192.168.1.10:8080"; None: nothing can be published."""
        return self._public_base_url

    @public_base_url.setter
    def public_base_url(self, url: str | None) -> None:
        # Assigned by the wiring once the HTTP face has its port; jobs resumed at start wait for it.
        self._public_base_url = url
        self._public_url_known.set()

    def routes(self) -> list[BaseRoute]:
        """The HTTP routes serving published files."""
        return self._files_view.routes()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the index (re-verifying files), resume interrupted jobs, then run jobs until cancelled."""
        await trio.to_thread.run_sync(self.content.prepare)
        jobs = await self._load_index()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for job in jobs:
                self._start(job, None)
            task_status.started()
            await trio.sleep_forever()

    def publish(self, payload: dict[str, Any]) -> PublishAnswer:
        """Answer a PublishFirmware (L03); raises RequestInvalid for a payload that breaks the schema."""
        request = parse_publish(payload)
        md5 = normalise_md5(request["checksum"])
        location = request["location"]
        reason = None
        if md5 is None:
            reason, detail = "InvalidChecksum", "checksum must be 32 hexadecimal digits (an MD5)"
        elif (problem := location_problem(location)) is not None:
            reason, detail = problem, "only http:// and https:// locations are fetched"
        elif md5 in self._jobs:
            reason, detail = "AlreadyInProgress", "this file is being published already"
        elif not self.public_base_url:
            reason, detail = "NoPublicURL", "no [firmware] public_base_url is configured"
        elif self._nursery is None:
            reason, detail = "NotReady", "the firmware cache is not running"
        if reason is not None:
            log.warning(
                "firmware cache: PublishFirmware %d for %.200s rejected: %s", request["requestId"], location, detail
            )
            self.metrics.rejected.labels(reason).inc()
            return PublishAnswer({"status": "Rejected", "statusInfo": {"reasonCode": reason, "additionalInfo": detail}})
        assert md5 is not None
        retries = request.get("retries", self.settings.default_retries)
        interval = request.get("retryInterval", self.settings.default_retry_interval_s)
        job = Job(
            md5=md5,
            request_id=request["requestId"],
            location=location,
            name=file_name_for(location),
            attempts_left=max(0, retries) + 1,
            retry_interval_s=float(max(0, interval)),
        )
        self._state.put(_JOB_PREFIX + md5, job.to_record())
        answered = trio.Event()
        self._start(job, answered)
        log.info("firmware cache: PublishFirmware %d accepted: %s from %.200s", job.request_id, md5, location)
        return PublishAnswer({"status": "Accepted"}, answered)

    def unpublish(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Answer an UnpublishFirmware (L04); raises RequestInvalid for a payload that breaks the schema.

        A publishing process still under way for the file (the controller downloading it, or about to
        announce it) is stopped first, so that the file is not served afterwards (L04's aim): its job
        is forgotten durably at once, its bytes are deleted, and its status becomes Idle. The answer
        is then NoFirmware if no file had been published yet (L04.FR.03 asks about a *published*
        file; DownloadOngoing is L04.FR.04's answer for a *station* downloading a published one).
        """
        request = parse_unpublish(payload)
        md5 = normalise_md5(request["checksum"])
        if md5 is None:
            return {"status": "NoFirmware"}  # L04.FR.03
        if md5 in self._files and self.downloads.active(md5):
            log.info("firmware cache: not unpublishing %s: %d station(s) downloading", md5, self.downloads.active(md5))
            return {"status": "DownloadOngoing"}  # L04.FR.04: and the file stays published
        self._withdraw(md5)
        if md5 not in self._files:
            return {"status": "NoFirmware"}  # L04.FR.03
        entry = self._files.pop(md5)
        self._state.delete(_FILE_PREFIX + md5)
        self.content.delete_file(md5)
        self._update_gauges()
        log.info("firmware cache: unpublished %s (%s, %d bytes)", md5, entry.name, entry.size_bytes)
        return {"status": "Unpublished"}  # L04.FR.01/02

    def _withdraw(self, md5: str) -> None:
        """Stop the publishing process for ``md5``, if one runs (see :meth:`unpublish`)."""
        running = self._jobs.pop(md5, None)
        if running is None:
            return
        self._state.delete(_JOB_PREFIX + md5)  # before answering: a restart must not resume it
        running.scope.cancel()
        log.info("firmware cache: UnpublishFirmware stopped publishing request %d (%s)", running.job.request_id, md5)

    def trigger_payload(self) -> dict[str, Any]:
        """The PublishFirmwareStatusNotification a TriggerMessage asks for (L03.FR.10/11)."""
        last = self._state.get(_LAST_KEY)
        if not isinstance(last, dict) or last.get("status") in (None, "Published", "Idle"):
            return {"status": "Idle"}
        payload: dict[str, Any] = {"status": last["status"]}
        if isinstance(last.get("requestId"), int):
            payload["requestId"] = last["requestId"]
        return payload

    def published(self) -> dict[str, CachedFile]:
        """The published files by MD5."""
        return dict(self._files)

    def urls(self, md5: str) -> list[str]:
        """Every URL the file ``md5`` is served at (empty if not published or no public URL)."""
        entry = self._files.get(md5)
        if entry is None or not self.public_base_url:
            return []
        return [published_url(self.public_base_url, md5, entry.name)]

    # -- index --------------------------------------------------------------------------------------

    async def _load_index(self) -> list[Job]:
        files: dict[str, CachedFile] = {}
        jobs: list[Job] = []
        for key, record in self._state.items().items():
            if key.startswith(_FILE_PREFIX):
                entry = CachedFile.from_record(record)
                if entry is None or key != _FILE_PREFIX + entry.md5:
                    log.error("firmware cache: index entry %r is unreadable; dropped", key)
                    self._state.delete(key)
                    continue
                files[entry.md5] = entry
            elif key.startswith(_JOB_PREFIX):
                job = Job.from_record(record)
                if job is None or key != _JOB_PREFIX + job.md5:
                    log.error("firmware cache: index entry %r is unreadable; dropped", key)
                    self._state.delete(key)
                    continue
                jobs.append(job)
        adopted = set()
        for job in jobs:
            if job.md5 not in files and self.content.file_path(job.md5).is_file():
                # A crash after the file was moved into place, before it was indexed: verified like the others.
                files[job.md5] = CachedFile(job.md5, job.name, 0, job.request_id, job.location)
                adopted.add(job.md5)
        for md5, entry in files.items():
            digest, size = await self.content.hash_file(md5)
            if digest != md5:
                # Bit rot, or an edit behind our back: never serve a file whose MD5 is not the one published.
                log.error(
                    "firmware cache: %s no longer matches its MD5 (read %s, %d bytes); dropped", md5, digest, size
                )
                self.metrics.dropped_at_start.inc()
                self._state.delete(_FILE_PREFIX + md5)
                self.content.delete_file(md5)
                continue
            entry.size_bytes = size
            self._files[md5] = entry
            if md5 in adopted:
                self._state.put(_FILE_PREFIX + md5, entry.to_record())
        # Every job left goes on: one whose file is published (a crash before its Published was sent,
        # or before the job was removed) just sends Published; the others resume their download.
        removed = await trio.to_thread.run_sync(self.content.remove_strays, set(self._files), {j.md5 for j in jobs})
        for name in removed:
            log.warning("firmware cache: removed %s, which no index entry accounts for", name)
        self._update_gauges()
        if self._files:
            log.info("firmware cache: serving %d file(s) again after verifying them", len(self._files))
        return jobs

    def _lookup(self, md5: str) -> tuple[Path, str] | None:
        entry = self._files.get(md5)
        return None if entry is None else (self.content.file_path(md5), entry.name)

    def _update_gauges(self) -> None:
        self.metrics.cached_files.set(len(self._files))
        self.metrics.cached_bytes.set(sum(entry.size_bytes for entry in self._files.values()))

    def _budget_left_bytes(self, md5: str) -> int:
        cached = sum(entry.size_bytes for entry in self._files.values())
        others = sum(size for other, size in self._partial_bytes.items() if other != md5)
        return self.settings.disk_budget_bytes - cached - others - self._partial_bytes.get(md5, 0)

    # -- jobs ---------------------------------------------------------------------------------------

    def _start(self, job: Job, answered: trio.Event | None) -> None:
        assert self._nursery is not None
        running = _Running(job)
        self._jobs[job.md5] = running
        self._nursery.start_soon(self._run_job, running, answered, name=f"firmware {job.md5}")

    def _current(self, job: Job) -> bool:
        """Whether ``job`` is still the publishing process for its file (UnpublishFirmware ends that)."""
        running = self._jobs.get(job.md5)
        return running is not None and running.job is job

    async def _run_job(self, running: _Running, answered: trio.Event | None) -> None:
        job = running.job
        outcome = "download_failed"
        with running.scope:
            try:
                if answered is not None:
                    with trio.move_on_after(self.settings.answer_wait_s):
                        await answered.wait()
                await self._public_url_known.wait()  # a job resumed at start may be about to say Published
                outcome = await self._publish_job(job)
            except Exception:
                # A bug must not leave the CSMS waiting for ever: say how this one ended, then forget it.
                log.exception("firmware cache: publishing %s failed unexpectedly", job.md5)
                self.content.delete_partial(job.md5)
                await self._notify(job, "DownloadFailed")
        if not self._current(job):
            await self._withdrawn(job)
            return
        self.metrics.downloads.labels(outcome).inc()
        self._state.delete(_JOB_PREFIX + job.md5)
        self._jobs.pop(job.md5, None)
        self._partial_bytes.pop(job.md5, None)

    async def _withdrawn(self, job: Job) -> None:
        """Clean up after UnpublishFirmware stopped ``job`` (its index entry is gone already)."""
        if job.md5 not in self._jobs:  # a newer PublishFirmware for the same file may be using these bytes
            self.content.delete_partial(job.md5)
            self._partial_bytes.pop(job.md5, None)
        if job.md5 not in self._files:  # moved into place just as it was stopped, never announced
            self.content.delete_file(job.md5)
        self.metrics.downloads.labels("unpublished").inc()
        # L03.FR.01: the process has left its last status (Downloading …): it is over, and nothing is
        # published, so the controller is idle for this request. A TriggerMessage then says Idle too.
        await self._send_status(job, "Idle")

    async def _publish_job(self, job: Job) -> str:
        if job.md5 in self._files:  # published already (earlier, or before a restart): say where, again
            urls = self.urls(job.md5)
            if not urls:
                log.error("firmware cache: %s is published but has no public URL to announce", job.md5)
                await self._notify(job, "PublishFailed")  # L03.FR.08: stations cannot be told where it is
                return "publish_failed"
            await self._notify(job, "Published", urls)
            return "published"
        await self._notify(job, "Downloading")
        progress = await self._resume_point(job)
        failed = await self._download(job, progress)
        if failed is not None:
            self.content.delete_partial(job.md5)
            await self._notify(job, failed)  # L03.FR.06 (DownloadFailed) or L03.FR.07 (InvalidChecksum)
            return "download_failed" if failed == "DownloadFailed" else "invalid_checksum"
        await self._notify(job, "ChecksumVerified")
        url = published_url(self.public_base_url or "", job.md5, job.name)
        try:
            if not self.public_base_url or len(url) > MAX_LOCATION_CHARS:
                raise OSError(f"cannot publish at {url[:80]!r}… (no public base URL, or longer than 512 characters)")
            size = await self.content.publish(job.md5)
            if not self._current(job):
                return "unpublished"  # stopped while the file was moved (a worker thread ignores cancellation)
        except OSError as error:
            log.error("firmware cache: cannot publish %s: %s", job.md5, getattr(error, "strerror", None) or error)
            self.content.delete_partial(job.md5)
            await self._notify(job, "PublishFailed")  # L03.FR.08
            return "publish_failed"
        entry = CachedFile(job.md5, job.name, size, job.request_id, job.location)
        self._state.put(_FILE_PREFIX + job.md5, entry.to_record())
        self._files[job.md5] = entry
        self._partial_bytes.pop(job.md5, None)
        self._update_gauges()
        log.info("firmware cache: published %s (%d bytes) at %s", job.md5, size, url)
        await self._notify(job, "Published", [url])  # L03.FR.04/09
        return "published"

    async def _resume_point(self, job: Job) -> Progress:
        """What the partial file holds already (the download goes on from there); nothing if unreadable."""
        try:
            digest, size = await self.content.hash_partial(job.md5)
        except OSError as error:
            log.error(
                "firmware cache: cannot read the partial file of %s: %s; starting over",
                job.md5,
                error.strerror or error,
            )
            self.content.delete_partial(job.md5)
            digest, size = _md5(), 0
        self._partial_bytes[job.md5] = size
        return Progress(digest, size, job.validator if size else None)

    async def _download(self, job: Job, progress: Progress) -> PublishStatus | None:
        """Attempt the download until the whole file is there with the right MD5 (None), or no attempt is left.

        Every failed attempt costs one of the request's attempts, whatever failed: the source (an HTTP
        error status, no connection, a transfer cut short, a certificate), our limits, or the MD5 of
        what arrived. Between attempts the status is DownloadPaused for ``retryInterval``. Returns
        the final status once the budget is spent: DownloadFailed, or InvalidChecksum when the last
        attempt brought a whole file with another MD5.
        """
        timeout = httpx.Timeout(self.settings.download_timeout_s)
        limits = Limits(self.settings.max_file_bytes, lambda: self._budget_left_bytes(job.md5))

        def on_bytes(count: int) -> None:
            self.metrics.downloaded_bytes.inc(count)
            self._partial_bytes[job.md5] = progress.size_bytes
            if progress.validator != job.validator:
                # Kept so that a download resumed after a restart can still ask If-Range.
                job.validator = progress.validator
                self._state.put(_JOB_PREFIX + job.md5, job.to_record())

        async with httpx.AsyncClient(
            timeout=timeout, verify=self._ssl_context, follow_redirects=True, trust_env=False
        ) as client:
            while True:
                failure: PublishStatus
                try:
                    await fetch(
                        client, job.location, self.content.partial_path(job.md5), progress, limits, _md5, on_bytes
                    )
                except DownloadError as error:
                    self.metrics.attempt_failures.labels(error.reason).inc()
                    failure, why = "DownloadFailed", str(error)
                else:
                    await self._notify(job, "Downloaded")
                    got = progress.digest.hexdigest()
                    if got == job.md5:  # L03.FR.02: over the whole file
                        return None
                    # Not the file (another one, or one cut short by a source that sent no length):
                    # the next attempt starts again from the first byte.
                    self.metrics.attempt_failures.labels("checksum").inc()
                    failure, why = "InvalidChecksum", f"{progress.size_bytes} bytes arrived with MD5 {got}"
                    self.content.delete_partial(job.md5)
                    progress.start_over(_md5())
                job.attempts_left -= 1
                job.validator = progress.validator
                self._state.put(_JOB_PREFIX + job.md5, job.to_record())
                self._partial_bytes[job.md5] = progress.size_bytes
                if job.attempts_left <= 0:
                    log.warning(
                        "firmware cache: download of %s from %.200s failed for good: %s", job.md5, job.location, why
                    )
                    return failure
                log.warning(
                    "firmware cache: download of %s failed (%s); %d attempt(s) left, next in %.0f s",
                    job.md5,
                    why,
                    job.attempts_left,
                    job.retry_interval_s,
                )
                await self._notify(job, "DownloadPaused")
                await trio.sleep(job.retry_interval_s)
                await self._notify(job, "Downloading")

    async def _notify(self, job: Job, status: PublishStatus, location: list[str] | None = None) -> None:
        """Send a status of ``job``'s process (L03.FR.01), unless UnpublishFirmware has ended that process."""
        if self._current(job):
            await self._send_status(job, status, location)

    async def _send_status(self, job: Job, status: PublishStatus, location: list[str] | None = None) -> None:
        payload: dict[str, Any] = {"status": status, "requestId": job.request_id}
        if location is not None:
            payload["location"] = location
        log.info("firmware cache: request %d: %s", job.request_id, status)
        await self._notifier.send(STATUS_ACTION, payload)
        self._state.put(_LAST_KEY, {"status": status, "requestId": job.request_id})  # once sent (L03.FR.11)


@dataclass(eq=False)
class _Running:
    """A job whose task runs, and the scope that stops it."""

    job: Job
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def download_context(ca_file: Path | None) -> ssl.SSLContext:
    """The TLS client context for https sources: certificate and host name verified (L03: https).

    Trusts only ``ca_file`` when one is given (like the CSMS leg's ``ca_file``), else the system's
    CAs. Raises ``OSError`` or ``ssl.SSLError`` when the file cannot be read or holds no certificate.
    """
    # create_default_context: CERT_REQUIRED and check_hostname; with a cafile it loads only that file.
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None if ca_file is None else str(ca_file))


def _md5() -> Any:
    return hashlib.md5(usedforsecurity=False)
