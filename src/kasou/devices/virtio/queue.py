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

Buffers are handed out as zero-copy ``memoryview``s of guest RAM, and a chain remembers
where its device-writable buffers are: ``use`` marks them written
(``GuestMemory.mark_written``) when the chain goes back, with the used ring's element and
index, so a diff snapshot or a migration round sees every byte the device wrote. The used
ring's flags and ``avail_event``, which the device writes too, are marked where they change.

Snapshots: ``save`` returns the queue's registers and the device's side of the rings (the
indexes, kept outside guest RAM) as a ``VirtqueueState``; ``restore`` takes one back, through
the same checks as ``activate``. A device that holds popped chains saves their heads and gets
them back with ``walk`` (the driver does not touch a descriptor it made available until the
device has used it, so the table still describes the chain).

Barriers: x86 keeps loads in order and stores in order; where a store must be seen before a
later load (the used index before reading ``used_event``, ``avail_event`` before re-reading
the available index) a lock round trip serves as the full fence (a locked instruction on
x86).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

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
    "VirtqueueState",
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
    """One descriptor chain: the buffers the device reads, then those it writes, and where
    the writable ones are in guest RAM (``(gpa, size)`` each, for dirty tracking)."""

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len", "written_at")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
        written_at: list[tuple[int, int]] | None = None,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len
        self.written_at = written_at if written_at is not None else []

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


