"""The appliance's configuration: one TOML file, validated, with every problem in plain words.

Theory of operation: :func:`load_settings` reads the file with :mod:`tomllib`; :func:`parse_settings`
validates the tables against frozen, strict pydantic models that forbid unknown keys, so a typo is an
error rather than a setting silently ignored. Every key has a default: an empty file yields a runnable
controller (stations on port 9000, HTTP API on loopback only, CSMS at ``ws://127.0.0.1:9100/ocpp``,
state in ``/var/lib/ocpp-lc``).
Pydantic's errors are written for programmers; installers read :class:`ConfigError`, which lists
*every* problem at once, each naming the key, what it got and what is allowed.

The tables' models live in :mod:`router.settings` (one module per concern); this module assembles them
into :class:`Settings`, reads the file and re-exports the public names, so callers import from here.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from balancing.site import SiteConfig
from meters.settings import MeterSettings, site_problems
from mqtt.settings import MqttSettings

from .autonomy.settings import AutonomySettings
from .settings.balancing import BalancingSettings
from .settings.controller import ControllerSettings, LogSettings
from .settings.http_api import EmsSettings, HttpSettings
from .settings.links import CsmsSettings, RoutingSettings, StationsSettings
from .settings.problems import ConfigProblem, translate
from .settings.storage import FirmwareCacheSettings, StateSettings
from .settings.values import MODEL, ListenAddress, parse_listen_address, parse_ws_url, problem

__all__ = [
    "BalancingSettings",
    "ConfigError",
    "ConfigProblem",
    "ControllerSettings",
    "CsmsSettings",
    "EmsSettings",
    "FirmwareCacheSettings",
    "HttpSettings",
    "ListenAddress",
    "LogSettings",
    "RoutingSettings",
    "Settings",
    "StateSettings",
    "StationsSettings",
    "load_settings",
    "parse_listen_address",
    "parse_settings",
    "parse_ws_url",
]

_TOML_POSITION = re.compile(r"(.*) \(at line (\d+), column (\d+)\)")


class Settings(BaseModel):
    """The whole configuration file; every section is optional."""

    model_config = MODEL
    controller: ControllerSettings = ControllerSettings()
    stations: StationsSettings = StationsSettings()
    csms: CsmsSettings = CsmsSettings()
    routing: RoutingSettings = RoutingSettings()
    http: HttpSettings = HttpSettings()
    state: StateSettings = StateSettings()
    firmware: FirmwareCacheSettings = FirmwareCacheSettings()
    ems: EmsSettings = EmsSettings()
    site: SiteConfig = SiteConfig()
    balancing: BalancingSettings = BalancingSettings()
    autonomy: AutonomySettings = AutonomySettings()
    log: LogSettings = LogSettings()
    meters: tuple[MeterSettings, ...] = Field(default=(), strict=False)  # [[meters]]: see meters/settings.py
    mqtt: MqttSettings = MqttSettings()  # [mqtt]: see mqtt/settings.py

    @model_validator(mode="after")
    def _meters_fit_the_site(self) -> Settings:
        for field, message in site_problems(self.meters, self.site)[:1]:
            raise problem(message, field=field)
        return self

    @model_validator(mode="after")
    def _ports_do_not_clash(self) -> Settings:
        stations, http = self.stations.address, self.http.address
        hosts = {stations.host, http.host}
        if stations.port == http.port != 0 and (len(hosts) == 1 or hosts & {"0.0.0.0", "::"}):
            raise problem(f"uses port {http.port}, like [stations] listen; pick another port", field="http.listen")
        return self

    @model_validator(mode="after")
    def _password_fits_the_profile(self) -> Settings:
        # Profile 3 authenticates the controller by its certificate; Basic auth belongs to 1 and 2 (A00).
        if self.controller.basic_auth_password is not None and self.csms.security.security_profile == 3:
            message = (
                "is not used with [csms.security] security_profile 3 (the client certificate identifies the "
                "controller): remove it"
            )
            raise problem(message, field="controller.basic_auth_password")
        return self


_SECTIONS: dict[str, type[BaseModel]] = {
    name: info.annotation
    for name, info in Settings.model_fields.items()
    if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
}


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` lists everything wrong with it, in file order."""

    def __init__(self, problems: list[ConfigProblem], path: Path | None = None, source: str | None = None) -> None:
        self.path = path
        self.problems = list(problems)
        self.source = source if source is not None else str(path) if path is not None else "<config>"
        super().__init__(str(self))

    def __str__(self) -> str:
        """Every problem on its own line, as ``<file>: [section] key: message``."""
        lines = []
        for location, message in self.problems:
            # "stations.security.key_file" is key "key_file" of the TOML table [stations.security].
            section, _, key = location.rpartition(".") if "." in location else (location, "", "")
            where = f"[{section}] {key}: " if key else f"[{section}]: " if section in _SECTIONS else ""
            lines.append(f"{self.source}: {where}{message}")
        return "\n".join(lines)


def load_settings(path: Path) -> Settings:
    """Read and validate the TOML file at ``path``; raise ConfigError listing every problem."""
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except tomllib.TOMLDecodeError as error:
        match = _TOML_POSITION.fullmatch(str(error))
        message = f"TOML syntax error at line {match[2]}, column {match[3]}: {match[1]}" if match else f"{error}"
        message += " (text needs double quotes)" if match and match[1] == "Invalid value" else ""
    except UnicodeDecodeError:
        message = "is not UTF-8 text"
    except FileNotFoundError:
        message = "file not found"
    except OSError as error:
        message = f"cannot read the file: {error.strerror or error}"
    else:
        return _validate(data, path, str(path))
    raise ConfigError([ConfigProblem("", message)], path)


def parse_settings(data: Mapping[str, Any], source: str = "<config>") -> Settings:
    """Validate already-parsed tables; raise ConfigError listing every problem."""
    return _validate(data, None, source)


def _validate(data: Mapping[str, Any], path: Path | None, source: str) -> Settings:
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as error:
        problems = [translate(detail, _SECTIONS) for detail in error.errors(include_url=False)]
    raise ConfigError(problems, path, source)
