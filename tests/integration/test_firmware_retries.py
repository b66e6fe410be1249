"""PublishFirmware's ``retries`` and ``retryInterval`` (L03): every failed attempt costs one, whatever failed.

The sources are the raw HTTP/1.1 servers of ``test_firmware_cache.py`` on 127.0.0.1 port 0, and the
cache is the real one on a real store. Timing runs on a :class:`trio.testing.MockClock` whose virtual
time stands still while anything at all happens and jumps to the next timer only once the whole run
has been idle for ``IDLE_JUMP_S`` real seconds (``autojump_threshold``). With the autojump clock's
threshold of 0 the clock could jump while bytes are still on their way through loopback (or a file
operation runs in a worker thread), firing a download timeout no real source caused; half a second of
complete idleness never happens while a step is in flight, so the intervals asserted are exact
virtual seconds on a machine of any speed.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.integration.test_firmware_cache import (
    FIRMWARE,
    FIRMWARE_MD5,
    OTHER,
    SUCCESS,
    Behaviour,
    always_cut,
    fetch_bytes,
    honest,
    running_cache,
    short_without_length,
    source,
    status,
)

#: Real seconds of complete idleness after which the virtual clock jumps to the next timer.
IDLE_JUMP_S = 0.5
#: Virtual seconds: the retry intervals below plus a margin for the steps between them.
TIMEOUT_S = 600
RETRY_INTERVAL_S = 30
#: Real seconds, for the one test on the real clock.
REAL_TIMEOUT_S = 10

PAUSED = ["DownloadPaused", "Downloading"]
#: Three attempts (retries=2) of a download that never completes.
NEVER_DOWNLOADED = ["Downloading", *PAUSED, *PAUSED, "DownloadFailed"]
#: Three attempts that each bring a whole file with the wrong MD5.
NEVER_VERIFIED = ["Downloading", "Downloaded", *PAUSED, "Downloaded", *PAUSED, "Downloaded", "InvalidChecksum"]


@pytest.fixture
def idle_clock() -> trio.testing.MockClock:
    """Virtual time for the test (see the module docstring); pytest-trio runs the test on it."""
    return trio.testing.MockClock(autojump_threshold=IDLE_JUMP_S)


@pytest.mark.parametrize(
    ("behaviour", "reason", "statuses", "outcome"),
    [
        pytest.param(status("404 Not Found"), "http_4xx", NEVER_DOWNLOADED, "download_failed", id="404"),
        pytest.param(status("403 Forbidden"), "http_4xx", NEVER_DOWNLOADED, "download_failed", id="403"),
        pytest.param(status("503 Service Unavailable"), "http_5xx", NEVER_DOWNLOADED, "download_failed", id="503"),
        pytest.param(always_cut(FIRMWARE, 5000), "broken_transfer", NEVER_DOWNLOADED, "download_failed", id="cut"),
        pytest.param(
            short_without_length(FIRMWARE, 5000), "checksum", NEVER_VERIFIED, "invalid_checksum", id="short-no-length"
        ),
        pytest.param(honest(OTHER), "checksum", NEVER_VERIFIED, "invalid_checksum", id="another-file"),
    ],
)
async def test_every_failure_costs_one_attempt_and_waits_retry_interval(
    tmp_path: Path,
    idle_clock: trio.testing.MockClock,
    behaviour: Behaviour,
    reason: str,
    statuses: list[str],
    outcome: str,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(behaviour) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), retries=2, retryInterval=RETRY_INTERVAL_S)
            # L03.FR.06/07: DownloadFailed and InvalidChecksum come once, after the last attempt.
            assert await fw.recorder.final(7) == statuses
            assert len(src.requests) == 3  # retries=2: the first attempt and two more
            gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(src.requests)]
            assert gaps == [RETRY_INTERVAL_S, RETRY_INTERVAL_S]
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason=reason) == 3
            assert fw.metric("ocpp_lc_firmware_downloads_total", outcome=outcome) == 1
            assert fw.cache.published() == {}
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []
            assert fw.cache.trigger_payload() == {"status": statuses[-1], "requestId": 7}  # L03.FR.11


async def test_retries_zero_is_a_single_attempt(tmp_path: Path, idle_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with source(status("404 Not Found")) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), retries=0, retryInterval=RETRY_INTERVAL_S)
            assert await fw.recorder.final(7) == ["Downloading", "DownloadFailed"]  # TC_L_24
            assert len(src.requests) == 1


async def test_without_retries_in_the_request_the_configured_ones_apply(
    tmp_path: Path, idle_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with (
            source(status("404 Not Found")) as src,
            running_cache(tmp_path, default_retries=1, default_retry_interval_s=45.0) as fw,
        ):
            fw.publish(src.url())
            assert await fw.recorder.final(7) == ["Downloading", *PAUSED, "DownloadFailed"]
            assert [request.at - src.requests[0].at for request in src.requests] == [0, 45]


async def test_a_body_cut_short_without_a_length_is_fetched_again_whole_and_published(tmp_path: Path) -> None:
    # Real clock, no interval: this one goes on to publish, whose fsync runs in a worker thread.
    with trio.fail_after(REAL_TIMEOUT_S):
        async with source(short_without_length(FIRMWARE, 1000, times=1)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), retries=1, retryInterval=0)
            assert await fw.recorder.final(7) == ["Downloading", "Downloaded", *PAUSED, *SUCCESS[1:]]
            # The bytes that failed the MD5 were thrown away: the second request asked for the whole file.
            assert len(src.requests) == 2 and "range" not in src.requests[1].headers
            response = await fetch_bytes(fw.recorder.sent[-1]["location"][0])
            assert response.content == FIRMWARE
            assert fw.cache.published().keys() == {FIRMWARE_MD5}