U16 = 0xFFFF
U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class VirtqueueState:
    """One queue as saved: the driver's registers and the device's ring indexes.

    Field names are a snapshot format contract. ``last_avail_idx`` is the next available
    entry the device reads, ``used_idx`` the used index it published, ``signalled_idx`` the
    used index when it last decided on an interrupt (§2.7.10 compares against it);
    ``bad_chains`` counts toward ``BAD_CHAIN_LIMIT``. Everything else of the rings (entries,
    flags, ``used_event``, ``avail_event``) is in guest RAM."""

    ready: bool
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail_idx: int
    used_idx: int
    signalled_idx: int
    bad_chains: int


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

    def check(self, memory: GuestMemory) -> None:
        """Raise ``QueueError`` unless the driver's configuration can go live: the size a
        power of two up to the maximum, each ring aligned (§2.7: descriptor table 16 bytes,
        available ring 2, used ring 4) and wholly inside guest RAM. Changes nothing."""
        size = self.size
        if size < 1 or size > self.max_size or size & (size - 1):
            raise QueueError(
                f"queue {self.index}: size {size} is not a power of two up to {self.max_size}"
            )
        for name, address, align, length in (
            ("descriptor table", self.desc_addr, 16, DESC_SIZE * size),
            ("available ring", self.avail_addr, 2, 6 + 2 * size),
            ("used ring", self.used_addr, 4, 6 + 8 * size),
        ):
            if address % align:
                raise QueueError(f"queue {self.index}: {name} at {address:#x} is not aligned")
            if not memory.contains(address, length):
                raise QueueError(
                    f"queue {self.index}: the {name} at {address:#x}+{length:#x} is outside "
                    "guest RAM"
                )

    def activate(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Check the driver's configuration and map the rings (when the driver sets
        DRIVER_OK). Raises ``QueueError``."""
        self.check(memory)
        size = self.size
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
        self._avail_event_gpa = self.used_addr + 4 + 8 * size
        self.event_idx = event_idx
        self.indirect = indirect
        # Both indexes start at 0 after a reset (§2.7.13.1, §2.7.14): the driver zeroed its
        # rings; the device does not read back what it wrote there before.
        self.last_avail = 0
        self.used_idx = 0
        self._signalled = 0
        self.live = True

    # --- snapshots ----------------------------------------------------------------------

    def save(self) -> VirtqueueState:
        """The queue as it stands (the device quiesced: its reactor parked)."""
        return VirtqueueState(
            ready=self.ready,
            size=self.size,
            desc_addr=self.desc_addr,
            avail_addr=self.avail_addr,
            used_addr=self.used_addr,
            last_avail_idx=self.last_avail,
            used_idx=self.used_idx,
            signalled_idx=self._signalled,
            bad_chains=self.bad_chains,
        )

    @staticmethod
    def check_state(state: VirtqueueState, bad_chain_limit: int) -> str:
        """Why ``state`` cannot be any queue's, as "field: problem", or "" when it can be.

        Every field the driver can set takes any value it can write (a queue that is not
        live holds what the driver wrote, checked only when it goes live); the indexes are
        16 bits; ``bad_chains`` goes one past the limit at most (the device stops there)."""
        for name, top in (
            ("size", U32),
            ("desc_addr", U64),
            ("avail_addr", U64),
            ("used_addr", U64),
            ("last_avail_idx", U16),
            ("used_idx", U16),
            ("signalled_idx", U16),
            ("bad_chains", bad_chain_limit + 1),
        ):
            value = getattr(state, name)
            if type(value) is not int or not 0 <= value <= top:
                return f"{name}: {value!r} is not a number from 0 to {top}"
        if type(state.ready) is not bool:
            return f"ready: {state.ready!r} is not a bool"
        return ""

    def restore(
        self,
        state: VirtqueueState,
        memory: GuestMemory,
        *,
        live: bool,
        event_idx: bool,
        indirect: bool,
    ) -> None:
        """Take back a saved queue (checked by ``check_state``, and by ``check`` when
        ``live``): its registers, then, for a queue of a running device, the rings mapped
        and the indexes where the device left them. Raises ``QueueError`` (nothing changed)."""
        old = (self.size, self.desc_addr, self.avail_addr, self.used_addr)
        self.size, self.desc_addr = state.size, state.desc_addr
        self.avail_addr, self.used_addr = state.avail_addr, state.used_addr
        try:
            if live:
                self.activate(memory, event_idx=event_idx, indirect=indirect)
        except QueueError:
            self.size, self.desc_addr, self.avail_addr, self.used_addr = old
            raise
        self.ready = state.ready
        self.last_avail = state.last_avail_idx
        self.used_idx = state.used_idx
        self._signalled = state.signalled_idx
        self.bad_chains = state.bad_chains

    def walk(self, head: int) -> Chain:
        """The chain at ``head`` again: for a device taking back, after a restore, a chain it
        had popped and held when the snapshot was taken. Raises ``ChainError``."""
        if not 0 <= head < self.size:
            raise ChainError(head, f"is not a descriptor index of a queue of {self.size}")
        return self._walk(head)

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
        written_at: list[tuple[int, int]] = []
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
                    written_at.append((address, length))
                    writable_len += length
                elif writable:
                    raise ChainError(head, "a device-readable buffer after a writable one")
                else:
                    readable.append(view)
                    readable_len += length
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable, readable_len, writable_len, written_at)
            index = following

    # --- the used side ------------------------------------------------------------------

    def use(self, chain: Chain, written: int) -> None:
        """Return ``chain`` to the driver with ``written`` bytes in its buffers, its writable
        buffers marked written for dirty tracking (all of them: ``written`` need not be a
        prefix, virtio-blk's status byte is the last)."""
        mark = self._memory.mark_written
        for gpa, size in chain.written_at:
            mark(gpa, size)
        self.push(chain.head, written)

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes in its buffers, for a
        chain whose buffers the device did not write into (``use`` marks them)."""
        slot = self.used_idx % self.size
        USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written)
        # The element is stored before the index that publishes it (x86 keeps stores in order).
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used16[1] = self.used_idx
        mark = self._memory.mark_written
        mark(self.used_addr + 4 + 8 * slot, 8)
        mark(self.used_addr + 2, 2)

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
            self._memory.mark_written(self.used_addr, 2)

    def enable_notifications(self) -> bool:
        """Ask for a notification on the next chain; return whether one is already there
        (then the caller goes on working instead of waiting)."""
        if self.event_idx:
            self._used16[self._avail_event_at] = self.last_avail
            self._memory.mark_written(self._avail_event_gpa, 2)
        else:
            self._used16[0] = self._used16[0] & ~USED_F_NO_NOTIFY
            self._memory.mark_written(self.used_addr, 2)
        _fence()  # the request is visible before the available index is read again
        return self.has_available()
