"""libc through ctypes: what the standard library does not offer.

``ioctl`` with errno and a real pointer argument (``fcntl.ioctl`` takes a C int and copies
buffers), ``KVM_RUN``-style ioctls that return ``EINTR`` to the caller instead of retrying,
and naming threads. Eventfds, epoll and signals come from ``os``, ``select`` and ``signal``.
"""

from kasou._sys.libc import ioctl, ioctl_noretry, set_thread_name

__all__ = ["ioctl", "ioctl_noretry", "set_thread_name"]
