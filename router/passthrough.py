"""What of a station's opening handshake reaches the CSMS, and what of a CSMS refusal reaches the station.

Part 4 §6.1 asks that a station need not behave differently behind a Local Controller and that the
CSMS cannot tell it is relayed. So the controller's handshake toward the CSMS carries the station's
request as far as HTTP allows a proxy to: the same path *and query string*, the subprotocols the
station offered, and every end-to-end request header. It drops only what belongs to one hop or to
one websocket handshake, because the controller's own handshake toward the CSMS regenerates it:

* hop-by-hop (RFC 9110 §7.6.1): ``Connection`` and every header it names, ``Keep-Alive``,
  ``Proxy-Connection``, ``Proxy-Authorization`` (credentials for a proxy on the station's hop,
  never meant for the CSMS), ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``;
* the websocket handshake (RFC 6455 §4.1): ``Sec-WebSocket-Key``, ``-Version``, ``-Extensions``
  (each leg negotiates permessage-deflate itself), ``-Protocol`` (passed as the offered
  subprotocols), ``-Accept``;
* message framing and the connection's addressing: ``Host`` (the CSMS's own), ``Content-Length``
  (an upgrade GET has no body), ``Expect``.

Everything else passes unchanged and in order: ``Authorization`` (Basic auth, A00.FR.2xx),
``User-Agent``, ``Cookie`` (e.g. a load balancer's stickiness), ``Origin``, vendor ``X-…`` headers.

A CSMS refusal reaches the station with its status and body, plus the response headers that tell
the station what to do next: ``WWW-Authenticate`` (a 401 must carry its challenge, RFC 9110
§11.6.1) and ``Retry-After`` (503, 429). Others are not mirrored: framing headers are the
controller's own answer's, and ``Location`` would send the station around the controller.

Pure functions, no I/O: :mod:`router.server` applies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

#: Request headers that never travel to the CSMS (lower-case), see the module docstring.
NOT_FORWARDED: Final = frozenset(
    {
        # hop-by-hop
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        # this websocket handshake's own
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        # framing and addressing of this hop
        "host",
        "content-length",
        "expect",
    }
)

#: Refusal headers mirrored to the station (lower-case).
MIRRORED_REFUSAL_HEADERS: Final = frozenset({"www-authenticate", "retry-after"})


def forwarded_request_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The station's request headers to send on to the CSMS, in their order.

    ``headers`` maps lower-case names to values (repeats joined with ", ", as
    :func:`router.transport.read_handshake` gives them). Headers named in ``Connection`` are
    hop-by-hop too (RFC 9110 §7.6.1) and are dropped with it.
    """
    named_by_connection = {token.strip().lower() for token in headers.get("connection", "").split(",")}
    dropped = NOT_FORWARDED | named_by_connection
    return [(name, value) for name, value in headers.items() if name not in dropped]


def mirrored_refusal_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers of a CSMS refusal that the station's refusal repeats (each occurrence, in order)."""
    return [(name, value) for name, value in headers if name.lower() in MIRRORED_REFUSAL_HEADERS]


def upstream_target(upstream_path: str, raw_segment: str, station_target: str) -> str:
    """``<upstream path>/<identity segment as the station sent it>`` plus the station's query string."""
    _, question, query = station_target.partition("?")
    target = f"{upstream_path}/{raw_segment}"
    return f"{target}?{query}" if question else target
