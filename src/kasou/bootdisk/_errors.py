"""The one error the bootdisk package raises."""

from __future__ import annotations

from kasou.errors import ImageError

__all__ = ["BootDiskError"]


class BootDiskError(ImageError):
    """A disk image kasou cannot boot from.

    An ``ImageError``: the image is at fault, or holds nothing kasou can boot (no partition
    table and no file system, a root file system other than ext2/3/4, no kernel in /boot,
    corrupt metadata, a corrupt qcow2 file). The message is one line: it names the image,
    where in it the problem is, and what to do.
    """
