"""The initial ramdisk: where it goes in guest memory, and copying it there.

This module owns placing an initrd (any file: a cpio archive, compressed or not) as high as
the kernel allows, page aligned, above the kernel image, and reading it straight into guest
RAM. boot.rst ("initrd_addr_max") asks boot loaders to put it as high as possible; the kernel
finds it through ``boot_params`` (``bootparams.py``). It does not look inside the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from kasou.errors import ImageError
from kasou.memory import GuestMemory

if TYPE_CHECKING:
    from kasou.loader import LoadedKernel

__all__ = ["IDENTITY_MAP_END", "load_initrd", "read_error"]

_PAGE = 4096
_MIB = 1 << 20
# Everything the kernel touches before it builds its own page tables must be identity mapped;
# arch/x86_64/paging.py maps the first 4 GiB, so nothing is placed above that.
IDENTITY_MAP_END = 1 << 32


def load_initrd(
    memory: GuestMemory, path: Path, kernel: LoadedKernel, ram_top: int
) -> tuple[int, int]:
    """Copy the initrd at ``path`` into guest memory; return ``(address, size)``.

    It is put page aligned as high as allowed: ending at or below ``ram_top`` (the end of
    the RAM the caller wants used), ``kernel.initrd_addr_max`` and 4 GiB, and starting at or
    above ``kernel.end``.
    """
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size == 0:
                raise ImageError(f"initrd {path} is empty: give a cpio archive")
            top = min(kernel.initrd_addr_max, ram_top, IDENTITY_MAP_END)
            address = (top - size) & ~(_PAGE - 1)
            if size > top or address < _align_up(kernel.end) or not memory.contains(address, size):
                raise _too_big(memory, path, size, kernel)
            read = file.readinto(memory.view(address, size))
    except OSError as error:
        raise read_error("initrd", path, error) from error
    if read != size:
        raise ImageError(f"initrd {path} changed while it was read: try again")
    return address, size


def _too_big(memory: GuestMemory, path: Path, size: int, kernel: LoadedKernel) -> ImageError:
    needed = _align_up(kernel.end) + _align_up(size)
    what = f"initrd {path} ({_mib(size)} MiB)"
    if needed > kernel.initrd_addr_max:
        return ImageError(
            f"{what} does not fit between the kernel and the highest address the kernel "
            f"accepts for it ({kernel.initrd_addr_max:#x}): use a smaller initrd"
        )
    return ImageError(
        f"{what} needs {_mib(needed)} MiB of guest memory with the kernel, the VM has "
        f"{_mib(memory.size)} MiB: raise --memory"
    )


def read_error(what: str, path: Path, error: OSError) -> ImageError:
    """The one-line ``ImageError`` for a ``what`` ("kernel", "initrd") that cannot be read."""
    if isinstance(error, FileNotFoundError):
        return ImageError(f"{what} {path} does not exist: check the path")
    if isinstance(error, IsADirectoryError):
        return ImageError(f"{what} {path} is a directory: give the path of a file")
    return ImageError(f"cannot read {what} {path}: {error.strerror or error}: check the file")


def _align_up(value: int) -> int:
    return (value + _PAGE - 1) & ~(_PAGE - 1)


def _mib(size: int) -> int:
    return (size + _MIB - 1) // _MIB
