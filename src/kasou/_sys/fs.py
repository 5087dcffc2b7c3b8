"""renameat2(2) with RENAME_EXCHANGE: swap two paths in one step (the standard library has
only rename and replace, which cannot swap two folders)."""

from __future__ import annotations

import ctypes
import os

__all__ = ["rename_exchange"]

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100  # linux/fcntl.h
_RENAME_EXCHANGE = 1 << 1  # linux/fs.h

_renameat2 = _libc.renameat2
_renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
_renameat2.restype = ctypes.c_int


def rename_exchange(first: str | os.PathLike[str], second: str | os.PathLike[str]) -> None:
    """Atomically swap ``first`` and ``second`` (both must exist, on one file system)."""
    result = _renameat2(
        _AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first), None, str(second))
