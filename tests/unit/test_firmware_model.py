"""The firmware cache's pure parts and its [firmware] configuration section."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware_cache.model import file_name_for, location_problem, normalise_md5, published_url
from router.config import ConfigError, parse_listen_address, parse_settings


@pytest.mark.parametrize(
    ("location", "name"),
    [
        ("https://vendor.example/fw/station-2.1.0.bin", "station-2.1.0.bin"),
        ("https://vendor.example/fw/station-2.1.0.bin?token=abc", "station-2.1.0.bin"),
        ("https://vendor.example/fw/", "firmware.bin"),
        ("https://vendor.example/fw/..", "firmware.bin"),
        ("https://vendor.example/fw/..%2F..%2Fetc%2Fpasswd", "firmware.bin"),
        ("https://vendor.example/fw/.hidden", "firmware.bin"),
        ("https://vendor.example/fw/a%20b.bin", "firmware.bin"),
        ("https://vendor.example/" + "a" * 200, "firmware.bin"),
    ],
)
def test_the_published_name_is_a_safe_name_or_the_default(location: str, name: str) -> None:
    assert file_name_for(location) == name


@pytest.mark.parametrize(
    ("location", "problem"),
    [
        ("http://vendor.example/fw.bin", None),
        ("HTTPS://vendor.example:8443/fw.bin", None),
        ("ftp://vendor.example/fw.bin", "UnsupportedScheme"),
        ("sftp://vendor.example/fw.bin", "UnsupportedScheme"),
        ("vendor.example/fw.bin", "UnsupportedScheme"),
        ("http://vendor.example:70000/fw.bin", "InvalidURL"),
        ("http:///fw.bin", "InvalidURL"),
    ],
)
def test_only_http_and_https_locations_are_fetched(location: str, problem: str | None) -> None:
    assert location_problem(location) == problem


def test_checksums_are_md5_hex_in_lower_case() -> None:
    assert normalise_md5("D41D8CD98F00B204E9800998ECF8427E") == "d41d8cd98f00b204e9800998ecf8427e"
    assert normalise_md5("d41d8cd98f00b204e9800998ecf8427") is None
    assert normalise_md5("g41d8cd98f00b204e9800998ecf8427e") is None


def test_published_urls_quote_the_name_and_fit_the_base() -> None:
    assert (
        published_url("http://10.0.0.2:8080/", "ab" * 16, "fw.bin")
        == f"http://10.0.0.2:8080/firmware/{'ab' * 16}/fw.bin"
    )


def test_the_public_base_url_defaults_to_the_http_address_unless_it_is_every_interface() -> None:
    settings = parse_settings({"state": {"dir": "/srv/lc"}})
    firmware = settings.firmware
    assert firmware.public_base(parse_listen_address("192.168.1.10:8080"), 8080) == "http://192.168.1.10:8080"
    assert firmware.public_base(parse_listen_address("[fd00::5]:0"), 43123) == "http://[fd00::5]:43123"
    assert firmware.public_base(parse_listen_address("0.0.0.0:8080"), 8080) is None
    assert firmware.cache_path(settings.state.path) == Path("/srv/lc/firmware")
    configured = parse_settings({"firmware": {"public_base_url": "https://lc.site:8443", "cache_dir": "/data/fw"}})
    assert configured.firmware.public_base(parse_listen_address("0.0.0.0:8080"), 8080) == "https://lc.site:8443"
    assert configured.firmware.cache_path(Path("/x")) == Path("/data/fw")


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ({"public_base_url": "ftp://lc.site"}, "http:// or https://"),
        ({"public_base_url": "http://lc.site/"}, "must not end with '/'"),
        ({"cache_dir": "relative/dir"}, "absolute path"),
        ({"max_file_bytes": 10}, "must be from 1024"),
        ({"retries": -1}, "must be from 0"),
        ({"bogus": 1}, "unknown key 'bogus'"),
    ],
)
def test_bad_firmware_settings_are_explained(section: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"firmware": section})
    assert words in str(error.value)
    assert "[firmware]" in str(error.value)
