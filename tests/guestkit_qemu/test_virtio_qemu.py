"""The guest kit's virtio driver against QEMU's virtio-mmio devices, under ``-M microvm``.

These prove the driver (src/kasou/guestkit/src/virtio.c, vwork.c) on a VMM other than
kasou, so the kvm tier's virtio tests (tests/kvm/test_virtio.py) can blame kasou for what
fails there. QEMU boots the kit's ELF as a Multiboot kernel; microvm has no i8042, so the
guest ends with a triple fault, which ``-no-reboot`` turns into QEMU's exit.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.guestkit import DONE_LINE, FAIL_PREFIX, GuestKitError, build_guest, vblk_pattern
from qemu_peer import QEMU, QemuRun, kvm_usable, run_guest

pytestmark = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")

SECTOR = 512
# QEMU's virtio-mmio transports are legacy (version 1) unless told otherwise.
MICROVM = ("-global", "virtio-mmio.force-legacy=false")

needs_kvm = pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm is missing or not accessible")


@pytest.fixture(scope="module")
def elf() -> Iterator[Path]:
    try:
        yield build_guest()
    except GuestKitError as exc:
        if shutil.which("gcc") is None:
            pytest.skip(str(exc))
        raise


def disk_args(path: Path, index: int, *, read_only: bool = False, serial: str = "") -> list[str]:
    drive = f"id=d{index},file={path},format=raw,if=none" + (",readonly=on" if read_only else "")
    device = f"virtio-blk-device,drive=d{index}" + (f",serial={serial}" if serial else "")
    return ["-drive", drive, "-device", device]


def microvm(elf: Path, cmdline: str, *devices: str, kvm: bool = False) -> QemuRun:
    run = run_guest(elf, cmdline, kvm=kvm, machine="microvm", extra=[*MICROVM, *devices])
    assert run.returncode == 0
    assert not any(text.startswith(FAIL_PREFIX) for text in run.texts), run.texts
    assert run.texts[-1] == DONE_LINE, run.texts
    return run


@pytest.mark.parametrize(
    ("kvm", "irq"),
    [
        (False, 0),
        (False, 1),
        pytest.param(True, 0, marks=[pytest.mark.kvm, needs_kvm]),
        pytest.param(True, 1, marks=[pytest.mark.kvm, needs_kvm]),
    ],
    ids=["tcg-polling", "tcg-interrupts", "kvm-polling", "kvm-interrupts"],
)
def test_vblk_reads_and_writes_the_disk_file(
    elf: Path, tmp_path: Path, kvm: bool, irq: int
) -> None:
    path = tmp_path / "disk.img"
    before = os.urandom(1 << 20)
    path.write_bytes(before)
    run = microvm(
        elf,
        f"kasou.test=vblk sector=4 count=20 irq={irq}",
        *disk_args(path, 0, serial="qemu-serial-1"),
        kvm=kvm,
    )
    assert run.texts[1:] == [
        f"vblk capacity={len(before) // SECTOR} blk_size=512 ro=0",
        "vblk serial=qemu-serial-1",
        f"vblk sector0 crc={zlib.crc32(before[:SECTOR]):#010x}",
        "vblk write sector=4 count=20 status=0",
        "vblk flush status=0",
        "vblk verify sector=4 count=20 ok",
        "vblk ok",
        DONE_LINE,
    ]
    after = path.read_bytes()
    assert after[4 * SECTOR : 24 * SECTOR] == vblk_pattern(4, 20)
    assert (
        after[: 4 * SECTOR] + after[24 * SECTOR :] == before[: 4 * SECTOR] + before[24 * SECTOR :]
    )


def test_vblk_read_only_disk_answers_a_write_with_ioerr(elf: Path, tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    before = os.urandom(1 << 20)
    path.write_bytes(before)
    run = microvm(elf, "kasou.test=vblk sector=4", *disk_args(path, 0, read_only=True))
    assert run.texts[1:] == [
        f"vblk capacity={len(before) // SECTOR} blk_size=512 ro=1",
        "vblk serial=",
        f"vblk sector0 crc={zlib.crc32(before[:SECTOR]):#010x}",
        "vblk ro-write status=1",
        "vblk ok",
        DONE_LINE,
    ]
    assert path.read_bytes() == before


def test_devices_are_found_in_command_line_order(elf: Path, tmp_path: Path) -> None:
    (tmp_path / "a.img").write_bytes(bytes(1 << 20))
    (tmp_path / "b.img").write_bytes(bytes(1 << 20))
    run = microvm(
        elf,
        "kasou.test=vlist",
        *disk_args(tmp_path / "a.img", 0),
        "-device",
        "virtio-rng-device",
        *disk_args(tmp_path / "b.img", 1),
    )
    ids = [text.split()[1] for text in run.texts if text.startswith("virtio id=")]
    assert ids == ["id=2", "id=4", "id=2"]
    assert "virtio devices=3" in run.texts


@pytest.mark.parametrize(
    "kvm", [False, pytest.param(True, marks=[pytest.mark.kvm, needs_kvm])], ids=["tcg", "kvm"]
)
def test_vrng_reads_entropy_twice(elf: Path, kvm: bool) -> None:
    run = microvm(elf, "kasou.test=vrng", "-device", "virtio-rng-device", kvm=kvm)
    first, second = (run.first(f"vrng {n} ").text.split()[2] for n in (1, 2))
    assert len(first) == len(second) == 128
    assert first != second
    assert "vrng ok" in run.texts


def test_bench_workload_counts_its_bytes(elf: Path, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    run = microvm(
        elf,
        "kasou.test=vblk-bench mode=randread size=4096 count=300 depth=8",
        *disk_args(path, 0),
    )
    assert run.first("vblk-bench start ").text == (
        "vblk-bench start mode=randread size=4096 count=300 depth=8 bytes=1228800"
    )
    end = run.first("vblk-bench end ").text.split()
    assert end[2] == "bytes=1228800"
    assert 1 <= int(end[3].removeprefix("notifies=")) <= 300


def test_a_missing_device_fails_with_a_reason(elf: Path) -> None:
    run = run_guest(elf, "kasou.test=vblk", machine="microvm", extra=MICROVM)
    assert run.texts[-1].startswith(FAIL_PREFIX + "no block device")
