"""kasou's virtio-mmio devices driven by the guest kit's own virtio driver, on /dev/kvm.

Each test boots one virtio workload of the guest kit (``kasou.guestkit``, ``src/vwork.c``)
with devices from ``VmConfig`` and checks what the guest printed against the host's side of
the device: the disk file, the TAP interface, the vsock Unix socket. The guest's driver is
proven separately against QEMU's devices (tests/guestkit_qemu/test_virtio_qemu.py), so a
failure here points at kasou.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.arch.x86_64 import layout
from kasou.guestkit import DONE_LINE, FAIL_PREFIX, VNET_ETHERTYPE, vblk_pattern
from kasou.vmm import ExitKind, Vm
from kasou.vmm.config import DiskConfig, NetConfig, VsockConfig

from .conftest import Booted, BootFactory

SECTOR = 512
VIRTIO_ID_NET, VIRTIO_ID_BLOCK, VIRTIO_ID_RNG = 1, 2, 4


def finished(vm: Booted) -> str:
    """The console once the guest has ended the VM; fails on the guest's own failure."""
    ending = vm.wait()
    text = vm.console.text
    assert FAIL_PREFIX not in text, text
    assert DONE_LINE in text, text
    assert ending.kind is ExitKind.REBOOT, (ending, text)  # the guest kit ends with a reset
    return text


def line(text: str, prefix: str) -> str:
    """The one line of ``text`` that starts with ``prefix``."""
    found = [each for each in text.splitlines() if each.startswith(prefix)]
    assert len(found) == 1, f"{prefix!r} in {text!r}"
    return found[0]


def make_disk(path: Path, size: int = 1 << 20) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


# --- discovery ---------------------------------------------------------------------------


def test_devices_sit_at_kasous_windows_and_interrupt_lines_in_configured_order(
    boot: BootFactory, tmp_path: Path
) -> None:
    make_disk(tmp_path / "a.img")
    make_disk(tmp_path / "b.img")
    disks = (DiskConfig(tmp_path / "a.img"), DiskConfig(tmp_path / "b.img"))
    text = finished(boot("vlist", settings={"disks": disks, "rng": True}))
    found = re.findall(
        r"^virtio id=(\d+) base=(0x[0-9a-f]+) vendor=\S+ ioapic=(\S+) pin=(\d+)$", text, re.M
    )
    assert [(int(i), int(b, 16), int(a, 16), int(p)) for i, b, a, p in found] == [
        (ident, layout.virtio_mmio_address(slot), layout.IOAPIC_ADDRESS, layout.VIRTIO_IRQS[slot])
        for slot, ident in enumerate((VIRTIO_ID_BLOCK, VIRTIO_ID_BLOCK, VIRTIO_ID_RNG))
    ]
    assert "virtio devices=3" in text


# --- block -------------------------------------------------------------------------------


@pytest.mark.parametrize("irq", [0, 1], ids=["polling", "interrupts"])
def test_blk_guest_reads_the_host_file_and_its_writes_land_there(
    boot: BootFactory, tmp_path: Path, irq: int
) -> None:
    path = tmp_path / "disk.img"
    before = make_disk(path)
    disk = DiskConfig(path, serial="kasou-serial-01")
    vm = boot("vblk", settings={"disks": (disk,), "rng": False}, sector=4, count=20, irq=irq)
    text = finished(vm)

    assert (
        line(text, "vblk capacity=") == f"vblk capacity={len(before) // SECTOR} blk_size=512 ro=0"
    )
    assert line(text, "vblk serial=") == "vblk serial=kasou-serial-01"
    # The test's bytes reach the guest: sector 0 as the guest read it.
    assert (
        line(text, "vblk sector0 crc=") == f"vblk sector0 crc={zlib.crc32(before[:SECTOR]):#010x}"
    )
    assert "vblk flush status=0" in text
    assert "vblk verify sector=4 count=20 ok" in text
    # The guest's bytes reach the file, and nothing else changed.
    after = path.read_bytes()
    assert after[4 * SECTOR : 24 * SECTOR] == vblk_pattern(4, 20)
    assert after[: 4 * SECTOR] == before[: 4 * SECTOR]
    assert after[24 * SECTOR :] == before[24 * SECTOR :]


