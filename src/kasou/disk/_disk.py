"""What a block device sees of a disk image: the ``Disk`` protocol, and checks every format
shares."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from kasou.disk._errors import DiskError

__all__ = ["SECTOR_SIZE", "Disk", "check_range", "check_writable"]

SECTOR_SIZE = 512
"""Disks are sized in whole sectors of this many bytes (virtio 1.2 §5.2.4: ``capacity`` is in
512-byte sectors)."""


class Disk(Protocol):
    """A disk image opened for a block device.

    One thread at a time uses a ``Disk`` (the block device's own); implementations lock their
    metadata anyway. Buffers are views of guest RAM: they are read into and written from
    directly, never copied as a whole.
    """

    path: Path
    size: int
    """Virtual size in bytes, a multiple of 512."""
    read_only: bool
    format: str
    """``"raw"`` or ``"qcow2"``."""

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` (in order) from byte ``offset``. Never short: a read past ``size``
        raises ``DiskError``; I/O failures raise ``OSError``."""

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write ``buffers`` (in order) at byte ``offset``."""

    def flush(self) -> None:
        """Make every completed write durable (fdatasync): it survives kill -9 and power
        loss."""

    def discard(self, offset: int, length: int) -> None:
        """Give the range's storage back to the host. It reads as zeros afterwards, except on
        a raw block device, where the device decides (virtio 1.2 §5.2.6.2 leaves discarded
        data unspecified)."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeros; with ``unmap`` its storage may be given back."""

    def close(self) -> None:
        """Flush and release the image (and its backing chain). Closing twice is harmless."""

    def __enter__(self) -> Disk:
        """``with open_disk(...) as disk:`` closes the disk at the end of the block."""

    def __exit__(self, *exc_info: object) -> None: ...


def check_range(disk: Disk, what: str, offset: int, length: int) -> None:
    """Raise ``DiskError`` unless ``[offset, offset + length)`` lies within ``disk``."""
    if offset < 0 or length < 0 or offset + length > disk.size:
        raise DiskError(
            f"{disk.path}: {what} of {length} bytes at offset {offset} is outside the disk "
            f"({disk.size} bytes)"
        )


def check_writable(disk: Disk, what: str) -> None:
    """Raise ``DiskError`` if ``disk`` is read-only."""
    if disk.read_only:
        raise DiskError(f"{disk.path}: cannot {what}: the disk is open read-only")
