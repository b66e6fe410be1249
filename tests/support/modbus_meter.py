"""Meters for the tests: pymodbus's own Modbus TCP server, SunSpec and plain register images.

:class:`ModbusMeterServer` runs pymodbus's ``ModbusTcpServer`` (an independent Modbus implementation)
on its own asyncio loop in a thread, bound to 127.0.0.1 port 0. Every read is answered from
:attr:`ModbusMeterServer.image` (address → register value), which a test changes as it goes: a
building load rising is a new value there. :attr:`ModbusMeterServer.silent` makes the meter take a
request and never answer (a meter whose gateway hangs).

:class:`ImageReader` answers the same images in-process (no socket), so tests on trio's autojump
clock can drive the meter service; its ``silent`` waits forever like a hung meter.

The images: :func:`sunspec_image` lays out a SunSpec map ('SunS', model 1, a meter model, end) the way
a meter does; :func:`plain_image` puts currents and power at the addresses of a :class:`RegisterMap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import threading
from collections.abc import Callable
from typing import Any

import trio
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from meters.decode import MeterFault
from meters.settings import WIDTH, RegisterMap

Image = dict[int, int]
NOT_IMPLEMENTED = 0x8000


def _int16(value: int) -> int:
    if not -0x8000 <= value <= 0x7FFF:
        raise ValueError(f"{value} does not fit int16")
    return value & 0xFFFF


def sunspec_image(
    currents_amperes: tuple[float, float, float],
    *,
    base: int = 40000,
    model_id: int = 203,
    current_exponent: int = -1,
    power_watts: float | None = None,
    power_exponent: int = 0,
    total: float | None = None,
) -> Image:
    """A SunSpec map at ``base``: marker, common model (1, 66 registers), meter model ``model_id`` (105), end."""
    image: Image = {base: 0x5375, base + 1: 0x6E53, base + 2: 1, base + 3: 66}
    for offset in range(66):
        image[base + 4 + offset] = 0
    model = base + 4 + 66
    image[model] = model_id
    image[model + 1] = 105
    for offset in range(105):
        image[model + 2 + offset] = NOT_IMPLEMENTED
    set_sunspec_currents(image, currents_amperes, base=base, current_exponent=current_exponent, total=total)
    if power_watts is not None:
        image[model + 2 + 16] = _int16(round(power_watts / 10.0**power_exponent))
        image[model + 2 + 20] = _int16(power_exponent)
    image[model + 2 + 105] = 0xFFFF
    image[model + 2 + 106] = 0
    return image


def sunspec_model_address(base: int = 40000) -> int:
    """Where :func:`sunspec_image` puts the meter model's header."""
    return base + 4 + 66


def set_sunspec_currents(
    image: Image,
    currents_amperes: tuple[float, float, float],
    *,
    base: int = 40000,
    current_exponent: int = -1,
    total: float | None = None,
) -> None:
    """Write per-phase currents (and the total ``A``) into a :func:`sunspec_image` map."""
    data = sunspec_model_address(base) + 2
    scale = 10.0**current_exponent
    image[data + 4] = _int16(current_exponent)
    for phase, value in enumerate(currents_amperes):
        image[data + 1 + phase] = _int16(round(value / scale))
    image[data] = _int16(round((sum(currents_amperes) if total is None else total) / scale))


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


class ModbusMeterServer:
    """pymodbus's Modbus TCP server on 127.0.0.1 port 0 in a thread; see the module docstring."""

    def __init__(self, image: Image, unit_id: int = 1) -> None:
        self.image = image
        self.unit_id = unit_id
        self.silent = False
        self.port = 0
        self.requests = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: ModbusTcpServer | None = None
        self._released: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modbus-meter", daemon=True)

    async def _action(
        self, function_code: int, start: int, address: int, count: int, registers: list[int], values: Any
    ) -> ExcCodes | None:
        self.requests += 1
        if self.silent:
            assert self._released is not None
            await self._released.wait()  # never answered (until the server stops)
            return ExcCodes.DEVICE_BUSY
        if any(address + offset not in self.image for offset in range(count)):
            return ExcCodes.ILLEGAL_ADDRESS
        for offset in range(count):
            registers[address - start + offset] = self.image[address + offset]
        return None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop

        async def serve() -> None:
            self._released = asyncio.Event()
            device = SimDevice(
                self.unit_id,
                simdata=[SimData(0, count=65535, values=0, datatype=DataType.REGISTERS)],
                action=self._action,
            )
            server = ModbusTcpServer(device, address=("127.0.0.1", 0))
            self._server = server
            await server.listen()
            assert server.transport is not None
            self.port = server.transport.sockets[0].getsockname()[1]
            self._ready.set()
            await server.serving

        try:
            loop.run_until_complete(serve())
        except asyncio.CancelledError:
            pass
        finally:
            loop.close()

    def __enter__(self) -> ModbusMeterServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Modbus server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        loop, server = self._loop, self._server
        if loop is not None and server is not None:
            if self._released is not None:
                loop.call_soon_threadsafe(self._released.set)
            future = asyncio.run_coroutine_threadsafe(server.shutdown(), loop)
            # A hung silent request may keep it from stopping cleanly: the thread is a daemon, move on.
            with contextlib.suppress(Exception):
                future.result(5)
        self._thread.join(5)


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
