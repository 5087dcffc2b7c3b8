"""ioctl(2), prctl(2), fallocate(2) and memcmp(3) through ctypes, with errno turned into
``OSError``."""

from __future__ import annotations

import ctypes
import errno as errno_module
import os
from typing import Any

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "fallocate",
    "ioctl",
    "ioctl_noretry",
    "memcmp",
    "set_thread_name",
]

_libc = ctypes.CDLL(None, use_errno=True)
# int ioctl(int fd, unsigned long request, ...): the third argument is a pointer or an
# unsigned long; c_void_p carries both. ctypes releases the GIL for the call.
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_ioctl.restype = ctypes.c_int

_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl.restype = ctypes.c_int
_PR_SET_NAME = 15  # linux/prctl.h

# int fallocate(int fd, int mode, off_t offset, off_t len); off_t is 64-bit on x86-64.
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int
FALLOC_FL_KEEP_SIZE = 0x01  # linux/falloc.h
FALLOC_FL_PUNCH_HOLE = 0x02  # linux/falloc.h; must be ORed with FALLOC_FL_KEEP_SIZE

_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


def _pointer(arg: Any) -> int | None:
    if arg is None or isinstance(arg, int):
        return arg
    return ctypes.addressof(arg)


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """Call ioctl(2); retry on EINTR; raise ``OSError`` on failure.

    ``arg`` is an int (passed by value) or a ctypes object (passed by address).
    """
    pointer = _pointer(arg)
    while True:
        result: int = _ioctl(fd, request, pointer)
        if result >= 0:
            return result
        code = ctypes.get_errno()
        if code != errno_module.EINTR:
            raise OSError(code, os.strerror(code))


def ioctl_noretry(fd: int, request: int, arg: Any = None) -> int:
    """Call ioctl(2) once and return its result, or ``-errno`` on failure (``-EINTR`` when a
    signal interrupted it). For ``KVM_RUN``, where an interruption is a kick, not an error."""
    result: int = _ioctl(fd, request, _pointer(arg))
    if result < 0:
        return -ctypes.get_errno()
    return result


def set_thread_name(name: str) -> None:
    """Name the calling OS thread (seen in ``top -H`` and /proc/PID/task/*/comm)."""
    _prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Call fallocate(2) (e.g. ``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` to free a
    file's blocks); retry on EINTR; raise ``OSError`` on failure."""
    while _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        if code != errno_module.EINTR:
            raise OSError(code, os.strerror(code))


def memcmp(first: int, second: int, size: int) -> int:
    """Compare ``size`` bytes at two host addresses (memcmp(3)), without copying them and
    with the GIL released; 0 when equal. The caller vouches that both ranges are mapped."""
    result: int = _memcmp(first, second, size)
    return result
