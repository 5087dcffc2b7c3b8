"""Address buses: which device answers a port (PIO) or MMIO access, and at what offset.

A ``Bus`` maps non-overlapping address ranges to devices. The vCPU thread that took a PIO or
MMIO exit calls ``Bus.read``/``Bus.write`` with the access's address and a ``memoryview`` of
its data (1 to 8 bytes); the device gets the offset from the start of its range. An access
that hits no device, or that runs past the end of the device's range, is answered by no one:
the call returns ``False`` and the caller does what the platform does for a hole (reads see
all ones, writes are dropped).

The bus is on the exit hot path and is called from several vCPU threads at once:

- lookups are a dict hit on the exact address (a small cache, filled on first use of an
  address, bounded, replaced wholesale when a range is inserted or removed) or else a bisect
  over the sorted range bases;
- ``insert``/``remove`` build new tables and swap them in (copy on write), so a lookup never
  sees a half-updated table and takes no bus-wide lock;
- each device gets its own ``threading.Lock``, taken around its ``read``/``write``, so device
  models are written as single-threaded register machines. A device inserted at several
  ranges shares one lock across them.

A vCPU that looked a device up just before ``remove`` may still complete that one access:
remove devices while the vCPUs are paused.

This module does not know KVM exits, port numbers of particular devices, or what the caller
does for a hole.
"""

from __future__ import annotations

import bisect
import threading
from typing import NamedTuple, Protocol

from kasou.errors import KasouError

__all__ = ["Bus", "BusDevice", "BusError"]

# The size of each address space: x86 I/O ports are 16 bits wide (Intel SDM vol. 1, 18.3
# "I/O address space"); MMIO, and any other named bus, may use the whole 64-bit space.
_SPACE_SIZE = {"pio": 1 << 16}
_DEFAULT_SPACE_SIZE = 1 << 64

# How many distinct addresses the lookup cache remembers before it starts afresh. Guests
# touch few distinct device addresses; the bound only keeps a scanning guest from growing it.
_CACHE_LIMIT = 4096


class BusDevice(Protocol):
    """A device as the bus sees it: register reads and writes at an offset in its range."""

    def read(self, offset: int, data: memoryview) -> None:
        """Fill ``data`` (``len(data)`` is the access size) from the registers at ``offset``."""

    def write(self, offset: int, data: memoryview) -> None:
        """Store ``data`` into the registers at ``offset``."""


class BusError(KasouError):
    """A range that cannot be inserted or removed: a wiring mistake in the VMM, not the guest."""


class _Slot(NamedTuple):
    """One inserted range: ``[base, end)`` answered by ``device`` under ``lock``."""

    device: BusDevice
    base: int
    end: int
    lock: threading.Lock


class _NoDevice:
    """Stands in the cache for a hole; never called (its slot's range is empty)."""

    def read(self, offset: int, data: memoryview) -> None:
        raise AssertionError("the hole marker was dispatched to")

    def write(self, offset: int, data: memoryview) -> None:
        raise AssertionError("the hole marker was dispatched to")


# Cached for addresses that no device answers. ``end`` is -1, so the bounds check every
# access makes (``address + size > end``) refuses it without a separate test for holes.
_HOLE = _Slot(_NoDevice(), 0, -1, threading.Lock())


class Bus:
    """Non-overlapping address ranges, each answered by one device."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._space_size = _SPACE_SIZE.get(name, _DEFAULT_SPACE_SIZE)
        # The sorted range bases and their slots, replaced as one tuple, never mutated once
        # published: readers take no lock (see the module docstring and ``_lookup``).
        self._table: tuple[list[int], list[_Slot]] = ([], [])
        self._cache: dict[int, _Slot] = {}
        # Serialises insert/remove against each other, and owns the per-device locks.
        self._mutation_lock = threading.Lock()
        self._device_locks: dict[int, tuple[threading.Lock, int]] = {}

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        """Answer ``[base, base + length)`` with ``device``.

        Raises ``BusError`` for an empty range, one outside the bus's address space, or one
        that overlaps a range already inserted.
        """
        if length <= 0:
            raise BusError(f"{self.name} bus: a device range must not be empty (length {length})")
        if base < 0 or base + length > self._space_size:
            raise BusError(
                f"{self.name} bus: range {base:#x}+{length:#x} is outside the address space "
                f"[0, {self._space_size:#x})"
            )
        with self._mutation_lock:
            bases, slots = self._table
            index = bisect.bisect_right(bases, base)
            if index > 0 and slots[index - 1].end > base:
                raise BusError(self._overlap_message(base, length, slots[index - 1]))
            if index < len(slots) and slots[index].base < base + length:
                raise BusError(self._overlap_message(base, length, slots[index]))
            lock, count = self._device_locks.get(id(device), (threading.Lock(), 0))
            self._device_locks[id(device)] = (lock, count + 1)
            slot = _Slot(device, base, base + length, lock)
            self._publish(
                [*bases[:index], base, *bases[index:]],
                [*slots[:index], slot, *slots[index:]],
            )

    def remove(self, base: int) -> None:
        """Take away the range that starts at ``base``; ``BusError`` if none starts there."""
        with self._mutation_lock:
            bases, slots = self._table
            index = bisect.bisect_left(bases, base)
            if index == len(bases) or bases[index] != base:
                raise BusError(f"{self.name} bus: no device range starts at {base:#x}")
            device = slots[index].device
            lock, count = self._device_locks[id(device)]
            if count == 1:
                del self._device_locks[id(device)]
            else:
                self._device_locks[id(device)] = (lock, count - 1)
            self._publish(bases[:index] + bases[index + 1 :], slots[:index] + slots[index + 1 :])

    def read(self, address: int, data: memoryview) -> bool:
        """Let the device at ``address`` fill ``data``; ``False`` if no device answers."""
        slot = self._cache.get(address)
        if slot is None:
            slot = self._lookup(address)
        device, base, end, lock = slot
        if address + len(data) > end:
            return False
        with lock:
            device.read(address - base, data)
        return True

    def write(self, address: int, data: memoryview) -> bool:
        """Give ``data`` to the device at ``address``; ``False`` if no device answers."""
        slot = self._cache.get(address)
        if slot is None:
            slot = self._lookup(address)
        device, base, end, lock = slot
        if address + len(data) > end:
            return False
        with lock:
            device.write(address - base, data)
        return True

    def find(self, address: int) -> tuple[BusDevice, int] | None:
        """The device whose range holds ``address`` and the offset into it, or ``None``."""
        slot = self._lookup(address)
        if slot is _HOLE:
            return None
        return slot.device, address - slot.base

    def _lookup(self, address: int) -> _Slot:
        # The cache is read before the table and ``_publish`` stores the table before the
        # cache: a lookup racing an insert/remove either caches into the cache that is being
        # retired, or caches an answer from the new table. A stale answer never becomes current.
        cache = self._cache
        bases, slots = self._table
        index = bisect.bisect_right(bases, address) - 1
        slot = slots[index] if index >= 0 and address < slots[index].end else _HOLE
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()  # in place: replacing it could retire a newer, published cache
        cache[address] = slot
        return slot

    def _publish(self, bases: list[int], slots: list[_Slot]) -> None:
        self._table = (bases, slots)
        self._cache = {}

    def _overlap_message(self, base: int, length: int, other: _Slot) -> str:
        return (
            f"{self.name} bus: range {base:#x}+{length:#x} overlaps the range "
            f"{other.base:#x}+{other.end - other.base:#x} of {type(other.device).__name__}"
        )
