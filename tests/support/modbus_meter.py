"""Meters for the tests: pymodbus's own Modbus TCP server, SunSpec and plain register images.

:class:`ModbusMeterServer` (from :mod:`meters.simulator`, shared with the demo) runs pymodbus's
``ModbusTcpServer`` (an independent Modbus implementation) on its own asyncio loop in a thread, bound
to 127.0.0.1 port 0. Every read is answered from :attr:`ModbusMeterServer.image` (address → register
value), which a test changes as it goes: a building load rising is a new value there.
:attr:`ModbusMeterServer.silent` makes the meter take a request and never answer (a meter whose
gateway hangs).

:class:`ImageReader` answers the same images in-process (no socket), so tests on trio's autojump
clock can drive the meter service; its ``silent`` waits forever like a hung meter.

The images: :func:`sunspec_image` (also from :mod:`meters.simulator`) lays out a SunSpec map ('SunS',
model 1, a meter model, end) the way a meter does; :func:`plain_image` puts currents and power at the
addresses of a :class:`RegisterMap`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import trio

from meters.decode import MeterFault
from meters.settings import WIDTH, RegisterMap
from meters.simulator import (
    NOT_IMPLEMENTED,
    Image,
    ModbusMeterServer,
    set_sunspec_currents,
    sunspec_image,
    sunspec_model_address,
)

__all__ = [
    "NOT_IMPLEMENTED",
    "Image",
    "ImageReader",
    "ModbusMeterServer",
    "encode_value",
    "plain_image",
    "put",
    "set_sunspec_currents",
    "sunspec_image",
    "sunspec_model_address",
]


def encode_value(value: float, data_type: str, byte_order: str = "big", word_order: str = "big") -> list[int]:
    """Registers holding ``value`` as a meter lays it out (the inverse of the decoder, written apart)."""
    code = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f"}[data_type]
    raw = struct.pack(code, value if data_type == "float32" else round(value))
    words = [raw[i : i + 2] for i in range(0, len(raw), 2)]
    registers = [int.from_bytes(word, "big" if byte_order == "big" else "little") for word in words]
    if word_order == "little":
        registers.reverse()
    assert len(registers) == WIDTH[data_type]
    return registers


def plain_image(layout: RegisterMap, currents_amperes: tuple[float, float, float], power_watts: float = 0.0) -> Image:
    """Currents (and power) at the layout's addresses, in its type and orders, before its scale."""
    image: Image = {}
    addresses = (layout.current_l1, layout.current_l2, layout.current_l3)
    for address, value in zip(addresses, currents_amperes, strict=True):
        if address is not None:
            put(
                image,
                address,
                encode_value(value / layout.current_scale, layout.data_type, layout.byte_order, layout.word_order),
            )
    if layout.power is not None:
        put(
            image,
            layout.power,
            encode_value(power_watts / layout.power_scale, layout.data_type, layout.byte_order, layout.word_order),
        )
    return image


def put(image: Image, address: int, registers: list[int]) -> None:
    for offset, register in enumerate(registers):
        image[address + offset] = register


class ImageReader:
    """An in-process :class:`~meters.modbus.RegisterReader` over an image (for the autojump clock)."""

    def __init__(self, image: Image | Callable[[], Image]) -> None:
        self._image = image
        self.silent = False
        self.reads = 0
        self.closed = 0

    @property
    def image(self) -> Image:
        return self._image() if callable(self._image) else self._image

    async def read(self, table: str, address: int, count: int) -> list[int]:
        self.reads += 1
        if self.silent:
            await trio.sleep_forever()
        image = self.image
        await trio.lowlevel.checkpoint()
        if any(address + offset not in image for offset in range(count)):
            raise MeterFault("modbus_error", f"illegal address {address}+{count}")
        return [image[address + offset] for offset in range(count)]

    def close(self) -> None:
        self.closed += 1
