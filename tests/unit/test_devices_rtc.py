"""The CMOS RTC: the host's time in the guest's format, guest-set time, NVRAM, state."""

from __future__ import annotations

import calendar
import dataclasses
from datetime import datetime

import pytest

from kasou.devices import DeviceStateError
from kasou.devices.legacy import Rtc

# CMOS indexes and register bits as a driver knows them (MC146818A; Linux mc146818rtc.h).
SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D, CENTURY = 0x0A, 0x0B, 0x0C, 0x0D, 0x32
A_UIP = 0x80
B_SET, B_PIE, B_UIE, B_DM_BINARY, B_24H = 0x80, 0x40, 0x10, 0x04, 0x02
D_VRT = 0x80
NMI_DISABLE = 0x80
CLOCK = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY, MONTH, YEAR, CENTURY)


class FakeClock:
    """A host clock that stands still until a test moves it."""

    def __init__(self, utc: str) -> None:
        moment = datetime.fromisoformat(utc)
        self.now = calendar.timegm(moment.timetuple()) + 0.25  # a quarter into the second

    def __call__(self) -> float:
        return self.now


def cmos_read(rtc: Rtc, index: int) -> int:
    rtc.write(0, memoryview(bytearray([index])))
    data = bytearray(1)
    rtc.read(1, memoryview(data))
    return data[0]


def cmos_write(rtc: Rtc, index: int, value: int) -> None:
    rtc.write(0, memoryview(bytearray([index])))
    rtc.write(1, memoryview(bytearray([value])))


def read_clock(rtc: Rtc) -> list[int]:
    return [cmos_read(rtc, index) for index in CLOCK]


def test_the_guest_sees_the_hosts_time_in_bcd() -> None:
    rtc = Rtc(FakeClock("2024-02-29 13:45:07"))  # a Thursday
    assert cmos_read(rtc, REG_B) & (B_DM_BINARY | B_24H) == B_24H  # 24-hour BCD by default

    assert read_clock(rtc) == [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]


def test_binary_mode_is_what_register_b_asks_for() -> None:
    rtc = Rtc(FakeClock("2024-02-29 13:45:07"))
    cmos_write(rtc, REG_B, B_24H | B_DM_BINARY)

    assert read_clock(rtc) == [7, 45, 13, 5, 29, 2, 24, 20]


@pytest.mark.parametrize(
    ("hour", "bcd", "binary"),
    [
        (0, 0x12, 12),
        (1, 0x01, 1),
        (11, 0x11, 11),
        (12, 0x92, 0x8C),
        (13, 0x81, 0x81),
        (23, 0x91, 0x8B),
    ],
)
def test_twelve_hour_mode_marks_pm_in_bit_7(hour: int, bcd: int, binary: int) -> None:
    rtc = Rtc(FakeClock(f"1999-12-31 {hour:02d}:00:00"))
    cmos_write(rtc, REG_B, 0)
    assert cmos_read(rtc, HOURS) == bcd
    cmos_write(rtc, REG_B, B_DM_BINARY)
    assert cmos_read(rtc, HOURS) == binary


def test_the_clock_follows_the_host() -> None:
    clock = FakeClock("2023-12-31 23:59:59")  # a Sunday
    rtc = Rtc(clock)
    assert cmos_read(rtc, DAY_OF_WEEK) == 1

    clock.now += 1

    assert read_clock(rtc) == [0x00, 0x00, 0x00, 0x02, 0x01, 0x01, 0x24, 0x20]


def test_status_registers_never_make_a_reader_wait() -> None:
    rtc = Rtc(FakeClock("2024-01-01 00:00:00"))
    assert cmos_read(rtc, REG_A) & A_UIP == 0
    assert cmos_read(rtc, REG_C) == 0
    assert cmos_read(rtc, REG_D) == D_VRT
    cmos_write(rtc, REG_A, 0xA6)  # the update-in-progress bit is read-only
    assert cmos_read(rtc, REG_A) == 0x26


def test_register_b_keeps_the_bits_the_guest_writes() -> None:
    rtc = Rtc(FakeClock("2024-01-01 00:00:00"))
    cmos_write(rtc, REG_B, B_PIE | B_UIE | B_24H | B_DM_BINARY | 0x09)
    assert cmos_read(rtc, REG_B) == B_PIE | B_UIE | B_24H | B_DM_BINARY | 0x09


def test_the_guest_can_set_the_clock_like_linux_does() -> None:
    clock = FakeClock("2024-02-29 13:45:07")
    rtc = Rtc(clock)
    control = cmos_read(rtc, REG_B)
    # mc146818_set_time: SET, write the fields, restore B.
    cmos_write(rtc, REG_B, control | B_SET)
    for index, value in zip(CLOCK, (0x05, 0x04, 0x03, 0x07, 0x02, 0x01, 0x30, 0x20), strict=True):
        cmos_write(rtc, index, value)
    clock.now += 10  # frozen while SET is on
    assert read_clock(rtc)[:3] == [0x05, 0x04, 0x03]
    cmos_write(rtc, REG_B, control)

    assert read_clock(rtc) == [0x05, 0x04, 0x03, 0x04, 0x02, 0x01, 0x30, 0x20]
    clock.now += 2
    assert cmos_read(rtc, SECONDS) == 0x07

    restored = Rtc.restore(clock, rtc.save())
    assert read_clock(restored) == read_clock(rtc)


