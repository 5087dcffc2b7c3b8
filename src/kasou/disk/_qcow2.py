"""qcow2 images (versions 2 and 3): guest reads and writes through the L1/L2 mapping, with
cluster allocation, refcounts and a backing file.

Follows QEMU's docs/interop/qcow2.txt ("qcow2 spec, <section>"). What this module does:

- reads standard, zero and compressed clusters (zlib raw deflate, or zstd when the header says
  so; qcow2 spec, "Cluster mapping"), and unallocated clusters from the backing ``Disk`` (or
  as zeros past its end);
- writes in place to clusters whose refcount is one (COPIED flag), and otherwise into newly
  allocated clusters, copying the untouched head and tail of a partly written cluster from
  what it read before (the backing file, zeros, or the old cluster): copy-on-write;
- keeps refcounts exact (qcow2 spec, "Host cluster management"): any refcount width (orders
  0 to 6), new refcount blocks as needed, a larger refcount table when the old one is full;
- discard and write-zeroes: whole clusters become unallocated, or "all zeroes" (version 3)
  where a backing file would otherwise show through; partial clusters get zeros written.

Crash safety. Every metadata change is written through (no write-back cache), in an order
that keeps the image consistent if the process dies at any point, and ``fdatasync`` barriers
keep it so across a power loss:

- data clusters are reserved in batches: their refcounts are written and synced before any
  L2 entry points at them. Guest data goes to the cluster, then the L2 entry is written (the
  L1 entry, for a new L2 table, only after the table and its refcount are synced);
- clusters that lose their last reference are freed only after a sync has made the L2
  entries that dropped them durable (at ``flush``, or when many are pending);
- a crash can therefore leak clusters (refcount above the references: reserved clusters never
  used, frees not yet done; ``qemu-img check -r leaks`` reclaims them) but never leave an L2
  entry pointing at a cluster whose refcount is zero. A clean ``close`` leaves no leaks.

Guest data itself is durable only after ``flush``: after a power loss, a cluster written since
the last flush may read as zeros or as what its host cluster held before, as on a real disk
with a volatile write cache.

Not supported: writing to images with internal snapshots (they open read-only), external data
files, extended L2 entries, encryption (refused at open), writing compressed clusters (a write
to one decompresses it into a new standard cluster), and setting the dirty bit (lazy
refcounts are never used, so it is never needed).

Thread safety: one lock serialises every operation on an image's metadata.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from kasou.disk._disk import SECTOR_SIZE, Disk, check_range, check_writable
from kasou.disk._errors import DiskError
from kasou.disk._io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Cursor,
    byte_views,
    fallocate,
    first_bytes,
    pread_padded,
    preadv_full,
    pwrite_full,
    pwritev_full,
    skip,
    zero_fill,
)
from kasou.disk._qcow2_format import (
    COMPRESSED,
    COPIED,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    L1_RESERVED,
    L2_RESERVED,
    MAGIC,
    MAX_CLUSTER_BITS,
    MAX_REFTABLE_BYTES,
    OFFSET_MASK,
    REFTABLE_RESERVED,
    ZERO,
    Header,
    parse_header,
)

__all__ = ["Qcow2Disk", "read_header"]

# What a guest cluster's L2 entry says about it (qcow2 spec, "Cluster mapping").
_UNALLOCATED = 0  # read from the backing file, or zeros
_ZERO = 1  # reads as zeros; may keep a preallocated host cluster
_DATA = 2  # a standard cluster at a host offset
_COMPRESSED_KIND = 3

_ENTRY = struct.Struct(">Q")
_REFTABLE_HEADER_FIELDS = struct.Struct(">QI")  # header bytes 48-59: offset, clusters
_AUTOCLEAR_OFFSET = 88  # header bytes 88-95 (version 3)
_MAX_HOST_OFFSET = 1 << 56  # qcow2 spec, "Cluster mapping": host offsets below 64 PB

_L2_CACHE_BYTES = 4 << 20
_REFBLOCK_CACHE_BYTES = 1 << 20
_MIN_CACHED = 4
_RESERVE_FIRST = 4  # clusters reserved for data at the first allocation
_RESERVE_BYTES = 16 << 20  # reservations double up to this many bytes
_PENDING_FREE_LIMIT = 1024  # clusters waiting to be freed before a sync frees them
_ZERO_CHUNK = 1 << 20  # bytes of zeros written at a time where zeros must be written


def read_header(fd: int, file_size: int) -> Header:
    """Read and validate the header of the qcow2 image open on ``fd``."""
    start = pread_padded(fd, min(file_size, 4096), 0)
    cluster_bits = struct.unpack_from(">I", start, 20)[0] if len(start) >= 24 else 0
    cluster_size = 1 << min(cluster_bits, MAX_CLUSTER_BITS)
    if cluster_size > len(start) and start[:4] == MAGIC:
        start = pread_padded(fd, min(file_size, cluster_size), 0)
    return parse_header(bytes(start), file_size)


class _LruCache:
    """Tables (L2 tables, refcount blocks) by host offset; the least recently used goes."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._tables: OrderedDict[int, bytearray] = OrderedDict()

    def get(self, offset: int) -> bytearray | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, offset: int, table: bytearray) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        while len(self._tables) > self._capacity:
            self._tables.popitem(last=False)


