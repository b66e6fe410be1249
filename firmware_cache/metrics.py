"""The firmware cache's Prometheus metrics (prefix ``ocpp_lc_firmware_``, base units, bounded labels)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

#: How a publishing process ended (the ``outcome`` label of downloads_total); "unpublished": stopped
#: by an UnpublishFirmware before it was published.
OUTCOMES: Final = ("published", "download_failed", "invalid_checksum", "publish_failed", "unpublished")


class FirmwareMetrics:
    """Counters and gauges registered on the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.downloaded_bytes = Counter(
            "ocpp_lc_firmware_downloaded_bytes",
            "Bytes of firmware the controller downloaded from sources",
            registry=registry,
        )
        self.served_bytes = Counter(
            "ocpp_lc_firmware_served_bytes", "Bytes of firmware served to stations", registry=registry
        )
        self.downloads = Counter(
            "ocpp_lc_firmware_downloads",
            "Publishing processes by how they ended",
            ["outcome"],
            registry=registry,
        )
        self.attempt_failures = Counter(
            "ocpp_lc_firmware_download_attempt_failures",
            "Failed download attempts by reason (unreachable, timeout, broken_transfer, http_4xx, checksum ...)",
            ["reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "ocpp_lc_firmware_requests_rejected",
            "PublishFirmware requests answered Rejected, by reason",
            ["reason"],
            registry=registry,
        )
        self.cached_files = Gauge("ocpp_lc_firmware_cached_files", "Published files in the cache", registry=registry)
        self.cached_bytes = Gauge(
            "ocpp_lc_firmware_cached_bytes", "Bytes of published files in the cache", registry=registry
        )
        self.station_downloads = Gauge(
            "ocpp_lc_firmware_station_downloads", "Firmware transfers to stations in progress", registry=registry
        )
        self.http_responses = Counter(
            "ocpp_lc_firmware_http_responses",
            "Answers to firmware requests by HTTP status (200, 206, 304, 404, 416 ...)",
            ["code"],
            registry=registry,
        )
        self.dropped_at_start = Counter(
            "ocpp_lc_firmware_dropped_at_start",
            "Cached files dropped at start because their MD5 no longer matched",
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.downloads.labels(outcome)
