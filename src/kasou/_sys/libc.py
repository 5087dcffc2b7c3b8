"""ioctl(2) and prctl(2) through ctypes, with errno turned into ``OSError``."""

from __future__ import annotations

import ctypes
import errno as errno_module
import os
from typing import Any

__all__ = ["ioctl", "ioctl_noretry", "set_thread_name"]

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
