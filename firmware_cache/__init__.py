"""The firmware cache: publish firmware for the site's stations (L03) and unpublish it (L04).

Nothing here imports ``router``: the store, the own identity's outbox and the HTTP face come in
through the Protocols declared in :mod:`firmware_cache.service`. See that module for the theory of
operation, :mod:`firmware_cache.download` for resuming, :mod:`firmware_cache.serving` for the files.
"""

from __future__ import annotations

from .model import RequestInvalid
from .service import FirmwareCache, FirmwareSettings, KeyValue, Notifier, PublishAnswer

__all__ = ["FirmwareCache", "FirmwareSettings", "KeyValue", "Notifier", "PublishAnswer", "RequestInvalid"]
