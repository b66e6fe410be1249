"""permessage-deflate (RFC 7692): what we offer and accept, and the zlib state that follows from it.

wsproto runs the handshake and calls this extension object to build the offer (client) or the
answer (server); once the connection is open, :func:`codecs` turns the negotiated parameters into
the :class:`router.framing.Inflater` and :class:`router.framing.Deflater` the framer uses.

The parameters are chosen per leg, because zlib's state is most of an idle compressed connection's
memory: a compressor costs ``2**(window_bits + 2) + 2**(mem_level + 9)`` bytes plus ~6 KiB, an
inflater ``2**window_bits`` plus ~7 KiB, for as long as its context is kept.

* Toward stations (the site LAN) our compressor drops its context after every message (declared
  with ``server_no_context_takeover``), so it exists only while a message is compressed; a station
  that lets us limit its window (``client_max_window_bits``) gets :data:`STATION_WINDOW_BITS`.
* Toward the CSMS (the WAN, often metered): our compressor keeps its context, the part that makes
  repetitive OCPP traffic shrink ~20-fold, with a 4 KiB window and ``mem_level`` 3 (~26 KiB instead
  of zlib's default ~260 KiB: on OCPP messages, which are mostly shorter than 4 KiB and repeat
  their neighbours, the ratio is that of the default; ``tests/bench/versus_nginx.py`` prints the
  measured figures). The CSMS is asked for a 2 KiB window without a kept context
  (``server_max_window_bits=11; server_no_context_takeover``): what it sends is mostly short
  answers, which a kept context hardly shrinks, and our inflater then holds nothing between messages.

Whatever the peer sends is inflated to at most the message size limit (the framer's Inflater).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from wsproto.extensions import PerMessageDeflate

from .framing import Deflater, Inflater

#: The window the station's compressor is asked to stay within, when it lets us choose (LAN leg:
#: its ratio matters little there, and inflating it costs 1 KiB of window instead of 32).
STATION_WINDOW_BITS: Final = 10
#: Our compressor toward stations: its context is dropped after every message, so a small window
#: loses nothing (OCPP messages are mostly shorter than 1 KiB) and the transient state stays small.
STATION_DEFLATE_WINDOW_BITS: Final = 10
STATION_DEFLATE_MEM_LEVEL: Final = 3
#: Our compressor toward the CSMS (WAN): its window and memory level (~26 KiB of zlib state).
CSMS_WINDOW_BITS: Final = 12
CSMS_DEFLATE_MEM_LEVEL: Final = 3
#: The window the CSMS is asked to compress with (our inflater keeps it: ~9 KiB instead of ~39).
CSMS_PEER_WINDOW_BITS: Final = 11
_ZLIB_MAX_BITS: Final = 15


@dataclass(frozen=True, slots=True)
class Parameters:
    """What was agreed: the peer's window and context, ours."""

    peer_window_bits: int
    peer_keeps_context: bool
    own_window_bits: int
    own_keeps_context: bool


def _parse(offer: str) -> dict[str, str | None] | None:
    """The parameters of one extension offer or answer (None when malformed)."""
    parameters: dict[str, str | None] = {}
    for part in offer.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        name = name.strip()
        if not name or name in parameters:
            return None
        parameters[name] = value.strip().strip('"') or None
    return parameters


def _bits(value: str | None, default: int) -> int | None:
    if value is None:
        return default
    if not value.isdigit() or not 9 <= int(value) <= _ZLIB_MAX_BITS:
        return None
    return int(value)


