"""libc through ctypes: what the standard library does not offer.

``ioctl`` with errno and a real pointer argument (``fcntl.ioctl`` takes a C int and copies
buffers), ``KVM_RUN``-style ioctls that return ``EINTR`` to the caller instead of retrying,
naming threads, punching holes in files (``fallocate``) and comparing memory in place
(``memcmp``). Eventfds, epoll and signals come from ``os``, ``select`` and ``signal``.
"""

from kasou._sys.libc import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    fallocate,
    ioctl,
    ioctl_noretry,
    memcmp,
    set_thread_name,
)

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "fallocate",
    "ioctl",
    "ioctl_noretry",
    "memcmp",
    "set_thread_name",
]
