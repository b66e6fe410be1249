"""The firmware cache's vocabulary, without I/O: requests, statuses, index records, names and URLs.

Everything here is synchronous and pure so that the state machine's decisions (accept or reject a
PublishFirmware, which file name to publish, what URL a station is told) can be tested without a
server. The index records are plain dicts on the way to and from the store (msgpack values).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Final, Literal, NotRequired

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict  # pydantic reads TypedDicts from here before Python 3.12

#: PublishFirmwareStatusEnumType (Part 2 §3, L03).
PublishStatus = Literal[
    "Idle",
    "DownloadScheduled",
    "Downloading",
    "Downloaded",
    "Published",
    "DownloadFailed",
    "DownloadPaused",
    "InvalidChecksum",
    "ChecksumVerified",
    "PublishFailed",
]

#: Statuses after which a publishing process is over (nothing more is sent for its requestId). Idle
#: ends a process that an UnpublishFirmware stopped before it was published.
FINAL_STATUSES: Final = frozenset({"Published", "DownloadFailed", "InvalidChecksum", "PublishFailed", "Idle"})

#: URL schemes the controller fetches firmware from (FTP is not offered: L03 leaves protocols to us).
FETCH_SCHEMES: Final = frozenset({"http", "https"})

#: OCPP's limit on one URI in PublishFirmwareStatusNotification.location (string[0..512]).
MAX_LOCATION_CHARS: Final = 512

_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME_CHARS: Final = 128
#: Published when the location's last path segment is no usable file name.
DEFAULT_FILE_NAME: Final = "firmware.bin"


class RequestInvalid(Exception):
    """A CALL payload that breaks the message schema: answer it with this OCPP-J CALLERROR code."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description


@with_config(ConfigDict(extra="forbid"))
class PublishFirmwareRequest(TypedDict):
    """PublishFirmwareRequest (L03)."""

    location: Annotated[str, Field(max_length=512)]
    checksum: Annotated[str, Field(max_length=32)]
    requestId: int
    retries: NotRequired[int]
    retryInterval: NotRequired[int]
    customData: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="forbid"))
class UnpublishFirmwareRequest(TypedDict):
    """UnpublishFirmwareRequest (L04)."""

    checksum: Annotated[str, Field(max_length=32)]
    customData: NotRequired[dict[str, Any]]


_PUBLISH: Final = TypeAdapter(PublishFirmwareRequest)
_UNPUBLISH: Final = TypeAdapter(UnpublishFirmwareRequest)


def _parse(adapter: TypeAdapter[Any], payload: dict[str, Any]) -> Any:
    try:
        return adapter.validate_python(payload, strict=True)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "payload"
        kind = first["type"]
        if kind == "missing":
            code = "OccurrenceConstraintViolation"
        elif kind == "extra_forbidden":
            code = "FormatViolation"
        elif kind.endswith("_type"):
            code = "TypeConstraintViolation"
        else:
            code = "PropertyConstraintViolation"
        raise RequestInvalid(code, f"{where}: {first['msg']}") from None


def parse_publish(payload: dict[str, Any]) -> PublishFirmwareRequest:
    """Validate a PublishFirmware payload against its schema; RequestInvalid if it does not fit."""
    request: PublishFirmwareRequest = _parse(_PUBLISH, payload)
    return request


def parse_unpublish(payload: dict[str, Any]) -> UnpublishFirmwareRequest:
    """Validate an UnpublishFirmware payload against its schema; RequestInvalid if it does not fit."""
    request: UnpublishFirmwareRequest = _parse(_UNPUBLISH, payload)
    return request


def normalise_md5(checksum: str) -> str | None:
    """The checksum as 32 lower-case hex digits, or None if it is not an MD5 in hex (L03: "length 32")."""
    return checksum.lower() if _MD5.fullmatch(checksum) else None


def location_problem(location: str) -> str | None:
    """Why the controller will not fetch from ``location`` (a short reason), or None if it will."""
    try:
        parts = urllib.parse.urlsplit(location)
        _ = parts.port  # raises ValueError for a port that is no number or out of range
    except ValueError:
        return "InvalidURL"
    if parts.scheme.lower() not in FETCH_SCHEMES:
        return "UnsupportedScheme"
    if not parts.hostname:
        return "InvalidURL"
    return None


def file_name_for(location: str) -> str:
    """The name a file is published under: the location's last path segment if it is a safe name.

    Safe means letters, digits, '.', '_' and '-' only, not starting with '.', at most 128 characters;
    anything else (an empty segment, '..', percent-encoded slashes, spaces) gives ``firmware.bin``. The
    name is only cosmetic for stations (the MD5 in the URL identifies the file): it never selects a path.
    """
    path = urllib.parse.urlsplit(location).path
    segment = urllib.parse.unquote(path.rsplit("/", 1)[-1])
    if _SAFE_NAME.fullmatch(segment) and not segment.startswith(".") and len(segment) <= _MAX_NAME_CHARS:
        return segment
    return DEFAULT_FILE_NAME


def published_url(public_base_url: str, md5: str, name: str) -> str:
    """Where stations fetch the file: ``<base>/firmware/<md5>/<name>``."""
    return f"{public_base_url.rstrip('/')}/firmware/{md5}/{urllib.parse.quote(name, safe='')}"


@dataclass
class Job:
    """A publishing process under way (stored under ``job:<md5>`` until it ends)."""

    md5: str
    request_id: int
    location: str
    name: str
    #: Attempts still allowed, this one included.
    attempts_left: int
    retry_interval_s: float
    #: The source's validator (ETag, else Last-Modified) of the bytes already in the partial file.
    validator: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The msgpack-able form kept in the store."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> Job | None:
        """The job from its stored form; None if the record is not one (it is then dropped)."""
        try:
            job = cls(**record)
        except TypeError:
            return None
        ok = isinstance(job.md5, str) and normalise_md5(job.md5) == job.md5
        ok = ok and isinstance(job.request_id, int) and isinstance(job.location, str) and isinstance(job.name, str)
        return job if ok and isinstance(job.attempts_left, int) else None


@dataclass
class CachedFile:
    """A published file (stored under ``file:<md5>``)."""

    md5: str
    name: str
    size_bytes: int
    request_id: int
    source: str = field(default="")

    def to_record(self) -> dict[str, Any]:
        """The msgpack-able form kept in the store."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: Any) -> CachedFile | None:
        """The entry from its stored form; None if the record is not one."""
        try:
            entry = cls(**record)
        except TypeError:
            return None
        ok = isinstance(entry.md5, str) and normalise_md5(entry.md5) == entry.md5 and isinstance(entry.name, str)
        ok = ok and _SAFE_NAME.fullmatch(entry.name) is not None and not entry.name.startswith(".")
        return entry if ok and isinstance(entry.size_bytes, int) else None