class NegotiatedDeflate(PerMessageDeflate):
    """permessage-deflate as we offer (client) or accept (server) it; see the module docstring."""

    def __init__(self, *, server: bool, keep_context: bool, max_message_bytes: int) -> None:
        super().__init__()
        self.server = server
        self.keep_context = keep_context
        self.max_message_bytes = max_message_bytes
        self.parameters: Parameters | None = None

    # -- client ---------------------------------------------------------------------------------

    def offer(self) -> str:
        parts = [
            f"client_max_window_bits={CSMS_WINDOW_BITS}",
            f"server_max_window_bits={CSMS_PEER_WINDOW_BITS}",
            # What a CSMS sends is mostly short answers, which a kept context hardly shrinks; without
            # it our inflater exists only while a message arrives (~9 KiB less per idle station).
            "server_no_context_takeover",
        ]
        if not self.keep_context:
            parts.append("client_no_context_takeover")
        return "; ".join(parts)

    def finalize(self, offer: str) -> None:
        answer = _parse(offer) or {}
        # We asked for server_max_window_bits: a server that accepts must answer it (RFC 7692
        # §7.1.2.1); if one does not, inflating with the largest window is still correct.
        peer_bits = _bits(answer.get("server_max_window_bits"), _ZLIB_MAX_BITS) or _ZLIB_MAX_BITS
        own_limit = _bits(answer.get("client_max_window_bits"), CSMS_WINDOW_BITS) or CSMS_WINDOW_BITS
        self.parameters = Parameters(
            peer_window_bits=peer_bits,
            peer_keeps_context="server_no_context_takeover" not in answer,
            own_window_bits=min(own_limit, CSMS_WINDOW_BITS),
            own_keeps_context=self.keep_context and "client_no_context_takeover" not in answer,
        )
        self._enabled = True

    # -- server ---------------------------------------------------------------------------------

    def accept(self, offer: str) -> str | None:
        if self.parameters is not None:
            return None  # wsproto asks about every offer; the first acceptable one was taken
        asked = _parse(offer)
        if asked is None or set(asked) - {
            "client_max_window_bits",
            "server_max_window_bits",
            "client_no_context_takeover",
            "server_no_context_takeover",
        }:
            return None  # decline what we do not understand (RFC 7692 §5.1); the next offer may do
        answer: list[str] = []
        peer_bits = _ZLIB_MAX_BITS
        if "client_max_window_bits" in asked:
            offered = _bits(asked["client_max_window_bits"], _ZLIB_MAX_BITS)
            if offered is None:
                return None
            peer_bits = min(offered, STATION_WINDOW_BITS)
            answer.append(f"client_max_window_bits={peer_bits}")
        own_keeps = self.keep_context and "server_no_context_takeover" not in asked
        own_bits = CSMS_WINDOW_BITS if own_keeps else STATION_DEFLATE_WINDOW_BITS
        if "server_max_window_bits" in asked:
            limit = _bits(asked["server_max_window_bits"], _ZLIB_MAX_BITS)
            if asked["server_max_window_bits"] is None or limit is None:
                return None  # this parameter must carry a value
            own_bits = min(own_bits, limit)
            answer.append(f"server_max_window_bits={limit}")
        if not own_keeps:
            answer.append("server_no_context_takeover")  # a server may declare it unasked (§7.1.1.1)
        peer_keeps = "client_no_context_takeover" not in asked
        if not peer_keeps:
            answer.append("client_no_context_takeover")
        self.parameters = Parameters(peer_bits, peer_keeps, own_bits, own_keeps)
        self._enabled = True
        return "; ".join(answer)


def deflate(*, server: bool, keep_context: bool, max_message_bytes: int) -> NegotiatedDeflate:
    """permessage-deflate as we offer (client) or accept (server) it.

    ``keep_context`` decides whether *our* compressor keeps its LZ77 window between messages. The
    peer's own choice about its compressor is always honoured. What the peer sends is inflated to
    at most ``max_message_bytes`` per message.
    """
    return NegotiatedDeflate(server=server, keep_context=keep_context, max_message_bytes=max_message_bytes)


def codecs(extension: NegotiatedDeflate) -> tuple[Inflater, Deflater]:
    """The inflater for what the peer sends and the deflater for what we send, as negotiated."""
    agreed = extension.parameters
    assert agreed is not None, "permessage-deflate was not negotiated"
    mem_level = CSMS_DEFLATE_MEM_LEVEL if not extension.server else STATION_DEFLATE_MEM_LEVEL
    if extension.server and agreed.own_keeps_context:
        mem_level = CSMS_DEFLATE_MEM_LEVEL
    inflater = Inflater(
        agreed.peer_window_bits, keep_context=agreed.peer_keeps_context, max_message_bytes=extension.max_message_bytes
    )
    return inflater, Deflater(agreed.own_window_bits, mem_level, keep_context=agreed.own_keeps_context)
