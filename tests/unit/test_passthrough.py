"""Which parts of a station's handshake reach the CSMS, and of a CSMS refusal the station (#13.8).

The end-to-end proof, with real peers on both sides, is tests/e2e/test_handshake_passthrough.py;
these pin the header policy of router/passthrough.py case by case.
"""

from __future__ import annotations

from router.passthrough import forwarded_request_headers, mirrored_refusal_headers, upstream_target


def test_end_to_end_request_headers_pass_and_this_hops_do_not() -> None:
    # What read_handshake gives for a typical station: lower-case names, in arrival order.
    station = {
        "host": "lc.site.local:9000",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
        "authorization": "Basic Q1MwMTpzZWNyZXQ=",
        "user-agent": "ACME-Charger/1.2",
        "cookie": "lb=node-2",
        "origin": "http://lc.site.local",
        "x-vendor-trace": "42",
        "proxy-authorization": "Basic cHJveHk6cHc=",
        "keep-alive": "timeout=5",
        "content-length": "0",
    }
    assert forwarded_request_headers(station) == [
        ("authorization", "Basic Q1MwMTpzZWNyZXQ="),
        ("user-agent", "ACME-Charger/1.2"),
        ("cookie", "lb=node-2"),
        ("origin", "http://lc.site.local"),
        ("x-vendor-trace", "42"),
    ]


def test_headers_named_in_connection_are_hop_by_hop() -> None:
    station = {"connection": "Upgrade, X-Hop", "upgrade": "websocket", "x-hop": "1", "x-end": "2"}
    assert forwarded_request_headers(station) == [("x-end", "2")]


def test_a_refusal_keeps_its_challenge_and_retry_hint_only() -> None:
    csms = [
        ("content-type", "text/plain"),
        ("content-length", "12"),
        ("www-authenticate", 'Basic realm="csms"'),
        ("www-authenticate", 'Bearer realm="csms"'),
        ("Retry-After", "30"),
        ("location", "ws://csms.example.net/elsewhere"),
        ("connection", "close"),
    ]
    assert mirrored_refusal_headers(csms) == [
        ("www-authenticate", 'Basic realm="csms"'),
        ("www-authenticate", 'Bearer realm="csms"'),
        ("Retry-After", "30"),
    ]


def test_the_query_string_follows_the_identity() -> None:
    assert upstream_target("/ocpp", "CS01", "/ocpp/CS01?site=7&x=%2F") == "/ocpp/CS01?site=7&x=%2F"
    assert upstream_target("/ocpp", "RDAM%20123", "/ocpp/RDAM%20123") == "/ocpp/RDAM%20123"
    assert upstream_target("", "CS01", "/ocpp/CS01?") == "/CS01?"
