"""Guest RAM regions and bounds-checked access by guest-physical address (GPA).

Each region is one host mapping: anonymous private memory, a memfd mapped shared (so
another process, a snapshot writer or a migration sender, can map the same pages), or a
snapshot's memory file mapped private (``GuestMemory.from_file``: copy-on-write, the file
is never written and its pages are read in only as the guest touches them). Reads and
writes that are not wholly inside one region raise ``GuestMemoryError``: a guest-supplied
address or length can never reach host memory outside guest RAM. ``discard`` gives pages back
to the host (a balloon's inflated or reported pages).

The write log records which pages kasou itself wrote (``mark_written``): KVM's dirty log
sees only vCPU writes, so devices mark what they put into guest RAM, and diff snapshots and
migration rounds take both. A memory file holds region ``i`` at ``file_offsets(layout)[i]``
(``kasou.memory.snapfile`` writes it).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kasou.errors import GuestMemoryError, HostError, SnapshotError
from kasou.memory.pages import PageBitmap

__all__ = ["Backing", "GuestMemory", "Region", "file_offsets"]

Backing = Literal["anonymous", "memfd"]

PAGE_SIZE = 4096
_PAGE_SHIFT = 12
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # linux/mman.h; Python < 3.13 lacks it


@dataclass(eq=False)
class Region:
    """One contiguous range of guest RAM backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    host_address: int
    fd: int | None = None
    """The file behind the mapping: the memfd (shared), or the snapshot's memory file opened
    read-only (``source``); None for anonymous memory."""
    source: Path | None = None
    """The memory file mapped private (copy-on-write) by ``GuestMemory.from_file``; None
    for fresh RAM."""
    file_offset: int = 0
    """Where the region's bytes start in ``source``."""

    @property
    def end(self) -> int:
        """The first guest-physical address after this region."""
        return self.gpa + self.size


