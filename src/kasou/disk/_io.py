"""Positioned vectored I/O on file descriptors, and buffer bookkeeping for it.

The disk formats move guest data between the image file and the caller's buffers (views of
guest RAM) without copying: ``preadv``/``pwritev`` go straight into and out of the given
memoryviews. This module splits buffer lists at byte offsets, loops over short transfers, and
wraps fallocate(2) for hole punching. It knows no image format.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Sequence

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "Cursor",
    "byte_views",
    "fallocate",
    "first_bytes",
    "preadv_full",
    "pread_padded",
    "pwrite_full",
    "pwritev_full",
    "skip",
    "zero_fill",
]

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

_libc = ctypes.CDLL(None, use_errno=True)
# int fallocate(int fd, int mode, off_t offset, off_t len); off_t is 64-bit on x86_64.
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


def byte_views(buffers: Iterable[memoryview]) -> list[memoryview]:
    """The buffers as flat byte views (format ``B``), empty ones dropped.

    Raises ``ValueError`` for a buffer that is not contiguous (it cannot be a view of guest
    RAM, which is one flat mapping)."""
    views = []
    for buffer in buffers:
        view = buffer if buffer.format == "B" and buffer.ndim == 1 else buffer.cast("B")
        if view.nbytes:
            views.append(view)
    return views


def skip(views: Sequence[memoryview], count: int) -> list[memoryview]:
    """``views`` without their first ``count`` bytes."""
    rest = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        rest.append(view[count:] if count else view)
        count = 0
    return rest


def first_bytes(views: Sequence[memoryview], count: int) -> list[memoryview]:
    """The first ``count`` bytes of ``views``."""
    kept = []
    for view in views:
        if count <= 0:
            break
        kept.append(view[:count])
        count -= len(kept[-1])
    return kept


class Cursor:
    """Hands out consecutive byte ranges of a buffer list, in order, as lists of views."""

    def __init__(self, views: Sequence[memoryview]) -> None:
        self._views = list(views)
        self._index = 0
        self._offset = 0  # into self._views[self._index]

    def take(self, count: int) -> list[memoryview]:
        """The next ``count`` bytes of the buffers (split across them as they fall)."""
        taken = []
        while count:
            view = self._views[self._index]
            piece = view[self._offset : self._offset + count]
            taken.append(piece)
            count -= len(piece)
            self._offset += len(piece)
            if self._offset == len(view):
                self._index += 1
                self._offset = 0
        return taken


def zero_fill(views: Iterable[memoryview]) -> None:
    """Set every byte of the views to zero."""
    for view in views:
        view[:] = bytes(len(view))


def preadv_full(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Fill ``views`` from ``fd`` at ``offset``, looping over short reads; stop early only at
    the end of the file. Returns the number of bytes read."""
    done = 0
    pending = list(views)
    while pending:
        count = os.preadv(fd, pending[:_IOV_MAX], offset + done)
        if count == 0:
            break
        done += count
        pending = skip(pending, count)
    return done


def pwritev_full(fd: int, views: Sequence[memoryview | bytes], offset: int) -> None:
    """Write all of ``views`` to ``fd`` at ``offset``, looping over short writes."""
    pending = [memoryview(view) for view in views]
    done = 0
    while pending:
        count = os.pwritev(fd, pending[:_IOV_MAX], offset + done)
        if count == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += count
        pending = skip(pending, count)


def pwrite_full(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset``."""
    pwritev_full(fd, [memoryview(data)], offset)


def pread_padded(fd: int, length: int, offset: int) -> bytearray:
    """``length`` bytes of ``fd`` from ``offset``; what lies past the end of the file reads
    as zeros (qcow2 metadata may end short of its last cluster)."""
    data = bytearray(length)
    preadv_full(fd, [memoryview(data)], offset)
    return data


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises ``OSError`` (``EOPNOTSUPP`` where the file system lacks ``mode``)."""
    while _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))
