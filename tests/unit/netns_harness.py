"""Network namespaces for tests that need real interfaces (TAPs, packet sockets, TCP).

Each test gets a fresh namespace (``ip netns add``) and does its network work inside it: a
function run through ``Netns.run`` executes on a thread that joined the namespace with
setns(2), so a TAP it opens is created there and a socket it makes lives there; the fds stay
usable from any thread afterwards. Nothing is routed anywhere: the namespace has no link to
the host's interfaces, and deleting it removes whatever was made inside.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

_libc = ctypes.CDLL(None, use_errno=True)
_names = itertools.count()


def skip_reason() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TAPs)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    if shutil.which("ip") is None:
        return "no ip(8) (iproute2)"
    return None


class Netns:
    """One throw-away network namespace."""

    def __init__(self) -> None:
        self.name = f"kasou-t{os.getpid()}-{next(_names)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.path = f"/run/netns/{self.name}"
        self.run(_quiet_ipv6)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def run(self, function: Callable[[], T]) -> T:
        """Call ``function`` on a thread inside the namespace; return what it returns."""
        result: list[Any] = []

        def inside() -> None:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                result.append((True, function()))
            except BaseException as error:
                result.append((False, error))

        thread = threading.Thread(target=inside, name=f"in-{self.name}")
        thread.start()
        thread.join()
        ok, value = result[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def ip(self, *args: str) -> str:
        done = subprocess.run(
            ["ip", "-n", self.name, *args], check=True, capture_output=True, text=True
        )
        return done.stdout

    def link(self, name: str) -> dict[str, Any]:
        """``ip -j -s link show`` for one interface: flags, mtu, stats64."""
        data: list[dict[str, Any]] = json.loads(self.ip("-j", "-s", "link", "show", "dev", name))
        return data[0]

    def exists(self, name: str) -> bool:
        done = subprocess.run(
            ["ip", "-n", self.name, "link", "show", "dev", name], check=False, capture_output=True
        )
        return done.returncode == 0

    def packet_socket(self, interface: str) -> socket.socket:
        """An AF_PACKET socket on ``interface``: sees every frame the interface receives
        (what the guest sent) and sends frames out of it (towards the guest)."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.bind((interface, 0))
            sock.settimeout(10)
            return sock

        return self.run(make)


def _quiet_ipv6() -> None:
    # No router solicitations or MLD reports from new interfaces: tests see only their frames.
    for scope in ("all", "default"):
        path = f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"
        if os.path.exists(path):
            with open(path, "w") as file:
                file.write("1")


def receive_incoming(
    sock: socket.socket, match: Callable[[bytes], bool], timeout: float = 10
) -> bytes:
    """The next frame the interface received (not one it sent) for which ``match`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("the frame did not arrive")
        sock.settimeout(remaining)
        data, address = sock.recvfrom(1 << 17)
        if address[2] != PACKET_OUTGOING and match(data):
            return data