def test_an_impossible_time_from_the_guest_is_ignored() -> None:
    rtc = Rtc(FakeClock("2024-02-28 12:00:00"))
    cmos_write(rtc, REG_B, B_24H | B_SET)
    cmos_write(rtc, DAY, 0x30)  # February 30th
    cmos_write(rtc, MINUTES, 0x7A)  # not BCD
    cmos_write(rtc, REG_B, B_24H)

    assert read_clock(rtc) == [0x00, 0x00, 0x12, 0x04, 0x28, 0x02, 0x24, 0x20]


def test_a_single_field_written_without_set_takes_effect() -> None:
    rtc = Rtc(FakeClock("2024-02-28 12:00:00"))
    cmos_write(rtc, YEAR, 0x25)
    assert cmos_read(rtc, YEAR) == 0x25
    assert cmos_read(rtc, DAY_OF_WEEK) == 0x06  # 2025-02-28 is a Friday


def test_nvram_holds_what_is_written() -> None:
    rtc = Rtc(FakeClock("2024-01-01 00:00:00"))
    rtc.set_nvram(0x34, 0x12)  # memory above 16 MiB, in 64 KiB units, low byte
    assert cmos_read(rtc, 0x34) == 0x12
    for index in (0x0E, 0x40, 0x7F):
        cmos_write(rtc, index, index ^ 0xA5)
    assert [cmos_read(rtc, index) for index in (0x0E, 0x40, 0x7F)] == [
        index ^ 0xA5 for index in (0x0E, 0x40, 0x7F)
    ]


@pytest.mark.parametrize(("index", "value"), [(0x0D, 0), (0x80, 0), (CENTURY, 0x20), (0x40, 256)])
def test_set_nvram_refuses_what_is_not_nvram(index: int, value: int) -> None:
    with pytest.raises(ValueError, match="CMOS"):
        Rtc().set_nvram(index, value)


def test_the_index_port_carries_the_nmi_mask() -> None:
    rtc = Rtc(FakeClock("2024-01-01 00:00:00"))
    cmos_write(rtc, NMI_DISABLE | REG_D, 0)
    assert rtc.nmi_masked
    data = bytearray(1)
    rtc.read(1, memoryview(data))
    assert data[0] == D_VRT  # bit 7 is not part of the index
    rtc.write(0, memoryview(bytearray([REG_D])))
    assert not rtc.nmi_masked


def test_the_default_clock_is_the_hosts() -> None:
    import time

    rtc = Rtc()
    cmos_write(rtc, REG_B, B_24H | B_DM_BINARY)
    before = time.gmtime()
    year = cmos_read(rtc, CENTURY) * 100 + cmos_read(rtc, YEAR)
    assert year in (before.tm_year, before.tm_year + 1)


def test_state_round_trips_through_save_and_restore() -> None:
    clock = FakeClock("2024-02-29 13:45:07")
    rtc = Rtc(clock)
    rtc.set_nvram(0x5B, 0x40)
    cmos_write(rtc, REG_B, B_24H | B_DM_BINARY | B_SET)  # caught in the middle of setting
    cmos_write(rtc, HOURS, 9)
    rtc.write(0, memoryview(bytearray([NMI_DISABLE | 0x5B])))
    state = rtc.save()

    restored = Rtc.restore(clock, state)

    assert restored.save() == state
    assert restored.nmi_masked
    data = bytearray(1)
    restored.read(1, memoryview(data))
    assert data[0] == 0x40
    cmos_write(restored, REG_B, B_24H | B_DM_BINARY)
    assert [cmos_read(restored, index) for index in (HOURS, MINUTES)] == [9, 45]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": 256}, "index is 256, not a byte"),
        ({"cmos": bytes(127)}, "cmos must be 128 bytes"),
        ({"cmos": bytes(10) + b"\xa6" + bytes(117)}, "update-in-progress"),
        ({"offset_seconds": 10**15}, "offset_seconds"),
        ({"offset_seconds": 1.5}, "offset_seconds"),
        ({"frozen_time": bytes(8)}, "frozen_time has 8 bytes, 0 expected"),
    ],
)
def test_restore_rejects_a_corrupt_state(change: dict[str, object], message: str) -> None:
    state = dataclasses.replace(Rtc().save(), **change)  # type: ignore[arg-type]
    with pytest.raises(DeviceStateError, match=message):
        Rtc.restore(FakeClock("2024-01-01 00:00:00"), state)
