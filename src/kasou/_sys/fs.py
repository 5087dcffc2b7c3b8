"""File-system calls the standard library lacks: swapping two paths in one step
(renameat2(2) with RENAME_EXCHANGE; ``os.rename`` and ``os.replace`` cannot swap two folders),
and copying a file fast and sparse (a reflink, else only its data extents).

This module copies bytes; it does not know what a file holds (a disk image, a memory file)
and does not flush anything but the copy it wrote.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import NamedTuple

__all__ = ["SparseCopy", "copy_sparse", "rename_exchange"]

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100  # linux/fcntl.h
_RENAME_EXCHANGE = 1 << 1  # linux/fs.h

_renameat2 = _libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_renameat2.restype = ctypes.c_int

# FICLONE = _IOW(0x94, 9, int), linux/fs.h: the target file shares the source's extents.
_FICLONE = 0x40049409
# What FICLONE and copy_file_range(2) answer when they cannot do the job here (another file
# system, one without shared extents, or not a regular file): copy another way.
_NOT_HERE = frozenset(
    {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS, errno.EBADF}
)
_CHUNK = 1 << 20  # bytes a read-and-write copy moves at a time


def rename_exchange(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> None:
    """Atomically swap ``first`` and ``second`` (both must exist, on one file system)."""
    result = _renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))


class SparseCopy(NamedTuple):
    """How ``copy_sparse`` copied: ``how`` is "reflink" (the copy shares the source's
    blocks until either is written), "extents" (copy_file_range(2) over the data extents)
    or "read" (read and write, zero blocks left as holes); ``data_bytes`` is what it read
    (for a reflink, the file's size: nothing was read)."""

    how: str
    data_bytes: int


def copy_sparse(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, sync: bool = True
) -> SparseCopy:
    """Copy ``source`` (a regular file or a block device) to the new file ``target``, of
    the same size and content, its holes kept as holes; fsync it unless ``sync`` is false.

    First a reflink (the FICLONE ioctl, linux/fs.h: Btrfs, XFS; no data moves); else only
    the data extents the source has (lseek(2) SEEK_DATA/SEEK_HOLE), each copied in the
    kernel with copy_file_range(2); else (another file system, a block device) a read and
    write of each 1 MiB, skipping those that are all zeros. ``target`` must not exist
    (``FileExistsError``); other failures are the ``OSError`` of the call that failed, and
    the partial ``target`` is left for the caller to remove."""
    with open(source, "rb") as reader, open(target, "xb") as writer:
        src, dst = reader.fileno(), writer.fileno()
        size = os.lseek(src, 0, os.SEEK_END)  # st_size is 0 for a block device
        try:
            fcntl.ioctl(dst, _FICLONE, src)
            result = SparseCopy("reflink", size)
        except OSError as error:
            if error.errno not in _NOT_HERE:
                raise
            os.ftruncate(dst, size)  # the holes: every byte not written below reads zero
            result = _copy_extents(src, dst, size)
        if sync:
            os.fsync(dst)
    return result


def _copy_extents(src: int, dst: int, size: int) -> SparseCopy:
    offset = copied = 0
    in_kernel = True
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        except OSError as error:
            if error.errno == errno.ENXIO:
                break  # only a hole is left (lseek(2): SEEK_DATA past the last data)
            if error.errno != errno.EINVAL:
                raise
            start, end = offset, size  # no SEEK_DATA here: all of it is data
        if in_kernel:
            moved, in_kernel = _copy_range(src, dst, start, end)
            copied += moved
            start += moved
        if not in_kernel:
            copied += _copy_read(src, dst, start, end)
        offset = end
    return SparseCopy("extents" if in_kernel else "read", copied)


def _copy_range(src: int, dst: int, start: int, end: int) -> tuple[int, bool]:
    """copy_file_range(2) from ``start`` to ``end``: the bytes it moved, and False when the
    kernel cannot do it for these files (the rest is then for ``_copy_read``)."""
    position = start
    while position < end:
        try:
            moved = os.copy_file_range(src, dst, end - position, position, position)
        except OSError as error:
            if error.errno not in _NOT_HERE:
                raise
            return position - start, False
        if moved == 0:
            break  # the source ended early (it shrank while being copied)
        position += moved
    return position - start, True


def _copy_read(src: int, dst: int, start: int, end: int) -> int:
    position = start
    while position < end:
        data = os.pread(src, min(_CHUNK, end - position), position)
        if not data:
            break
        if data.count(0) != len(data):  # all zeros: leave the hole ftruncate made
            os.pwrite(dst, data, position)
        position += len(data)
    return position - start
