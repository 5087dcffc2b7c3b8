"""A writer of "newc" cpio archives, the initramfs format Linux unpacks
(Documentation/driver-api/early-userspace/buffer-format.rst).

Written here rather than by the cpio tool so that no root is needed to put device nodes and
root-owned files in the archive, and so that the bytes depend only on the entries: fixed
mtimes, inode numbers in entry order, the gzip header's time zeroed.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO, Literal

__all__ = ["Entry", "write_cpio", "write_cpio_gz"]

_MAGIC = b"070701"  # newc: ASCII hex fields, no checksum
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One file of the archive. ``path`` is relative to the root ("bin/sh"), with "/"
    separators; ``mode`` holds the permission bits only (the kind gives the type)."""

    path: str
    kind: Literal["dir", "file", "symlink", "chardev"]
    mode: int
    data: bytes = b""  # a file's contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # a device node's (major, minor)
    uid: int = 0
    gid: int = 0
    mtime: int = 0

    def file_mode(self) -> int:
        kind = {
            "dir": stat.S_IFDIR,
            "file": stat.S_IFREG,
            "symlink": stat.S_IFLNK,
            "chardev": stat.S_IFCHR,
        }[self.kind]
        return kind | (self.mode & 0o7777)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % 4)


def write_cpio(entries: Iterable[Entry], out: BinaryIO) -> None:
    """Write ``entries`` in order (a directory must come before what it holds) and the
    trailer. Raises ValueError for a path that is absolute, empty or has ".." in it."""
    for ino, entry in enumerate(entries, start=1):
        parts = entry.path.split("/")
        if not entry.path or entry.path.startswith("/") or ".." in parts or "" in parts:
            raise ValueError(f"cpio entry path {entry.path!r} must be relative and normalised")
        _write_one(out, ino, entry, entry.file_mode())
    # The end: an empty entry named TRAILER!!!, all fields zero.
    _write_one(out, 0, Entry(_TRAILER, "file", 0), 0)


def _write_one(out: BinaryIO, ino: int, entry: Entry, mode: int) -> None:
    encoded = entry.path.encode() + b"\0"
    data = entry.data
    # A regular file with nlink >= 2 is taken for a hard link by the kernel's unpacker
    # (init/initramfs.c), so files get 1; directories conventionally 2.
    nlink = 2 if entry.kind == "dir" else 1
    fields = (
        ino,
        mode,
        entry.uid,
        entry.gid,
        nlink,
        entry.mtime,
        len(data),
        0,  # devmajor, devminor: the device holding the file; none
        0,
        entry.rdev[0],
        entry.rdev[1],
        len(encoded),
        0,  # check: only for the "070702" (crc) variant
    )
    header = _MAGIC + b"".join(b"%08X" % field for field in fields)
    out.write(header + encoded + _pad(len(header) + len(encoded)))
    out.write(data + _pad(len(data)))


def write_cpio_gz(entries: Iterable[Entry], out: BinaryIO) -> None:
    """``write_cpio`` through gzip (the kernel's RD_GZIP), with no name or time in the gzip
    header so the same entries always give the same bytes."""
    import gzip

    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        write_cpio(entries, gz)  # type: ignore[arg-type]
