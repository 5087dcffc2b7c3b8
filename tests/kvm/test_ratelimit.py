"""Rate limits seen from a guest: the guest kit's vblk-bench against a limited disk and the
vnet workload behind a limited interface move what the limit allows (within 10 %), and a
limit changed through the control socket takes effect while the guest runs.

Rates are timed on the host between two lines the guest prints (or, for receive, from the
first frame the host sends to the guest's line for the last). Each run takes a few seconds:
the bucket's initial ``WINDOW`` of tokens is a few percent of that.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kasou.devices.ratelimit import RateLimit
from kasou.guestkit import VNET_ETHERTYPE, cmdline
from kasou.vmm.config import DiskConfig, NetConfig

from .conftest import BootFactory
from .test_virtio import _frames_on, _ip, _tap_name, finished, line, make_disk, needs_tap

KASOU = str(Path(sys.executable).with_name("kasou"))
TOLERANCE = 0.10


def timed_bench(boot: BootFactory, disk: DiskConfig, **bench: int | str) -> tuple[int, float]:
    vm = boot("vblk-bench", settings={"disks": (disk,)}, **bench)
    vm.console.wait_for("vblk-bench start")
    started = time.monotonic()
    vm.console.wait_for("vblk-bench end")
    elapsed = time.monotonic() - started
    text = finished(vm)
    total = int(line(text, "vblk-bench end").split()[2].removeprefix("bytes="))
    return total, elapsed


def test_a_disk_limited_in_bandwidth_moves_that_many_bytes_a_second(
    boot: BootFactory, tmp_path: Path
) -> None:
    path = tmp_path / "disk.img"
    make_disk(path, 16 << 20)
    limit = 4 << 20
    disk = DiskConfig(path, rate=RateLimit(bandwidth=limit))
    total, elapsed = timed_bench(boot, disk, mode="read", size=65536, count=192, depth=4)
    rate = total / elapsed
    print(f"\nbw limit {limit} B/s: measured {rate:,.0f} B/s over {elapsed:.2f} s")
    assert abs(rate - limit) <= TOLERANCE * limit


def test_a_disk_limited_in_iops_serves_that_many_requests_a_second(
    boot: BootFactory, tmp_path: Path
) -> None:
    path = tmp_path / "disk.img"
    make_disk(path, 4 << 20)
    limit = 200
    disk = DiskConfig(path, rate=RateLimit(ops=limit))
    total, elapsed = timed_bench(boot, disk, mode="randread", size=4096, count=600, depth=4)
    rate = total / 4096 / elapsed
    print(f"\niops limit {limit}/s: measured {rate:,.1f}/s over {elapsed:.2f} s")
    assert abs(rate - limit) <= TOLERANCE * limit


@needs_tap
@pytest.mark.parametrize(
    ("limit", "expected"),
    [(RateLimit(ops=100), 100.0), (RateLimit(bandwidth=100_000), 100.0)],
    ids=["rx-pps", "rx-bw"],
)
def test_an_interface_limited_on_receive_delivers_that_many_frames_a_second(
    boot: BootFactory, limit: RateLimit, expected: float
) -> None:
    name = _tap_name("r")
    _ip("tuntap", "add", "dev", name, "mode", "tap")
    try:
        _ip("link", "set", name, "up")
        with _frames_on(name) as sock:
            net = NetConfig(tap=name, mac="52:54:00:6b:73:01", rx_rate=limit)
            vm = boot("vnet", settings={"nets": (net,)}, payload="kasou-ping")
            sock.recv(2048)  # the guest's frame: its receive buffers are posted
            guest = bytes.fromhex("5254006b7301")
            kind = VNET_ETHERTYPE.to_bytes(2, "big")
            other = (VNET_ETHERTYPE + 1).to_bytes(2, "big")
            frames = [guest + bytes(6) + other + bytes(986)] * 250  # 1000 bytes, skipped
            frames.append(guest + bytes(6) + kind + b"kasou-last".ljust(986, b"\0"))
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            with raw:
                raw.bind((name, 0))
                started = time.monotonic()
                for frame in frames:
                    raw.send(frame)
                vm.console.wait_for("vnet rx ")
            elapsed = time.monotonic() - started
            text = finished(vm)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True, timeout=30)
    assert "payload=kasou-last" in line(text, "vnet rx ")
    # The host may send a frame of its own (IPv6 neighbour discovery) to a new link.
    assert int(line(text, "vnet skipped=").split("=")[1]) >= 250
    rate = len(frames) / elapsed
    print(f"\nrx limit {limit}: measured {rate:,.1f} frames/s over {elapsed:.2f} s")
    assert abs(rate - expected) <= TOLERANCE * expected


def test_a_limit_changed_through_the_control_socket_takes_effect_at_once(
    guest_elf: Path, tmp_path: Path
) -> None:
    path = tmp_path / "disk.img"
    make_disk(path, 8 << 20)
    sock = tmp_path / "vm.sock"
    # 4 MiB at 128 KiB/s would take 32 s; lifted to 64 MiB/s, the rest goes at once.
    bench = cmdline("vblk-bench", mode="read", size=65536, count=64, depth=2)
    process = subprocess.Popen(
        [
            KASOU,
            "run",
            "--kernel",
            str(guest_elf),
            "--memory",
            "64M",
            "--cmdline",
            bench,
            "--disk",
            f"{path},bw=128K",
            "--api-sock",
            str(sock),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    lines: list[tuple[float, str]] = []
    started = threading.Event()

    def read_console() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            lines.append((time.monotonic(), raw.decode(errors="replace")))
            if "vblk-bench start" in lines[-1][1]:
                started.set()

    reader = threading.Thread(target=read_console, daemon=True)
    reader.start()
    try:
        assert started.wait(60), lines
        throttled = subprocess.run(
            [KASOU, "rate-limit", "--sock", str(sock), "block0"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert throttled.returncode == 0, throttled.stderr
        assert json.loads(throttled.stdout)["rate_limit"]["bandwidth"] == 128 << 10
        changed_at = time.monotonic()
        changed = subprocess.run(
            [KASOU, "rate-limit", "--sock", str(sock), "block0", "--bw", "64M"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert changed.returncode == 0, changed.stderr
        reply = json.loads(changed.stdout)["rate_limit"]
        assert reply["bandwidth"] == 64 << 20
        assert reply["delayed"] >= 1 and reply["throttled_seconds"] > 0
        bad = subprocess.run(
            [KASOU, "rate-limit", "--sock", str(sock), "block0", "--bw", "-1M"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert bad.returncode == 2 and bad.stderr.count(b"\n") == 1, bad.stderr
        assert process.wait(30) == 0
        reader.join(10)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    ends = [at for at, text in lines if "vblk-bench end" in text]
    assert ends, lines
    print(f"\nafter the change the bench ended in {ends[0] - changed_at:.2f} s")
    assert ends[0] - changed_at < 5  # 32 s at the old limit


@needs_tap
@pytest.mark.parametrize(
    "limit",
    [RateLimit(ops=100), RateLimit(bandwidth=12_800)],  # 128-byte frames: 100 a second
    ids=["tx-pps", "tx-bw"],
)
def test_an_interface_limited_on_transmit_sends_that_many_frames_a_second(
    boot: BootFactory, limit: RateLimit
) -> None:
    """The guest sends 251 frames of 128 bytes, one in flight; they reach the TAP at the
    limit's pace, timed by the host from the first to the last."""
    name = _tap_name("t")
    _ip("tuntap", "add", "dev", name, "mode", "tap")
    payload = "kasou-tx".ljust(114, "x")  # 14 + 114 = 128 bytes on the wire
    try:
        _ip("link", "set", name, "up")
        with _frames_on(name) as sock:
            net = NetConfig(tap=name, mac="52:54:00:6b:73:02", tx_rate=limit)
            vm = boot("vnet", settings={"nets": (net,)}, payload=payload, count=251)
            arrivals = []
            while len(arrivals) < 251:
                frame = sock.recv(2048)
                assert frame[14:].decode() == payload  # intact, none dropped
                arrivals.append(time.monotonic())
            guest = bytes.fromhex("5254006b7302")
            sock.send(guest + bytes(6) + VNET_ETHERTYPE.to_bytes(2, "big") + bytes(46))
            text = finished(vm)
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True, timeout=30)
    assert "vnet tx len=128 count=251" in text
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(
        f"\ntx limit {limit}: measured {rate:,.1f} frames/s over {arrivals[-1] - arrivals[0]:.2f} s"
    )
    assert abs(rate - 100) <= TOLERANCE * 100
