"""Wall-clock time for OCPP timestamps, injected so that tests and replays can choose it."""

from __future__ import annotations

import datetime
from collections.abc import Callable

#: Returns the current time as an aware UTC datetime.
WallClock = Callable[[], datetime.datetime]


def utc_now() -> datetime.datetime:
    """The system's wall clock (the default :data:`WallClock`)."""
    return datetime.datetime.now(datetime.UTC)


def format_time(moment: datetime.datetime) -> str:
    """An OCPP dateTime: RFC 3339 in UTC, at most three decimals (Part 2, primitive datatypes)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime.datetime:
    """An OCPP dateTime (RFC 3339, 'Z' allowed) as an aware datetime (UTC when it names no zone)."""
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=datetime.UTC)
