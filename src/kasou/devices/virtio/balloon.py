"""virtio-balloon (virtio 1.2 §5.5): lets the host take guest RAM back and see how it is used.

Scope: inflate and deflate, the statistics queue and free page reporting; the device asks
for a balloon size (``set_target``) and gives back to the host (``GuestMemory.discard``)
every page the guest puts in the balloon or reports free. Not done: free page hinting
(VIRTIO_BALLOON_F_FREE_PAGE_HINT, for migration) and page poisoning (PAGE_POISON), neither
offered; MUST_TELL_HOST is not offered either, so the guest may touch a deflated page before
telling the device, which is harmless here (a discarded page simply comes back on touch).

Queues. The spec numbers them inflateq 0, deflateq 1, statsq 2, free_page_vq 3, reporting_vq
4, each present only with its feature (§5.5.2). Linux numbers only the queues it uses, in
that order (drivers/virtio/virtio_balloon.c ``init_vqs`` leaves a missing queue's name NULL
and virtio_mmio.c ``vm_find_vqs`` skips it without using up an index), and QEMU follows
Linux. Free page hinting is never offered, so the device has four queues and the roles of 2
and 3 follow the negotiated features: statsq then reporting_vq, or reporting_vq alone at 2.

Pages are 4 KiB (VIRTIO_BALLOON_PFN_SHIFT 12) whatever the guest's page size. Config space
(struct virtio_balloon_config, §5.5.4): num_pages (the balloon size the host wants), actual
(the size the guest reached, written by the driver), free_page_hint_cmd_id and poison_val
(unused, read as 0).

Statistics (§5.5.6.3). The driver makes one buffer of (u16 tag, u64 value) pairs available
on statsq; the device keeps it, and returning it (used) asks the driver for fresh figures,
which come back in a new buffer. The device asks every ``stats_interval`` seconds.

Everything the guest sends is untrusted: a PFN array of odd length, a PFN outside guest RAM,
a reporting buffer the driver made device-readable, a statistics buffer too big or not made
of whole entries each fail that chain only (returned unused, ``bad_chain``); nothing reaches
host memory outside guest RAM (chains are validated by the queue, PFNs here).

Snapshots (``BalloonState``): the size asked for and the size reached, the latest statistics
and their interval, and the statistics buffer the device holds (its head; after a restore the
device returns it when the interval is next up, asking for fresh figures). The figures'
age is not saved: after a restore they count as received then.

Threads: the queues are served on the device's reactor; ``set_target``, ``target``,
``actual``, ``stats`` and ``counters`` are for any thread (the control socket); config space
reads and writes come from vCPU threads.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

from kasou.devices.virtio.device import Reactor, VirtioDevice
from kasou.devices.virtio.queue import Chain, ChainError, Virtqueue
from kasou.devices.virtio.spec import DeviceType
from kasou.errors import ConfigError, GuestMemoryError, HostError
from kasou.memory import GuestMemory
from kasou.persist import encode_state

__all__ = [
    "DEFAULT_STATS_INTERVAL",
    "F_DEFLATE_ON_OOM",
    "F_PAGE_REPORTING",
    "F_STATS_VQ",
    "PAGE_SIZE",
    "STAT_NAMES",
    "Balloon",
    "BalloonState",
]

log = logging.getLogger(__name__)

QUEUE_SIZE = 128  # Linux needs at least PAGE_REPORTING_CAPACITY (32) on the reporting queue
PAGE_SHIFT = 12  # VIRTIO_BALLOON_PFN_SHIFT
PAGE_SIZE = 1 << PAGE_SHIFT
MAX_PAGES = 0xFFFF_FFFF  # num_pages is a u32

# Feature bits (§5.5.3).
F_MUST_TELL_HOST = 1 << 0
F_STATS_VQ = 1 << 1
F_DEFLATE_ON_OOM = 1 << 2
F_FREE_PAGE_HINT = 1 << 3
F_PAGE_POISON = 1 << 4
F_PAGE_REPORTING = 1 << 5

# struct virtio_balloon_config (§5.5.4): num_pages, actual, free_page_hint_cmd_id,
# poison_val, all le32.
_CONFIG = struct.Struct("<IIII")
_ACTUAL_AT = 4

# struct virtio_balloon_stat (§5.5.6.3): le16 tag, le64 val, packed.
_STAT = struct.Struct("<HQ")
MAX_STATS = 64
"""The most entries a statistics buffer may hold (Linux 6.1 sends 10, later ones 16)."""

MAX_PFNS = 16384
"""The most PFNs one inflate or deflate chain may carry (Linux sends at most 256)."""

STAT_NAMES = {
    0: "swap_in",  # VIRTIO_BALLOON_S_SWAP_IN, bytes
    1: "swap_out",  # VIRTIO_BALLOON_S_SWAP_OUT, bytes
    2: "major_faults",  # VIRTIO_BALLOON_S_MAJFLT, a count
    3: "minor_faults",  # VIRTIO_BALLOON_S_MINFLT, a count
    4: "free_memory",  # VIRTIO_BALLOON_S_MEMFREE, bytes
    5: "total_memory",  # VIRTIO_BALLOON_S_MEMTOT, bytes
    6: "available_memory",  # VIRTIO_BALLOON_S_AVAIL, bytes
    7: "disk_caches",  # VIRTIO_BALLOON_S_CACHES, bytes
    8: "hugetlb_allocations",  # VIRTIO_BALLOON_S_HTLB_PGALLOC, a count
    9: "hugetlb_failures",  # VIRTIO_BALLOON_S_HTLB_PGFAIL, a count
}
"""Statistics tags (§5.5.6.3, Memory Statistics) and the names ``stats()`` gives them; the
device ignores other tags, as the spec requires. Values are passed on as the guest sent
them, in the spec's units."""

