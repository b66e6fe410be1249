"""``[state]`` and ``[firmware]``: what the controller keeps on disk, and how stations reach cached firmware."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, Field

from .values import MODEL, ListenAddress, check_absolute_path, check_readable_file


class StateSettings(BaseModel):
    """Where the controller keeps what must survive a restart."""

    model_config = MODEL
    dir: Annotated[str, AfterValidator(check_absolute_path)] = Field(
        default="/var/lib/ocpp-lc", min_length=1, max_length=4096, description="state directory (absolute path)"
    )

    @property
    def path(self) -> Path:
        """The state directory (the store file inside it is ``state.sqlite3``)."""
        return Path(self.dir)


def _check_public_base_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not url.lower().startswith(f"{parts.scheme}://") or not parts.hostname:
        example = "http://192.168.1.10:8080"
        raise ValueError(f"must be an http:// or https:// URL with a host, e.g. {example!r}, got {url!r}")
    if url.endswith("/") or any(char in url for char in "?# \t@"):
        raise ValueError(f"must not end with '/' or have a query, fragment, user name or spaces, got {url!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"has an invalid port, got {url!r}") from None
    return url


class FirmwareCacheSettings(BaseModel):
    """The firmware cache (L03/L04): where files are kept and how stations reach them."""

    model_config = MODEL
    public_base_url: Annotated[str, AfterValidator(_check_public_base_url)] | None = Field(
        default=None,
        max_length=400,
        description=(
            "base URL stations download published firmware from (http(s)://host[:port]); default: the "
            "[http] listen address, unless that is 0.0.0.0 or ::"
        ),
    )
    cache_dir: Annotated[str, AfterValidator(check_absolute_path)] | None = Field(
        default=None, max_length=4096, description="where firmware files are kept (absolute path; <state dir>/firmware)"
    )
    ca_file: Annotated[str, AfterValidator(check_readable_file)] | None = Field(
        default=None,
        max_length=4096,
        description="CA certificates (PEM, absolute path) an https firmware source must chain to; "
        "default: the system's CAs",
    )
    max_file_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024, le=64 * 1024**3, description="largest firmware file (bytes)"
    )
    disk_budget_bytes: int = Field(
        default=2 * 1024**3, ge=1024, le=16 * 1024**4, description="disk space the cache may use in all (bytes)"
    )
    download_timeout_s: float = Field(
        default=60.0, ge=1, le=3600, description="a download source silent this long fails the attempt (seconds)"
    )
    retries: int = Field(default=3, ge=0, le=100, description="retries when PublishFirmware names none (count)")
    retry_interval_s: int = Field(
        default=30, ge=0, le=86_400, description="wait between attempts when PublishFirmware names none (seconds)"
    )

    def cache_path(self, state_dir: Path) -> Path:
        """The cache directory: ``cache_dir``, or ``firmware`` inside the state directory."""
        return Path(self.cache_dir) if self.cache_dir is not None else state_dir / "firmware"

    def public_base(self, http: ListenAddress, http_port: int) -> str | None:
        """The URL stations are told, given the bound HTTP port; None when it cannot be derived."""
        if self.public_base_url is not None:
            return self.public_base_url
        if http.host in ("0.0.0.0", "::", ""):
            return None  # every interface: which address a station can reach is the installer's to say
        host = f"[{http.host}]" if ":" in http.host else http.host
        return f"http://{host}:{http_port}"
