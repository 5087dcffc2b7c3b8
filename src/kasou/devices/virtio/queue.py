"""Split virtqueues (virtio 1.2 §2.7): the device's side of the rings the driver fills.

This module owns reading descriptor chains out of guest memory and returning used buffers,
with notification suppression both ways (§2.7.7, §2.7.10: ``VIRTIO_F_EVENT_IDX`` or the
flags). It does not know what a request means, nor threads, interrupts or eventfds: a device
pops chains, does the work, pushes them back and asks ``needs_interrupt``.

Every field the driver writes is untrusted. What is checked, and what follows:

- ring addresses and the queue size, once, when the queue goes live (``activate``): aligned
  as §2.7 requires, the size a power of two no larger than the device's maximum, every ring
  inside guest RAM; otherwise ``QueueError`` and the device is not started;
- the available index may run ahead of the device by at most the queue size, and a head
  must be a descriptor index: otherwise the ring itself is broken and nothing later in it
  can be trusted, ``RingError`` (the device should go ``NEEDS_RESET``);
- a chain is walked with a budget of the table's size, so a loop ends; an indirect
  descriptor is honoured only once negotiated, never nested and never combined with NEXT;
  every buffer must lie wholly inside guest RAM; device-readable buffers must all come
  before device-writable ones (§2.7.4.2): otherwise ``ChainError`` naming the head, which the
  device returns to the driver unused and fails that request only.

Buffers are handed out as zero-copy ``memoryview``s of guest RAM. Barriers: x86 keeps
loads in order and stores in order; where a store must be seen before a later load (the
used index before reading ``used_event``, ``avail_event`` before re-reading the available
index) a lock round trip serves as the full fence (a locked instruction on x86).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from kasou.devices.virtio.spec import (
    AVAIL_F_NO_INTERRUPT,
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_F_NO_NOTIFY,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from kasou.errors import GuestError, GuestMemoryError
from kasou.memory import GuestMemory

__all__ = [
    "MAX_INDIRECT",
    "Chain",
    "ChainError",
    "QueueError",
    "RingError",
    "Virtqueue",
    "gather",
    "scatter",
    "split_views",
]

MAX_INDIRECT = 4096
"""The most descriptors an indirect table may hold (§2.7.5.3.1 leaves the bound to the
device; Linux never builds larger ones than its queue's segment limit)."""

_FENCE = threading.Lock()


def _fence() -> None:
    with _FENCE:
        pass


class QueueError(GuestError):
    """A queue the driver configured wrongly (size, alignment, rings outside RAM)."""


class RingError(GuestError):
    """The driver broke the ring itself (its index or a head): the queue cannot go on."""


class ChainError(GuestError):
    """One malformed descriptor chain; ``head`` goes back to the driver unused."""

    def __init__(self, head: int, message: str) -> None:
        super().__init__(f"descriptor chain {head}: {message}")
        self.head = head


class Chain:
    """One descriptor chain: the buffers the device reads, then those it writes."""

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def read(self, size: int | None = None, offset: int = 0) -> bytes:
        """Copy ``size`` bytes (all by default) of the readable buffers from ``offset``."""
        if size is None:
            size = self.readable_len - offset
        return gather(self.readable, offset, size)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable buffers at ``offset``; return the bytes copied
        (fewer than ``len(data)`` when the buffers are shorter)."""
        return scatter(self.writable, offset, data)


def split_views(views: Sequence[memoryview], offset: int, size: int) -> list[memoryview]:
    """The views covering ``[offset, offset + size)`` of the concatenation of ``views``,
    cut at the edges (zero-copy). Shorter when the views end first."""
    out: list[memoryview] = []
    for view in views:
        length = len(view)
        if offset >= length:
            offset -= length
            continue
        piece = view[offset : offset + size]
        out.append(piece)
        size -= len(piece)
        offset = 0
        if size <= 0:
            break
    return out


def gather(views: Sequence[memoryview], offset: int, size: int) -> bytes:
    """Copy ``size`` bytes from ``offset`` of the views' concatenation (shorter if they end)."""
    pieces = split_views(views, offset, size)
    if len(pieces) == 1:
        return bytes(pieces[0])
    return b"".join(pieces)


def scatter(views: Sequence[memoryview], offset: int, data: bytes | bytearray | memoryview) -> int:
    """Copy ``data`` into the views' concatenation at ``offset``; return the bytes copied."""
    source = memoryview(data).cast("B")
    done = 0
    for piece in split_views(views, offset, len(source)):
        piece[:] = source[done : done + len(piece)]
        done += len(piece)
    return done


class Virtqueue:
    """One split virtqueue, configured by the transport, driven by its device."""

    def __init__(self, index: int, max_size: int) -> None:
        if max_size < 1 or max_size > 32768 or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} is not a power of two up to 32768")
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """Back to the state after a device reset (§2.7: size = max, addresses 0, not ready).

        The rings' views are kept until the next ``activate`` or ``release``: the reset comes
        on a vCPU thread while the device's reactor may be inside ``pop``, and guest RAM stays
        mapped as long as the VM lives, so an old view is stale but harmless."""
        self.live = False
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.live = False
        self.event_idx = False
        self.indirect = False
        self.last_avail = 0  # the next available entry the device reads
        self.used_idx = 0  # the device's used index, as published
        self._signalled = 0  # the used index when the driver was last considered for an irq
        self.popped = 0
        self.bad_chains = 0

    def release(self) -> None:
        """Drop the views of the rings (guest memory cannot be unmapped while they live)."""
        for name in ("_desc", "_avail", "_used16", "_used"):
            view = self.__dict__.pop(name, None)
            if view is not None:
                view.release()
        self.live = False

    def activate(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Check the driver's configuration and map the rings (when the driver sets
        DRIVER_OK). Raises ``QueueError``."""
        size = self.size
        if size < 1 or size > self.max_size or size & (size - 1):
            raise QueueError(
                f"queue {self.index}: size {size} is not a power of two up to {self.max_size}"
            )
        # §2.7: descriptor table 16-byte aligned, available ring 2, used ring 4.
        for name, address, align in (
            ("descriptor table", self.desc_addr, 16),
            ("available ring", self.avail_addr, 2),
            ("used ring", self.used_addr, 4),
        ):
            if address % align:
                raise QueueError(f"queue {self.index}: {name} at {address:#x} is not aligned")
        self.release()
        try:
            self._memory = memory
            self._desc = memory.view(self.desc_addr, DESC_SIZE * size)
            self._avail = memory.view(self.avail_addr, 6 + 2 * size).cast("H")
            used = memory.view(self.used_addr, 6 + 8 * size)
        except GuestMemoryError as error:
            raise QueueError(f"queue {self.index}: a ring is outside guest RAM: {error}") from None
        self._used = used
        self._used16 = used.cast("H")
        self._used_event_at = 2 + size  # virtq_avail.used_event, in u16 units
        self._avail_event_at = 2 + 4 * size  # virtq_used.avail_event, in u16 units
        self.event_idx = event_idx
        self.indirect = indirect
        # Both indexes start at 0 after a reset (§2.7.13.1, §2.7.14): the driver zeroed its
        # rings; the device does not read back what it wrote there before.
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0
        self.live = True

    # --- the available side -------------------------------------------------------------

    def has_available(self) -> bool:
        """Whether the driver has made a chain available that the device has not popped."""
        return self.live and self._avail[1] != self.last_avail

    def pop(self) -> Chain | None:
        """The next available chain, or ``None``. Raises ``RingError`` (the ring is broken)
        or ``ChainError`` (this chain is; it counts as popped and must be pushed back)."""
        avail = self._avail
        last = self.last_avail
        index = avail[1]
        if index == last:
            return None
        if (index - last) & 0xFFFF > self.size:
            raise RingError(
                f"queue {self.index}: the available index {index} is more than the queue size "
                f"ahead of the device ({last})"
            )
        head = avail[2 + last % self.size]
        if head >= self.size:
            raise RingError(f"queue {self.index}: head {head} is not a descriptor index")
        self.last_avail = (last + 1) & 0xFFFF
        self.popped += 1
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        memory = self._memory
        table = self._desc
        limit = self.size
        index = head
        seen = 0
        nested = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        readable_len = writable_len = 0
        while True:
            if index >= limit:
                raise ChainError(head, f"next index {index} is outside the table of {limit}")
            address, length, flags, following = DESC.unpack_from(table, index * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # §2.7.5.3: an indirect table replaces the rest of the chain.
                if not self.indirect:
                    raise ChainError(head, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if nested:
                    raise ChainError(head, "an indirect table inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(head, "an indirect descriptor with NEXT set")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise ChainError(head, f"indirect table of {length} bytes")
                try:
                    table = memory.view(address, length)
                except GuestMemoryError:
                    raise ChainError(head, "the indirect table is outside guest RAM") from None
                nested = True
                limit = length // DESC_SIZE
                index = 0
                seen = 0
                continue
            seen += 1
            if seen > limit:
                raise ChainError(head, f"longer than its table of {limit}: a loop")
            if length:
                try:
                    view = memory.view(address, length)
                except GuestMemoryError:
                    raise ChainError(
                        head, f"buffer {address:#x}+{length:#x} is outside guest RAM"
                    ) from None
                if flags & VIRTQ_DESC_F_WRITE:
                    writable.append(view)
                    writable_len += length
                elif writable:
                    raise ChainError(head, "a device-readable buffer after a writable one")
                else:
                    readable.append(view)
                    readable_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, readable_len, writable_len)
            index = following

    # --- the used side ------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes in its buffers."""
        slot = self.used_idx % self.size
        USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written)
        # The element is stored before the index that publishes it (x86 keeps stores in order).
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call
        (§2.7.10: ``used_event`` with EVENT_IDX, else the NO_INTERRUPT flag)."""
        new, old = self.used_idx, self._signalled
        if new == old:
            return False
        self._signalled = new
        _fence()  # the used index is visible before used_event is read
        if self.event_idx:
            event = self._avail[self._used_event_at]
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._avail[0] & AVAIL_F_NO_INTERRUPT

    # --- notifications from the driver (§2.7.7) -----------------------------------------

    def disable_notifications(self) -> None:
        """Ask the driver not to notify while the device is already working on the queue."""
        if not self.event_idx:
            self._used16[0] = self._used16[0] | USED_F_NO_NOTIFY

    def enable_notifications(self) -> bool:
        """Ask for a notification on the next chain; return whether one is already there
        (then the caller goes on working instead of waiting)."""
        if self.event_idx:
            self._used16[self._avail_event_at] = self.last_avail
        else:
            self._used16[0] = self._used16[0] & ~USED_F_NO_NOTIFY
        _fence()  # the request is visible before the available index is read again
        return self.has_available()