DEFAULT_STATS_INTERVAL = 2.0
"""Seconds between two requests for fresh statistics."""
MAX_STATS_INTERVAL = 86400.0

_TAGS = {name: tag for tag, name in STAT_NAMES.items()}
STATS_QUEUE = 2  # statsq's index whenever VIRTIO_BALLOON_F_STATS_VQ is negotiated


@dataclass(frozen=True)
class BalloonState:
    """A balloon as saved. Field names are a snapshot format contract.

    ``target_pages``: the balloon size the host asks for (num_pages); ``actual_pages``: the
    size the driver reported (actual), both in 4 KiB pages; ``stats``: the latest statistics
    as (tag, value) pairs (§5.5.6.3 tags), ascending by tag; ``stats_head``: the statistics
    buffer the device holds, if any; ``stats_interval_ms``: how often it asks (0: never)."""

    target_pages: int
    actual_pages: int
    stats: tuple[tuple[int, int], ...]
    stats_head: int | None
    stats_interval_ms: int


class Balloon(VirtioDevice):
    """A memory balloon: inflate, deflate, statistics and free page reporting."""

    device_type = DeviceType.BALLOON
    name = "balloon"

    def __init__(self, reactor: Reactor) -> None:
        super().__init__(
            reactor, (QUEUE_SIZE,) * 4, F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING
        )
        self._num_pages = 0  # the balloon size the host asks for, in pages
        self._actual = 0  # the size the driver reports, in pages
        self._stats: dict[str, int] = {}
        self._stats_time: float | None = None
        self._stats_interval = DEFAULT_STATS_INTERVAL
        self._roles: dict[int, str] = {}
        # The statistics buffer the device holds (its head), and the timer that will return
        # it: a timer whose token is no longer current does nothing (timers cannot be
        # cancelled).
        self._stats_head: int | None = None
        self._stats_token = 0
        self._restored: BalloonState | None = None  # from ``load_state``, for ``on_activate``
        self.inflated_pages = 0
        self.deflated_pages = 0
        self.reported_pages = 0
        self.stats_updates = 0

    # --- the host's side (any thread) ---------------------------------------------------

    def set_target(self, size: int) -> None:
        """Ask the guest to put ``size`` bytes (rounded down to 4 KiB pages) in the balloon,
        taking them from its usable RAM; 0 gives everything back. Raises ``ConfigError``
        for a negative size or one larger than guest RAM (once the guest runs)."""
        if size < 0:
            raise ConfigError("balloon", f"a balloon of {size} bytes: give a size of 0 or more")
        memory = self.memory
        if memory is not None and size > memory.size:
            raise ConfigError(
                "balloon",
                f"a balloon of {size} bytes is larger than the guest's {memory.size} bytes "
                "of RAM: give a smaller size",
            )
        pages = size >> PAGE_SHIFT
        if pages > MAX_PAGES:
            raise ConfigError("balloon", f"a balloon of {size} bytes: at most 16 TiB")
        self._num_pages = pages
        interrupt = self.interrupt
        if self.active and interrupt is not None:
            interrupt.signal_config()  # §5.5.6: the driver rereads num_pages

    @property
    def target(self) -> int:
        """The balloon size asked of the guest, in bytes."""
        return self._num_pages << PAGE_SHIFT

    @property
    def actual(self) -> int:
        """The balloon size the guest reports it reached, in bytes."""
        return self._actual << PAGE_SHIFT

    def stats(self) -> dict[str, int]:
        """The guest's latest statistics by name (``STAT_NAMES``): only those it sent."""
        return dict(self._stats)

    @property
    def stats_age(self) -> float | None:
        """Seconds since the guest last sent statistics, or ``None`` if it never did."""
        if self._stats_time is None:
            return None
        return time.monotonic() - self._stats_time

    @property
    def stats_interval(self) -> float:
        return self._stats_interval

    def set_stats_interval(self, seconds: float) -> None:
        """Ask for fresh statistics every ``seconds``; 0 stops asking."""
        if not 0 <= seconds <= MAX_STATS_INTERVAL:  # also refuses NaN
            raise ConfigError(
                "balloon",
                f"a statistics interval of {seconds} s: give 0 (off) up to {MAX_STATS_INTERVAL}",
            )
        self._stats_interval = seconds
        self.reactor.call_soon(self._schedule_stats_request)

    def counters(self) -> dict[str, Any]:
        return {
            "target_pages": self._num_pages,
            "actual_pages": self._actual,
            "inflated_pages": self.inflated_pages,
            "deflated_pages": self.deflated_pages,
            "reported_pages": self.reported_pages,
            "stats_updates": self.stats_updates,
        }

    # --- config space (vCPU threads) ----------------------------------------------------

    def config(self) -> bytes:
        return _CONFIG.pack(self._num_pages, self._actual, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only ``actual`` is the driver's to write (§5.5.4); a write that covers part of it
        # changes those bytes, anything else is ignored.
        end = offset + len(data)
        if offset >= _ACTUAL_AT + 4 or end <= _ACTUAL_AT:
            return
        value = bytearray(self._actual.to_bytes(4, "little"))
        for position in range(max(offset, _ACTUAL_AT), min(end, _ACTUAL_AT + 4)):
            value[position - _ACTUAL_AT] = data[position - offset]
        self._actual = int.from_bytes(value, "little")

    # --- the queues (the reactor) -------------------------------------------------------

    def on_activate(self) -> None:
        roles = ["inflate", "deflate"]
        if self.has_feature(F_STATS_VQ):
            roles.append("stats")
        if self.has_feature(F_PAGE_REPORTING):
            roles.append("reporting")
        self._roles = dict(enumerate(roles))
        self._stats_head = None
        self._stats_token += 1  # timers of an earlier activation do nothing
        restored, self._restored = self._restored, None
        if restored is None:
            self._stats = {}
            self._stats_time = None
            return
        # A restore: the statistics stay, and the buffer held at the snapshot is held again.
        head = restored.stats_head
        queue = self.queues[STATS_QUEUE]
        if head is not None and self._roles.get(STATS_QUEUE) == "stats" and queue.live:
            for chain in self.held_chains(queue, (head,)):
                self._stats_head = chain.head
                self._schedule_stats_request()

    def on_reset(self) -> None:
        self._restored = None

    # --- snapshots ----------------------------------------------------------------------

    def save_state(self) -> bytes:
        state = BalloonState(
            target_pages=self._num_pages,
            actual_pages=self._actual,
            stats=tuple(sorted((_TAGS[name], value) for name, value in self._stats.items())),
            stats_head=self._stats_head if self.active else None,
            stats_interval_ms=round(self._stats_interval * 1000),
        )
        return encode_state(state)

    def load_state(self, data: bytes) -> None:
        state = self.decode_state(data, BalloonState)
        for field in ("target_pages", "actual_pages"):
            value = getattr(state, field)
            if not 0 <= value <= MAX_PAGES:
                raise self.state_error(field, f"{value} is not a number from 0 to {MAX_PAGES}")
        if len(state.stats) > len(STAT_NAMES):
            raise self.state_error("stats", f"{len(state.stats)} entries (at most one a tag)")
        tags = [tag for tag, _ in state.stats]
        for tag, value in state.stats:
            if tag not in STAT_NAMES:
                raise self.state_error("stats", f"tag {tag} is not one the device keeps")
            if not 0 <= value < 1 << 64:
                raise self.state_error("stats", f"value {value} of tag {tag} is not a u64")
        if len(set(tags)) != len(tags):
            raise self.state_error("stats", "a tag twice")
        if state.stats_head is not None:
            self.check_heads("stats_head", (state.stats_head,), STATS_QUEUE)
        interval = state.stats_interval_ms
        if not 0 <= interval <= MAX_STATS_INTERVAL * 1000:
            raise self.state_error(
                "stats_interval_ms", f"{interval} is not from 0 to {MAX_STATS_INTERVAL * 1000:.0f}"
            )
        # Checked: the host's side takes effect now, the held buffer once the device runs.
        self._num_pages = state.target_pages
        self._actual = state.actual_pages
        self._stats = {STAT_NAMES[tag]: value for tag, value in state.stats}
        self._stats_time = time.monotonic() if state.stats else None
        self._stats_interval = interval / 1000
        self._restored = state

    def process(self, queue: Virtqueue) -> None:
        role = self._roles.get(queue.index)
        while self.active:
            try:
                chain = queue.pop()
                if chain is None:
                    break
                self._serve(queue, role, chain)
            except ChainError as error:
                # Without its traceback, a kept error (a log record) holds no view of guest
                # RAM, which would stop the RAM from being unmapped.
                self.bad_chain(queue, error.with_traceback(None))
        self.signal(queue)

    def _serve(self, queue: Virtqueue, role: str | None, chain: Chain) -> None:
        try:
            if role == "inflate":
                self._inflate(chain)
            elif role == "deflate":
                self._deflate(chain)
            elif role == "stats":
                self._receive_stats(queue, chain)
                return  # the device keeps the buffer
            elif role == "reporting":
                self._report(chain)
            else:
                raise ChainError(
                    chain.head, f"queue {queue.index} has no use with the features taken"
                )
        except HostError as error:
            # The host kept the pages (madvise refused): the request is done all the same,
            # the VM only holds more host memory than it could.
            log.warning("%s: %s", self.name, error)
        queue.use(chain, 0)

    def _pfns(self, chain: Chain) -> list[int]:
        size = chain.readable_len
        if size % 4:
            raise ChainError(chain.head, f"a PFN array of {size} bytes (not whole u32s)")
        if size > 4 * MAX_PFNS:
            raise ChainError(chain.head, f"{size // 4} PFNs in one request (at most {MAX_PFNS})")
        return list(struct.unpack(f"<{size // 4}I", chain.read()))

    def _inflate(self, chain: Chain) -> None:
        memory = self._guest_memory()
        pages = sorted(set(self._pfns(chain)))
        # All PFNs are checked before any page goes: a bad one fails the whole request.
        for pfn in pages:
            if not memory.contains(pfn << PAGE_SHIFT, PAGE_SIZE):
                raise ChainError(chain.head, f"PFN {pfn:#x} is not guest RAM")
        for start, count in _runs(pages):
            _discard(memory, start << PAGE_SHIFT, count << PAGE_SHIFT)
        self.inflated_pages += len(pages)

    def _deflate(self, chain: Chain) -> None:
        # Nothing to do: a discarded page comes back when the guest touches it.
        self.deflated_pages += len(self._pfns(chain))

    def _report(self, chain: Chain) -> None:
        # Free Page Reporting (§5.5.6): free pages come as device-writable buffers; the device
        # writes nothing into them.
        if chain.readable:
            raise ChainError(chain.head, "a free page report with device-readable buffers")
        memory = self._guest_memory()
        for view in chain.writable:
            gpa = _gpa_of(memory, view)
            self.reported_pages += memory.discard(gpa, len(view)) >> PAGE_SHIFT

    def _receive_stats(self, queue: Virtqueue, chain: Chain) -> None:
        size = chain.readable_len
        if size % _STAT.size or size > MAX_STATS * _STAT.size:
            raise ChainError(
                chain.head,
                f"a statistics buffer of {size} bytes (whole {_STAT.size}-byte entries, "
                f"at most {MAX_STATS})",
            )
        stats: dict[str, int] = {}
        for tag, value in _STAT.iter_unpack(chain.read()):
            name = STAT_NAMES.get(tag)
            if name is not None:
                stats[name] = value
        self._stats = stats
        self._stats_time = time.monotonic()
        self.stats_updates += 1
        if self._stats_head is not None:
            # The driver keeps at most one buffer there (§5.5.6.3); give the older one back.
            queue.push(self._stats_head, 0)
        self._stats_head = chain.head
        self._schedule_stats_request()

    def _schedule_stats_request(self) -> None:
        self._stats_token += 1
        if self._stats_head is None or not self._stats_interval:
            return
        token = self._stats_token
        self.reactor.call_later(self._stats_interval, lambda: self._request_stats(token))

    def _request_stats(self, token: int) -> None:
        # §5.5.6.3: returning the buffer asks the driver for fresh statistics.
        head = self._stats_head
        if token != self._stats_token or head is None or not self.active:
            return
        for index, role in self._roles.items():
            if role == "stats":
                queue = self.queues[index]
                self._stats_head = None
                queue.push(head, 0)
                self.signal(queue)

    def _guest_memory(self) -> GuestMemory:
        memory = self.memory
        assert memory is not None, "served only while active"
        return memory


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted, distinct page numbers as (first, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _discard(memory: GuestMemory, gpa: int, size: int) -> None:
    """Discard ``[gpa, gpa + size)`` (all guest RAM), cut where one region meets the next."""
    for region in memory.regions:
        start, end = max(gpa, region.gpa), min(gpa + size, region.end)
        if start < end:
            memory.discard(start, end - start)


def _gpa_of(memory: GuestMemory, view: memoryview) -> int:
    """The guest-physical address of a view of guest RAM (a chain's buffer)."""
    anchor = ctypes.c_char.from_buffer(view)
    address = ctypes.addressof(anchor)
    del anchor  # ends the buffer export, so the view can be released later
    for region in memory.regions:
        if region.host_address <= address < region.host_address + region.size:
            return region.gpa + address - region.host_address
    raise GuestMemoryError(f"host address {address:#x} is not guest RAM")
