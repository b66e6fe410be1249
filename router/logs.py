"""Log setup: readable lines by default, JSON lines on request. Secrets never reach a log line.

Station-related lines carry the identity as ``[CS01]`` at the start of the message; the JSON form
also lifts it into a ``station`` field so log pipelines can filter on it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal

_STATION = re.compile(r"^\[([^\]]{1,48})\] ")
# Defence in depth: if an Authorization header or password ever slipped into a message, blank it.
_SECRET = re.compile(r"(?i)(authorization:?\s*(basic|bearer)\s+)\S+|(password[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+")


def _redact(text: str) -> str:
    return _SECRET.sub(lambda m: (m.group(1) or m.group(3)) + "***", text)


def _stamp(record: logging.LogRecord) -> str:
    """The record's time as UTC RFC 3339 with milliseconds, as both formats print it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-11-25T11:00:00.123Z INFO  ocpp_lc.link [CS01] pair closed ...``"""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_stamp(record)} {record.levelname:<7} {record.name} {_redact(record.getMessage())}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, station (when known), exception."""

    def format(self, record: logging.LogRecord) -> str:
        message = _redact(record.getMessage())
        entry: dict[str, Any] = {
            "time": _stamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        match = _STATION.match(message)
        if match:
            entry["station"] = match.group(1)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: Literal["text", "json"] = "text") -> None:
    """Send logs to stderr in the chosen format (replacing earlier handlers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn's own chatter stays at warning unless debugging.
    if level != "debug":
        logging.getLogger("hypercorn").setLevel(logging.WARNING)
        # pymodbus logs every failed meter read at error level; the meter service logs them (once per
        # kind of failure, with the meter's name) and counts them, so its own lines would only repeat.
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
