"""A byte range of a disk image (the whole disk or one partition) that every read is checked
against: nothing read from the image can send a read outside it."""

from __future__ import annotations

from kasou.bootdisk._errors import BootDiskError
from kasou.disk import Disk, DiskError

__all__ = ["Region"]


class Region:
    """``size`` bytes of ``disk`` from byte ``offset``, called ``name`` in error messages
    ("partition 1", "the disk")."""

    def __init__(self, disk: Disk, offset: int, size: int, name: str) -> None:
        self.disk = disk
        self.offset = offset
        self.size = size
        self.name = name

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes from ``offset``; ``what`` names them in the error if the range
        falls outside the region."""
        buffer = bytearray(length)
        self.read_into(offset, memoryview(buffer), what)
        return bytes(buffer)

    def read_into(self, offset: int, view: memoryview, what: str) -> None:
        """Fill ``view`` from ``offset`` (one read of the disk, however large)."""
        length = len(view)
        if offset < 0 or offset + length > self.size:
            raise BootDiskError(
                f"{self.name}: {what} ({length} bytes at byte {offset}) lies outside it "
                f"({self.size} bytes): the image is truncated or corrupt"
            )
        if not length:
            return
        try:
            self.disk.readv(self.offset + offset, [view])
        except DiskError as error:
            detail = str(error).removeprefix(f"{self.disk.path}: ")
            raise BootDiskError(f"cannot read the image: {detail}") from None
        except OSError as error:
            raise BootDiskError(f"cannot read the image: {error.strerror or error}") from None
