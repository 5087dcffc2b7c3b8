"""Forwarded ports: a TCP port of this host that reaches a port inside the nested host.

The nested host has no network by default (no NIC at all). With forwards, QEMU gives it one
virtio-net-pci NIC on its user-mode network stack (libslirp) with ``restrict=on``: the nested
host can reach nothing outside it, not even this host, and the only traffic that comes in is
what each ``hostfwd`` rule lets in (QEMU's documentation of ``-netdev user``: "restrict=on ...
does not affect any explicitly set forwarding rules")::

    this host                                   outer VM (nested host)
    127.0.0.1:HOSTPORT ── QEMU (slirp) ── virtio-net ── 10.0.2.15:GUESTPORT
                          restrict=on: nothing goes out

The outer VM's /init gives the NIC slirp's default guest address (``GUEST_ADDRESS``, the one a
``hostfwd`` rule without a guest address aims at) and brings it up (``_image``). The host end
listens on 127.0.0.1 only: nothing beyond this host can reach the nested host.

This module parses forwards, checks that their host ports are free and writes QEMU's options;
it does not start QEMU (``_run``).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from kasou.errors import ConfigError

__all__ = ["GUEST_ADDRESS", "Forward", "check_host_ports", "netdev_options", "parse_forward"]

# slirp's defaults (QEMU's -netdev user: net=10.0.2.0/24, dhcpstart=10.0.2.15): the guest's
# address, the one hostfwd aims at when a rule names none.
GUEST_ADDRESS = "10.0.2.15/24"
_LOOPBACK = "127.0.0.1"
_NETDEV_ID = "kasounet"


@dataclass(frozen=True)
class Forward:
    """This host's ``127.0.0.1:host_port`` reaches the nested host's ``guest_port`` (TCP)."""

    host_port: int
    guest_port: int

    def __post_init__(self) -> None:
        for what, port in (("host", self.host_port), ("guest", self.guest_port)):
            if not 0 < port < 65536:
                raise ConfigError("forward", f"the {what} port {port} is not between 1 and 65535")

    def __str__(self) -> str:
        return f"{self.host_port}:{self.guest_port}"


def parse_forward(text: str) -> Forward:
    """``HOSTPORT:GUESTPORT`` (``8080:80``), or one port for both (``8080``)."""
    host, sep, guest = text.strip().partition(":")
    if not sep:
        guest = host
    if not (host.isdecimal() and guest.isdecimal()):
        raise ConfigError(
            "forward", f"{text!r} is not HOSTPORT:GUESTPORT: give two TCP ports, like 8080:80"
        )
    return Forward(int(host), int(guest))


def check_host_ports(forwards: Sequence[Forward]) -> None:
    """Raise ``ConfigError`` if two forwards share a host port or one is taken on this host.

    The port is bound for a moment the way QEMU binds it (SO_REUSEADDR, so a port held only by
    connections in TIME_WAIT counts as free); a port taken between this check and QEMU's start
    still makes QEMU fail, with its own message.
    """
    seen: set[int] = set()
    for forward in forwards:
        if forward.host_port in seen:
            raise ConfigError("forward", f"host port {forward.host_port} is forwarded twice")
        seen.add(forward.host_port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((_LOOPBACK, forward.host_port))
            except OSError as error:
                why = "taken" if error.errno == errno.EADDRINUSE else error.strerror
                raise ConfigError(
                    "forward",
                    f"port {forward.host_port} on {_LOOPBACK} is {why}: pick another host "
                    f"port (--forward OTHER:{forward.guest_port})",
                ) from None


def netdev_options(forwards: Sequence[Forward]) -> list[str]:
    """QEMU's options for the NIC that carries ``forwards``; none without forwards."""
    if not forwards:
        return []
    rules = "".join(
        f",hostfwd=tcp:{_LOOPBACK}:{forward.host_port}-:{forward.guest_port}"
        for forward in forwards
    )
    return [
        "-netdev", f"user,id={_NETDEV_ID},restrict=on{rules}",
        "-device", f"virtio-net-pci,netdev={_NETDEV_ID}",
    ]  # fmt: skip
