"""Disk images for virtio-blk: raw files and block devices, and qcow2 (versions 2 and 3)
with backing chains.

This package owns the image formats: it maps a guest's byte offsets to the image file,
allocates and frees qcow2 clusters, keeps refcounts consistent, and creates qcow2 images. It
knows nothing of virtio, guest memory or the event loop: a block device hands it offsets and
memoryviews (views of guest RAM, read into and written from without copies) through the
``Disk`` protocol::

    from kasou.disk import create_overlay, open_disk

    create_overlay("vm.qcow2", "debian.raw")          # a qcow2 v3 overlay over a raw base
    disk = open_disk("vm.qcow2")                      # format probed; the base opened read-only
    disk.writev(0, [memoryview(b"x" * 512)])
    disk.flush()                                      # fdatasync: survives kill -9
    disk.close()

Everything read from an image file is untrusted: headers and tables are validated before
use, and an image that is corrupt, truncated or uses features kasou cannot honour raises
``DiskError`` (a ``GuestError``) naming the problem. The qcow2 layouts follow QEMU's
docs/interop/qcow2.txt; ``qemu-img check`` finds no errors and no leaks in images kasou
wrote and closed.
"""

from kasou.disk._create import create_overlay, create_qcow2, set_backing_name
from kasou.disk._disk import SECTOR_SIZE, Disk
from kasou.disk._errors import DiskError
from kasou.disk._info import DiskInfo, inspect_disk
from kasou.disk._open import FORMATS, MAX_CHAIN, open_disk
from kasou.disk._qcow2 import Qcow2Disk
from kasou.disk._raw import RawDisk

__all__ = [
    "FORMATS",
    "MAX_CHAIN",
    "SECTOR_SIZE",
    "Disk",
    "DiskError",
    "DiskInfo",
    "Qcow2Disk",
    "RawDisk",
    "create_overlay",
    "create_qcow2",
    "inspect_disk",
    "open_disk",
    "set_backing_name",
]
