"""Creating qcow2 version 3 images: empty ones, and overlays over a backing file; and
pointing an existing image at another backing file (``set_backing_name``).

A new image has, in order: the header cluster (header, header extensions, backing file
name), the refcount table, the refcount blocks counting these clusters, and a zeroed L1 table
(qcow2 spec, "Header", "Host cluster management", "Cluster mapping"). It is written to a
temporary file in the target's folder, synced, and linked into place, so the target either
does not exist or is complete; an existing target is never replaced.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from pathlib import Path

from kasou.disk._disk import SECTOR_SIZE
from kasou.disk._errors import DiskError
from kasou.disk._open import FORMATS, open_image, resolve_backing
from kasou.disk._qcow2_format import (
    MAX_CLUSTER_BITS,
    MAX_L1_BYTES,
    MIN_CLUSTER_BITS,
    encode_header,
    parse_header,
)

__all__ = ["create_overlay", "create_qcow2", "set_backing_name"]

_REFCOUNT_BITS = 16  # refcount_order 4, what qemu-img creates by default


def create_qcow2(path: str | Path, size: int, *, cluster_size: int = 65536) -> None:
    """Create an empty qcow2 v3 image of ``size`` bytes (a multiple of 512) at ``path``."""
    _write_image(Path(path), size, cluster_size, None, None)


def create_overlay(
    path: str | Path,
    backing: str | Path,
    *,
    backing_format: str | None = None,
    size: int | None = None,
    cluster_size: int = 65536,
) -> None:
    """Create a qcow2 v3 overlay at ``path`` over the image ``backing``.

    ``backing`` is stored as given; a relative one is relative to the overlay's folder, as
    whoever opens the overlay will read it. The backing image (and its own chain) is opened
    read-only to check it and to learn its format (unless ``backing_format`` is given) and
    its virtual size (the default ``size``)."""
    path = Path(path)
    backing_name = os.fspath(backing)
    if backing_format is not None and backing_format not in FORMATS:
        raise DiskError(f"unknown backing format {backing_format!r}: use raw or qcow2")
    base = open_image(
        resolve_backing(path, backing_name),
        backing_format,
        True,
        (os.path.realpath(path),),
    )
    try:
        backing_format = base.format
        size = base.size if size is None else size
    finally:
        base.close()
    _write_image(path, size, cluster_size, backing_name, backing_format)


def set_backing_name(path: str | Path, backing: str) -> None:
    """Store ``backing`` as the backing file name of the qcow2 image ``path`` in place of
    the one it has, and nothing else (the data is not looked at, as ``qemu-img rebase -u``
    does): for a copy of an image whose backing file sits elsewhere than the original's
    relative name says. A relative ``backing`` is relative to the image's folder.

    The name goes where the old one was (qcow2 spec, "Header": backing_file_offset and
    backing_file_size; the name must stay within the first cluster); raises ``DiskError``
    for an image without a backing file or when the name does not fit there."""
    name = backing.encode()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        data = os.pread(fd, 1 << MAX_CLUSTER_BITS, 0)
        header = parse_header(data, os.fstat(fd).st_size)
        offset, _ = struct.unpack_from(">QI", data, 8)
        if header.backing_file is None:
            raise DiskError(f"{path} has no backing file to point elsewhere")
        if not name or b"\0" in name or len(name) > 1023:
            raise DiskError(f"{backing!r} is not a backing file name (1 to 1023 bytes)")
        if offset + len(name) > header.cluster_size:
            raise DiskError(
                f"{path}: the backing file name {backing!r} does not fit in its first cluster"
            )
        os.pwrite(fd, name, offset)
        os.pwrite(fd, struct.pack(">I", len(name)), 16)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_image(
    path: Path,
    size: int,
    cluster_size: int,
    backing_file: str | None,
    backing_format: str | None,
) -> None:
    cluster_bits = cluster_size.bit_length() - 1
    if (
        cluster_size != 1 << cluster_bits
        or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
    ):
        raise DiskError(
            f"cluster size {cluster_size} is not a power of two from 512 bytes to 2 MiB"
        )
    if size < 0 or size % SECTOR_SIZE:
        raise DiskError(f"disk size {size} is not a whole number of 512-byte sectors")
    # qcow2 spec, "Cluster mapping": one L1 entry per L2 table of cluster_size / 8 entries.
    l1_size = -(-size // (cluster_size * (cluster_size // 8)))
    if l1_size * 8 > MAX_L1_BYTES:
        raise DiskError(
            f"a {size}-byte disk needs an L1 table over 32 MiB: use a larger cluster size"
        )
    l1_clusters = -(-l1_size * 8 // cluster_size)
    # Refcount table and blocks sized to count every cluster of the new image, themselves
    # included (qcow2 spec, "Host cluster management").
    block_entries = cluster_size * 8 // _REFCOUNT_BITS
    table_clusters = blocks = 1
    while True:
        used = 1 + table_clusters + blocks + l1_clusters
        needed_blocks = -(-used // block_entries)
        needed_table = -(-needed_blocks * 8 // cluster_size)
        if (needed_blocks, needed_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, needed_blocks), max(table_clusters, needed_table)
    table_offset = cluster_size
    blocks_offset = table_offset + table_clusters * cluster_size
    l1_offset = blocks_offset + blocks * cluster_size
    header = encode_header(
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset if l1_size else 0,
        refcount_table_offset=table_offset,
        refcount_table_clusters=table_clusters,
        backing_file=backing_file,
        backing_format=backing_format,
    )
    table = struct.pack(
        f">{blocks}Q", *(blocks_offset + number * cluster_size for number in range(blocks))
    )
    refcounts = struct.pack(f">{used}H", *([1] * used))
    _write_atomically(
        path,
        [(0, header), (table_offset, table), (blocks_offset, refcounts)],
        l1_offset + l1_clusters * cluster_size,
    )


def _write_atomically(path: Path, pieces: list[tuple[int, bytes]], length: int) -> None:
    """Write ``pieces`` (offset, bytes) into a new file of ``length`` bytes at ``path``:
    a temporary file in the same folder, synced, then linked to ``path`` (which must not
    exist), and the folder synced."""
    folder = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as error:
        raise DiskError(f"cannot create {path}: {error.strerror}") from error
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
            os.ftruncate(fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)
        _link_new(temporary, path)
        _sync_folder(folder)
    except OSError as error:
        raise DiskError(f"cannot create {path}: {error.strerror}") from error
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass  # renamed into place


def _link_new(temporary: str, path: Path) -> None:
    """Give ``temporary`` the name ``path`` without replacing an existing file."""
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise DiskError(f"{path} already exists; remove it first or choose another name") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # No hard links on this file system: check, then rename (a small race remains).
        if path.exists():
            raise DiskError(
                f"{path} already exists; remove it first or choose another name"
            ) from None
        os.rename(temporary, path)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (``Umask:`` in /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass  # no /proc: assume the common default
    return 0o022
