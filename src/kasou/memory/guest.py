"""Guest RAM regions and bounds-checked access by guest-physical address (GPA).

Each region is one host mapping: anonymous private memory, or a memfd mapped shared (so
another process, a snapshot writer or a migration sender, can map the same pages). Reads and
writes that are not wholly inside one region raise ``GuestMemoryError``: a guest-supplied
address or length can never reach host memory outside guest RAM. ``discard`` gives pages back
to the host (a balloon's inflated or reported pages); they read as zeros afterwards.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from kasou.errors import GuestMemoryError, HostError

__all__ = ["Backing", "GuestMemory", "Region"]

Backing = Literal["anonymous", "memfd"]

PAGE_SIZE = 4096
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # linux/mman.h; Python < 3.13 lacks it


@dataclass(eq=False)
class Region:
    """One contiguous range of guest RAM backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    host_address: int
    fd: int | None = None

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

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(region.size for region in self.regions)

    def close(self) -> None:
        """Release the host mappings. Views handed out before must be released first."""
        for view in self._views:
            view.release()
        self._views = ()
        for region in self.regions:
            _unmap(region)
        self.regions = ()

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

    def read_int(self, gpa: int, size: int) -> int:
        """A little-endian unsigned integer of ``size`` bytes."""
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        """Store ``value`` as a little-endian unsigned integer of ``size`` bytes."""
        self.view(gpa, size)[:] = value.to_bytes(size, "little")

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        """Set ``size`` bytes at ``gpa`` to ``byte``."""
        ctypes.memset(self.host_address(gpa, size), byte, size)

    def discard(self, gpa: int, size: int) -> int:
        """Give the whole pages inside ``[gpa, gpa + size)`` back to the host; return the
        bytes discarded. The range must lie inside one region; the partial pages at its ends
        are kept. A discarded page reads as zeros and costs host memory again once touched.

        Anonymous private memory drops its pages (``MADV_DONTNEED``); a memfd also frees the
        file's pages (``MADV_REMOVE``, a hole punched in the shared memory object), which
        ``MADV_DONTNEED`` would leave in place behind a shared mapping (madvise(2)).
        """
        index, offset = self._locate(gpa, size)
        # Regions start on page boundaries, so offsets round like guest-physical addresses.
        start = (offset + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
        end = (offset + size) // PAGE_SIZE * PAGE_SIZE
        if end <= start:
            return 0
        region = self.regions[index]
        advice = mmap.MADV_DONTNEED if region.fd is None else mmap.MADV_REMOVE
        try:
            region.mapping.madvise(advice, start, end - start)
        except OSError as error:
            raise HostError(
                f"cannot give guest RAM {gpa:#x}+{size:#x} back to the host: {error.strerror}; "
                "the pages stay in use (the VM runs on with them)"
            ) from error
        return end - start

    def host_address(self, gpa: int, size: int = 1) -> int:
        """The host virtual address of ``gpa`` (for KVM memory slots and libc calls)."""
        index, offset = self._locate(gpa, size)
        return self.regions[index].host_address + offset


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
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor  # releases the buffer export so the mapping can be closed later
    return Region(gpa=gpa, size=size, mapping=mapping, host_address=address, fd=fd)


def _unmap(region: Region) -> None:
    region.mapping.close()
    if region.fd is not None:
        os.close(region.fd)
        region.fd = None
