"""The PIO/MMIO bus: dispatch by address, offsets, holes, straddles, overlaps, removal."""

from __future__ import annotations

import sys
import threading

import pytest

from kasou.devices import Bus, BusError


class Registers:
    """A device of plain byte registers that records each access as (kind, offset, size)."""

    def __init__(self, size: int, fill: int = 0) -> None:
        self.memory = bytearray([fill] * size)
        self.accesses: list[tuple[str, int, int]] = []

    def read(self, offset: int, data: memoryview) -> None:
        self.accesses.append(("read", offset, len(data)))
        data[:] = self.memory[offset : offset + len(data)]

    def write(self, offset: int, data: memoryview) -> None:
        self.accesses.append(("write", offset, len(data)))
        self.memory[offset : offset + len(data)] = data


def read(bus: Bus, address: int, size: int) -> bytes | None:
    buffer = bytearray(b"\xaa" * size)
    return bytes(buffer) if bus.read(address, memoryview(buffer)) else None


def write(bus: Bus, address: int, data: bytes) -> bool:
    return bus.write(address, memoryview(bytearray(data)))


def test_accesses_reach_the_device_at_their_offset() -> None:
    bus = Bus("pio")
    uart, rtc = Registers(8), Registers(2)
    bus.insert(uart, 0x3F8, 8)
    bus.insert(rtc, 0x70, 2)

    assert write(bus, 0x3FB, b"\x03")
    assert write(bus, 0x71, b"\x42")
    assert read(bus, 0x3FB, 1) == b"\x03"
    assert read(bus, 0x71, 1) == b"\x42"
    assert uart.accesses == [("write", 3, 1), ("read", 3, 1)]
    assert rtc.accesses == [("write", 1, 1), ("read", 1, 1)]


def test_wide_accesses_inside_a_range_are_dispatched_whole() -> None:
    bus = Bus("mmio")
    device = Registers(0x200)
    bus.insert(device, 0xD000_0000, 0x200)

    assert write(bus, 0xD000_0100, bytes(range(1, 9)))
    assert read(bus, 0xD000_0104, 4) == bytes([5, 6, 7, 8])
    assert read(bus, 0xD000_01F8, 8) == bytes(8)  # the last 8 bytes of the range
    assert device.accesses[-1] == ("read", 0x1F8, 8)


def test_holes_are_answered_by_no_device() -> None:
    bus = Bus("pio")
    device = Registers(8)
    bus.insert(device, 0x3F8, 8)

    for address in (0x0, 0x80, 0x3F7, 0x400, 0xFFFF):
        assert read(bus, address, 1) is None
        assert not write(bus, address, b"\x00")
    assert device.accesses == []


def test_an_access_straddling_the_end_of_a_range_is_refused() -> None:
    bus = Bus("pio")
    low, high = Registers(4), Registers(4)
    bus.insert(low, 0x100, 4)
    bus.insert(high, 0x104, 4)  # adjacent: the straddle must not be split between them

    assert read(bus, 0x103, 1) is not None
    assert read(bus, 0x103, 2) is None
    assert not write(bus, 0x102, b"\x00\x00\x00\x00")
    assert low.accesses == [("read", 3, 1)]
    assert high.accesses == []


@pytest.mark.parametrize(
    ("base", "length"),
    [(0x3F8, 8), (0x3F0, 9), (0x3FF, 1), (0x3FA, 2), (0x3F0, 0x20)],
    ids=["same", "overlaps-start", "overlaps-end", "inside", "contains"],
)
def test_overlapping_ranges_are_refused(base: int, length: int) -> None:
    bus = Bus("pio")
    uart = Registers(8)
    bus.insert(uart, 0x3F8, 8)

    with pytest.raises(BusError, match="overlaps the range 0x3f8\\+0x8 of Registers"):
        bus.insert(Registers(length), base, length)
    assert read(bus, 0x3F8, 1) is not None
    assert bus.find(0x3F8) == (uart, 0)


def test_adjacent_ranges_are_accepted() -> None:
    bus = Bus("pio")
    first, second = Registers(8), Registers(8)
    bus.insert(second, 0x3F8, 8)
    bus.insert(first, 0x3F0, 8)

    assert bus.find(0x3F7) == (first, 7)
    assert bus.find(0x3F8) == (second, 0)


@pytest.mark.parametrize(
    ("name", "base", "length", "message"),
    [
        ("pio", 0x60, 0, "must not be empty"),
        ("pio", -1, 2, "outside the address space"),
        ("pio", 0xFFFF, 2, "outside the address space"),
        ("mmio", (1 << 64) - 4, 8, "outside the address space"),
    ],
)
def test_invalid_ranges_are_refused(name: str, base: int, length: int, message: str) -> None:
    with pytest.raises(BusError, match=message):
        Bus(name).insert(Registers(8), base, length)


def test_a_removed_range_becomes_a_hole_and_a_hole_can_be_filled() -> None:
    bus = Bus("pio")
    bus.insert(Registers(8, fill=0x11), 0x3F8, 8)
    assert read(bus, 0x3F8, 1) == b"\x11"  # now remembered by the bus's lookup cache
    assert read(bus, 0x2F8, 1) is None  # and so is this hole

    bus.remove(0x3F8)
    bus.insert(Registers(8, fill=0x22), 0x2F8, 8)

    assert read(bus, 0x3F8, 1) is None
    assert read(bus, 0x2F8, 1) == b"\x22"
    with pytest.raises(BusError, match="no device range starts at 0x3f8"):
        bus.remove(0x3F8)
    with pytest.raises(BusError, match="no device range starts at 0x2f9"):
        bus.remove(0x2F9)


def test_find_names_the_device_and_offset() -> None:
    bus = Bus("mmio")
    device = Registers(0x1000)
    bus.insert(device, 0xD000_0000, 0x1000)

    assert bus.find(0xD000_0FFF) == (device, 0xFFF)
    assert bus.find(0xD000_1000) is None
    assert bus.find(0xCFFF_FFFF) is None


def test_a_device_at_two_ranges_is_never_entered_by_two_threads_at_once() -> None:
    class Counter:
        def __init__(self) -> None:
            self.count = 0

        def read(self, offset: int, data: memoryview) -> None:
            data[0] = self.count & 0xFF

        def write(self, offset: int, data: memoryview) -> None:
            count = self.count  # a read-modify-write that loses updates unless serialised
            for _ in range(200):
                pass
            self.count = count + 1

    bus = Bus("pio")
    counter = Counter()
    bus.insert(counter, 0x60, 1)
    bus.insert(counter, 0x64, 1)
    threads_count, writes = 4, 2000
    start = threading.Barrier(threads_count)

    def hammer(port: int) -> None:
        start.wait()
        data = memoryview(bytearray(1))
        for _ in range(writes):
            bus.write(port, data)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        threads = [
            threading.Thread(target=hammer, args=(0x60 if i % 2 else 0x64,))
            for i in range(threads_count)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)

    assert counter.count == threads_count * writes
