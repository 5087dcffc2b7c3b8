"""The system calls the jail needs that Python 3.11's ``os`` lacks, through ctypes:
unshare(2), mount(2), umount2(2), pivot_root(2), prctl(2) and capset(2). Each raises
``OSError`` with errno on failure."""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "clear_capabilities",
    "drop_bounding_set",
    "mount",
    "pivot_root",
    "set_no_new_privs",
    "set_parent_death_signal",
    "umount2",
    "unshare",
]

_libc = ctypes.CDLL(None, use_errno=True)

# linux/sched.h
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

# linux/mount.h (mount(2))
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2  # umount2(2)

# linux/prctl.h
_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4

_SYS_PIVOT_ROOT = 155  # arch/x86/entry/syscalls/syscall_64.tbl; glibc has no wrapper
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # linux/capability.h


class _CapHeader(ctypes.Structure):
    """struct __user_cap_header_struct, linux/capability.h."""

    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    """struct __user_cap_data_struct, linux/capability.h (version 3 takes two)."""

    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


assert ctypes.sizeof(_CapHeader) == 8
assert ctypes.sizeof(_CapData) == 12

_unshare = _libc.unshare
_unshare.argtypes = (ctypes.c_int,)
_mount = _libc.mount
_mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_umount2 = _libc.umount2
_umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_syscall = _libc.syscall
_prctl = _libc.prctl
_prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_capset = _libc.capset
_capset.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _bytes(text: str | os.PathLike[str] | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def unshare(flags: int) -> None:
    """unshare(2): move the caller into new namespaces (``CLONE_NEW*``)."""
    _check(_unshare(flags), "unshare")


def mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    """mount(2)."""
    _check(
        _mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)),
        f"mount {target}",
    )


def umount2(target: str | os.PathLike[str], flags: int) -> None:
    """umount2(2)."""
    _check(_umount2(_bytes(target), flags), f"umount {target}")


def pivot_root(new_root: str | os.PathLike[str], put_old: str | os.PathLike[str]) -> None:
    """pivot_root(2): ``new_root`` becomes /, the old root moves to ``put_old``."""
    result = _syscall(
        ctypes.c_long(_SYS_PIVOT_ROOT),
        ctypes.c_char_p(_bytes(new_root)),
        ctypes.c_char_p(_bytes(put_old)),
    )
    _check(result, "pivot_root")


def set_parent_death_signal(signum: int) -> None:
    """PR_SET_PDEATHSIG (prctl(2)): get ``signum`` when the parent thread dies. A change of
    credentials clears it (kernel/cred.c, commit_creds): set it again after the drop."""
    _check(_prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0), "PR_SET_PDEATHSIG")


def drop_bounding_set() -> None:
    """PR_CAPBSET_DROP for every capability the kernel knows (needs CAP_SETPCAP), and clear
    the ambient set (PR_CAP_AMBIENT_CLEAR_ALL): capabilities(7)."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as file:
        last = int(file.read())
    for capability in range(last + 1):
        _check(_prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0), f"PR_CAPBSET_DROP {capability}")
    _check(_prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT")


def clear_capabilities() -> None:
    """capset(2) with empty effective, permitted and inheritable sets."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_capset(ctypes.byref(header), data), "capset")


def set_no_new_privs() -> None:
    """PR_SET_NO_NEW_PRIVS: execve(2) can never grant privileges again (prctl(2))."""
    _check(_prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
