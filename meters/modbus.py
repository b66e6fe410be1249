"""Reading a meter's registers over Modbus TCP, and finding a SunSpec meter model: the only I/O here.

pymodbus's clients are asyncio (``AsyncModbusTcpClient``) or blocking (``ModbusTcpClient``); trio
cannot await the former, and trio-asyncio would put a second event loop under every other part of the
appliance for one meter read a second. So each read runs the blocking client in a worker thread
(``trio.to_thread.run_sync``), one thread at a time per meter (a ``CapacityLimiter`` of 1: the client
is never used by two threads at once), with the client's own socket timeout a little inside the
meter's timeout, so a silent meter normally ends the read on its thread. The caller bounds the whole
read (SunSpec discovery included) with ``trio.fail_after``; a read cancelled there is abandoned to
finish on its thread (its socket timeout ends it), and the next read waits for that thread to let go.

After any failure the connection is closed, on the thread that used it, so the next read starts on a
fresh one: a late answer to a timed-out request can never be taken for the answer to the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import trio
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from .decode import (
    METER_MODEL_READ,
    METER_MODELS,
    SUNSPEC_END,
    MeterFault,
    MeterReading,
    decode_meter_model,
    decode_register_map,
    is_sunspec_marker,
    model_header,
)
from .settings import SUNSPEC_BASES, MeterSettings, RegisterMap

Table = Literal["holding", "input"]
#: Models walked before giving up on a SunSpec map (real devices have a handful).
MAX_MODELS = 64
#: The client's socket timeout as a share of the meter's timeout: its own timeout fires first.
SOCKET_TIMEOUT_SHARE = 0.8


class RegisterReader(Protocol):
    """Reads consecutive registers of one Modbus unit; MeterFault on any failure."""

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        """``count`` registers from ``address`` of ``table``."""
        ...

    def close(self) -> None:
        """Let go of the connection (it is opened again on the next read)."""
        ...


class PymodbusReader:
    """:class:`RegisterReader` over pymodbus's blocking TCP client, run in a worker thread."""

    def __init__(self, host: str, port: int, unit_id: int, timeout_s: float) -> None:
        socket_timeout_s = timeout_s * SOCKET_TIMEOUT_SHARE
        self._client = ModbusTcpClient(host, port=port, timeout=socket_timeout_s, retries=0, reconnect_delay=0)
        self._unit_id = unit_id
        self._where = f"{host}:{port} unit {unit_id}"
        self._limiter = trio.CapacityLimiter(1)

    async def read(self, table: Table, address: int, count: int) -> list[int]:
        return await trio.to_thread.run_sync(
            self._read_blocking, table, address, count, abandon_on_cancel=True, limiter=self._limiter
        )

    def close(self) -> None:
        # Not under a read still running on its thread (abandoned by a timeout): that one closes the
        # connection itself when it fails, and a socket must not be closed under a thread blocked on it.
        if self._limiter.borrowed_tokens == 0:
            self._client.close()  # type: ignore[no-untyped-call]

    def _read_blocking(self, table: Table, address: int, count: int) -> list[int]:
        try:
            if not self._client.connected and not self._client.connect():  # type: ignore[no-untyped-call]
                raise MeterFault("unreachable", f"no Modbus TCP connection to {self._where}")
            method = self._client.read_holding_registers if table == "holding" else self._client.read_input_registers
            response = method(address, count=count, device_id=self._unit_id)
            if response.isError():
                code = getattr(response, "exception_code", "?")
                raise MeterFault(
                    "modbus_error", f"{self._where} answered exception {code} for {table} {address}+{count}"
                )
            registers = list(response.registers)
            if len(registers) < count:
                raise MeterFault("short_read", f"{self._where} sent {len(registers)} of {count} registers")
            return registers[:count]
        except MeterFault:
            self._client.close()  # type: ignore[no-untyped-call]
            raise
        except ModbusIOException as error:
            self._client.close()  # type: ignore[no-untyped-call]
            raise MeterFault("timeout", f"{self._where}: {error}") from None
        except (ConnectionException, OSError) as error:
            self._client.close()  # type: ignore[no-untyped-call]
            raise MeterFault("unreachable", f"{self._where}: {error}") from None
        except ModbusException as error:
            self._client.close()  # type: ignore[no-untyped-call]
            raise MeterFault("modbus_error", f"{self._where}: {error}") from None


async def find_meter_model(reader: RegisterReader, bases: Sequence[int] = SUNSPEC_BASES) -> int:
    """The address of the first SunSpec meter model (201–204) header; MeterFault if there is none.

    ``not_sunspec``: no ``SunS`` marker at any base; ``wrong_model``: a SunSpec map without a meter model.
    """
    for base in bases:
        try:
            marker = await reader.read("holding", base, 2)
        except MeterFault as fault:
            if fault.outcome in ("modbus_error", "short_read"):
                continue  # nothing there (illegal address): try the next base
            raise
        if not is_sunspec_marker(marker):
            continue
        address = base + 2
        seen: list[int] = []
        for _ in range(MAX_MODELS):
            if address + 2 > 65536:
                break
            model_id, length = model_header(await reader.read("holding", address, 2))
            if model_id == SUNSPEC_END:
                break
            if model_id in METER_MODELS:
                return address
            seen.append(model_id)
            address += 2 + length
        raise MeterFault("wrong_model", f"the SunSpec map at {base} has no meter model (201-204), only {seen}")
    raise MeterFault("not_sunspec", f"no SunSpec marker at {', '.join(map(str, bases))}")


class SunSpecMeter:
    """A SunSpec meter: the model is found on the first read and again after it is found changed."""

    def __init__(self, reader: RegisterReader, base_address: int | None = None) -> None:
        self.reader = reader
        self._bases = SUNSPEC_BASES if base_address is None else (base_address,)
        self.model_address: int | None = None

    async def read(self) -> MeterReading:
        if self.model_address is None:
            self.model_address = await find_meter_model(self.reader, self._bases)
        try:
            return decode_meter_model(await self.reader.read("holding", self.model_address, METER_MODEL_READ))
        except MeterFault as fault:
            if fault.outcome in ("wrong_model", "modbus_error"):
                self.model_address = None  # the map moved (a firmware update?): look for it again next time
            raise


class MappedMeter:
    """A meter read through an explicit :class:`RegisterMap` (one request per run of adjacent values)."""

    def __init__(self, reader: RegisterReader, layout: RegisterMap) -> None:
        self.reader = reader
        self._layout = layout

    async def read(self) -> MeterReading:
        registers: dict[int, int] = {}
        for first, count in self._layout.reads():
            values = await self.reader.read(self._layout.table, first, count)
            registers.update(zip(range(first, first + count), values, strict=False))
        return decode_register_map(registers, self._layout)


class Meter(Protocol):
    """A meter as the service polls it."""

    reader: RegisterReader

    async def read(self) -> MeterReading:
        """One reading; MeterFault if there is none to be had."""
        ...


def open_meter(settings: MeterSettings, reader: RegisterReader | None = None) -> Meter:
    """The meter ``settings`` describes, over ``reader`` (default: pymodbus over TCP)."""
    if reader is None:
        reader = PymodbusReader(settings.host, settings.port, settings.unit_id, settings.timeout_s)
    if settings.registers is not None:
        return MappedMeter(reader, settings.registers)
    return SunSpecMeter(reader, settings.sunspec_base_address)
