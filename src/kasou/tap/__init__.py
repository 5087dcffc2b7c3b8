"""Host TAP interfaces: the backend a virtio-net device reads and writes Ethernet frames on.

This package owns opening ``/dev/net/tun`` as a TAP with a virtio-net header on every frame
(``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``, kernel Documentation/networking/tuntap.rst), setting
the header's size and the offloads the guest can take, and turning the kernel's refusals into
messages that say what to do. It knows nothing of virtio queues or guest memory: the device
(``kasou.devices.virtio.net``) does the I/O on ``Tap.fd``, which is non-blocking.

Which interface. ``open_tap(None)`` lets the kernel pick a free ``tapN``; ``open_tap(NAME)``
attaches to the TAP ``NAME`` when it exists (made beforehand with ``ip tuntap add NAME mode
tap``, possibly owned by an unprivileged user) and creates it otherwise. A TAP kasou creates
is not persistent: it lives as long as the VM and disappears when ``close`` releases it.

What kasou configures, and what it leaves to the user. A TAP kasou creates is brought up
(``IFF_UP``), because nobody else knows it exists until the VM runs and a down TAP refuses
every frame the guest sends (EIO). A TAP that already existed keeps the state its owner
gave it. Addresses, routes, bridges and NAT are never touched: like Firecracker, kasou leaves
the host side of the network to the user (``ip addr add 10.0.0.1/24 dev tap0``, or a bridge).

Layer: stdlib and ``kasou.errors`` only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from kasou.errors import ConfigError, HostError

__all__ = ["TUN_CLONE_DEVICE", "VNET_HEADER_SIZE", "Tap", "open_tap"]

TUN_CLONE_DEVICE = "/dev/net/tun"

VNET_HEADER_SIZE = 12
"""Bytes of ``struct virtio_net_hdr_v1`` (virtio 1.2 §5.1.6) before each frame: with
VIRTIO_F_VERSION_1 the header always carries ``num_buffers``, so it is 12 bytes, not 10."""

IFNAMSIZ = 16  # linux/if.h, with the terminating NUL

# linux/if_tun.h: _IOW('T', 202, int) and friends.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # fail with EBUSY instead of attaching when the name exists
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

# linux/sockios.h and linux/if.h.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
IFF_UP = 0x1

# struct ifreq (linux/if.h): ifr_name[IFNAMSIZ], then a 24-byte union; kasou uses its
# ``short ifr_flags`` and ``int ifr_mtu`` members.
_IFREQ_FLAGS = struct.Struct("16sH22x")
_IFREQ_INT = struct.Struct("16si20x")
assert _IFREQ_FLAGS.size == _IFREQ_INT.size == 40


class Tap:
    """One open TAP queue: frames with a virtio-net header in front, read and written on a
    non-blocking ``fd``. ``created``: kasou made the interface (it goes away on ``close``)."""

    vnet_header_size = VNET_HEADER_SIZE

    def __init__(self, fd: int, name: str, mtu: int, created: bool) -> None:
        self.fd = fd
        self.name = name
        self.mtu = mtu
        self.created = created

    def __repr__(self) -> str:
        return f"Tap({self.name!r}, fd={self.fd}, mtu={self.mtu}, created={self.created})"

    def fileno(self) -> int:
        return self.fd

    def set_offload(
        self,
        *,
        csum: bool = False,
        tso4: bool = False,
        tso6: bool = False,
        ecn: bool = False,
        ufo: bool = False,
    ) -> None:
        """Tell the kernel what the reader of this TAP can take (TUNSETOFFLOAD): frames with a
        partial checksum (``csum``), TCP segmentation left undone (``tso4``, ``tso6``, with
        ``ecn``), UDP fragmentation left undone (``ufo``). The segmentation flags need
        ``csum``. Frames the guest writes may use any offload regardless."""
        flags = (
            (TUN_F_CSUM if csum else 0)
            | (TUN_F_TSO4 if tso4 else 0)
            | (TUN_F_TSO6 if tso6 else 0)
            | (TUN_F_TSO_ECN if ecn else 0)
            | (TUN_F_UFO if ufo else 0)
        )
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as error:
            raise HostError(
                f"TAP {self.name}: the kernel refused offloads {flags:#x} "
                f"({error.strerror}): segmentation offloads need the checksum offload, and an "
                "older kernel may not know some of them"
            ) from error

    def close(self) -> None:
        """Release the TAP (a TAP kasou created disappears with it). Idempotent."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_name(name: str) -> None:
    # The kernel's dev_valid_name (net/core/dev.c): 1..15 bytes, not "." or "..", no "/",
    # ":" or white space.
    if (
        not name
        or len(name.encode()) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in "/:" or c.isspace() for c in name)
        or "\0" in name
    ):
        raise ConfigError(
            "tap",
            f"{name!r} is not an interface name: use 1 to 15 characters without '/', ':' or "
            "spaces, like tap0",
        )


