"""A CMOS real-time clock (Motorola MC146818A) that shows the host's time and keeps NVRAM.

Ports 0x70 (index; bit 7 masks NMI) and 0x71 (data), inserted on the PIO bus at base 0x70
with length 2. The clock registers (seconds, minutes, hours, day of week, day of month,
month, year, and the PC's century byte at 0x32) are computed from the injected ``clock``
(seconds since the epoch, UTC) on every read, in the format register B asks for: BCD or
binary (bit 2, DM), 24 or 12 hours (bit 1). The guest may set the clock (register B bit 7,
SET, freezes the registers while it writes them, as Linux's ``mc146818_set_time`` does);
the guest's time is then kept as a whole-second offset from the host's. The day of week is
always derived from the date.

Registers A and B keep what the guest writes; A's update-in-progress bit (7) always reads 0,
so a reader never waits for an update cycle (Linux's ``mc146818_avoid_UIP`` re-reads the
seconds around its read-out, which covers a second boundary passing). Register C reads 0
and register D reads 0x80 (valid RAM and time). NVRAM bytes 0x0E..0x7F (except the century
byte) are plain storage; the VMM may fill in the BIOS memory-size fields with ``set_nvram``.
No checksum is kept for them.

Not modelled: interrupts (periodic, alarm, update-ended; the alarm registers are stored but
never fire), the divider chain and the square-wave output, daylight saving (B bit 0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kasou.devices import DeviceStateError

if TYPE_CHECKING:
    from datetime import datetime

__all__ = ["CMOS_SIZE", "Rtc", "RtcState"]

CMOS_SIZE = 128
"""Bytes of CMOS addressed through port 0x70 (index bits 0-6)."""

# Offsets from base 0x70.
_INDEX_PORT = 0
_DATA_PORT = 1

_INDEX_MASK = 0x7F
_NMI_MASKED = 0x80

# Register indexes (MC146818A datasheet, "Address Map"; 0x32 is the PC/AT century byte).
_SECONDS = 0x00
_MINUTES = 0x02
_HOURS = 0x04
_DAY_OF_WEEK = 0x06
_DAY_OF_MONTH = 0x07
_MONTH = 0x08
_YEAR = 0x09
_REG_A = 0x0A
_REG_B = 0x0B
_REG_C = 0x0C
_REG_D = 0x0D
_NVRAM_FIRST = 0x0E
_CENTURY = 0x32

# The clock registers, and where each sits in a frozen copy of them.
_CLOCK_SLOTS = {
    _SECONDS: 0,
    _MINUTES: 1,
    _HOURS: 2,
    _DAY_OF_WEEK: 3,
    _DAY_OF_MONTH: 4,
    _MONTH: 5,
    _YEAR: 6,
    _CENTURY: 7,
}
# CMOS bytes that hold no stored value here: the clock and registers C and D.
_COMPUTED = frozenset(_CLOCK_SLOTS) | {_REG_C, _REG_D}

_A_UIP = 0x80  # update in progress: read-only, always 0 here
_B_SET = 0x80  # freeze the clock registers for setting
_B_UIE = 0x10  # update-ended interrupt enable, cleared by SET
_B_BINARY = 0x04  # DM: binary rather than BCD
_B_24_HOUR = 0x02
_HOUR_PM = 0x80  # in 12-hour mode
_D_VRT = 0x80  # valid RAM and time

# Power-on values as a BIOS leaves them: 32.768 kHz time base and 1024 Hz rate in A;
# 24-hour BCD in B.
_DEFAULT_A = 0x26
_DEFAULT_B = _B_24_HOUR

# Guest time more than this far from the host's cannot come from a valid date (years 1-9999).
_MAX_OFFSET_SECONDS = 10_000 * 366 * 86_400


@dataclass(frozen=True)
class RtcState:
    """An ``Rtc``'s registers and NVRAM. Field names are a snapshot format contract.

    ``index`` is the last byte written to port 0x70 (NMI mask included). ``cmos`` is the
    whole 128-byte image; the bytes of computed registers (the clock, C, D) are not used.
    ``offset_seconds`` is guest time minus host time. ``frozen_time`` holds the clock
    registers (seconds, minutes, hours, day of week, day, month, year, century) while
    register B's SET bit is on, and is empty otherwise.
    """

    index: int
    cmos: bytes
    offset_seconds: int
    frozen_time: bytes


class Rtc:
    """An MC146818A CMOS clock reading ``clock`` (seconds since the epoch, UTC)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._index = 0
        self._cmos = bytearray(CMOS_SIZE)
        self._cmos[_REG_A] = _DEFAULT_A
        self._cmos[_REG_B] = _DEFAULT_B
        self._offset = 0
        self._frozen: bytearray | None = None  # set exactly while register B's SET bit is

    @property
    def nmi_masked(self) -> bool:
        """Whether the guest last wrote port 0x70 with bit 7 set (NMI disabled)."""
        return bool(self._index & _NMI_MASKED)

    def set_nvram(self, index: int, value: int) -> None:
        """Store ``value`` in NVRAM byte ``index`` (0x0E..0x7F, not the century byte 0x32)."""
        if not _NVRAM_FIRST <= index < CMOS_SIZE or index == _CENTURY:
            raise ValueError(
                f"CMOS index {index:#x} is not NVRAM: use 0x0e..0x7f except 0x32 (the century)"
            )
        if not 0 <= value <= 0xFF:
            raise ValueError(f"CMOS byte value {value} is not in 0..255")
        self._cmos[index] = value

    def read(self, offset: int, data: memoryview) -> None:
        """Read port 0x70 or 0x71 at ``offset`` from 0x70."""
        for i in range(len(data)):
            if offset + i == _DATA_PORT:
                data[i] = self._read_register(self._index & _INDEX_MASK)
            else:
                data[i] = 0xFF  # the index port is write-only on the PC/AT

    def write(self, offset: int, data: memoryview) -> None:
        """Write port 0x70 (index and NMI mask) or 0x71 (data) at ``offset`` from 0x70."""
        for i, value in enumerate(data):
            if offset + i == _INDEX_PORT:
                self._index = value
            elif offset + i == _DATA_PORT:
                self._write_register(self._index & _INDEX_MASK, value)

    def save(self) -> RtcState:
        """The clock's state as plain data (the time itself is the host's, plus the offset)."""
        return RtcState(
            index=self._index,
            cmos=bytes(self._cmos),
            offset_seconds=self._offset,
            frozen_time=b"" if self._frozen is None else bytes(self._frozen),
        )

    @classmethod
    def restore(cls, clock: Callable[[], float], state: RtcState) -> Rtc:
        """A clock in ``state``, which is validated as untrusted input (``DeviceStateError``)."""
        if type(state.index) is not int or not 0 <= state.index <= 0xFF:
            raise _state_error(f"index is {state.index!r}, not a byte")
        if type(state.cmos) is not bytes or len(state.cmos) != CMOS_SIZE:
            raise _state_error(f"cmos must be {CMOS_SIZE} bytes")
        if state.cmos[_REG_A] & _A_UIP:
            raise _state_error("register A has its read-only update-in-progress bit set")
        if type(state.offset_seconds) is not int or abs(state.offset_seconds) > _MAX_OFFSET_SECONDS:
            raise _state_error(
                f"offset_seconds is {state.offset_seconds!r}, not a whole number of seconds "
                "within 10000 years"
            )
        if type(state.frozen_time) is not bytes:
            raise _state_error("frozen_time is not bytes")
        expected = len(_CLOCK_SLOTS) if state.cmos[_REG_B] & _B_SET else 0
        if len(state.frozen_time) != expected:
            raise _state_error(
                f"frozen_time has {len(state.frozen_time)} bytes, {expected} expected with "
                f"register B {state.cmos[_REG_B]:#04x}"
            )
        rtc = cls(clock)
        rtc._index = state.index
        rtc._cmos = bytearray(state.cmos)
        for index in _COMPUTED:
            rtc._cmos[index] = 0
        rtc._offset = state.offset_seconds
        rtc._frozen = bytearray(state.frozen_time) if expected else None
        return rtc

    # -- registers ----------------------------------------------------------------------------

    def _read_register(self, index: int) -> int:
        slot = _CLOCK_SLOTS.get(index)
        if slot is not None:
            frozen = self._frozen
            return frozen[slot] if frozen is not None else self._clock_registers()[slot]
        if index == _REG_C:
            return 0  # no interrupt flags: no interrupt source is modelled
        if index == _REG_D:
            return _D_VRT
        return self._cmos[index]

    def _write_register(self, index: int, value: int) -> None:
        slot = _CLOCK_SLOTS.get(index)
        if slot is not None:
            frozen = self._frozen
            if frozen is not None:
                frozen[slot] = value  # taken into the clock when SET is cleared
            else:
                registers = self._clock_registers()
                registers[slot] = value
                self._set_clock(registers)
        elif index == _REG_A:
            self._cmos[_REG_A] = value & ~_A_UIP
        elif index == _REG_B:
            self._write_register_b(value)
        elif index not in (_REG_C, _REG_D):  # C and D are read-only
            self._cmos[index] = value

    def _write_register_b(self, value: int) -> None:
        before = self._cmos[_REG_B]
        if value & _B_SET:
            value &= ~_B_UIE  # datasheet: setting SET clears UIE
        if self._frozen is not None and not value & _B_SET:
            # SET cleared: the clock runs from what the guest wrote, read in the format it
            # was written in.
            self._set_clock(self._frozen)
            self._frozen = None
        self._cmos[_REG_B] = value
        if value & _B_SET and not before & _B_SET:
            self._frozen = self._clock_registers()

    # -- the clock ----------------------------------------------------------------------------

    def _clock_registers(self) -> bytearray:
        """The clock registers as the guest reads them now, in register B's format."""
        moment = time.gmtime(math.floor(self._clock()) + self._offset)
        binary = self._cmos[_REG_B] & _B_BINARY
        hour = moment.tm_hour
        if self._cmos[_REG_B] & _B_24_HOUR:
            hours = _encode(hour, binary)
        else:
            hours = _encode(hour % 12 or 12, binary) | (_HOUR_PM if hour >= 12 else 0)
        return bytearray(
            (
                _encode(moment.tm_sec, binary),
                _encode(moment.tm_min, binary),
                hours,
                # The RTC counts Sunday as 1; Python's tm_wday counts Monday as 0.
                _encode((moment.tm_wday + 1) % 7 + 1, binary),
                _encode(moment.tm_mday, binary),
                _encode(moment.tm_mon, binary),
                _encode(moment.tm_year % 100, binary),
                _encode(moment.tm_year // 100 % 100, binary),
            )
        )

    def _set_clock(self, registers: bytearray) -> None:
        """Make the clock read ``registers`` now; an impossible time is ignored, as the
        guest's own check of its write would show it."""
        try:
            moment = self._decode(registers)
        except ValueError:
            return
        import calendar  # the guest setting the clock is rare: keep it off start-up

        self._offset = calendar.timegm(moment.timetuple()) - math.floor(self._clock())

    def _decode(self, registers: bytearray) -> datetime:
        binary = self._cmos[_REG_B] & _B_BINARY
        hours = registers[_CLOCK_SLOTS[_HOURS]]
        if self._cmos[_REG_B] & _B_24_HOUR:
            hour = _decode(hours, binary)
        else:
            twelve = _decode(hours & ~_HOUR_PM, binary)
            if not 1 <= twelve <= 12:
                raise ValueError(f"hour {twelve} in 12-hour mode")
            hour = twelve % 12 + (12 if hours & _HOUR_PM else 0)
        year = _decode(registers[_CLOCK_SLOTS[_YEAR]], binary)
        century = _decode(registers[_CLOCK_SLOTS[_CENTURY]], binary)
        if year > 99 or century > 99:
            raise ValueError(f"year {year} or century {century} over 99")
        from datetime import datetime

        # datetime checks every field, the day against the month's length included.
        return datetime(
            century * 100 + year,
            _decode(registers[_CLOCK_SLOTS[_MONTH]], binary),
            _decode(registers[_CLOCK_SLOTS[_DAY_OF_MONTH]], binary),
            hour,
            _decode(registers[_CLOCK_SLOTS[_MINUTES]], binary),
            _decode(registers[_CLOCK_SLOTS[_SECONDS]], binary),
        )


def _encode(value: int, binary: int) -> int:
    return value if binary else (value // 10) << 4 | value % 10


def _decode(value: int, binary: int) -> int:
    if binary:
        return value
    high, low = value >> 4, value & 0x0F
    if high > 9 or low > 9:
        raise ValueError(f"{value:#04x} is not BCD")
    return high * 10 + low


def _state_error(detail: str) -> DeviceStateError:
    return DeviceStateError(
        f"RTC state is invalid: {detail}; the snapshot is corrupt or was not written by "
        "kasou: take a new one"
    )
