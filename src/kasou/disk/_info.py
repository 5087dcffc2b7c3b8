"""What ``kasou disk info`` shows about an image and its backing chain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from kasou.disk._open import open_disk
from kasou.disk._qcow2 import Qcow2Disk
from kasou.disk._raw import RawDisk

__all__ = ["DiskInfo", "inspect_disk"]


class DiskInfo(NamedTuple):
    """One image of a chain, and the chain below it."""

    path: Path
    format: str
    size: int
    """Virtual size in bytes."""
    allocated: int
    """Bytes of the virtual disk whose content this image itself holds."""
    file_size: int
    """Bytes the image takes on the host (its allocated blocks)."""
    cluster_size: int | None
    """qcow2 only."""
    version: int | None
    """qcow2 only."""
    backing: DiskInfo | None


def inspect_disk(path: str | Path, *, format: str | None = None) -> DiskInfo:
    """Describe the image at ``path`` and its backing chain (opened read-only)."""
    disk = open_disk(path, format=format, read_only=True)
    try:
        return _describe(disk)
    finally:
        disk.close()


def _describe(disk: object) -> DiskInfo:
    if isinstance(disk, Qcow2Disk):
        return DiskInfo(
            path=disk.path,
            format="qcow2",
            size=disk.size,
            allocated=disk.allocated_bytes(),
            file_size=os.stat(disk.path).st_blocks * 512,
            cluster_size=disk.header.cluster_size,
            version=disk.header.version,
            backing=None if disk.backing is None else _describe(disk.backing),
        )
    assert isinstance(disk, RawDisk)
    return DiskInfo(
        path=disk.path,
        format="raw",
        size=disk.size,
        allocated=disk.allocated_bytes(),
        file_size=disk.allocated_bytes(),
        cluster_size=None,
        version=None,
        backing=None,
    )