class Qcow2Disk:
    """A qcow2 image opened by ``open_disk`` (which validates the header and opens the
    backing chain first)."""

    format = "qcow2"

    def __init__(
        self, path: Path, fd: int, header: Header, backing: Disk | None, *, read_only: bool
    ) -> None:
        self.path = path
        self.read_only = read_only
        self.header = header
        self.backing = backing
        self.size = -(-header.size // SECTOR_SIZE) * SECTOR_SIZE
        self._fd = fd
        self._lock = threading.Lock()
        self._bits = header.cluster_bits
        self._cluster = 1 << self._bits
        self._l2_entries = self._cluster // 8
        self._l2_bits = self._bits - 3
        self._refcount_bits = 1 << header.refcount_order
        self._refcount_max = (1 << self._refcount_bits) - 1
        self._rb_entries = self._cluster * 8 // self._refcount_bits
        self._zero_flag = header.version >= 3
        self._file_end = os.lseek(fd, 0, os.SEEK_END)
        self._l2_cache = _LruCache(max(_MIN_CACHED, _L2_CACHE_BYTES // self._cluster))
        self._refblocks = _LruCache(max(_MIN_CACHED, _REFBLOCK_CACHE_BYTES // self._cluster))
        self._decompressed: tuple[int, bytes] | None = None  # last compressed cluster read

        self._l1 = self._read_table(header.l1_table_offset, header.l1_size)
        for index, entry in enumerate(self._l1):
            if entry:
                self._check_table_pointer("L1 table", index, entry, L1_RESERVED)
        self._reftable_offset = header.refcount_table_offset
        self._reftable = self._read_table(
            header.refcount_table_offset, header.refcount_table_clusters * self._cluster // 8
        )
        for index, entry in enumerate(self._reftable):
            if entry:
                self._check_table_pointer("refcount table", index, entry, REFTABLE_RESERVED)

        # Allocation state (writable images only).
        self._end_cluster = 0  # every cluster from this one on is free
        self._free_hint = 0  # no free cluster below this one
        self._reserved_next = 0  # data clusters reserved (refcount 1, unreferenced)
        self._reserved_left = 0
        self._reserve_batch = _RESERVE_FIRST
        self._pending_free: list[int] = []  # cluster indexes to decrement after a sync
        if not read_only:
            self._prepare_for_writing()
            self._end_cluster = self._last_used_cluster() + 1

    # -- the Disk interface ------------------------------------------------------------

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers)
        length = sum(len(view) for view in views)
        check_range(self, "read", offset, length)
        with self._lock:
            self._check_open()
            self._read_range(offset, length, Cursor(views))

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers)
        length = sum(len(view) for view in views)
        check_writable(self, "write")
        check_range(self, "write", offset, length)
        with self._lock:
            self._check_open()
            self._write_range(offset, length, Cursor(views))
            self._free_if_many_pending()

    def flush(self) -> None:
        with self._lock:
            self._check_open()
            if not self.read_only:
                self._sync_and_free()

    def discard(self, offset: int, length: int) -> None:
        check_writable(self, "discard")
        check_range(self, "discard", offset, length)
        with self._lock:
            self._check_open()
            self._zero_range(offset, length, unmap=True)
            self._free_if_many_pending()

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        check_writable(self, "write zeroes")
        check_range(self, "write zeroes", offset, length)
        with self._lock:
            self._check_open()
            self._zero_range(offset, length, unmap=unmap)
            self._free_if_many_pending()

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            try:
                if not self.read_only:
                    self._release_reservation()
                    self._sync_and_free()
                    os.fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
                if self.backing is not None:
                    self.backing.close()

    def __enter__(self) -> Qcow2Disk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what the image holds ------------------------------------------------------------

    def allocated_bytes(self) -> int:
        """Bytes of the virtual disk whose content this image itself stores (standard and
        compressed clusters; not zero clusters, not what the backing file provides)."""
        with self._lock:
            self._check_open()
            count = 0
            for entry in self._l1:
                offset = entry & OFFSET_MASK
                if offset == 0:
                    continue
                table = self._load_l2(offset)
                for (value,) in struct.iter_unpack(">Q", table):
                    if value & COMPRESSED or (value & OFFSET_MASK and not value & ZERO):
                        count += 1
            return min(self.size, count * self._cluster)

    # -- reading -------------------------------------------------------------------------

    def _read_range(self, offset: int, length: int, cursor: Cursor) -> None:
        end = offset + length
        while offset < end:
            kind, value, count = self._extent(offset, end - offset)
            targets = cursor.take(count)
            if kind == _DATA:
                done = preadv_full(self._fd, targets, value)
                zero_fill(skip(targets, done))  # a cluster the file ends inside of
            elif kind == _ZERO:
                zero_fill(targets)
            elif kind == _UNALLOCATED:
                self._read_backing(offset, count, targets)
            else:
                data = self._decompress(value, offset >> self._bits)
                start = offset & (self._cluster - 1)
                source = memoryview(data)[start : start + count]
                for target in targets:
                    target[:] = source[: len(target)]
                    source = source[len(target) :]
            offset += count

    def _read_backing(self, offset: int, count: int, targets: list[memoryview]) -> None:
        """Unallocated clusters: the backing file's bytes, zeros past its end (qcow2 spec,
        "Cluster mapping", last paragraph)."""
        covered = 0
        if self.backing is not None:
            covered = max(0, min(count, self.backing.size - offset))
            if covered:
                self.backing.readv(offset, first_bytes(targets, covered))
        zero_fill(skip(targets, covered))

    def _extent(self, offset: int, limit: int) -> tuple[int, int, int]:
        """The longest run from guest ``offset`` (at most ``limit`` bytes, within one L2
        table) that reads the same way: (kind, host offset or compressed entry, bytes)."""
        cluster = offset >> self._bits
        within = offset & (self._cluster - 1)
        l1_index, l2_index = divmod(cluster, self._l2_entries)
        table = self._l2_for_read(l1_index)
        if table is None:
            run = (self._l2_entries - l2_index) * self._cluster - within
            return _UNALLOCATED, 0, min(limit, run)
        entry = _ENTRY.unpack_from(table, 8 * l2_index)[0]
        kind, host = self._classify(entry, cluster)
        if kind == _COMPRESSED_KIND:
            return kind, entry, min(limit, self._cluster - within)
        run = self._cluster - within
        following = host + self._cluster
        for index in range(l2_index + 1, self._l2_entries):
            if run >= limit:
                break
            next_kind, next_host = self._classify(
                _ENTRY.unpack_from(table, 8 * index)[0], l1_index * self._l2_entries + index
            )
            if next_kind != kind or (kind == _DATA and next_host != following):
                break
            run += self._cluster
            following += self._cluster
        return kind, host + within if kind == _DATA else 0, min(limit, run)

    def _classify(self, entry: int, cluster: int) -> tuple[int, int]:
        """(kind, host offset) of an L2 entry; raises ``DiskError`` for a corrupt one."""
        if entry & COMPRESSED:
            return _COMPRESSED_KIND, 0
        if entry & L2_RESERVED:
            raise self._corrupt(f"the L2 entry of guest cluster {cluster} has reserved bits set")
        host = entry & OFFSET_MASK
        if entry & ZERO:
            if host:
                self._check_host_cluster(host, f"guest cluster {cluster}")
            return _ZERO, host
        if host == 0:
            if entry & COPIED:
                raise self._corrupt(f"guest cluster {cluster} maps to host offset 0")
            return _UNALLOCATED, 0
        self._check_host_cluster(host, f"guest cluster {cluster}")
        return _DATA, host

    def _decompress(self, entry: int, cluster: int) -> bytes:
        """A compressed cluster's content (qcow2 spec, "Cluster mapping", Compressed Clusters
        Descriptor: x = 62 - (cluster_bits - 8) bits of host offset, then the count of
        additional 512-byte sectors)."""
        if self._decompressed is not None and self._decompressed[0] == entry:
            return self._decompressed[1]
        offset_bits = 62 - (self._bits - 8)
        host = entry & ((1 << offset_bits) - 1)
        sectors = ((entry & ~COPIED & ~COMPRESSED) >> offset_bits) + 1
        end = (host & ~(SECTOR_SIZE - 1)) + sectors * SECTOR_SIZE
        if host >= _MAX_HOST_OFFSET or end > self._file_end + SECTOR_SIZE:
            raise self._corrupt(f"compressed guest cluster {cluster} points outside the file")
        data = bytes(pread_padded(self._fd, end - host, host))
        if self.header.compression_type == 1:
            import zstandard  # a pinned dependency of kasou; only zstd images need it

            try:
                plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            except zstandard.ZstdError as error:
                raise self._corrupt(f"compressed guest cluster {cluster}: {error}") from None
        else:
            try:
                plain = zlib.decompressobj(-12).decompress(data, self._cluster)
            except zlib.error as error:
                raise self._corrupt(f"compressed guest cluster {cluster}: {error}") from None
        if len(plain) < self._cluster:
            raise self._corrupt(f"compressed guest cluster {cluster} decompresses short")
        plain = plain[: self._cluster]
        self._decompressed = (entry, plain)
        return plain

    def _cluster_content(self, cluster: int, entry: int) -> bytes:
        """All of guest cluster ``cluster`` as it reads now, given its L2 ``entry``: the
        source of a copy-on-write."""
        kind, host = self._classify(entry, cluster)
        if kind == _DATA:
            return bytes(pread_padded(self._fd, self._cluster, host))
        if kind == _COMPRESSED_KIND:
            return self._decompress(entry, cluster)
        data = bytearray(self._cluster)
        if kind == _UNALLOCATED:
            self._read_backing(cluster << self._bits, self._cluster, [memoryview(data)])
        return bytes(data)

    # -- writing -------------------------------------------------------------------------

    def _write_range(self, offset: int, length: int, cursor: Cursor) -> None:
        end = offset + length
        span = 1 << (self._bits + self._l2_bits)  # guest bytes one L2 table maps
        while offset < end:
            stop = min(end, (offset // span + 1) * span)
            self._write_in_table(offset, stop, cursor)
            offset = stop

    def _write_in_table(self, start: int, stop: int, cursor: Cursor) -> None:
        """Write guest ``[start, stop)``, which one L2 table maps, from ``cursor``."""
        first = start >> self._bits
        last = (stop - 1) >> self._bits
        l1_index = first // self._l2_entries
        table, table_offset = self._l2_for_write(l1_index)
        base = l1_index * self._l2_entries
        entries = list(struct.unpack_from(f">{last - first + 1}Q", table, 8 * (first - base)))

        def in_place(index: int) -> bool:
            entry = entries[index]
            return bool(entry & COPIED) and self._classify(entry, first + index)[0] == _DATA

        index = 0
        count = len(entries)
        while index < count:
            run_end = index + 1
            if in_place(index):
                host = entries[index] & OFFSET_MASK
                while (
                    run_end < count
                    and in_place(run_end)
                    and entries[run_end] & OFFSET_MASK == host + (run_end - index) * self._cluster
                ):
                    run_end += 1
                low = max(start, (first + index) << self._bits)
                high = min(stop, (first + run_end) << self._bits)
                target = host + low - ((first + index) << self._bits)
                pwritev_full(self._fd, cursor.take(high - low), target)
                self._file_end = max(self._file_end, target + high - low)
            else:
                while run_end < count and not in_place(run_end):
                    run_end += 1
                self._write_new_clusters(
                    table, table_offset, first + index, entries[index:run_end], start, stop, cursor
                )
            index = run_end

    def _write_new_clusters(
        self,
        table: bytearray,
        table_offset: int,
        first: int,
        old: list[int],
        start: int,
        stop: int,
        cursor: Cursor,
    ) -> None:
        """Write guest clusters ``first ..`` (one per ``old`` entry) into newly allocated
        host clusters, copying the parts of the first and last cluster that ``[start, stop)``
        does not cover from their current content."""
        count = len(old)
        low = max(start, first << self._bits)
        high = min(stop, (first + count) << self._bits)
        head = low - (first << self._bits)
        tail = ((first + count) << self._bits) - high
        parts: list[memoryview | bytes] = []
        head_content = self._cluster_content(first, old[0]) if head else b""
        if head:
            parts.append(head_content[:head])
        parts.extend(cursor.take(high - low))
        if tail:
            last = first + count - 1
            content = head_content if head and count == 1 else self._cluster_content(last, old[-1])
            parts.append(content[self._cluster - tail :])
        host = self._take_data_clusters(count)
        pwritev_full(self._fd, parts, host)
        self._file_end = max(self._file_end, host + count * self._cluster)
        new = [(host + index * self._cluster) | COPIED for index in range(count)]
        self._set_l2_entries(table, table_offset, first, new)
        for entry in old:
            self._release(entry)

    def _set_l2_entries(
        self, table: bytearray, table_offset: int, first: int, entries: list[int]
    ) -> None:
        """Write consecutive L2 entries for guest clusters ``first ..`` through to the file."""
        start = 8 * (first % self._l2_entries)
        struct.pack_into(f">{len(entries)}Q", table, start, *entries)
        pwrite_full(
            self._fd, memoryview(table)[start : start + 8 * len(entries)], table_offset + start
        )
        if self._decompressed is not None:
            self._decompressed = None  # a compressed cluster may just have been replaced

    def _l2_for_write(self, l1_index: int) -> tuple[bytearray, int]:
        """The L2 table for ``l1_index``, allocated (zeroed) if there is none yet."""
        entry = self._l1[l1_index]
        offset = entry & OFFSET_MASK
        if offset:
            if not entry & COPIED:
                if self._refcount(offset >> self._bits) != 1:
                    raise self._corrupt(
                        f"L2 table {l1_index} is shared but the image has no snapshots"
                    )
                self._set_l1_entry(l1_index, offset | COPIED)
            return self._load_l2(offset), offset
        offset = self._allocate(1)[0] << self._bits
        table = bytearray(self._cluster)
        pwrite_full(self._fd, table, offset)
        self._file_end = max(self._file_end, offset + self._cluster)
        os.fdatasync(self._fd)  # the table and its refcount are on disk before L1 names it
        self._l2_cache.put(offset, table)
        self._set_l1_entry(l1_index, offset | COPIED)
        return table, offset

    def _set_l1_entry(self, index: int, entry: int) -> None:
        self._l1[index] = entry
        pwrite_full(self._fd, _ENTRY.pack(entry), self.header.l1_table_offset + 8 * index)

    # -- zeroing -------------------------------------------------------------------------

    def _zero_range(self, offset: int, length: int, *, unmap: bool) -> None:
        end = offset + length
        span = 1 << (self._bits + self._l2_bits)
        while offset < end:
            stop = min(end, (offset // span + 1) * span)
            self._zero_in_table(offset, stop, unmap=unmap)
            offset = stop

    def _zero_in_table(self, start: int, stop: int, *, unmap: bool) -> None:
        """Make guest ``[start, stop)`` (mapped by one L2 table) read as zeros."""
        first_full = -(-start // self._cluster)
        end_full = stop // self._cluster
        head_end = min(stop, first_full << self._bits)
        self._zero_partial(start, head_end)
        self._zero_partial(max(head_end, end_full << self._bits), stop)
        if first_full < end_full:
            self._zero_clusters(first_full, end_full, unmap=unmap)

    def _zero_clusters(self, first: int, end: int, *, unmap: bool) -> None:
        """Make whole guest clusters ``first .. end - 1`` (of one L2 table) read as zeros
        through their L2 entries: unallocated where nothing shows through, else "all zeroes"
        (version 3), keeping the host cluster as preallocation unless ``unmap``."""
        needs_flag = self._backing_shows(first << self._bits)
        if needs_flag and not self._zero_flag:
            # Version 2 has no "all zeroes" flag: write real zeros over the backing file.
            self._write_zeros(first << self._bits, end << self._bits)
            return
        l1_index = first // self._l2_entries
        if self._l1[l1_index] & OFFSET_MASK == 0 and not needs_flag:
            return  # no L2 table and nothing behind: already reads as zeros
        table, table_offset = self._l2_for_write(l1_index)
        base = l1_index * self._l2_entries
        old = list(struct.unpack_from(f">{end - first}Q", table, 8 * (first - base)))
        new = []
        for index, entry in enumerate(old):
            kind, host = self._classify(entry, first + index)
            keep = not unmap and host != 0 and bool(entry & COPIED) and kind in (_DATA, _ZERO)
            if keep and self._zero_flag:
                new.append(host | COPIED | ZERO)  # a preallocated zero cluster
            elif needs_flag:
                new.append(ZERO)
            else:
                new.append(0)
        if new == old:
            return
        self._set_l2_entries(table, table_offset, first, new)
        for before, after in zip(old, new, strict=True):
            if before != after and not after & OFFSET_MASK:
                self._release(before)

    def _zero_partial(self, start: int, stop: int) -> None:
        """Write zeros over ``[start, stop)``, part of one cluster, unless that cluster
        already reads as zeros."""
        if start < stop and not self._reads_zero(start >> self._bits):
            self._write_zeros(start, stop)

    def _write_zeros(self, start: int, stop: int) -> None:
        zeros = memoryview(bytes(min(stop - start, _ZERO_CHUNK)))
        while start < stop:
            count = min(stop - start, len(zeros))
            self._write_range(start, count, Cursor([zeros[:count]]))
            start += count

    def _reads_zero(self, cluster: int) -> bool:
        """Whether guest cluster ``cluster`` is known to read as zeros from its mapping."""
        l1_index, l2_index = divmod(cluster, self._l2_entries)
        table = self._l2_for_read(l1_index)
        entry = 0 if table is None else _ENTRY.unpack_from(table, 8 * l2_index)[0]
        kind, _ = self._classify(entry, cluster)
        return kind == _ZERO or (
            kind == _UNALLOCATED and not self._backing_shows(cluster << self._bits)
        )

    def _backing_shows(self, offset: int) -> bool:
        """Whether an unallocated cluster at guest ``offset`` would read the backing file."""
        return self.backing is not None and offset < self.backing.size

    # -- L1/L2 tables --------------------------------------------------------------------

    def _l2_for_read(self, l1_index: int) -> bytearray | None:
        if l1_index >= len(self._l1):
            raise self._corrupt(f"guest cluster group {l1_index} lies beyond the L1 table")
        offset = self._l1[l1_index] & OFFSET_MASK
        return self._load_l2(offset) if offset else None

    def _load_l2(self, offset: int) -> bytearray:
        table = self._l2_cache.get(offset)
        if table is None:
            table = pread_padded(self._fd, self._cluster, offset)
            self._l2_cache.put(offset, table)
        return table

    def _read_table(self, offset: int, entries: int) -> list[int]:
        data = pread_padded(self._fd, 8 * entries, offset) if entries else b""
        return [value for (value,) in struct.iter_unpack(">Q", data)]

    def _check_table_pointer(self, name: str, index: int, entry: int, reserved: int) -> None:
        """An L1 or refcount table entry must name a whole cluster inside the file."""
        if entry & reserved:
            raise self._corrupt(f"{name} entry {index} has reserved bits set")
        offset = entry & OFFSET_MASK
        if offset and offset + self._cluster > self._rounded_file_end():
            raise self._corrupt(
                f"{name} entry {index} points outside the file (offset {offset:#x}, file "
                f"{self._file_end} bytes): the image is truncated or corrupt"
            )

    def _check_host_cluster(self, host: int, what: str) -> None:
        if host + self._cluster > self._rounded_file_end():
            raise self._corrupt(
                f"{what} points outside the file (offset {host:#x}, file {self._file_end} "
                "bytes): the image is truncated or corrupt"
            )

    def _rounded_file_end(self) -> int:
        """The file's end rounded up to a cluster: the last cluster may end short."""
        return -(-self._file_end // self._cluster) * self._cluster

    # -- refcounts (qcow2 spec, "Host cluster management") -------------------------------

    def _prepare_for_writing(self) -> None:
        """Refuse to write where kasou cannot keep the image consistent; clear autoclear
        feature bits (qcow2 spec, "Header": a writer that does not know them must)."""
        header = self.header
        if header.nb_snapshots:
            raise DiskError(
                f"{self.path}: the image has {header.nb_snapshots} internal snapshots; kasou "
                "opens such images read-only only (delete them with qemu-img snapshot -d, or "
                "flatten with qemu-img convert)"
            )
        if header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT):
            state = "dirty" if header.incompatible_features & INCOMPAT_DIRTY else "corrupt"
            raise DiskError(
                f"{self.path}: the image is marked {state}; repair it with "
                "`qemu-img check -r all` before writing to it"
            )
        metadata = [0, header.l1_table_offset, header.refcount_table_offset]
        if any(self._refcount(offset >> self._bits) == 0 for offset in metadata):
            raise self._corrupt("refcounts do not cover the image's own metadata")
        if header.autoclear_features:
            pwrite_full(self._fd, bytes(8), _AUTOCLEAR_OFFSET)
            os.fdatasync(self._fd)

    def _refcount(self, cluster: int) -> int:
        table_index, block_index = divmod(cluster, self._rb_entries)
        if table_index >= len(self._reftable):
            return 0
        offset = self._reftable[table_index] & OFFSET_MASK
        if offset == 0:
            return 0
        return self._get_refcount(self._load_refblock(offset), block_index)

    def _get_refcount(self, block: bytearray, index: int) -> int:
        bits = self._refcount_bits
        if bits >= 8:
            width = bits // 8
            return int.from_bytes(block[index * width : (index + 1) * width], "big")
        # Sub-byte widths: bit 0 is the least significant bit of the byte (qcow2 spec,
        # "Host cluster management", refcount block entry).
        byte, shift = divmod(index * bits, 8)
        return (block[byte] >> shift) & self._refcount_max

    def _put_refcount(self, block: bytearray, index: int, value: int) -> None:
        bits = self._refcount_bits
        if bits >= 8:
            width = bits // 8
            block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
            return
        byte, shift = divmod(index * bits, 8)
        block[byte] = (block[byte] & ~(self._refcount_max << shift)) | (value << shift)

    def _load_refblock(self, offset: int) -> bytearray:
        block = self._refblocks.get(offset)
        if block is None:
            block = pread_padded(self._fd, self._cluster, offset)
            self._refblocks.put(offset, block)
        return block

    def _set_refcounts(self, first: int, count: int, value: int) -> None:
        """Set the refcounts of clusters ``first .. first + count - 1`` to ``value``; their
        refcount blocks must exist. Writes each block's changed bytes through."""
        cluster = first
        end = first + count
        bits = self._refcount_bits
        while cluster < end:
            table_index, index = divmod(cluster, self._rb_entries)
            run = min(end - cluster, self._rb_entries - index)
            offset = self._reftable[table_index] & OFFSET_MASK
            if offset == 0:
                raise self._corrupt(f"cluster {cluster} is in use but has no refcount block")
            block = self._load_refblock(offset)
            if bits >= 8:
                width = bits // 8
                block[index * width : (index + run) * width] = value.to_bytes(width, "big") * run
            else:
                for position in range(index, index + run):
                    self._put_refcount(block, position, value)
            low = index * bits // 8
            high = -(-(index + run) * bits // 8)
            pwrite_full(self._fd, memoryview(block)[low:high], offset + low)
            cluster += run

    def _last_used_cluster(self) -> int:
        """The highest cluster index with a non-zero refcount (-1 if none)."""
        for table_index in range(len(self._reftable) - 1, -1, -1):
            offset = self._reftable[table_index] & OFFSET_MASK
            if offset == 0:
                continue
            block = self._load_refblock(offset)
            used = len(bytes(block).rstrip(b"\0"))
            if used == 0:
                continue
            last_bit = (used - 1) * 8 + block[used - 1].bit_length() - 1
            return table_index * self._rb_entries + last_bit // self._refcount_bits
        return -1

    # -- allocation ----------------------------------------------------------------------

    def _allocate(self, count: int, up_to: int = 0) -> tuple[int, int]:
        """Find at least ``count`` (at most ``up_to``) contiguous free clusters, set their
        refcounts to one and return (first index, number). Refcount blocks that the run
        needs are created just before it, and the refcount table grows when the run lies
        past what it covers. The run's refcounts are written but not yet synced."""
        up_to = max(count, up_to)
        blocks = 0  # new refcount blocks, placed in front of the run
        while True:
            first, length = self._find_free(blocks + count, blocks + up_to)
            end = first + length
            if end << self._bits > _MAX_HOST_OFFSET:
                raise DiskError(f"{self.path}: the image file cannot grow past 64 PB")
            last_range = (end - 1) // self._rb_entries
            if last_range >= len(self._reftable):
                self._grow_reftable(last_range + 1)
                continue  # the new table took clusters: look again
            missing = [
                index
                for index in range(first // self._rb_entries, last_range + 1)
                if self._reftable[index] & OFFSET_MASK == 0
            ]
            if len(missing) <= blocks:
                break
            blocks = len(missing)
        if missing:
            self._create_refblocks(first, missing)
        first += len(missing)
        length -= len(missing)
        self._set_refcounts(first, length, 1)
        self._end_cluster = max(self._end_cluster, first + length)
        self._free_hint = first + length
        return first, length

    def _find_free(self, count: int, up_to: int) -> tuple[int, int]:
        """The first run of at least ``count`` clusters with refcount zero, from the free
        hint on, extended to at most ``up_to``: (first index, number)."""
        first = cluster = self._free_hint
        while cluster - first < up_to:
            if cluster >= self._end_cluster:
                return first, up_to  # every cluster from here on is free
            table_index, index = divmod(cluster, self._rb_entries)
            offset = (
                self._reftable[table_index] & OFFSET_MASK
                if table_index < len(self._reftable)
                else 0
            )
            if offset == 0:  # a missing refcount block: its whole range is free
                cluster = min((table_index + 1) * self._rb_entries, first + up_to)
                continue
            if self._get_refcount(self._load_refblock(offset), index):
                if cluster - first >= count:
                    break  # long enough, if not as long as hoped
                first = cluster + 1
            cluster += 1
        return first, cluster - first

    def _create_refblocks(self, first: int, ranges: list[int]) -> None:
        """New refcount blocks for the refcount ``ranges``, placed in the free clusters
        ``first ..``. Each block's own refcount goes into whichever block counts its cluster:
        a new one, or an existing one (written first, so a crash leaks, never corrupts)."""
        new = {index: bytearray(self._cluster) for index in ranges}
        for number in range(len(ranges)):
            cluster = first + number
            owner, index = divmod(cluster, self._rb_entries)
            if owner in new:
                self._put_refcount(new[owner], index, 1)
            else:
                self._set_refcounts(cluster, 1, 1)
        for number, index in enumerate(ranges):
            offset = (first + number) << self._bits
            pwrite_full(self._fd, new[index], offset)
            self._refblocks.put(offset, new[index])
        self._file_end = max(self._file_end, (first + len(ranges)) << self._bits)
        os.fdatasync(self._fd)  # the blocks are on disk before the table names them
        for number, index in enumerate(ranges):
            offset = (first + number) << self._bits
            self._reftable[index] = offset
            pwrite_full(self._fd, _ENTRY.pack(offset), self._reftable_offset + 8 * index)
        self._end_cluster = max(self._end_cluster, first + len(ranges))

    def _grow_reftable(self, needed: int) -> None:
        """Move the refcount table to a larger one of at least ``needed`` entries.

        The new table goes into a fresh area at the start of the first refcount range past
        every existing block, after new refcount blocks that cover the area itself; the
        header switches to it in one write, then the old table is freed."""
        old_entries = len(self._reftable)
        last_block = max(
            (index for index, entry in enumerate(self._reftable) if entry & OFFSET_MASK),
            default=-1,
        )
        first_range = last_block + 1
        area = first_range * self._rb_entries
        blocks = 1
        while True:
            entries = max(needed, 2 * old_entries, first_range + blocks)
            table_clusters = -(-entries * 8 // self._cluster)
            covering = -(-(blocks + table_clusters) // self._rb_entries)
            if covering <= blocks:
                break
            blocks = covering
        if table_clusters * self._cluster > MAX_REFTABLE_BYTES:
            raise DiskError(
                f"{self.path}: the refcount table would exceed 8 MiB: the image is too large "
                "for its cluster size"
            )
        entries = table_clusters * self._cluster // 8
        table_offset = (area + blocks) << self._bits
        used = blocks + table_clusters
        new_table = self._reftable + [0] * (entries - old_entries)
        for number in range(blocks):
            block = bytearray(self._cluster)
            in_range = min(self._rb_entries, used - number * self._rb_entries)
            for index in range(in_range):
                self._put_refcount(block, index, 1)
            offset = (area + number) << self._bits
            pwrite_full(self._fd, block, offset)
            self._refblocks.put(offset, block)
            new_table[first_range + number] = offset
        pwrite_full(self._fd, struct.pack(f">{entries}Q", *new_table), table_offset)
        self._file_end = max(self._file_end, table_offset + table_clusters * self._cluster)
        os.fdatasync(self._fd)
        old_offset = self._reftable_offset
        old_clusters = -(-old_entries * 8 // self._cluster)
        pwrite_full(self._fd, _REFTABLE_HEADER_FIELDS.pack(table_offset, table_clusters), 48)
        os.fdatasync(self._fd)
        self._reftable = new_table
        self._reftable_offset = table_offset
        self._end_cluster = max(self._end_cluster, area + used)
        self._set_refcounts(old_offset >> self._bits, old_clusters, 0)
        self._free_hint = min(self._free_hint, old_offset >> self._bits)

    def _take_data_clusters(self, count: int) -> int:
        """``count`` contiguous clusters for guest data, from the reservation (refcount one,
        synced, referenced by nothing yet); returns the first one's host offset."""
        if self._reserved_left < count:
            self._release_reservation()
            self._reserved_next, self._reserved_left = self._allocate(
                count, max(count, self._reserve_batch)
            )
            self._reserve_batch = min(
                2 * self._reserve_batch, max(_RESERVE_FIRST, _RESERVE_BYTES >> self._bits)
            )
            os.fdatasync(self._fd)  # refcounts on disk before any L2 entry points here
        first = self._reserved_next
        self._reserved_next += count
        self._reserved_left -= count
        return first << self._bits

    def _release_reservation(self) -> None:
        """Give back reserved clusters that no entry points at."""
        if self._reserved_left:
            self._set_refcounts(self._reserved_next, self._reserved_left, 0)
            self._free_hint = min(self._free_hint, self._reserved_next)
            self._reserved_left = 0

    def _release(self, entry: int) -> None:
        """An L2 entry that no longer maps its guest cluster: free its host clusters once
        the change is on disk."""
        if entry & COMPRESSED:
            offset_bits = 62 - (self._bits - 8)
            host = entry & ((1 << offset_bits) - 1)
            sectors = ((entry & ~COPIED & ~COMPRESSED) >> offset_bits) + 1
            start = host & ~(SECTOR_SIZE - 1)
            end = start + sectors * SECTOR_SIZE
            self._pending_free.extend(range(start >> self._bits, ((end - 1) >> self._bits) + 1))
            return
        host = entry & OFFSET_MASK
        if host:
            self._pending_free.append(host >> self._bits)

    def _free_if_many_pending(self) -> None:
        if len(self._pending_free) >= _PENDING_FREE_LIMIT:
            self._sync_and_free()

    def _sync_and_free(self) -> None:
        """fdatasync, then free the clusters that lost their references before it. A lost
        decrement (a crash before the next sync) is a leak, never a corruption."""
        os.fdatasync(self._fd)
        pending, self._pending_free = self._pending_free, []
        freed = []
        for cluster in sorted(pending):
            count = self._refcount(cluster)
            if count == 0:
                raise self._corrupt(f"cluster {cluster} is freed but has refcount 0")
            self._set_refcounts(cluster, 1, count - 1)
            if count == 1:
                freed.append(cluster)
        if freed:
            self._free_hint = min(self._free_hint, freed[0])
            self._punch(freed)

    def _punch(self, clusters: list[int]) -> None:
        """Give freed clusters' space back to the host file system (best effort)."""
        start = previous = clusters[0]
        for cluster in [*clusters[1:], -1]:
            if cluster == previous + 1:
                previous = cluster
                continue
            try:
                fallocate(
                    self._fd,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    start << self._bits,
                    (previous - start + 1) << self._bits,
                )
            except OSError:
                return  # the file system cannot: the space stays, the data is unreferenced
            start = previous = cluster

    # -- errors --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise DiskError(f"{self.path}: the disk is closed")

    def _corrupt(self, problem: str) -> DiskError:
        return DiskError(
            f"{self.path}: corrupt qcow2 image: {problem} (check it with `qemu-img check`)"
        )
