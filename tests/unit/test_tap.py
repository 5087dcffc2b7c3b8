"""kasou.tap: opening TAPs for real, each test in its own network namespace, and the
messages a user gets when the host says no."""

from __future__ import annotations

import fcntl
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_harness import Netns, skip_reason

from kasou.errors import ConfigError, HostError
from kasou.tap import VNET_HEADER_SIZE, Tap, open_tap

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int), linux/if_tun.h


@pytest.fixture
def netns() -> Iterator[Netns]:
    namespace = Netns()
    yield namespace
    namespace.close()


def test_a_new_tap_is_made_up_with_vnet_headers_and_gone_after_close(netns: Netns) -> None:
    tap = netns.run(lambda: open_tap(None))
    try:
        assert re.fullmatch(r"tap\d+", tap.name)
        assert tap.created
        link = netns.link(tap.name)
        assert "UP" in link["flags"]
        assert tap.mtu == link["mtu"] == 1500
        size = bytearray(4)
        fcntl.ioctl(tap.fd, TUNGETVNETHDRSZ, size)
        assert struct.unpack("i", size)[0] == VNET_HEADER_SIZE == 12
        assert fcntl.fcntl(tap.fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(tap.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        with pytest.raises(BlockingIOError):
            os.read(tap.fd, 2048)  # nothing to read, and the read does not block
    finally:
        tap.close()
    assert not netns.exists(tap.name)
    tap.close()  # a second close does nothing


def test_a_named_tap_is_created_and_a_second_open_is_refused(netns: Netns) -> None:
    with netns.run(lambda: open_tap("kasou-a")) as tap:
        assert tap.name == "kasou-a" and tap.created
        with pytest.raises(HostError, match="TAP kasou-a is in use by another process"):
            netns.run(lambda: open_tap("kasou-a"))
    assert not netns.exists("kasou-a")


def test_an_existing_tap_is_attached_and_left_as_its_owner_made_it(netns: Netns) -> None:
    netns.ip("tuntap", "add", "dev", "mine0", "mode", "tap")
    netns.ip("link", "set", "dev", "mine0", "mtu", "9000")
    with netns.run(lambda: open_tap("mine0")) as tap:
        assert not tap.created
        assert tap.mtu == 9000
        assert "UP" not in netns.link("mine0")["flags"]  # its admin state is the owner's
    assert netns.exists("mine0")  # persistent: it outlives kasou


@pytest.mark.parametrize("kind", ["lo", "tun"])
def test_an_interface_that_is_not_a_tap_is_named(netns: Netns, kind: str) -> None:
    name = "lo"
    if kind == "tun":
        name = "tun7"
        netns.ip("tuntap", "add", "dev", name, "mode", "tun")
    with pytest.raises(HostError, match=f"{name} exists but is not a single-queue TAP"):
        netns.run(lambda: open_tap(name))


@pytest.mark.parametrize("name", ["", "a" * 16, "a/b", "a b", "eth:0", ".."])
def test_names_the_kernel_would_refuse_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="is not an interface name"):
        open_tap(name)


def test_no_tun_device_says_to_load_the_module(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"load the tun module \(modprobe tun\)"):
        open_tap(None, clone_device=str(tmp_path / "tun"))


def test_without_cap_net_admin_the_message_says_so() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, try, report the message
        os.close(read)
        message = b"opened"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)  # nobody
            open_tap("kasou-nobody")
        except HostError as error:
            message = str(error).encode()
        except BaseException as error:
            message = repr(error).encode()
        os.write(write, message)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        reported = pipe.read().decode()
    os.waitpid(pid, 0)
    assert "needs CAP_NET_ADMIN (run as root or give kasou the capability)" in reported


def test_offloads_are_set_and_an_impossible_set_is_explained(netns: Netns) -> None:
    with netns.run(lambda: open_tap(None)) as tap:
        assert isinstance(tap, Tap)
        tap.set_offload(csum=True, tso4=True, tso6=True, ecn=True)
        tap.set_offload()
        with pytest.raises(HostError, match="segmentation offloads need the checksum offload"):
            tap.set_offload(ufo=True)  # UFO without CSUM: the kernel says EINVAL
