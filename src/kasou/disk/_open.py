"""Opening a disk image: probing its format and opening a qcow2 image's backing chain."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kasou.disk._disk import Disk
from kasou.disk._errors import DiskError
from kasou.disk._qcow2 import Qcow2Disk, read_header
from kasou.disk._qcow2_format import MAGIC
from kasou.disk._raw import RawDisk

__all__ = ["FORMATS", "MAX_CHAIN", "open_disk", "open_image", "resolve_backing"]

FORMATS = ("raw", "qcow2")
MAX_CHAIN = 16
"""Images in a backing chain, the top one included, beyond which ``open_disk`` refuses."""


def open_disk(path: str | Path, *, format: str | None = None, read_only: bool = False) -> Disk:
    """Open the disk image at ``path``.

    ``format`` is ``"raw"``, ``"qcow2"`` or None to probe (the qcow2 magic ``QFI\\xfb``, else
    raw). A qcow2 image's backing file is opened read-only, in the format its header names or
    else probed; a relative backing path is taken relative to the image's folder (qcow2 spec,
    "Header": backing_file_offset). Raises ``DiskError`` for an image that cannot be opened or
    used, naming the image and the problem.
    """
    return open_image(Path(path), format, read_only, ())


def open_image(path: Path, format: str | None, read_only: bool, chain: tuple[str, ...]) -> Disk:
    """``open_disk`` for an image below ``chain`` (the real paths of the images above it)."""
    if format is not None and format not in FORMATS:
        raise DiskError(f"{path}: unknown disk format {format!r}: use raw or qcow2")
    real = os.path.realpath(path)
    if real in chain:
        raise DiskError(f"{chain[0]}: the backing chain loops: {' -> '.join([*chain, real])}")
    if len(chain) >= MAX_CHAIN:
        raise DiskError(f"{chain[0]}: the backing chain is deeper than {MAX_CHAIN} images")
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as error:
        what = "backing file" if chain else "disk image"
        raise DiskError(f"cannot open {what} {path}: {error.strerror}") from error
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise DiskError(f"{path}: not a regular file or block device")
        if format is None:
            format = "qcow2" if os.pread(fd, len(MAGIC), 0) == MAGIC else "raw"
        if format == "raw":
            return RawDisk(path, fd, read_only=read_only, block_device=stat.S_ISBLK(mode))
        return _open_qcow2(path, fd, read_only, (*chain, real))
    except BaseException:
        os.close(fd)
        raise


def _open_qcow2(path: Path, fd: int, read_only: bool, chain: tuple[str, ...]) -> Qcow2Disk:
    file_size = os.lseek(fd, 0, os.SEEK_END)
    try:
        header = read_header(fd, file_size)
    except DiskError as error:
        raise DiskError(f"{path}: unusable qcow2 image: {error}") from None
    backing = None
    if header.backing_file is not None:
        backing_format = header.backing_format
        if backing_format is not None and backing_format not in FORMATS:
            raise DiskError(
                f"{path}: the backing file's format {backing_format!r} is not supported "
                "(raw or qcow2)"
            )
        backing_path = resolve_backing(path, header.backing_file)
        backing = open_image(backing_path, backing_format, True, chain)
    try:
        return Qcow2Disk(path, fd, header, backing, read_only=read_only)
    except BaseException:
        if backing is not None:
            backing.close()
        raise


def resolve_backing(image: Path, backing_file: str) -> Path:
    """Where a backing file name stored in ``image`` points: relative names are relative to
    the folder holding ``image``."""
    backing = Path(backing_file)
    return backing if backing.is_absolute() else image.parent / backing