def test_blk_read_only_disk_refuses_a_write_with_ioerr(boot: BootFactory, tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    before = make_disk(path)
    disk = DiskConfig(path, read_only=True)
    text = finished(boot("vblk", settings={"disks": (disk,), "rng": False}, sector=4))
    assert line(text, "vblk capacity=").endswith(" ro=1")
    assert (
        line(text, "vblk sector0 crc=") == f"vblk sector0 crc={zlib.crc32(before[:SECTOR]):#010x}"
    )
    assert "vblk ro-write status=1" in text
    assert path.read_bytes() == before


def test_blk_serial_defaults_to_an_empty_id(boot: BootFactory, tmp_path: Path) -> None:
    make_disk(tmp_path / "disk.img")
    text = finished(boot("vblk", settings={"disks": (DiskConfig(tmp_path / "disk.img"),)}))
    assert line(text, "vblk serial") == "vblk serial="


def test_malformed_chains_are_refused_and_the_other_disk_keeps_working(
    boot: BootFactory, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    make_disk(first)
    before = make_disk(second)
    disks = (DiskConfig(first), DiskConfig(second))
    vm = boot("vbad", settings={"disks": disks, "rng": False}, sector=3)
    text = finished(vm)
    outcomes = dict(re.findall(r"^vbad (\S+) (.*)$", text, re.M))
    for case in ("outside-ram", "loop", "readonly-status", "longer-than-queue", "indirect-length"):
        # Refused: returned unused (len 0) or with IOERR/UNSUPP, or the device needs a reset.
        outcome = outcomes.get(case, "missing")
        used = re.fullmatch(r"used len=(\d+) status=(\d+)", outcome)
        refused = outcome == "needs-reset" or (
            used is not None and (used.group(1) == "0" or used.group(2) in ("1", "2"))
        )
        assert refused, f"{case}: {outcome}\n{text}"
    assert "vbad first-device ok" in text
    assert "vbad second-device ok" in text
    assert "vbad ok" in text
    after = second.read_bytes()
    assert after[3 * SECTOR : 4 * SECTOR] == vblk_pattern(3, 1)
    assert after[: 3 * SECTOR] == before[: 3 * SECTOR]


# --- rng ---------------------------------------------------------------------------------


def test_rng_gives_two_different_blocks_of_entropy(boot: BootFactory) -> None:
    text = finished(boot("vrng", settings={"rng": True}))
    first = line(text, "vrng 1 ").split()[2]
    second = line(text, "vrng 2 ").split()[2]
    assert len(first) == len(second) == 128
    assert first != second
    assert "vrng ok" in text


# --- net ---------------------------------------------------------------------------------

GUEST_MAC = "52:54:00:6b:73:01"
HOST_MAC = bytes.fromhex("02006b730002")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


needs_tap = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or shutil.which("ip") is None,
    reason="TAP interfaces need root, /dev/net/tun and iproute2",
)


def _tap_name(tag: str) -> str:
    return f"kvt{os.getpid() % 100000}{tag}"[:15]  # IFNAMSIZ - 1


def _frames_on(name: str) -> socket.socket:
    """A packet socket on interface ``name`` for the vnet workload's ethertype: what the
    guest sends out of the TAP arrives here, what is sent here goes to the guest."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(VNET_ETHERTYPE))
    sock.bind((name, VNET_ETHERTYPE))
    sock.settimeout(60)
    return sock


def _talk_to_guest(vm: Booted, sock: socket.socket) -> None:
    """Reads the guest's frame from the TAP and answers it."""
    frame = sock.recv(2048)
    guest = bytes.fromhex(GUEST_MAC.replace(":", ""))
    assert frame[:6] == b"\xff" * 6
    assert frame[6:12] == guest
    assert frame[12:14] == VNET_ETHERTYPE.to_bytes(2, "big")
    assert frame[14:].rstrip(b"\0") == b"kasou-ping"
    assert len(frame) == 60  # padded to Ethernet's minimum
    reply = guest + HOST_MAC + VNET_ETHERTYPE.to_bytes(2, "big") + b"kasou-pong".ljust(46, b"\0")
    sock.send(reply)
    text = finished(vm)
    assert line(text, "vnet mac=") == f"vnet mac={GUEST_MAC}"
    assert "vnet tx len=60" in text
    assert line(text, "vnet rx ") == f"vnet rx len=60 src={HOST_MAC.hex(':')} payload=kasou-pong"


@needs_tap
def test_net_frames_cross_a_tap_the_test_created(boot: BootFactory) -> None:
    name = _tap_name("a")
    _ip("tuntap", "add", "dev", name, "mode", "tap")
    try:
        _ip("link", "set", name, "up")
        with _frames_on(name) as sock:
            net = NetConfig(tap=name, mac=GUEST_MAC)
            vm = boot("vnet", settings={"nets": (net,), "rng": False}, payload="kasou-ping")
            _talk_to_guest(vm, sock)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True, timeout=30)


