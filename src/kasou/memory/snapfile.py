"""Guest memory files: writing guest RAM into a snapshot, and folding a diff into its base.

A memory file is guest RAM as it is, region after region, with nothing else in it::

    0                   file_offsets[1]          file_offsets[2]          memory.size
    | region 0 (size 0) | region 1 (size 1)      | ...                    |

Region ``i`` (in ascending guest-physical order, as ``GuestMemory.layout`` lists them)
starts at ``file_offsets(layout)[i]``, the sum of the sizes before it. The file is sparse:
an all-zero page is a hole, so a file of a mostly idle guest takes little disk, and
``GuestMemory.from_file`` maps it back copy-on-write without reading it. There is no
header and no checksum: the layout, the page bitmaps of a diff and any checksums live in
the snapshot's sections file (``kasou.persist``); this module reads and writes only bytes.

A full file holds every page. A diff file has the same size and places but holds only the
pages its ``PageBitmap``s mark (the pages written since the previous snapshot); a marked
page that is all zeros and an unmarked page are both holes, so a diff means nothing without
its bitmaps. ``merge_memory`` copies the marked pages of a diff into its base, after which
the base is the full file of the later memory.

Not here: when to snapshot, pausing the VM, the sections file, the directory layout
(``kasou.vmm``). ``save_memory`` expects the guest's memory to hold still while it runs
(the VM paused): it reads guest RAM in place.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from kasou._sys import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate, memcmp
from kasou.errors import GuestMemoryError, HostError, SnapshotError
from kasou.memory.guest import PAGE_SIZE, GuestMemory, Region, file_offsets
from kasou.memory.pages import PageBitmap, byte_runs

__all__ = ["MemoryFile", "MemoryWrite", "merge_memory", "nonzero_pages", "save_memory"]

_CHUNK = 2 << 20  # checked for zeros in one memcmp; a non-zero chunk is then checked per page
_CHUNK_PAGES = _CHUNK // PAGE_SIZE
_MAX_WRITE = 64 << 20  # bytes per pwrite: bounds each system call
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_CHUNK = bytes(_CHUNK)

# /proc/self/pagemap (Documentation/admin-guide/mm/pagemap.rst): one 64-bit entry per page;
# bit 63 "page present", bit 62 "page swapped". Both live in the entry's top byte.
_PAGEMAP = "/proc/self/pagemap"
_PAGEMAP_BATCH = 1 << 16  # pages per read: 512 KiB of entries for 256 MiB of RAM
_PRESENT_OR_SWAPPED = bytes(1 if byte & 0xC0 else 0 for byte in range(256))


class MemoryWrite(NamedTuple):
    """What ``save_memory`` wrote."""

    pages: int
    """Pages written (not left holes)."""
    bytes: int
    """Bytes written: ``pages * 4096``."""
    seconds: float
    """Wall time from opening the file to its fsync returning."""


class MemoryFile:
    """A memory file read by guest-physical address, without mapping it: to look into a
    snapshot's guest RAM (tools, tests). ``layout`` is the RAM layout it was saved with."""

    def __init__(self, path: Path, layout: Sequence[tuple[int, int]]) -> None:
        self.path = path
        self._regions = list(zip(layout, file_offsets(layout), strict=True))

    def read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes at ``gpa`` (inside one region); a hole reads as zeros."""
        for (start, length), offset in self._regions:
            if start <= gpa and gpa + size <= start + length:
                with open(self.path, "rb") as file:
                    return os.pread(file.fileno(), size, offset + gpa - start)
        raise GuestMemoryError(f"{gpa:#x}+{size:#x} is not inside the saved guest RAM")


def save_memory(
    memory: GuestMemory, path: Path, only: Sequence[PageBitmap] | None = None
) -> MemoryWrite:
    """Write guest RAM to a new memory file at ``path`` (the layout in the module docstring).

    Full (``only`` None): every page that is not all zeros. Pages that cannot hold data are
    skipped without being read: a memfd region's holes (``SEEK_DATA``/``SEEK_HOLE``), an
    anonymous region's pages never touched (neither present nor swapped in
    /proc/self/pagemap; mincore(2) would miss swapped-out pages), a region mapped from a
    file (``from_file``) outside both the file's data and the pages copied on write. The
    rest is checked for zeros 2 MiB at a time, then page by page where it is not all zeros.

    Diff (``only`` given, one bitmap per region): exactly the marked pages, except that
    an all-zero page stays a hole.

    The file is created (``O_EXCL``: an existing file is never overwritten) and fsynced
    before this returns. Writes go straight from guest RAM (``os.pwrite``, the GIL
    released). A host failure (no space, an I/O error) raises ``HostError`` naming the
    file; the partial file is removed.
    """
    started = time.perf_counter()
    regions = memory.regions
    if only is not None:
        _check_bitmaps(only, memory.layout, "save_memory")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise HostError(
            f"cannot create the memory file {path}: {error.strerror}; choose a new path "
            "in a writable directory"
        ) from error
    written = 0
    try:
        os.ftruncate(fd, memory.size)
        for index, (region, offset) in enumerate(
            zip(regions, file_offsets(memory.layout), strict=True)
        ):
            runs = only[index].runs() if only is not None else _data_runs(region)
            view = memory.view(region.gpa, region.size)
            try:
                for first, count in _nonzero_runs(view, region.host_address, runs):
                    _write_all(
                        fd,
                        view[first * PAGE_SIZE : (first + count) * PAGE_SIZE],
                        offset + first * PAGE_SIZE,
                    )
                    written += count
            finally:
                view.release()
        os.fsync(fd)
    except BaseException as error:
        os.close(fd)
        os.unlink(path)
        if isinstance(error, OSError):
            raise HostError(
                f"cannot write guest memory to {path}: {error.strerror}; the partial file "
                "was removed: free space there or choose another directory"
            ) from error
        raise
    os.close(fd)
    return MemoryWrite(written, written * PAGE_SIZE, time.perf_counter() - started)


def merge_memory(
    base: Path, diff: Path, pages: Sequence[PageBitmap], layout: Sequence[tuple[int, int]]
) -> int:
    """Copy the pages ``pages`` marks from the diff memory file ``diff`` into the memory file
    ``base`` (both of ``layout``), then fsync ``base``; return how many pages were merged.

    A marked page that is all zeros in ``diff`` becomes a hole in ``base`` (fallocate(2)
    ``FALLOC_FL_PUNCH_HOLE``; zeros are written where the file system cannot punch). ``base``
    is changed in place: if this fails part way (``HostError``), ``base`` holds some pages
    of each snapshot and must be thrown away. It must not be mapped by a running VM either
    (``from_file``: pages not yet copied would change under the guest). Files whose size is
    not the layout's, or bitmaps that do not fit it, raise ``SnapshotError``.
    """
    layout = tuple(layout)
    _check_bitmaps(pages, layout, "merge_memory")
    total = sum(size for _, size in layout)
    base_fd = _open_memory_file(base, os.O_RDWR, total)
    try:
        diff_fd = _open_memory_file(diff, os.O_RDONLY, total)
        try:
            merged = 0
            for bitmap, offset in zip(pages, file_offsets(layout), strict=True):
                for first, count in bitmap.runs():
                    _merge_run(base_fd, diff_fd, offset + first * PAGE_SIZE, count, diff)
                    merged += count
            os.fsync(base_fd)
        except OSError as error:
            raise HostError(
                f"cannot merge the memory file {diff} into {base}: {error.strerror}; "
                f"{base} is now part merged: restore from the snapshots before it"
            ) from error
        finally:
            os.close(diff_fd)
    finally:
        os.close(base_fd)
    return merged


def _check_bitmaps(
    bitmaps: Sequence[PageBitmap], layout: Sequence[tuple[int, int]], caller: str
) -> None:
    if len(bitmaps) != len(layout):
        raise SnapshotError(
            f"{caller}: {len(bitmaps)} page bitmaps for {len(layout)} memory regions: the "
            "snapshot is corrupt or not of this memory layout"
        )
    for index, (bitmap, (_, size)) in enumerate(zip(bitmaps, layout, strict=True)):
        if bitmap.pages != size // PAGE_SIZE:
            raise SnapshotError(
                f"{caller}: the page bitmap of region {index} has {bitmap.pages} pages, the "
                f"region {size // PAGE_SIZE}: the snapshot is corrupt or not of this layout"
            )


def _open_memory_file(path: Path, flags: int, size: int) -> int:
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except OSError as error:
        raise SnapshotError(
            f"cannot open the memory file {path}: {error.strerror}; check the snapshot directory"
        ) from error
    actual = os.fstat(fd).st_size
    if actual != size:
        os.close(fd)
        raise SnapshotError(
            f"the memory file {path} holds {actual} bytes but the memory layout needs {size}: "
            "the snapshot is truncated or not of this VM"
        )
    return fd


# --- which pages to read ---------------------------------------------------------------------


def nonzero_pages(memory: GuestMemory, index: int) -> Iterator[tuple[int, int]]:
    """Runs ``(first_page, count)`` of region ``index`` that are not all zeros, found as a
    full save finds them (pages never touched are skipped without being read). A migration's
    first copy round sends these. Read them while nothing writes the region, or take them as
    a hint (a page written meanwhile is caught by dirty logging)."""
    region = memory.regions[index]
    view = memory.view(region.gpa, region.size)
    try:
        yield from _nonzero_runs(view, region.host_address, _data_runs(region))
    finally:
        view.release()


def _data_runs(region: Region) -> Iterator[tuple[int, int]]:
    """Runs of the region's pages that may hold data; the others are zeros for sure."""
    pages = region.size // PAGE_SIZE
    if region.fd is not None and region.source is None:
        # A memfd mapped shared: its file knows every page it has (shmem's SEEK_DATA
        # counts swapped pages as data).
        return _file_data_runs(region.fd, 0, region.size)
    candidates = PageBitmap(pages)
    for first, count in _resident_runs(region.host_address, pages):
        candidates.mark(first, count)
    if region.source is not None and region.fd is not None:
        # Pages never touched read the snapshot file: its data counts too.
        for first, count in _file_data_runs(region.fd, region.file_offset, region.size):
            candidates.mark(first, count)
    return candidates.runs()


