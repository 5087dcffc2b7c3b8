"""A virtio driver in Python, for testing kasou's virtio devices without KVM.

It plays the guest: it programs a ``VirtioMmio`` transport's registers as Linux's
virtio_mmio driver does (virtio 1.2 §3.1.1, §4.2.3), lays out split rings in guest memory,
submits descriptor chains (well-formed or deliberately broken), notifies through QueueNotify
and waits for the device's interrupt. The device under test runs on a real ``EventLoop``
thread, as in a VM; waits block on the interrupt with a deadline, never sleep.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from kasou.devices.virtio import VirtioDevice, VirtioMmio
from kasou.devices.virtio.spec import (
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_VERSION_1,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Reg,
    Status,
)
from kasou.memory import GuestMemory

WAIT = 10.0
PAGE = 4096


class Reactor(Protocol):
    def call_soon(self, function: Callable[[], None]) -> None: ...


def settle(loop: Reactor, timeout: float = WAIT) -> None:
    """Return once the loop has handled every fd that was ready when this was called (a
    notification just written, say): a call made from within a call runs on the loop's next
    turn, after the handlers of the turn before."""
    done = threading.Event()
    loop.call_soon(lambda: loop.call_soon(done.set))
    assert done.wait(timeout), "the event loop did not come round"


def resident_pages(memory: GuestMemory, gpa: int, size: int) -> int:
    """How many pages of ``[gpa, gpa + size)`` (page aligned) occupy host memory (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    flags = ctypes.create_string_buffer(size // PAGE)
    if libc.mincore(memory.host_address(gpa, size), size, flags) != 0:
        raise OSError(ctypes.get_errno(), "mincore")
    return sum(byte & 1 for byte in flags.raw)


class CountingTrigger:
    """An interrupt line that counts edges and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def trigger(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_beyond(self, count: int, timeout: float = WAIT) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.count > count, timeout)


class DriverQueue:
    def __init__(self, driver: Driver, index: int, size: int) -> None:
        self.index = index
        self.size = size
        self.desc = driver.alloc(16 * size, 16)
        self.avail = driver.alloc(6 + 2 * size, 2)
        self.used = driver.alloc(6 + 8 * size, 4)
        for address, length in (
            (self.desc, 16 * size),
            (self.avail, 6 + 2 * size),
            (self.used, 6 + 8 * size),
        ):
            driver.memory.fill(address, length, 0)  # as Linux's zeroed ring allocations
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0


class Driver:
    """The guest's side of one virtio-mmio device."""

    def __init__(
        self,
        transport: VirtioMmio,
        memory: GuestMemory,
        trigger: CountingTrigger,
        heap: int = 0x10000,
    ) -> None:
        self.transport = transport
        self.memory = memory
        self.trigger = trigger
        self._next = heap
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0

    @classmethod
    def attach(cls, device: VirtioDevice, memory: GuestMemory, heap: int = 0x10000) -> Driver:
        """Put ``device`` behind a fresh transport with a counting interrupt line; ``close``
        releases both."""
        trigger = CountingTrigger()
        return cls(VirtioMmio(device, memory, trigger), memory, trigger, heap=heap)

    def close(self) -> None:
        self.transport.device.close()
        self.transport.close()

    # --- registers ------------------------------------------------------------------

    def read(self, offset: int, size: int = 4) -> int:
        data = bytearray(size)
        self.transport.read(offset, memoryview(data))
        return int.from_bytes(data, "little")

    def write(self, offset: int, value: int, size: int = 4) -> None:
        self.transport.write(offset, memoryview(bytearray(value.to_bytes(size, "little"))))

    def config(self, offset: int, size: int) -> bytes:
        data = bytearray(size)
        self.transport.read(Reg.CONFIG + offset, memoryview(data))
        return bytes(data)

    @property
    def status(self) -> int:
        return self.read(Reg.STATUS)

    def alloc(self, size: int, align: int = 16) -> int:
        address = (self._next + align - 1) & ~(align - 1)
        self._next = address + size
        assert self.memory.contains(address, size), "the test's guest memory is too small"
        return address

    # --- bring-up (§3.1.1) ------------------------------------------------------------

    def device_features(self) -> int:
        self.write(Reg.DEVICE_FEATURES_SEL, 0)
        low = self.read(Reg.DEVICE_FEATURES)
        self.write(Reg.DEVICE_FEATURES_SEL, 1)
        return low | self.read(Reg.DEVICE_FEATURES) << 32

    def start(
        self,
        features: int | None = None,
        queues: Sequence[int] | None = None,
        size: int | None = None,
    ) -> int:
        """Reset, negotiate (``features``: the driver's wish, masked by the offer; default
        VERSION_1 + EVENT_IDX + INDIRECT + all device bits), set up queues, DRIVER_OK."""
        self.write(Reg.STATUS, 0)
        self.write(Reg.STATUS, Status.ACKNOWLEDGE)
        self.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
        offered = self.device_features()
        wanted = offered if features is None else features & offered
        wanted |= F_VERSION_1 & offered
        for select in (0, 1):
            self.write(Reg.DRIVER_FEATURES_SEL, select)
            self.write(Reg.DRIVER_FEATURES, (wanted >> (32 * select)) & 0xFFFFFFFF)
        self.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
        assert self.status & Status.FEATURES_OK, "the device refused the features"
        self.features = wanted
        count = len(self.transport.queues)
        for index in queues if queues is not None else range(count):
            self.write(Reg.QUEUE_SEL, index)
            assert self.read(Reg.QUEUE_READY) == 0
            maximum = self.read(Reg.QUEUE_NUM_MAX)
            queue = DriverQueue(self, index, size or maximum)
            self.write(Reg.QUEUE_NUM, queue.size)
            for low, address in (
                (Reg.QUEUE_DESC_LOW, queue.desc),
                (Reg.QUEUE_DRIVER_LOW, queue.avail),
                (Reg.QUEUE_DEVICE_LOW, queue.used),
            ):
                self.write(low, address & 0xFFFFFFFF)
                self.write(low + 4, address >> 32)
            self.write(Reg.QUEUE_READY, 1)
            self.queues[index] = queue
        self.write(
            Reg.STATUS,
            Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK,
        )
        return wanted

    @property
    def event_idx(self) -> bool:
        return bool(self.features & F_EVENT_IDX)

    @property
    def indirect(self) -> bool:
        return bool(self.features & F_INDIRECT_DESC)

    # --- requests -------------------------------------------------------------------

    def write_desc(
        self, queue: DriverQueue, index: int, address: int, length: int, flags: int, next: int
    ) -> None:
        self.memory.write(
            queue.desc + 16 * index, struct.pack("<QIHH", address, length, flags, next)
        )

    def buffers(
        self, readable: Sequence[bytes], writable: Sequence[int]
    ) -> list[tuple[int, int, bool]]:
        out = []
        for data in readable:
            address = self.alloc(max(len(data), 1))
            self.memory.write(address, data)
            out.append((address, len(data), False))
        for size in writable:
            address = self.alloc(max(size, 1))
            self.memory.fill(address, size, 0xEE)
            out.append((address, size, True))
        return out

    def submit(
        self,
        queue_index: int,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect: bool = False,
        notify: bool = True,
    ) -> tuple[int, list[tuple[int, int, bool]]]:
        """Make one chain available; returns its head and its buffers (address, size,
        writable)."""
        queue = self.queues[queue_index]
        parts = self.buffers(readable, writable)
        if indirect:
            table = self.alloc(16 * len(parts), 16)
            for i, (address, size, write) in enumerate(parts):
                flags = (VIRTQ_DESC_F_WRITE if write else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0
                )
                self.memory.write(table + 16 * i, struct.pack("<QIHH", address, size, flags, i + 1))
            head = queue.free.pop(0)
            self.write_desc(queue, head, table, 16 * len(parts), VIRTQ_DESC_F_INDIRECT, 0)
        else:
            slots = [queue.free.pop(0) for _ in parts]
            for i, (address, size, write) in enumerate(parts):
                flags = (VIRTQ_DESC_F_WRITE if write else 0) | (
                    VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0
                )
                following = slots[i + 1] if i + 1 < len(parts) else 0
                self.write_desc(queue, slots[i], address, size, flags, following)
            head = slots[0]
        self.publish(queue_index, head, notify=notify)
        return head, parts

    def submit_at(
        self,
        queue_index: int,
        parts: Sequence[tuple[int, int, bool]],
        *,
        notify: bool = True,
    ) -> int:
        """Make one chain of buffers the test laid out itself available: (address, size,
        device-writable) each, in order, not checked. Returns its head."""
        queue = self.queues[queue_index]
        slots = [queue.free.pop(0) for _ in parts]
        for i, (address, size, write) in enumerate(parts):
            flags = (VIRTQ_DESC_F_WRITE if write else 0) | (
                VIRTQ_DESC_F_NEXT if i + 1 < len(parts) else 0
            )
            following = slots[i + 1] if i + 1 < len(parts) else 0
            self.write_desc(queue, slots[i], address, size, flags, following)
        self.publish(queue_index, slots[0], notify=notify)
        return slots[0]

    def publish(self, queue_index: int, head: int, *, notify: bool = True) -> None:
        queue = self.queues[queue_index]
        self.memory.write_int(queue.avail + 4 + 2 * (queue.avail_idx % queue.size), 2, head)
        queue.avail_idx = (queue.avail_idx + 1) & 0xFFFF
        self.memory.write_int(queue.avail + 2, 2, queue.avail_idx)
        if notify:
            self.notify(queue_index)

    def notify(self, queue_index: int) -> None:
        self.write(Reg.QUEUE_NOTIFY, queue_index)

    def used_idx(self, queue_index: int) -> int:
        return self.memory.read_int(self.queues[queue_index].used + 2, 2)

    def set_used_event(self, queue_index: int, value: int) -> None:
        queue = self.queues[queue_index]
        self.memory.write_int(queue.avail + 4 + 2 * queue.size, 2, value)

    def wait_used(
        self, queue_index: int, count: int = 1, timeout: float = WAIT
    ) -> list[tuple[int, int]]:
        """Wait until ``count`` more used entries are there; return them (head, len) and
        acknowledge the interrupt as Linux does."""
        queue = self.queues[queue_index]
        if self.event_idx:
            self.set_used_event(queue_index, queue.last_used)  # as virtqueue_enable_cb does
        deadline = time.monotonic() + timeout
        while (self.used_idx(queue_index) - queue.last_used) & 0xFFFF < count:
            if self.event_idx:
                # Ask for an interrupt for the next entry after those already there: with
                # used_event left at last_used, entries that come in later batches than the
                # first raise none.
                self.set_used_event(queue_index, self.used_idx(queue_index))
            seen = self.trigger.count
            if (self.used_idx(queue_index) - queue.last_used) & 0xFFFF >= count:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.trigger.wait_beyond(seen, remaining):
                raise AssertionError(
                    f"queue {queue_index}: {count} used entries did not come "
                    f"(used idx {self.used_idx(queue_index)}, status {self.status:#x})"
                )
            self.write(Reg.INTERRUPT_ACK, self.read(Reg.INTERRUPT_STATUS))
        entries = []
        for _ in range(count):
            slot = queue.last_used % queue.size
            head, length = struct.unpack("<II", self.memory.read(queue.used + 4 + 8 * slot, 8))
            entries.append((head, length))
            queue.last_used = (queue.last_used + 1) & 0xFFFF
        return entries

    def take_used(self, queue_index: int) -> list[tuple[int, int]]:
        """The used entries (head, len) there now, without waiting; none is an empty list."""
        queue = self.queues[queue_index]
        entries = []
        while queue.last_used != self.used_idx(queue_index):
            slot = queue.last_used % queue.size
            head, length = struct.unpack("<II", self.memory.read(queue.used + 4 + 8 * slot, 8))
            entries.append((head, length))
            queue.last_used = (queue.last_used + 1) & 0xFFFF
        return entries

    def wait_status(self, bit: int, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not self.status & bit:
            seen = self.trigger.count
            if self.status & bit:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.trigger.wait_beyond(seen, remaining):
                raise AssertionError(f"status bit {bit:#x} did not come (status {self.status:#x})")
