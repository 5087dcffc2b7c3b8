"""kasoud's backups copy the VM's disks while it is paused, so a restore runs on the disks
as they were at the backup, never on the user's file as it is now.

The guest is the guest kit's ``vblk-watch`` workload: it reads sector 0 of its disk again
and again and prints the CRC-32 of what it read. A VM brought back from a backup goes on
reading, so its lines after the restore tell which content its disk has.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kasou.daemon import Daemon
from kasou.disk import create_overlay
from kasou.guestkit import FAIL_PREFIX, cmdline
from kasou.spec import BackupDisk, VmSpec, VmState

MIB = 1 << 20
SECTOR = 512
WATCH = re.compile(r"vblk-watch read=(\d+) crc=0x([0-9a-f]{8})\n")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="kd"))  # sockets: keep it short
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    opened = Daemon.open(state_dir)
    yield opened
    opened.close(stop_vms=True)


def _watcher(name: str, kernel: Path, disk: str) -> VmSpec:
    return VmSpec(
        name=name,
        kernel=str(kernel),
        memory="64M",
        cmdline="console=ttyS0 " + cmdline("vblk-watch", every=16),
        disks=[disk],
    )


def _pattern(letter: bytes) -> bytes:
    return letter * SECTOR


def _crc(data: bytes) -> str:
    return f"{zlib.crc32(data):08x}"


def _write_sector0(path: Path, data: bytes) -> None:
    with path.open("r+b") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


def _until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling a file the VM writes; the deadline decides


def _seen(daemon: Daemon, name: str, start: int = 0) -> list[str]:
    """The CRCs ``name`` printed after byte ``start`` of its console log."""
    path = daemon.paths(name).console_log
    text = path.read_bytes()[start:].decode(errors="replace") if path.exists() else ""
    assert FAIL_PREFIX not in text, text
    return [crc for _, crc in WATCH.findall(text)]


def _reads(daemon: Daemon, name: str, count: int, start: int = 0) -> list[str]:
    _until(f"{count} reads of {name}", lambda: len(_seen(daemon, name, start)) >= count)
    return _seen(daemon, name, start)


def _log_size(daemon: Daemon, name: str) -> int:
    path = daemon.paths(name).console_log
    return path.stat().st_size if path.exists() else 0


def test_a_restore_sees_the_disk_as_it_was_at_the_backup(
    daemon: Daemon, guest_elf: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "data.raw"
    disk.write_bytes(_pattern(b"A") + bytes(MIB - SECTOR))
    a, b = _crc(_pattern(b"A")), _crc(_pattern(b"B"))
    daemon.create(_watcher("src", guest_elf, f"{disk},format=raw"), start=True)
    assert set(_reads(daemon, "src", 2)) == {a}

    backup = daemon.backups.create("src")
    copy_sha = hashlib.sha256(disk.read_bytes()).hexdigest()
    assert backup.disks == [BackupDisk(path=str(disk), file="disk0.raw", size=MIB, sha256=copy_sha)]
    # The user's file changes after the backup; the running VM reads the change.
    _write_sector0(disk, _pattern(b"B"))
    _until("src to read pattern B", lambda: _seen(daemon, "src")[-1] == b)

    copy = daemon.backups.restore("src", backup.id, "copy")
    assert copy.state is VmState.RUNNING
    assert set(_reads(daemon, "copy", 3)) == {a}  # the backup's disk, not the user's file

    restored = daemon.backups.restore("src", backup.id, None)  # into itself
    assert restored.state is VmState.RUNNING
    # Counted once the old process has ended (the restore stopped it): what follows in the
    # log is the restored VM's alone.
    start = _log_size(daemon, "src")
    assert set(_reads(daemon, "src", 3, start)) == {a}

    assert disk.read_bytes()[:SECTOR] == _pattern(b"B")  # neither restore wrote it
    assert daemon.backups.verify("src", backup.id)["ok"]


def test_a_sparse_disk_takes_only_its_data_in_a_backup(
    daemon: Daemon, guest_elf: Path, tmp_path: Path
) -> None:
    disk = tmp_path / "big.raw"
    with disk.open("wb") as out:
        out.truncate(256 * MIB)
        out.write(_pattern(b"A"))
        out.seek(128 * MIB)
        out.write(os.urandom(4 * MIB - SECTOR))
    daemon.create(_watcher("big", guest_elf, str(disk)), start=True)
    _reads(daemon, "big", 1)

    backup = daemon.backups.create("big")

    folder = daemon.backups.path("big", backup.id)
    copied = folder / "disk0.raw"
    assert copied.stat().st_size == 256 * MIB
    assert copied.stat().st_blocks * 512 <= 5 * MIB
    memory = (folder / "memory.bin").stat().st_blocks * 512
    assert backup.size <= memory + 6 * MIB
    assert backup.disks is not None and backup.disks[0].sha256 == (
        hashlib.sha256(disk.read_bytes()).hexdigest()
    )


def test_a_qcow2_disk_over_a_relative_backing_file_comes_back(
    daemon: Daemon, guest_elf: Path, tmp_path: Path
) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(_pattern(b"A") + bytes(MIB - SECTOR))
    create_overlay(top, "base.raw")  # stored relative: the copy in the backup must still find it
    daemon.create(_watcher("layered", guest_elf, str(top)), start=True)
    a = _crc(_pattern(b"A"))
    assert set(_reads(daemon, "layered", 1)) == {a}

    backup = daemon.backups.create("layered")
    daemon.delete("layered", force=True)
    top.unlink()  # the user's top image is gone; the backup holds its copy

    copy = daemon.backups.restore("layered", backup.id, "again")
    assert copy.state is VmState.RUNNING
    assert set(_reads(daemon, "again", 2)) == {a}


def test_a_restored_vm_is_backed_up_and_restored_again(
    daemon: Daemon, guest_elf: Path, tmp_path: Path
) -> None:
    """A restored VM runs on an overlay over its backup's copy, kept in its own folder:
    its backup takes that copy along, and restoring it into the same VM, which replaces
    that folder, still finds it."""
    disk = tmp_path / "data.raw"
    disk.write_bytes(_pattern(b"A") + bytes(MIB - SECTOR))
    a = _crc(_pattern(b"A"))
    daemon.create(_watcher("first", guest_elf, str(disk)), start=True)
    _reads(daemon, "first", 1)
    daemon.backups.restore("first", daemon.backups.create("first").id, "second")
    _reads(daemon, "second", 1)

    again = daemon.backups.create("second")
    assert again.disks is not None and again.disks[0].file == "disk0.qcow2"
    # The overlay's backing file (the first backup's copy) came along.
    assert (daemon.backups.path("second", again.id) / "disk0.1.raw").is_file()
    _write_sector0(disk, _pattern(b"B"))
    start = _log_size(daemon, "second")
    restored = daemon.backups.restore("second", again.id, None)
    assert restored.state is VmState.RUNNING, restored.message
    assert set(_reads(daemon, "second", 2, start)) == {a}


def test_a_killed_restored_vm_leaves_no_scratch_behind(
    daemon: Daemon, guest_elf: Path, tmp_path: Path
) -> None:
    """A restore's throw-away overlay lives in the VM's folder: a forced delete (SIGKILL, no
    cleanup by the VM process) takes it too, and nothing of the VM's is left in /tmp."""
    disk = tmp_path / "data.raw"
    disk.write_bytes(_pattern(b"A") + bytes(MIB - SECTOR))
    daemon.create(_watcher("src", guest_elf, f"{disk},format=raw"), start=True)
    _reads(daemon, "src", 2)
    backup = daemon.backups.create("src")
    clone = daemon.backups.restore("src", backup.id, "clone")
    assert clone.pid is not None
    folder = daemon.paths("clone").dir
    overlays = list(folder.glob(f"kasou-restore-{clone.pid}-*/disk0.qcow2"))
    assert len(overlays) == 1, sorted(path.name for path in folder.iterdir())
    daemon.delete("clone", force=True)
    assert not folder.exists()
    leftovers = list(Path(tempfile.gettempdir()).glob(f"kasou-*-{clone.pid}-*"))
    assert leftovers == []