def _open_clone(device: str) -> int:
    try:
        return os.open(device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError) as error:
        raise HostError(
            f"{device} does not exist: load the tun module (modprobe tun) to use a TAP network"
        ) from error
    except OSError as error:
        if error.errno in (errno.ENODEV, errno.ENXIO):
            raise HostError(
                f"{device} has no driver behind it: load the tun module (modprobe tun)"
            ) from error
        if error.errno in (errno.EACCES, errno.EPERM):
            raise _permission(device) from error
        raise HostError(f"cannot open {device}: {error.strerror}") from error


def _permission(what: str) -> HostError:
    return HostError(
        f"{what}: opening a TAP needs CAP_NET_ADMIN (run as root or give kasou the capability), "
        "or a TAP made for your user beforehand (ip tuntap add NAME mode tap user USER)"
    )


def _set_iff(fd: int, name: str, flags: int) -> str:
    """TUNSETIFF; returns the interface's name (the kernel fills it in for a pattern)."""
    request = bytearray(_IFREQ_FLAGS.pack(name.encode(), flags))
    fcntl.ioctl(fd, TUNSETIFF, request)
    return bytes(request[:IFNAMSIZ]).split(b"\0", 1)[0].decode()


def _attach(fd: int, name: str | None) -> tuple[str, bool]:
    """Create or attach; returns (name, created)."""
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    label = f"TAP {name}" if name else "a new TAP"
    try:
        if name is None:
            return _set_iff(fd, "", flags), True
        try:
            # Create it only if the name is free, so that kasou knows it made it.
            return _set_iff(fd, name, flags | IFF_TUN_EXCL), True
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
        return _set_iff(fd, name, flags), False
    except OSError as error:
        if error.errno == errno.EBUSY:
            raise HostError(
                f"TAP {name} is in use by another process (a TAP serves one VM): stop it, or "
                "pick another name"
            ) from error
        if error.errno == errno.EINVAL and name is not None:
            raise HostError(
                f"{name} exists but is not a single-queue TAP (a TUN, a multi-queue TAP or "
                "another kind of interface): pick another name, or remake it with "
                f"ip tuntap add {name} mode tap"
            ) from error
        if error.errno in (errno.EPERM, errno.EACCES):
            raise _permission(label) from error
        raise HostError(f"{label}: TUNSETIFF failed: {error.strerror}") from error


def _link(name: str, bring_up: bool) -> int:
    """Bring the interface up when asked; return its MTU. Any socket family reaches the
    interface ioctls; a Unix one needs no IP stack and lives in the caller's namespace."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        if bring_up:
            request = bytearray(_IFREQ_FLAGS.pack(name.encode(), 0))
            fcntl.ioctl(sock, SIOCGIFFLAGS, request)
            _, flags = _IFREQ_FLAGS.unpack(request)
            fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(name.encode(), flags | IFF_UP))
        request = bytearray(_IFREQ_INT.pack(name.encode(), 0))
        fcntl.ioctl(sock, SIOCGIFMTU, request)
        mtu: int = _IFREQ_INT.unpack(request)[1]
        return mtu


def open_tap(name: str | None = None, *, clone_device: str = TUN_CLONE_DEVICE) -> Tap:
    """Open the TAP ``name`` (created when it does not exist; ``None``: a new ``tapN``) with
    12-byte virtio-net headers and no offloads towards the reader yet. Raises ``HostError``
    (no tun module, no permission, the TAP is busy or is not a TAP) or ``ConfigError`` (a
    name the kernel would refuse)."""
    if name is not None:
        _check_name(name)
    fd = _open_clone(clone_device)
    try:
        tap_name, created = _attach(fd, name)
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HEADER_SIZE))
            # A TAP that existed may carry offloads its last user set: start from none.
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
            mtu = _link(tap_name, bring_up=created)
        except OSError as error:
            if error.errno in (errno.EPERM, errno.EACCES):
                raise _permission(f"TAP {tap_name}") from error
            raise HostError(f"TAP {tap_name}: setting it up failed: {error.strerror}") from error
    except BaseException:
        os.close(fd)
        raise
    return Tap(fd, tap_name, mtu, created)
