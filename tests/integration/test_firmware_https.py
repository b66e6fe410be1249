"""Downloading firmware over https (L03: "http and https", the certificate verified), in-process.

The source is the raw HTTP/1.1 server of ``test_firmware_cache.py`` behind trio's TLS, on 127.0.0.1
port 0, with a certificate from the throw-away PKI of ``tests/support/certs.py``. The cache verifies
the source's chain and host name: against the system's CAs by default (which know nothing of our test
CAs), or against ``FirmwareSettings.ca_file`` (the ``[firmware] ca_file`` setting) when one is given.
A source that fails verification fails the attempt, with a log line and a counter that name
certificate verification; like any failure it costs one of the request's attempts (its certificate
may be mended in between), and DownloadFailed follows the last one.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from firmware_cache import FirmwareCache, FirmwareSettings
from router.store import Store
from tests.integration.test_firmware_cache import (
    FIRMWARE,
    FIRMWARE_MD5,
    SUCCESS,
    Recorder,
    honest,
    running_cache,
    source,
)
from tests.support.certs import LOOPBACK_HOSTS, CertifiedKey, TestCa

TIMEOUT_S = 10


def server_context(certified: CertifiedKey) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certified.cert_file, certified.key_file)
    return context


@pytest.fixture
def site_ca(tmp_path: Path) -> TestCa:
    """The CA of the site's firmware server (not one the system trusts)."""
    directory = tmp_path / "pki"
    directory.mkdir()
    return TestCa(directory, "ocpp-lc test firmware CA")


async def test_a_source_whose_certificate_chains_to_the_configured_ca_is_published(
    tmp_path: Path, site_ca: TestCa
) -> None:
    certified = site_ca.issue("localhost", hosts=LOOPBACK_HOSTS)
    with trio.fail_after(TIMEOUT_S):
        async with (
            source(honest(FIRMWARE), server_context(certified)) as src,
            running_cache(tmp_path, ca_file=site_ca.cert_file) as fw,
        ):
            assert src.url().startswith("https://127.0.0.1:")
            assert fw.publish(src.url(), request_id=21) == {"status": "Accepted"}
            assert await fw.recorder.final(21) == SUCCESS
            assert len(src.requests) == 1
            async with httpx.AsyncClient(trust_env=False) as client:
                served = await client.get(fw.recorder.sent[-1]["location"][0])
            assert hashlib.md5(served.content).hexdigest() == FIRMWARE_MD5
            assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="published") == 1


async def test_by_default_only_the_system_cas_are_trusted(
    tmp_path: Path, site_ca: TestCa, caplog: pytest.LogCaptureFixture
) -> None:
    certified = site_ca.issue("localhost", hosts=LOOPBACK_HOSTS)
    caplog.set_level(logging.WARNING, logger="ocpp_lc.firmware")
    with trio.fail_after(TIMEOUT_S):
        async with source(honest(FIRMWARE), server_context(certified)) as src, running_cache(tmp_path) as fw:
            fw.publish(src.url(), request_id=22, retries=1, retryInterval=0)
            # TC_L_24's DownloadFailed once the attempts are spent.
            assert await fw.recorder.final(22) == ["Downloading", "DownloadPaused", "Downloading", "DownloadFailed"]
            assert src.requests == []  # not one byte of HTTP was exchanged
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="certificate") == 2
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="unreachable") == 0
            assert fw.metric("ocpp_lc_firmware_downloads_total", outcome="download_failed") == 1
            assert fw.cache.published() == {}
            assert list((tmp_path / "firmware" / "partial").iterdir()) == []
    failures = [r.getMessage() for r in caplog.records if "failed for good" in r.getMessage()]
    assert len(failures) == 1
    assert "certificate verification" in failures[0] and "unable to get local issuer certificate" in failures[0]


@pytest.mark.parametrize(
    ("case", "log_says"),
    [
        ("another CA", "unable to get local issuer certificate"),
        ("another host", "address mismatch"),
        ("expired", "certificate has expired"),
    ],
)
async def test_a_certificate_that_fails_verification_is_download_failed(
    tmp_path: Path, site_ca: TestCa, caplog: pytest.LogCaptureFixture, case: str, log_says: str
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    if case == "another CA":
        # Same name, same host names: only who signed it differs.
        certified = TestCa(site_ca.directory, "rogue CA").issue("localhost", hosts=LOOPBACK_HOSTS)
    elif case == "another host":
        certified = site_ca.issue("firmware.example", hosts=("firmware.example",))
    else:
        certified = site_ca.issue(
            "localhost",
            hosts=LOOPBACK_HOSTS,
            valid_from=now - datetime.timedelta(days=30),
            valid_until=now - datetime.timedelta(days=1),
        )
    caplog.set_level(logging.WARNING, logger="ocpp_lc.firmware")
    with trio.fail_after(TIMEOUT_S):
        async with (
            source(honest(FIRMWARE), server_context(certified)) as src,
            running_cache(tmp_path, ca_file=site_ca.cert_file) as fw,
        ):
            fw.publish(src.url(), retries=0)
            assert await fw.recorder.final(7) == ["Downloading", "DownloadFailed"]
            assert src.requests == []
            assert fw.metric("ocpp_lc_firmware_download_attempt_failures_total", reason="certificate") == 1
    assert any("certificate verification" in r.getMessage() and log_says in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [None, "not a certificate\n"])
def test_an_unusable_ca_file_fails_when_the_cache_is_built(tmp_path: Path, content: str | None) -> None:
    # At start, not at the first PublishFirmware: a typo in the configuration shows at once.
    ca_file = tmp_path / "ca.pem"
    if content is not None:
        ca_file.write_text(content)
    settings = FirmwareSettings(cache_dir=tmp_path / "firmware", ca_file=ca_file)
    with Store.open(tmp_path / "state") as store, pytest.raises(OSError):  # ssl.SSLError is an OSError
        FirmwareCache(settings, state=store.namespace("firmware"), notifier=Recorder(), registry=CollectorRegistry())