@needs_tap
def test_net_frames_cross_a_tap_kasou_created(boot: BootFactory) -> None:
    name = _tap_name("b")
    sockets: list[socket.socket] = []

    def link_up(vm: Vm) -> None:
        # kasou made the TAP while building the VM; it must be up to carry frames.
        _ip("link", "set", name, "up")
        sockets.append(_frames_on(name))

    net = NetConfig(tap=name, mac=GUEST_MAC)
    vm = boot(
        "vnet",
        settings={"nets": (net,), "rng": False},
        before_start=link_up,
        payload="kasou-ping",
    )
    with sockets[0] as sock:
        _talk_to_guest(vm, sock)


# --- vsock -------------------------------------------------------------------------------


class EchoServer:
    """Listens on ``<uds>_<port>`` (where kasou forwards a guest connection to host port
    ``port``), echoes what one connection sends until it closes."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.received = b""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
            with connection:
                connection.settimeout(60)
                while chunk := connection.recv(4096):
                    self.received += chunk
                    connection.sendall(chunk)
        except BaseException as error:  # reported by the test
            self.error = error

    def close(self) -> None:
        self.listener.close()
        self.thread.join(60)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A folder with a short path: Unix socket paths stop at 108 bytes."""
    folder = Path(f"/tmp/kasou-vsock-{os.getpid()}")
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_vsock_connects_to_the_host_and_gets_its_echo(boot: BootFactory, short_tmp: Path) -> None:
    uds = short_tmp / "v.sock"
    server = EchoServer(Path(f"{uds}_5000"))
    try:
        vsock = VsockConfig(cid=7, uds=uds)
        vm = boot(
            "vsock",
            settings={"vsock": vsock, "rng": False},
            port=5000,
            lport=40000,
            payload="kasou-vsock-echo",
        )
        text = finished(vm)
    finally:
        server.close()
    assert server.error is None, server.error
    assert server.received == b"kasou-vsock-echo"
    assert "vsock guest_cid=7" in text
    assert line(text, "vsock connected ").startswith("vsock connected port=5000 lport=40000 ")
    assert "vsock tx len=16" in text
    assert "vsock rx len=16 data=kasou-vsock-echo" in text
    assert "vsock closed by=host" in text  # virtio 1.2 §5.10.6.6: the peer answers with RST
    assert "vsock ok" in text


def test_vsock_connection_to_a_port_nobody_listens_on_is_reset(
    boot: BootFactory, short_tmp: Path
) -> None:
    vsock = VsockConfig(cid=8, uds=short_tmp / "v.sock")
    vm = boot("vsock", settings={"vsock": vsock, "rng": False}, port=5001)
    vm.console.wait_for(FAIL_PREFIX)
    ending = vm.wait()
    assert "vsock: the host refused port 5001 (RST)" in vm.console.text
    assert ending.kind is ExitKind.REBOOT