class GuestMemory:
    """Guest RAM: a few non-overlapping regions, sorted by guest-physical address."""

    def __init__(self, regions: Sequence[Region]) -> None:
        self.regions = tuple(sorted(regions, key=lambda region: region.gpa))
        for before, after in zip(self.regions, self.regions[1:], strict=False):
            if before.end > after.gpa:
                raise ValueError(f"guest memory regions overlap at {after.gpa:#x}")
        self._views = tuple(memoryview(region.mapping) for region in self.regions)
        # The write log: (gpa, end, bitmap) per region while on (all mark_written's loop
        # reads), None while off (mark_written then returns after one attribute check).
        # Marks and take_write_log hold the lock, so a device thread's mark lands either in
        # the log taken or in the next one, never in a log already handed out (and a
        # bytearray's read-modify-write is not atomic across threads either).
        self._write_log: tuple[tuple[int, int, PageBitmap], ...] | None = None
        self._write_log_lock = threading.Lock()

    @classmethod
    def create(
        cls,
        layout: Iterable[tuple[int, int]],
        backing: Backing = "anonymous",
        hugepages: bool = False,
    ) -> GuestMemory:
        """Map host memory for each ``(gpa, size)`` in ``layout``.

        Pages are reserved lazily (``MAP_NORESERVE``): the host commits them as the guest
        touches them. ``hugepages`` asks for transparent huge pages (``MADV_HUGEPAGE``).
        """
        regions: list[Region] = []
        try:
            for gpa, size in layout:
                if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                    raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")
                regions.append(_map_region(gpa, size, backing, hugepages))
        except BaseException:
            for region in regions:
                _unmap(region)
            raise
        return cls(regions)

    @classmethod
    def from_file(
        cls, layout: Iterable[tuple[int, int]], path: Path, *, hugepages: bool = False
    ) -> GuestMemory:
        """Map a snapshot's memory file as guest RAM: region ``i`` of ``layout`` (sorted by
        address, as ``GuestMemory.layout`` gives it) from ``file_offsets(layout)[i]``.

        Each region is mapped private (``MAP_PRIVATE``): the guest's writes go to
        copy-on-write pages of this process and never reach the file, so one file serves
        any number of clones. The kernel reads pages in as they are touched, so this costs
        the same whatever the guest's size. The file must not change while it is mapped
        (pages not yet copied would show the change). ``layout`` comes from a snapshot,
        so it is checked; a malformed layout or a file shorter than it raises
        ``SnapshotError``.
        """
        layout = tuple(layout)
        _check_layout(layout, path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            raise SnapshotError(
                f"cannot open the memory file {path}: {error.strerror}; "
                "check the snapshot directory"
            ) from error
        regions: list[Region] = []
        try:
            info = os.fstat(fd)
            total = sum(size for _, size in layout)
            if not stat.S_ISREG(info.st_mode):
                raise SnapshotError(f"the memory file {path} is not a regular file")
            if info.st_size < total:
                raise SnapshotError(
                    f"the memory file {path} holds {info.st_size} bytes but the memory "
                    f"layout needs {total}: the snapshot is truncated or not of this VM"
                )
            for (gpa, size), offset in zip(layout, file_offsets(layout), strict=True):
                regions.append(_map_file_region(gpa, size, fd, path, offset, hugepages))
        except BaseException:
            for region in regions:
                _unmap(region)
            raise
        finally:
            os.close(fd)  # each region holds its own duplicate
        return cls(regions)

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(region.size for region in self.regions)

    @property
    def layout(self) -> tuple[tuple[int, int], ...]:
        """``(gpa, size)`` of each region, sorted by address (what ``create`` and
        ``from_file`` take back)."""
        return tuple((region.gpa, region.size) for region in self.regions)

    # --- the write log ---------------------------------------------------------------------

    def start_write_log(self) -> None:
        """Start recording the pages ``mark_written`` reports. Already on: nothing changes
        (the pages marked so far stay marked)."""
        with self._write_log_lock:
            if self._write_log is None:
                self._write_log = self._empty_log()

    def stop_write_log(self) -> None:
        """Stop recording and drop what was recorded."""
        with self._write_log_lock:
            self._write_log = None

    def mark_written(self, gpa: int, size: int) -> None:
        """Record that kasou wrote ``[gpa, gpa + size)`` of guest RAM (call it after the
        bytes land). Each page the range touches is marked in its region; parts outside
        guest RAM are ignored. Costs one attribute check while the log is off."""
        if self._write_log is None:
            return
        self._mark(gpa, size)

    def take_write_log(self) -> list[PageBitmap]:
        """The pages marked since logging started or since the last call, one bitmap per
        region (in ``regions`` order); the log starts again empty. ``SnapshotError`` if
        the log is off: the caller would otherwise miss writes."""
        with self._write_log_lock:
            taken = self._write_log
            if taken is None:
                raise SnapshotError(
                    "guest memory is not logging writes: start_write_log() must come before "
                    "the writes a diff snapshot or a migration round has to carry"
                )
            self._write_log = self._empty_log()
        return [bitmap for _, _, bitmap in taken]

    def _empty_log(self) -> tuple[tuple[int, int, PageBitmap], ...]:
        return tuple(
            (region.gpa, region.end, PageBitmap(region.size // PAGE_SIZE))
            for region in self.regions
        )

    def _mark(self, gpa: int, size: int) -> None:
        if size <= 0:
            return
        end = gpa + size
        with self._write_log_lock:
            log = self._write_log
            if log is None:
                return
            # Written plainly (no zip, min or max): this runs for every used buffer.
            for start, stop, bitmap in log:
                if gpa < stop and start < end:
                    first = ((gpa if gpa > start else start) - start) >> _PAGE_SHIFT
                    last = ((end if end < stop else stop) - start - 1) >> _PAGE_SHIFT
                    bitmap.mark(first, last - first + 1)

    def close(self) -> None:
        """Release the host mappings. Views handed out before must be released first."""
        for view in self._views:
            view.release()
        self._views = ()
        for region in self.regions:
            _unmap(region)
        self.regions = ()
        self.stop_write_log()

    def _locate(self, gpa: int, size: int) -> tuple[int, int]:
        for index, region in enumerate(self.regions):
            if region.gpa <= gpa and gpa + size <= region.end and size >= 0:
                return index, gpa - region.gpa
        raise GuestMemoryError(f"guest-physical range {gpa:#x}+{size:#x} is not inside guest RAM")

    def contains(self, gpa: int, size: int = 1) -> bool:
        """Whether ``[gpa, gpa + size)`` lies wholly inside one RAM region."""
        return any(region.gpa <= gpa and gpa + size <= region.end for region in self.regions)

    def view(self, gpa: int, size: int) -> memoryview:
        """A zero-copy, writable view of ``size`` bytes at ``gpa`` (inside one region)."""
        index, offset = self._locate(gpa, size)
        return self._views[index][offset : offset + size]

    def read(self, gpa: int, size: int) -> bytes:
        """Copy ``size`` bytes out of guest RAM."""
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest RAM at ``gpa``."""
        if isinstance(data, memoryview):
            data = data.cast("B")  # the view below is bytes: item formats must match to copy
        self.view(gpa, len(data))[:] = data
        if self._write_log is not None:
            self._mark(gpa, len(data))

    def read_int(self, gpa: int, size: int) -> int:
        """A little-endian unsigned integer of ``size`` bytes."""
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        """Store ``value`` as a little-endian unsigned integer of ``size`` bytes."""
        self.view(gpa, size)[:] = value.to_bytes(size, "little")
        if self._write_log is not None:
            self._mark(gpa, size)

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set ``size`` bytes at ``gpa`` to ``byte``."""
        ctypes.memset(self.host_address(gpa, size), byte, size)
        if self._write_log is not None:
            self._mark(gpa, size)

    def discard(self, gpa: int, size: int) -> int:
        """Give the whole pages inside ``[gpa, gpa + size)`` back to the host; return the
        bytes discarded. The range must lie inside one region; the partial pages at its ends
        are kept. A discarded page costs host memory again once touched. The pages count as
        written for the write log (their content changed).

        Anonymous private memory drops its pages (``MADV_DONTNEED``): they read as zeros. A
        memfd also frees the file's pages (``MADV_REMOVE``, a hole punched in the shared
        memory object), which ``MADV_DONTNEED`` would leave in place behind a shared mapping
        (madvise(2)): they read as zeros. A region mapped from a snapshot file
        (``source``) drops its private copies (``MADV_DONTNEED``): the pages read the
        snapshot's content again, and the host memory they then use is the file's page
        cache, shared with every other VM mapping that file. The guest gave these pages up,
        so what they read is its own business.
        """
        index, offset = self._locate(gpa, size)
        # Regions start on page boundaries, so offsets round like guest-physical addresses.
        start = (offset + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        end = (offset + size) // PAGE_SIZE * PAGE_SIZE
        if end <= start:
            return 0
        region = self.regions[index]
        shared = region.fd is not None and region.source is None
        advice = mmap.MADV_REMOVE if shared else mmap.MADV_DONTNEED
        try:
            region.mapping.madvise(advice, start, end - start)
        except OSError as error:
            raise HostError(
                f"cannot give guest RAM {gpa:#x}+{size:#x} back to the host: {error.strerror}; "
                "the pages stay in use (the VM runs on with them)"
            ) from error
        if self._write_log is not None:
            self._mark(region.gpa + start, end - start)
        return end - start

    def host_address(self, gpa: int, size: int = 1) -> int:
        """The host virtual address of ``gpa`` (for KVM memory slots and libc calls)."""
        index, offset = self._locate(gpa, size)
        return self.regions[index].host_address + offset


def file_offsets(layout: Sequence[tuple[int, int]]) -> list[int]:
    """Where each region of ``layout`` starts in a memory file: region ``i`` right after
    region ``i - 1``, the first at 0 (no header; the file is exactly the layout's size)."""
    offsets: list[int] = []
    offset = 0
    for _, size in layout:
        offsets.append(offset)
        offset += size
    return offsets


def _check_layout(layout: Sequence[tuple[int, int]], path: Path) -> None:
    """Refuse a layout read from a snapshot that ``create`` would not have made."""
    if not layout:
        raise SnapshotError(f"the memory layout for {path} has no regions")
    previous_end = 0
    for gpa, size in layout:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or gpa < 0:
            raise SnapshotError(
                f"the memory layout for {path} has a region {gpa:#x}+{size:#x} that is not "
                "page aligned: the snapshot is corrupt"
            )
        if gpa < previous_end:
            raise SnapshotError(
                f"the memory layout for {path} has regions out of order or overlapping at "
                f"{gpa:#x}: the snapshot is corrupt"
            )
        previous_end = gpa + size


def _map_file_region(
    gpa: int, size: int, fd: int, path: Path, offset: int, hugepages: bool
) -> Region:
    region_fd = os.dup(fd)
    try:
        # MAP_PRIVATE of a read-only fd may still be written: writes make private copies.
        mapping = mmap.mmap(
            region_fd,
            size,
            flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset,
        )
    except OSError as error:
        os.close(region_fd)
        raise HostError(
            f"cannot map {size >> 20} MiB of guest RAM from {path}: {error.strerror}; "
            "give the guest less memory"
        ) from error
    if hugepages:
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # a hint: kernels without huge pages for file mappings run on without them
    return Region(
        gpa=gpa,
        size=size,
        mapping=mapping,
        host_address=_address_of(mapping),
        fd=region_fd,
        source=path,
        file_offset=offset,
    )


def _map_region(gpa: int, size: int, backing: Backing, hugepages: bool) -> Region:
    fd: int | None = None
    try:
        if backing == "memfd":
            fd = os.memfd_create(f"kasou-ram-{gpa:#x}", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _MAP_NORESERVE)
        else:
            mapping = mmap.mmap(
                -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
            )
    except OSError as error:
        if fd is not None:
            os.close(fd)
        raise HostError(
            f"cannot map {size >> 20} MiB of guest RAM: {error.strerror}; "
            "give the guest less memory"
        ) from error
    if hugepages:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return Region(gpa=gpa, size=size, mapping=mapping, host_address=_address_of(mapping), fd=fd)


def _address_of(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor  # releases the buffer export so the mapping can be closed later
    return address


def _unmap(region: Region) -> None:
    region.mapping.close()
    if region.fd is not None:
        os.close(region.fd)
        region.fd = None
