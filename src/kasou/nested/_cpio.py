"""A writer for the cpio "newc" archives the Linux kernel unpacks as an initramfs.

The format is the SVR4 portable ASCII format without checksums, as the kernel reads it
(Documentation/driver-api/early-userspace/buffer-format.rst; cpio(5), "New ASCII Format"):
each entry is a 110-byte header of the magic ``070701`` and thirteen 8-digit hexadecimal
fields, the path name with its NUL padded to a multiple of 4 bytes, then the file data padded
to a multiple of 4 bytes. A last entry named ``TRAILER!!!`` ends the archive.

This module writes only what an initramfs needs: directories, regular files, symbolic links
and device nodes, owned by root, with modification time 0 so the same inputs give the same
bytes. It does not read archives, compress them or know what goes into one.
"""

from __future__ import annotations

import stat
from typing import BinaryIO

__all__ = ["CpioWriter"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Appends newc entries to ``out``; call :meth:`finish` once to write the trailer.

    Paths are written relative (``bin/busybox``), the form the kernel and ``cpio -i`` expect;
    a leading ``/`` is dropped.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._next_inode = 1
        self._finished = False

    def directory(self, path: str, mode: int = 0o755) -> None:
        self._entry(path, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        # A symbolic link's data is its target, without a NUL (cpio(5)).
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(path, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> None:
        """Write the trailer entry. Nothing can be added afterwards."""
        self._entry(_TRAILER, 0, b"", nlink=1, inode=0)
        self._finished = True

    def _entry(
        self,
        path: str,
        mode: int,
        data: bytes,
        *,
        nlink: int = 1,
        rdev: tuple[int, int] = (0, 0),
        inode: int | None = None,
    ) -> None:
        if self._finished:
            raise ValueError("the cpio archive is already finished")
        name = path.lstrip("/").encode()
        if not name or b"\0" in name:
            raise ValueError(f"not a usable path in a cpio archive: {path!r}")
        if inode is None:
            inode = self._next_inode
            self._next_inode += 1
        fields = (
            inode,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            0,  # mtime
            len(data),
            0,  # devmajor: the device holding the file, unused by the kernel
            0,  # devminor
            rdev[0],
            rdev[1],
            len(name) + 1,  # namesize counts the NUL
            0,  # check: always 0 in the newc ("070701") format
        )
        header = _MAGIC + b"".join(b"%08X" % field for field in fields)
        head = header + name + b"\0"
        self._out.write(head + _pad(len(head)))
        self._out.write(data + _pad(len(data)))
