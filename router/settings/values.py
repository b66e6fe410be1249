"""The building blocks of the configuration tables: addresses, URLs, shared checks, the strict model config.

Everything here is pure: a check returns its value or raises ValueError (or a :func:`problem` naming a
field), in words an installer can act on; :mod:`router.settings.problems` turns them into ConfigProblems.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, NamedTuple
from urllib.parse import urlsplit

from pydantic import AfterValidator, ConfigDict
from pydantic_core import PydanticCustomError

_EXAMPLES = "e.g. '0.0.0.0:9000' or '[::1]:9000'"
_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME = re.compile(rf"{_HOST_LABEL}(\.{_HOST_LABEL})*")
_BRACKETED = re.compile(r"\[([^\[\]]*)\]:(.*)")
_PORT = re.compile(r"[0-9]{1,5}")


class ListenAddress(NamedTuple):
    """A TCP endpoint: ``host`` is a name or an IP address (IPv6 without brackets), ``port`` 0..65535."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for ``localhost`` and loopback IP addresses: only this machine can connect."""
        return self.host.lower() == "localhost" or (_is_ip(self.host) and ipaddress.ip_address(self.host).is_loopback)


def _is_ip(host: str) -> bool:
    try:
        return bool(ipaddress.ip_address(host))
    except ValueError:
        return False


def parse_listen_address(text: str) -> ListenAddress:
    """Parse ``host:port`` or ``[ipv6]:port`` (port 0: the OS picks); ValueError says what is allowed."""
    if text.startswith("["):
        match = _BRACKETED.fullmatch(text)
        host, port_text = match.groups() if match else ("", "")
        if not host or ":" not in host or not _is_ip(host):
            raise ValueError(f"must be '[ipv6-address]:port' with an IPv6 address, {_EXAMPLES}, got {text!r}")
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"must be host:port, {_EXAMPLES}, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address must be in brackets, e.g. '[::1]:9000', got {text!r}")
        if not host:
            raise ValueError(f"needs a host before the port ('0.0.0.0' for every interface), got {text!r}")
        # A dotted run of digits that is not a valid IPv4 address ("300.1.1.1") is a typo, not a name.
        is_name = len(host) <= 253 and not re.fullmatch(r"[0-9.]+", host) and _HOSTNAME.fullmatch(host)
        if not (is_name or _is_ip(host)):
            raise ValueError(f"{host!r} is not a host name or an IP address")
    port = int(port_text) if _PORT.fullmatch(port_text) else -1
    if not 0 <= port <= 65_535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return ListenAddress(host, port)


def parse_ws_url(url: str) -> tuple[ListenAddress, str, bool]:
    """Split a ws:// or wss:// URL into (host and port [80/443], path [maybe ''], TLS); or ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not url.lower().startswith(f"{parts.scheme}://"):
        raise ValueError(f"must be a ws:// or wss:// URL, got {url!r}")
    if any(char in url for char in "?# \t@"):
        raise ValueError(f"must not have a query ('?'), fragment ('#'), user name ('@') or spaces, got {url!r}")
    if not parts.netloc:
        raise ValueError(f"needs a host, e.g. 'ws://csms.example.net:9000/ocpp', got {url!r}")
    if url.endswith("/"):
        raise ValueError(f"must not end with '/': each station's identity is appended as '/<id>', got {url!r}")
    tls = parts.scheme == "wss"
    has_port = not parts.netloc.endswith("]") and ":" in parts.netloc
    address = parse_listen_address(parts.netloc if has_port else f"{parts.netloc}:{443 if tls else 80}")
    if address.port == 0:
        raise ValueError(f"port must be a number from 1 to 65535, got 0 in {url!r}")
    return address, parts.path, tls


def check_listen(text: str) -> str:
    parse_listen_address(text)
    return text


def check_url(url: str) -> str:
    parse_ws_url(url)
    return url


def _check_ping_interval(interval_s: float) -> float:
    if interval_s != 0 and not 1 <= interval_s <= 86_400:
        raise ValueError(f"must be 0 (no pings) or from 1 to 86400 seconds, got {show_toml(interval_s)}")
    return interval_s


def check_absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(
            f"must be an absolute path, e.g. '/var/lib/ocpp-lc' (a relative one would depend on where the "
            f"service starts), got {text!r}"
        )
    return text


def check_readable_file(text: str) -> str:
    check_absolute_path(text)
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"no such file: {text!r}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {text!r}: {exc.strerror}") from None
    return text


def problem(message: str, field: str) -> PydanticCustomError:  # field: dotted, relative to the model
    return PydanticCustomError("config", "{message}", {"message": message, "field": field})


ListenText = Annotated[str, AfterValidator(check_listen)]
PingInterval = Annotated[float, AfterValidator(_check_ping_interval)]
MODEL = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def show_toml(value: object) -> str:
    """A value as the installer wrote it in TOML."""
    if isinstance(value, bool | Mapping | list):
        return "a table" if isinstance(value, Mapping) else "a list" if isinstance(value, list) else str(value).lower()
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    return str(value)