def _resident_runs(address: int, pages: int) -> Iterator[tuple[int, int]]:
    """Pages of the mapping at ``address`` that are present or swapped out: an anonymous
    private page that is neither was never written (or was discarded) and reads as zeros."""
    try:
        fd = os.open(_PAGEMAP, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield 0, pages  # no pagemap (a restricted /proc): read every page
        return
    try:
        first_entry = address // PAGE_SIZE
        for batch in range(0, pages, _PAGEMAP_BATCH):
            count = min(_PAGEMAP_BATCH, pages - batch)
            try:
                entries = os.pread(fd, count * 8, (first_entry + batch) * 8)
            except OSError:
                entries = b""
            if len(entries) != count * 8:
                yield batch, count
                continue
            flags = entries[7::8].translate(_PRESENT_OR_SWAPPED)
            for start, end in byte_runs(flags):
                yield batch + start, end - start
    finally:
        os.close(fd)


def _file_data_runs(fd: int, start: int, size: int) -> Iterator[tuple[int, int]]:
    """Pages of ``[start, start + size)`` of a file that hold data (``SEEK_DATA`` to
    ``SEEK_HOLE``), relative to ``start``; all of them where the file system cannot tell."""
    end = start + size
    position = start
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data after position
                return
            yield (position - start) // PAGE_SIZE, -(-(end - position) // PAGE_SIZE)
            return
        if data >= end:
            return
        first = (data - start) // PAGE_SIZE
        last = -(-(min(hole, end) - start) // PAGE_SIZE)
        yield first, last - first
        position = hole


def _nonzero_runs(
    view: memoryview, address: int, runs: Iterable[tuple[int, int]]
) -> Iterator[tuple[int, int]]:
    """The pages of ``runs`` that are not all zeros, as maximal runs. ``view`` is the region
    and ``address`` its host address."""
    zero = _zero_chunk_address()
    start = count = 0  # the run being built; count 0: none yet
    for run_first, run_count in runs:
        run_end = run_first + run_count
        for chunk in range(run_first, run_end, _CHUNK_PAGES):
            chunk_pages = min(_CHUNK_PAGES, run_end - chunk)
            # memcmp reads guest RAM in place, with the GIL released: most of a guest's
            # resident memory is zeros or dense data, both settled here.
            if memcmp(address + chunk * PAGE_SIZE, zero, chunk_pages * PAGE_SIZE) == 0:
                continue
            data = bytes(view[chunk * PAGE_SIZE : (chunk + chunk_pages) * PAGE_SIZE])
            for page, pages, is_zero in _page_kinds(data):
                if is_zero:
                    continue
                if count and start + count == chunk + page:
                    count += pages
                else:
                    if count:
                        yield start, count
                    start, count = chunk + page, pages
    if count:
        yield start, count


def _page_kinds(data: bytes) -> Iterator[tuple[int, int, bool]]:
    """Split ``data`` (whole pages) into maximal runs of all-zero and other pages:
    ``(first_page, count, all_zero)``."""
    start = count = 0
    run_zero = False
    for page in range(len(data) // PAGE_SIZE):
        is_zero = data.startswith(_ZERO_PAGE, page * PAGE_SIZE)  # memcmp, no copy
        if count and is_zero == run_zero:
            count += 1
            continue
        if count:
            yield start, count, run_zero
        start, count, run_zero = page, 1, is_zero
    if count:
        yield start, count, run_zero


_zero_mapping: tuple[mmap.mmap, int] | None = None


def _zero_chunk_address() -> int:
    """The host address of ``_CHUNK`` bytes of a private anonymous mapping never written:
    they read as the kernel's zero page and cost no memory."""
    global _zero_mapping
    if _zero_mapping is None:
        mapping = mmap.mmap(-1, _CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(mapping)
        _zero_mapping = (mapping, ctypes.addressof(anchor))
        del anchor  # the mapping lives as long as the module; only its address is needed
    return _zero_mapping[1]


# --- writing ---------------------------------------------------------------------------------


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite(2) all of ``data`` at ``offset``, at most ``_MAX_WRITE`` bytes a call."""
    while data:
        written = os.pwrite(fd, data[:_MAX_WRITE], offset)
        data = data[written:]
        offset += written


def _merge_run(base_fd: int, diff_fd: int, offset: int, pages: int, diff: Path) -> None:
    """Copy ``pages`` pages at ``offset`` from the diff to the base, punching zero pages."""
    end = offset + pages * PAGE_SIZE
    for chunk in range(offset, end, _CHUNK):
        size = min(_CHUNK, end - chunk)
        data = os.pread(diff_fd, size, chunk)
        if len(data) != size:
            raise SnapshotError(
                f"the memory file {diff} ended early at byte {chunk + len(data)}: it changed "
                "while being merged"
            )
        if _ZERO_CHUNK.startswith(data):  # all zeros (memcmp against the zero chunk)
            _punch(base_fd, chunk, size)
            continue
        view = memoryview(data)
        for first, count, is_zero in _page_kinds(data):
            start, stop = first * PAGE_SIZE, (first + count) * PAGE_SIZE
            if is_zero:
                _punch(base_fd, chunk + start, stop - start)
            else:
                _write_all(base_fd, view[start:stop], chunk + start)


def _punch(fd: int, offset: int, size: int) -> None:
    """Make ``[offset, offset + size)`` of the file read as zeros, freeing its blocks where
    the file system can (fallocate(2), FALLOC_FL_PUNCH_HOLE)."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        for start in range(offset, offset + size, _CHUNK):
            _write_all(fd, memoryview(_ZERO_CHUNK)[: min(_CHUNK, offset + size - start)], start)
