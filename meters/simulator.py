"""A meter to talk to: pymodbus's own Modbus TCP server answering from a SunSpec register image.

Used by the demo (a simulated building behind a grid meter, :mod:`router.demo.building_meter`) and by
the tests (``tests/support/modbus_meter.py``). :class:`ModbusMeterServer` runs pymodbus's
``ModbusTcpServer`` (an implementation independent of our client's decoding) on its own asyncio loop
in a daemon thread, bound to 127.0.0.1 port 0. Every read is answered from
:attr:`ModbusMeterServer.image` (address → register value): a load changing is a new value there, or
a whole new image assigned at once (each answer reads the attribute once, so it never mixes two).
:attr:`ModbusMeterServer.silent` makes the meter take a request and never answer (a hung gateway).

:func:`sunspec_image` lays out a SunSpec map ('SunS', common model 1, a meter model, end marker) the
way a meter does; :func:`set_sunspec_currents` writes per-phase currents into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any, cast

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

__all__ = [
    "NOT_IMPLEMENTED",
    "Image",
    "ModbusMeterServer",
    "set_sunspec_currents",
    "sunspec_image",
    "sunspec_model_address",
]

Image = dict[int, int]
#: What a SunSpec device answers for a value it does not implement (int16).
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
        # Read once: whoever replaces the image (another thread) never makes one answer mix two images.
        image = self.image
        if any(address + offset not in image for offset in range(count)):
            return ExcCodes.ILLEGAL_ADDRESS
        for offset in range(count):
            registers[address - start + offset] = image[address + offset]
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
            # pymodbus keeps the listening asyncio.Server where a connection keeps its transport.
            listening = cast(asyncio.Server, server.transport)
            self.port = listening.sockets[0].getsockname()[1]
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
            future = asyncio.run_coroutine_threadsafe(server.shutdown(), loop)  # type: ignore[no-untyped-call]
            # A hung silent request may keep it from stopping cleanly: the thread is a daemon, move on.
            with contextlib.suppress(Exception):
                future.result(5)
        self._thread.join(5)
