"""Raw disk images (kasou.disk): guest reads and writes land byte for byte in the file,
checked with the file itself and with qemu-io, on regular files and on a loop device."""

from __future__ import annotations

import fcntl
import mmap
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kasou.disk import DiskError, RawDisk, create_qcow2, open_disk

needs_qemu_io = pytest.mark.skipif(
    shutil.which("qemu-io") is None, reason="qemu-io missing (apt-get install qemu-utils)"
)

MIB = 1 << 20


def read(disk: RawDisk, offset: int, length: int, pieces: int = 1) -> bytes:
    """Read through ``pieces`` separate buffers, as a scatter list from the guest would."""
    buffers = [bytearray(length // pieces) for _ in range(pieces - 1)]
    buffers.append(bytearray(length - sum(map(len, buffers))))
    disk.readv(offset, [memoryview(buffer) for buffer in buffers])
    return b"".join(buffers)


def raw_file(tmp_path: Path, size: int = MIB, name: str = "disk.raw") -> Path:
    path = tmp_path / name
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def open_raw(path: Path, read_only: bool = False) -> RawDisk:
    disk = open_disk(path, read_only=read_only)
    assert isinstance(disk, RawDisk)
    return disk


def test_writes_from_several_buffers_land_in_the_file(tmp_path: Path) -> None:
    path = raw_file(tmp_path)
    with open_raw(path) as disk:
        disk.writev(4096 + 3, [memoryview(b"abc"), memoryview(b""), memoryview(b"defg" * 1000)])
        assert read(disk, 4096, 4006, pieces=3) == b"\0\0\0abc" + b"defg" * 1000
    data = path.read_bytes()
    assert data[4099:4102] == b"abc"
    assert data[4102 : 4102 + 4000] == b"defg" * 1000
    assert len(data) == MIB


def test_reads_go_straight_into_views_of_a_mapping(tmp_path: Path) -> None:
    """Guest RAM is an mmap; the disk reads into and writes from views of it directly."""
    path = raw_file(tmp_path)
    path.write_bytes(bytes(range(256)) * 4096)
    ram = mmap.mmap(-1, 3 * 4096)
    view = memoryview(ram)
    try:
        with open_raw(path) as disk:
            disk.readv(256, [view[100:612], view[4096 : 4096 + 256]])
            assert bytes(view[100:612]) == bytes(range(256)) * 2
            assert bytes(view[4096:4352]) == bytes(range(256))
            view[8192 : 8192 + 512] = b"\xee" * 512
            disk.writev(512, [view[8192 : 8192 + 512]])
    finally:
        view.release()
        ram.close()
    assert path.read_bytes()[512:1024] == b"\xee" * 512


def test_a_file_that_is_not_whole_sectors_reads_zeros_to_the_next_sector(
    tmp_path: Path,
) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x01" * 1000)
    with open_raw(path) as disk:
        assert disk.size == 1024
        assert read(disk, 512, 512) == b"\x01" * 488 + bytes(24)
        disk.writev(1000, [memoryview(b"\x02" * 24)])
    assert path.read_bytes() == b"\x01" * 1000 + b"\x02" * 24


@pytest.mark.parametrize(("offset", "length"), [(MIB - 511, 512), (MIB, 1), (-512, 512)])
def test_a_request_outside_the_disk_is_refused(tmp_path: Path, offset: int, length: int) -> None:
    with open_raw(raw_file(tmp_path)) as disk:
        with pytest.raises(DiskError, match="outside the disk"):
            disk.readv(offset, [memoryview(bytearray(length))])
        with pytest.raises(DiskError, match="outside the disk"):
            disk.writev(offset, [memoryview(bytes(length))])
        with pytest.raises(DiskError, match="outside the disk"):
            disk.discard(offset, length)
    assert os.path.getsize(tmp_path / "disk.raw") == MIB  # nothing written past the end


def test_a_read_only_disk_refuses_every_change(tmp_path: Path) -> None:
    path = raw_file(tmp_path)
    path.chmod(0o444)  # root ignores permissions; O_RDONLY is what makes it safe
    with open_raw(path, read_only=True) as disk:
        assert disk.read_only
        changes: list[Callable[[], None]] = [
            lambda: disk.writev(0, [memoryview(b"x")]),
            lambda: disk.discard(0, 512),
            lambda: disk.write_zeroes(0, 512, False),
        ]
        for change in changes:
            with pytest.raises(DiskError, match="read-only"):
                change()
        assert read(disk, 0, 512) == bytes(512)
        flags = fcntl.fcntl(disk.fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY


def test_the_image_is_opened_close_on_exec(tmp_path: Path) -> None:
    with open_raw(raw_file(tmp_path)) as disk:
        assert fcntl.fcntl(disk.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_discard_punches_a_hole_that_reads_as_zeros(tmp_path: Path) -> None:
    path = raw_file(tmp_path, 4 * MIB)
    with open_raw(path) as disk:
        disk.writev(0, [memoryview(b"\x55" * 4 * MIB)])
        disk.flush()
        before = os.stat(path).st_blocks
        disk.discard(MIB, 2 * MIB)
        assert os.stat(path).st_blocks <= before - (2 * MIB) // 512
        assert read(disk, MIB - 1, 2 * MIB + 2) == b"\x55" + bytes(2 * MIB) + b"\x55"
        # An unaligned discard still zeroes exactly its range.
        disk.discard(100, 1000)
        assert read(disk, 0, 2048) == b"\x55" * 100 + bytes(1000) + b"\x55" * 948
    assert os.path.getsize(path) == 4 * MIB


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes_zeroes_exactly_its_range(tmp_path: Path, unmap: bool) -> None:
    path = raw_file(tmp_path)
    with open_raw(path) as disk:
        disk.writev(0, [memoryview(b"\xff" * MIB)])
        disk.write_zeroes(4095, 8194, unmap)
        assert read(disk, 4094, 8196) == b"\xff" + bytes(8194) + b"\xff"
    assert os.path.getsize(path) == MIB


def test_a_flushed_write_survives_kill_9(tmp_path: Path) -> None:
    path = raw_file(tmp_path)
    script = (
        "import os, signal, sys\n"
        "from kasou.disk import open_disk\n"
        "disk = open_disk(sys.argv[1])\n"
        "disk.writev(8192, [memoryview(b'durable' * 100)])\n"
        "disk.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], check=False)
    assert result.returncode == -signal.SIGKILL
    assert path.read_bytes()[8192 : 8192 + 700] == b"durable" * 100


def test_the_format_is_probed_from_the_qcow2_magic(tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    create_qcow2(qcow2, MIB)
    with open_disk(qcow2) as disk:
        assert disk.format == "qcow2"
    with open_disk(qcow2, format="raw") as disk:
        assert disk.format == "raw"
        assert disk.size == os.path.getsize(qcow2)
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"QFI" + bytes(509))  # not quite the magic
    with open_disk(raw) as disk:
        assert disk.format == "raw"


def test_what_cannot_be_opened_is_named(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"cannot open disk image .*missing.raw: No such file"):
        open_disk(tmp_path / "missing.raw")
    with pytest.raises(DiskError, match="not a regular file or block device"):
        open_disk("/dev/null", read_only=True)
    with pytest.raises(DiskError, match="unknown disk format 'vmdk'"):
        open_disk(raw_file(tmp_path), format="vmdk")


def test_a_closed_disk_says_so(tmp_path: Path) -> None:
    disk = open_raw(raw_file(tmp_path))
    disk.close()
    disk.close()  # twice is harmless
    with pytest.raises(DiskError, match="closed"):
        disk.readv(0, [memoryview(bytearray(512))])


@needs_qemu_io
def test_qemu_io_and_kasou_see_the_same_bytes(tmp_path: Path) -> None:
    path = raw_file(tmp_path)
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4k 64k",
            "-c",
            "write -P 0x12 300k 5k",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    with open_raw(path) as disk:
        assert read(disk, 4096, 65536, pieces=7) == b"\xab" * 65536
        assert read(disk, 300 * 1024, 5120) == b"\x12" * 5120
        disk.writev(500 * 1024, [memoryview(b"\xcd" * 3000), memoryview(b"\xcd" * 1096)])
    verify = subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xcd 500k 4k",
            "-c",
            "read -P 0xab 4k 64k",
            str(path),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    assert "Pattern verification failed" not in verify.stdout + verify.stderr


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    """A loop device over an 8 MiB file (root and util-linux's losetup needed)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup")
    backing = raw_file(tmp_path, 8 * MIB, "loop.raw")
    made = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"losetup could not attach a loop device: {made.stderr.strip()}")
    device = made.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


def test_a_block_device_is_a_raw_disk_of_its_size(loop_device: str) -> None:
    with open_raw(Path(loop_device)) as disk:
        assert disk.block_device
        assert disk.size == 8 * MIB
        disk.writev(512, [memoryview(b"\x5a" * 4096)])
        disk.write_zeroes(1024, 1000, False)  # partly whole sectors (BLKZEROOUT), partly not
        assert read(disk, 0, 5120) == bytes(512) + b"\x5a" * 512 + bytes(
            1000
        ) + b"\x5a" * 2584 + bytes(512)
        disk.discard(0, 8 * MIB)  # a hint on a device: accepted
        with pytest.raises(DiskError, match="outside the disk"):
            disk.readv(8 * MIB, [memoryview(bytearray(512))])
