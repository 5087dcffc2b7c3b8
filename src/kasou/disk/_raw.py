"""Raw disk images: the image file (or block device) is the disk, byte for byte.

A regular file's size is rounded up to whole sectors; the bytes past its end read as zeros
and a write there extends the file. On a block device the size is where ``lseek(SEEK_END)``
lands (the kernel's ``BLKGETSIZE64``). Discard and write-zeroes punch holes or zero ranges
with fallocate(2) on files, and use ``BLKDISCARD``/``BLKZEROOUT`` on block devices
(Documentation/userspace-api/ioctl/ioctl-number.rst: 0x12 is the block layer), falling back
to writing zeros where the host cannot. Not handled: O_DIRECT, and a file that another
process grows or shrinks while it is open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from kasou.disk._disk import SECTOR_SIZE, check_range, check_writable
from kasou.disk._errors import DiskError
from kasou.disk._io import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    byte_views,
    fallocate,
    preadv_full,
    pwrite_full,
    pwritev_full,
    skip,
    zero_fill,
)

__all__ = ["RawDisk"]

# linux/fs.h: _IO(0x12, 119) and _IO(0x12, 127), both taking a uint64_t[2] {start, length}.
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_RANGE = struct.Struct("=QQ")

_ZERO_CHUNK = 1 << 20  # bytes of zeros written at a time where the host cannot zero a range
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS)


class RawDisk:
    """A raw image: a regular file or a block device, opened by ``open_disk``."""

    format = "raw"

    def __init__(self, path: Path, fd: int, *, read_only: bool, block_device: bool) -> None:
        self.path = path
        self.read_only = read_only
        self.block_device = block_device
        self._fd = fd
        end = os.lseek(fd, 0, os.SEEK_END)
        self.size = -(-end // SECTOR_SIZE) * SECTOR_SIZE

    @property
    def fd(self) -> int:
        """The open file descriptor (-1 once closed)."""
        return self._fd

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers)
        check_range(self, "read", offset, sum(len(view) for view in views))
        self._check_open()
        done = preadv_full(self._fd, views, offset)
        zero_fill(skip(views, done))  # the tail of a file whose size is not whole sectors

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        views = byte_views(buffers)
        check_writable(self, "write")
        check_range(self, "write", offset, sum(len(view) for view in views))
        self._check_open()
        pwritev_full(self._fd, views, offset)

    def flush(self) -> None:
        self._check_open()
        if not self.read_only:
            os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        check_writable(self, "discard")
        check_range(self, "discard", offset, length)
        self._check_open()
        if length == 0:
            return
        if self.block_device:
            # A discarded range of a device need not read as zeros afterwards; the device
            # decides (virtio 1.2 §5.2.6.2 leaves discarded data unspecified).
            start, end = _sector_span(offset, length)
            if start < end:
                self._blk_ioctl(_BLKDISCARD, start, end - start)  # unsupported: a no-op hint
            return
        self._punch_or_zero(offset, length, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        check_writable(self, "write zeroes")
        check_range(self, "write zeroes", offset, length)
        self._check_open()
        if length == 0:
            return
        if self.block_device:
            start, end = _sector_span(offset, length)
            if start < end and self._blk_ioctl(_BLKZEROOUT, start, end - start):
                self._write_zeros(offset, start - offset)
                self._write_zeros(end, offset + length - end)
            else:
                self._write_zeros(offset, length)
            return
        mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
        self._punch_or_zero(offset, length, mode | FALLOC_FL_KEEP_SIZE)

    def close(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            if not self.read_only:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def allocated_bytes(self) -> int:
        """Bytes of the disk that take space on the host (a sparse file's holes do not)."""
        self._check_open()
        if self.block_device:
            return self.size
        return min(self.size, os.fstat(self._fd).st_blocks * 512)

    def __enter__(self) -> RawDisk:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._fd < 0:
            raise DiskError(f"{self.path}: the disk is closed")

    def _punch_or_zero(self, offset: int, length: int, mode: int) -> None:
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
            self._write_zeros(offset, length)

    def _blk_ioctl(self, request: int, offset: int, length: int) -> bool:
        """Run a ranged block-device ioctl; False where the device does not support it."""
        try:
            fcntl.ioctl(self._fd, request, _RANGE.pack(offset, length))
        except OSError as error:
            if error.errno in _UNSUPPORTED:
                return False
            raise
        return True

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = bytes(min(length, _ZERO_CHUNK))
        while length > 0:
            count = min(length, len(zeros))
            pwrite_full(self._fd, memoryview(zeros)[:count], offset)
            offset += count
            length -= count


def _sector_span(offset: int, length: int) -> tuple[int, int]:
    """The whole sectors inside ``[offset, offset + length)``: (start, end) byte offsets."""
    start = -(-offset // SECTOR_SIZE) * SECTOR_SIZE
    end = (offset + length) // SECTOR_SIZE * SECTOR_SIZE
    return start, max(start, end)
