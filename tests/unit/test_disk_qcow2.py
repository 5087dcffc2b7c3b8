"""qcow2 images (kasou.disk): what kasou reads and writes is what qemu-img and qemu-io read
and write on the same files, and ``qemu-img check`` finds no errors and no leaks afterwards.

The reference for every byte is QEMU itself: images are made and filled with qemu-img and
qemu-io, read back with ``qemu-img convert -O raw``, and checked with ``qemu-img check``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasou.disk import (
    MAX_CHAIN,
    Disk,
    DiskError,
    Qcow2Disk,
    create_overlay,
    create_qcow2,
    inspect_disk,
    open_disk,
)

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io missing (apt-get install qemu-utils)",
)

KIB = 1024
MIB = 1 << 20


# -- helpers ------------------------------------------------------------------------------


def qemu_img(*args: str | Path) -> str:
    result = subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> None:
    """Run qemu-io commands (``write -P 0xab 0 64k``) on ``image``."""
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, str(image)], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "failed" not in result.stdout, result.stdout + result.stderr


def check(image: Path) -> dict[str, Any]:
    """``qemu-img check``'s report on ``image``, asserting no errors and no leaks."""
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    report: dict[str, Any] = json.loads(result.stdout) if result.stdout else {}
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    assert report.get("corruptions", 0) == 0 and report.get("leaks", 0) == 0, report
    return report


def as_raw(image: Path, tmp_path: Path) -> bytes:
    """The guest-visible content of ``image`` (and its chain) as QEMU reads it."""
    out = tmp_path / f"{image.name}.converted.raw"
    qemu_img("convert", "-O", "raw", image, out)
    data = out.read_bytes()
    out.unlink()
    return data


def read(disk: Disk, offset: int, length: int, pieces: int = 1) -> bytes:
    buffers = [bytearray(length // pieces) for _ in range(pieces - 1)]
    buffers.append(bytearray(length - sum(map(len, buffers))))
    disk.readv(offset, [memoryview(buffer) for buffer in buffers])
    return b"".join(buffers)


def write(disk: Disk, offset: int, data: bytes, pieces: int = 1) -> None:
    step = max(1, len(data) // pieces)
    parts = [data[start : start + step] for start in range(0, len(data), step)]
    disk.writev(offset, [memoryview(part) for part in parts])


def open_qcow2(path: Path, read_only: bool = False) -> Qcow2Disk:
    disk = open_disk(path, read_only=read_only)
    assert isinstance(disk, Qcow2Disk)
    return disk


def pattern(seed: int, length: int) -> bytes:
    """Bytes that differ from cluster to cluster and from seed to seed."""
    block = bytes((seed * 31 + index * 7) % 251 + 1 for index in range(4099))
    return (block * (length // len(block) + 1))[:length]


def l2_entries(path: Path) -> list[int]:
    """The first L2 table of a kasou- or qemu-made image, as raw entries."""
    data = path.read_bytes()
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_offset)[0] & ((1 << 56) - 512)
    return list(struct.unpack_from(f">{cluster // 8}Q", data, l2))


# -- images kasou creates ------------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize(
    ("size", "cluster_size"),
    [(MIB, 65536), (100 << 30, 65536), (1 << 30, 512), (64 * MIB, 2 * MIB), (0, 65536)],
)
def test_a_new_image_is_what_qemu_expects(tmp_path: Path, size: int, cluster_size: int) -> None:
    path = tmp_path / "new.qcow2"
    create_qcow2(path, size, cluster_size=cluster_size)
    info = json.loads(qemu_img("info", "--output=json", path))
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == size
    assert info["cluster-size"] == cluster_size
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["format-specific"]["data"]["refcount-bits"] == 16
    check(path)
    with open_qcow2(path) as disk:
        assert disk.size == size


def test_creating_never_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "taken.qcow2"
    path.write_bytes(b"precious")
    with pytest.raises(DiskError, match="already exists"):
        create_qcow2(path, MIB)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["taken.qcow2"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("size", "cluster_size", "problem"),
    [
        (1000, 65536, "512-byte sectors"),
        (MIB, 3000, "power of two"),
        (MIB, 256, "power of two"),
        (1 << 50, 512, "L1 table over 32 MiB"),
    ],
)
def test_impossible_images_are_refused(
    tmp_path: Path, size: int, cluster_size: int, problem: str
) -> None:
    with pytest.raises(DiskError, match=problem):
        create_qcow2(tmp_path / "x.qcow2", size, cluster_size=cluster_size)
    assert not (tmp_path / "x.qcow2").exists()


# -- reading what QEMU wrote ---------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("cluster_size", ["512", "4k", "64k"])
@pytest.mark.parametrize("refcount_bits", ["1", "16", "64"])
def test_kasou_reads_what_qemu_io_wrote(
    tmp_path: Path, cluster_size: str, refcount_bits: str
) -> None:
    path = tmp_path / "qemu.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o",
        f"cluster_size={cluster_size},refcount_bits={refcount_bits}", path, "4M",
    )  # fmt: skip
    qemu_io(
        path,
        "write -P 0xab 0 64k",
        "write -P 0x01 70000 1234",
        "write -P 0xcd 1m 300k",
        "write -z 1100k 8k",
        "write -P 0xef 4190000 4304",
    )
    expected = as_raw(path, tmp_path)
    with open_qcow2(path, read_only=True) as disk:
        assert read(disk, 0, 4 * MIB, pieces=5) == expected
        assert read(disk, 69999, 1236) == expected[69999:71235]


@needs_qemu
def test_version_2_images_read_and_write(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(pattern(1, 2 * MIB))
    path = tmp_path / "v2.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10", "-b", base, "-F", "raw", path)
    qemu_io(path, "write -P 0x33 100k 10k")
    model = bytearray(as_raw(path, tmp_path))
    with open_qcow2(path) as disk:
        assert disk.header.version == 2
        assert read(disk, 0, 2 * MIB) == model
        write(disk, 65000, b"\x44" * 70000)
        model[65000:135000] = b"\x44" * 70000
        disk.write_zeroes(256 * KIB, 128 * KIB, True)  # no zero flag in v2: real zeros
        model[256 * KIB : 384 * KIB] = bytes(128 * KIB)
        assert read(disk, 0, 2 * MIB) == model
    assert as_raw(path, tmp_path) == model
    check(path)


@needs_qemu
@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_compressed_clusters_read_and_are_rewritten_on_write(
    tmp_path: Path, compression: str
) -> None:
    source = tmp_path / "source.raw"
    source.write_bytes(pattern(2, MIB) + bytes(MIB) + b"\x07" * MIB)
    path = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compression_type={compression}", source, path)
    assert "compressed" in qemu_img("check", path)
    with open_qcow2(path) as disk:
        assert read(disk, 0, 3 * MIB, pieces=3) == source.read_bytes()
        write(disk, 65536 + 1000, b"\x99" * 100)  # a partial write into a compressed cluster
        write(disk, 2 * MIB, b"\x98" * 65536)  # a whole one
    expected = bytearray(source.read_bytes())
    expected[66536:66636] = b"\x99" * 100
    expected[2 * MIB : 2 * MIB + 65536] = b"\x98" * 65536
    assert as_raw(path, tmp_path) == expected
    check(path)


# -- writing, checked by QEMU --------------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("made_by", ["kasou", "qemu-img"])
def test_qemu_reads_what_kasou_wrote(tmp_path: Path, made_by: str) -> None:
    path = tmp_path / "disk.qcow2"
    if made_by == "kasou":
        create_qcow2(path, 8 * MIB)
    else:
        qemu_img("create", "-f", "qcow2", path, "8M")
    model = bytearray(8 * MIB)
    writes = [(0, 512), (1000, 70000), (3 * MIB - 5, 200 * KIB), (8 * MIB - 4096, 4096)]
    with open_qcow2(path) as disk:
        for number, (offset, length) in enumerate(writes):
            data = pattern(number, length)
            write(disk, offset, data, pieces=number + 1)
            model[offset : offset + length] = data
        assert read(disk, 0, 8 * MIB) == model
    assert as_raw(path, tmp_path) == model
    check(path)


@needs_qemu
def test_rewriting_an_allocated_cluster_writes_it_in_place(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 4 * MIB)
    with open_qcow2(path) as disk:
        write(disk, 0, b"\x01" * 65536)
    first = l2_entries(path)[0]
    size = os.path.getsize(path)
    with open_qcow2(path) as disk:
        write(disk, 512, b"\x02" * 512)
    assert l2_entries(path)[0] == first
    assert os.path.getsize(path) == size
    assert as_raw(path, tmp_path)[:2048] == b"\x01" * 512 + b"\x02" * 512 + b"\x01" * 1024
    check(path)


@needs_qemu
@pytest.mark.parametrize("refcount_bits", ["1", "16", "64"])
def test_refcount_blocks_and_table_grow_as_the_image_grows(
    tmp_path: Path, refcount_bits: str
) -> None:
    """512-byte clusters: a refcount block covers 64 to 4096 clusters and the refcount table
    starts with one cluster, so a few MiB of data need new blocks and a larger table."""
    path = tmp_path / "small-clusters.qcow2"
    qemu_img(
        "create", "-f", "qcow2", "-o", f"cluster_size=512,refcount_bits={refcount_bits}",
        path, "32M",
    )  # fmt: skip
    table_before = struct.unpack_from(">Q", path.read_bytes(), 48)[0]
    data = pattern(5, 10 * MIB)
    with open_qcow2(path) as disk:
        write(disk, 3, data, pieces=3)  # unaligned: the first and last clusters are partial
        assert read(disk, 3, len(data)) == data
    if refcount_bits != "1":  # 1-bit refcounts: one table covers 128 MiB of clusters
        assert struct.unpack_from(">Q", path.read_bytes(), 48)[0] != table_before
    assert as_raw(path, tmp_path)[3 : 3 + len(data)] == data
    check(path)


@needs_qemu
def test_discarded_clusters_are_reused_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 16 * MIB)
    with open_qcow2(path) as disk:
        write(disk, 0, b"\x11" * 4 * MIB)
        disk.discard(0, 4 * MIB)
    check(path)
    size = os.path.getsize(path)
    with open_qcow2(path) as disk:
        write(disk, 8 * MIB, b"\x22" * 2 * MIB)
    assert os.path.getsize(path) == size
    assert as_raw(path, tmp_path)[8 * MIB : 10 * MIB] == b"\x22" * 2 * MIB
    check(path)


# -- overlays and backing chains -----------------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("base_format", ["raw", "qcow2"])
def test_an_overlay_reads_its_base_and_writes_only_itself(tmp_path: Path, base_format: str) -> None:
    base = tmp_path / f"base.{base_format}"
    content = pattern(3, 4 * MIB)
    if base_format == "raw":
        base.write_bytes(content)
    else:
        (tmp_path / "content.raw").write_bytes(content)
        qemu_img("convert", "-O", "qcow2", tmp_path / "content.raw", base)
    before = base.read_bytes()
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(overlay, "base." + base_format)  # relative: to the overlay's folder
    info = json.loads(qemu_img("info", "--output=json", overlay))
    assert info["backing-filename"] == f"base.{base_format}"
    assert info["backing-filename-format"] == base_format
    assert info["virtual-size"] == 4 * MIB

    model = bytearray(content)
    with open_qcow2(overlay) as disk:
        assert disk.backing is not None and disk.backing.read_only
        assert read(disk, 0, 4 * MIB, pieces=4) == content
        for offset, length in [(100, 10), (65530, 20), (MIB + 4096, 3 * 65536), (4 * MIB - 1, 1)]:
            data = pattern(offset, length)
            write(disk, offset, data)
            model[offset : offset + length] = data
        assert read(disk, 0, 4 * MIB) == model
    assert base.read_bytes() == before
    assert as_raw(overlay, tmp_path) == model
    report = check(overlay)
    assert report["allocated-clusters"] == 7  # guest clusters 0, 1, 16-19 and 63: those written


@needs_qemu
def test_a_chain_of_three_reads_each_layer_where_it_is_allocated(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x0b" * 2 * MIB)
    middle = tmp_path / "middle.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", middle)
    qemu_io(middle, "write -P 0x0c 64k 128k", "write -z 1m 64k")
    top = tmp_path / "top.qcow2"
    create_overlay(top, middle)
    with open_qcow2(top) as disk:
        assert read(disk, 0, 2 * MIB) == as_raw(middle, tmp_path)
        write(disk, 100 * KIB, b"\x0d" * 100)  # copy-on-write from the middle layer
        write(disk, MIB + 10, b"\x0e" * 10)  # over the middle layer's zero cluster
    model = bytearray(b"\x0b" * 2 * MIB)
    model[64 * KIB : 192 * KIB] = b"\x0c" * 128 * KIB
    model[MIB : MIB + 64 * KIB] = bytes(64 * KIB)
    model[100 * KIB : 100 * KIB + 100] = b"\x0d" * 100
    model[MIB + 10 : MIB + 20] = b"\x0e" * 10
    assert as_raw(top, tmp_path) == model
    check(top)
    info = inspect_disk(top)
    assert [info.format, info.backing.format, info.backing.backing.format] == [  # type: ignore[union-attr]
        "qcow2",
        "qcow2",
        "raw",
    ]
    assert info.allocated == 2 * 65536


@needs_qemu
def test_an_overlay_larger_than_its_base_reads_zeros_past_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xb0" * 100 * KIB)  # ends inside the overlay's second cluster
    overlay = tmp_path / "big.qcow2"
    create_overlay(overlay, base, size=4 * MIB)
    model = bytearray(4 * MIB)
    model[: 100 * KIB] = b"\xb0" * 100 * KIB
    with open_qcow2(overlay) as disk:
        assert read(disk, 0, 4 * MIB) == model
        write(disk, 99 * KIB, b"\xb1" * 2 * KIB)  # straddles the end of the base
        write(disk, 3 * MIB, b"\xb2" * 100)  # far past it
        model[99 * KIB : 101 * KIB] = b"\xb1" * 2 * KIB
        model[3 * MIB : 3 * MIB + 100] = b"\xb2" * 100
        assert read(disk, 0, 4 * MIB) == model
    assert as_raw(overlay, tmp_path) == model
    check(overlay)


@needs_qemu
def test_discard_and_write_zeroes_hide_the_base(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\xaa" * 4 * MIB)
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(overlay, base)
    model = bytearray(b"\xaa" * 4 * MIB)
    with open_qcow2(overlay) as disk:
        write(disk, 0, b"\x01" * MIB)
        model[:MIB] = b"\x01" * MIB
        disk.discard(0, 256 * KIB)  # allocated clusters: dropped, marked zero
        disk.discard(2 * MIB, 256 * KIB)  # unallocated: marked zero over the base
        disk.write_zeroes(512 * KIB, 128 * KIB, False)  # allocated, kept as preallocation
        disk.write_zeroes(3 * MIB + 100, 65536, True)  # partial clusters: zeros written
        for offset, length in [(0, 256 * KIB), (2 * MIB, 256 * KIB), (512 * KIB, 128 * KIB)]:
            model[offset : offset + length] = bytes(length)
        model[3 * MIB + 100 : 3 * MIB + 100 + 65536] = bytes(65536)
        assert read(disk, 0, 4 * MIB) == model
    assert as_raw(overlay, tmp_path) == model
    mapping = json.loads(qemu_img("map", "--output=json", overlay))
    zero_at = {extent["start"] for extent in mapping if extent["zero"] and extent["depth"] == 0}
    assert {0, 2 * MIB, 512 * KIB} <= zero_at
    check(overlay)


@needs_qemu
def test_discard_gives_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "disk.qcow2"
    create_qcow2(path, 8 * MIB)
    with open_qcow2(path) as disk:
        write(disk, 0, b"\x01" * 8 * MIB)
        disk.flush()
        full = os.stat(path).st_blocks
        disk.discard(0, 8 * MIB)
        assert read(disk, 0, 8 * MIB) == bytes(8 * MIB)
    assert os.stat(path).st_blocks < full - (6 * MIB) // 512
    assert inspect_disk(path).allocated == 0
    check(path)


# -- crashes --------------------------------------------------------------------------------

_CRASH_SCRIPT = """
import os, signal, sys
from kasou.disk import open_disk
disk = open_disk(sys.argv[1])
disk.writev(0, [memoryview(b"\\x5a" * 200_000)])
disk.discard(65536, 65536)
if sys.argv[2] == "flush":
    disk.flush()
disk.writev(1_000_000, [memoryview(b"\\x5b" * 100_000)])
os.kill(os.getpid(), signal.SIGKILL)
"""


@needs_qemu
@pytest.mark.parametrize("flush", [True, False])
def test_kill_9_leaves_a_consistent_image(tmp_path: Path, flush: bool) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * 2 * MIB)
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(overlay, base)
    argv = [sys.executable, "-c", _CRASH_SCRIPT, str(overlay), "flush" if flush else "no"]
    assert subprocess.run(argv, check=False).returncode == -signal.SIGKILL
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", str(overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = json.loads(result.stdout)
    assert report.get("corruptions", 0) == 0, report  # leaks are allowed, never corruption
    assert result.returncode in (0, 3), result.stderr  # 3: leaked clusters only
    data = as_raw(overlay, tmp_path)
    assert data[:65536] == b"\x5a" * 65536  # written before the kill: still in the page cache
    assert data[65536:131072] == bytes(65536)
    assert data[131072:200_000] == b"\x5a" * (200_000 - 131072)
    assert data[1_000_000:1_100_000] == b"\x5b" * 100_000
    qemu_img("check", "-r", "leaks", overlay)  # what qemu-img check -r leaks reclaims
    check(overlay)


# -- images that are refused ----------------------------------------------------------------


def make_image(tmp_path: Path, size: int = MIB, name: str = "disk.qcow2") -> Path:
    path = tmp_path / name
    create_qcow2(path, size)
    return path


def patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "problem"),
    [
        (4, ">I", 1, "version 1 is not supported"),
        (4, ">I", 4, "version 4 is not supported"),
        (20, ">I", 8, "cluster_bits 8"),
        (20, ">I", 30, "cluster_bits 30"),
        (32, ">I", 1, "encrypted"),
        (32, ">I", 2, "encrypted"),
        (72, ">Q", 1 << 4, "extended L2 entries"),
        (72, ">Q", 1 << 2, "external data file"),
        (72, ">Q", 1 << 40, "bit 40"),
        (96, ">I", 7, "refcount_order 7"),
        (100, ">I", 100, "header_length 100"),
        (36, ">I", 0, "L1 table .* too small"),
        (40, ">Q", 0x30001, "L1 table offset"),
        (40, ">Q", 1 << 40, "L1 table at .* points outside the file"),
        (48, ">Q", 1 << 40, "refcount table at .* points outside the file"),
        (56, ">I", 0, "refcount table is empty"),
        (104, ">B", 1, "compression type bit"),
    ],
)
def test_a_bad_header_is_refused_with_its_problem(
    tmp_path: Path, offset: int, fmt: str, value: int, problem: str
) -> None:
    path = make_image(tmp_path)
    patch(path, offset, fmt, value)
    with pytest.raises(DiskError, match=f"unusable qcow2 image: .*{problem}"):
        open_disk(path, read_only=True)


def test_a_truncated_image_is_refused(tmp_path: Path) -> None:
    path = make_image(tmp_path)
    data = path.read_bytes()
    for length in (0, 50, 100, 65536 + 8):
        path.write_bytes(data[:length])
        with pytest.raises(DiskError, match=r"truncated|points outside"):
            open_disk(path, format="qcow2", read_only=True)


def test_a_file_that_is_not_qcow2_is_refused_as_qcow2(tmp_path: Path) -> None:
    path = tmp_path / "plain.raw"
    path.write_bytes(bytes(MIB))
    with pytest.raises(DiskError, match="not a qcow2 image"):
        open_disk(path, format="qcow2")


def test_table_entries_pointing_outside_the_file_are_refused(tmp_path: Path) -> None:
    path = make_image(tmp_path)
    with open_qcow2(path) as disk:
        write(disk, 0, b"\x01" * 512)
    header = path.read_bytes()
    l1_offset = struct.unpack_from(">Q", header, 40)[0]
    l2_offset = struct.unpack_from(">Q", header, l1_offset)[0] & ((1 << 56) - 512)

    patch(path, l2_offset, ">Q", (1 << 63) | (1 << 45))  # the data cluster: far away
    with open_qcow2(path, read_only=True) as disk:
        with pytest.raises(DiskError, match="guest cluster 0 points outside the file"):
            read(disk, 0, 512)
        assert read(disk, 65536, 512) == bytes(512)  # the rest of the disk still reads

    patch(path, l1_offset, ">Q", (1 << 63) | (1 << 45))  # the L2 table: far away
    with pytest.raises(DiskError, match="L1 table entry 0 points outside the file"):
        open_disk(path)

    patch(path, l1_offset, ">Q", (1 << 63) | l2_offset | 1)  # a reserved bit
    with pytest.raises(DiskError, match="L1 table entry 0 has reserved bits set"):
        open_disk(path)


def test_backing_chain_loops_are_refused(tmp_path: Path) -> None:
    first = make_image(tmp_path, name="a.qcow2")
    create_overlay(tmp_path / "b.qcow2", first)
    # Point a.qcow2 at b.qcow2: rewrite its header as an overlay of b.
    first.unlink()
    create_overlay(first, make_image(tmp_path, name="c.qcow2"))
    data = bytearray(first.read_bytes())
    name_offset, name_size = struct.unpack_from(">QI", data, 8)
    assert data[name_offset : name_offset + name_size] == str(tmp_path / "c.qcow2").encode()
    data[name_offset + name_size - len("c.qcow2") : name_offset + name_size] = b"b.qcow2"
    first.write_bytes(data)
    with pytest.raises(DiskError, match="backing chain loops"):
        open_disk(tmp_path / "b.qcow2")
    with pytest.raises(DiskError, match="backing chain loops"):
        create_overlay(tmp_path / "d.qcow2", tmp_path / "b.qcow2")
    with pytest.raises(DiskError, match="backing chain loops"):
        create_overlay(tmp_path / "self.qcow2", "self.qcow2")


def test_a_backing_chain_deeper_than_the_cap_is_refused(tmp_path: Path) -> None:
    below = make_image(tmp_path, name="layer0.qcow2")
    for depth in range(1, MAX_CHAIN + 1):
        above = tmp_path / f"layer{depth}.qcow2"
        if depth < MAX_CHAIN:
            create_overlay(above, below.name)
        else:
            with pytest.raises(DiskError, match=f"deeper than {MAX_CHAIN}"):
                create_overlay(above, below.name)
        below = above
    with open_disk(tmp_path / f"layer{MAX_CHAIN - 1}.qcow2") as disk:
        assert disk.size == MIB


def test_a_missing_or_unsupported_backing_file_is_named(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(MIB))
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(overlay, "base.raw")
    base.unlink()
    with pytest.raises(DiskError, match=r"cannot open backing file .*base.raw: No such file"):
        open_disk(overlay)
    base.write_bytes(bytes(MIB))
    data = bytearray(overlay.read_bytes())
    data[data.index(b"raw\0") : data.index(b"raw\0") + 3] = b"vhd"  # the format extension
    overlay.write_bytes(data)
    with pytest.raises(DiskError, match="backing file's format 'vhd' is not supported"):
        open_disk(overlay)
    with pytest.raises(DiskError, match="unknown backing format 'vmdk'"):
        create_overlay(tmp_path / "other.qcow2", base, backing_format="vmdk")


@pytest.mark.parametrize(("bit", "state"), [(0, "dirty"), (1, "corrupt")])
def test_a_dirty_or_corrupt_image_opens_read_only_only(
    tmp_path: Path, bit: int, state: str
) -> None:
    path = make_image(tmp_path)
    patch(path, 72, ">Q", 1 << bit)
    with pytest.raises(DiskError, match=f"marked {state}.*qemu-img check -r all"):
        open_disk(path)
    with open_disk(path, read_only=True) as disk:
        assert read(disk, 0, 512) == bytes(512)


@needs_qemu
def test_an_image_with_internal_snapshots_opens_read_only_only(tmp_path: Path) -> None:
    path = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", path, "1M")
    qemu_io(path, "write -P 0x01 0 64k")
    qemu_img("snapshot", "-c", "before", path)
    qemu_io(path, "write -P 0x02 0 4k")
    with pytest.raises(DiskError, match=r"1 internal snapshots.*read-only"):
        open_disk(path)
    with open_disk(path, read_only=True) as disk:
        assert read(disk, 0, 8192) == b"\x02" * 4096 + b"\x01" * 4096


def test_reads_and_writes_outside_the_disk_are_refused(tmp_path: Path) -> None:
    path = make_image(tmp_path)
    with open_qcow2(path) as disk:
        with pytest.raises(DiskError, match="outside the disk"):
            read(disk, MIB - 100, 101)
        with pytest.raises(DiskError, match="outside the disk"):
            write(disk, MIB, b"x")
        with pytest.raises(DiskError, match="outside the disk"):
            disk.write_zeroes(-512, 512, False)
    with open_qcow2(path, read_only=True) as disk, pytest.raises(DiskError, match="read-only"):
        write(disk, 0, b"x")
    disk.close()
    with pytest.raises(DiskError, match="closed"):
        read(disk, 0, 1)


def test_an_autoclear_bit_is_cleared_by_a_writer(tmp_path: Path) -> None:
    """qcow2 spec, "Header": a writer that does not know an autoclear bit clears it."""
    path = make_image(tmp_path)
    patch(path, 88, ">Q", 1 << 5)
    with open_disk(path, read_only=True):
        pass
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 1 << 5
    with open_disk(path):
        pass
    assert struct.unpack_from(">Q", path.read_bytes(), 88)[0] == 0


# -- a model: random operations agree with a bytearray ------------------------------------

DISK_SIZE = 192 * KIB
CLUSTER = 4096

operations = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "read", "discard", "zeroes", "zeroes-keep", "flush"]),
        st.integers(0, DISK_SIZE - 1),
        st.integers(1, 3 * CLUSTER + 100),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=14,
)


@needs_qemu
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(operations=operations)
def test_random_operations_agree_with_a_model(
    tmp_path: Path, operations: list[tuple[str, int, int, int]]
) -> None:
    folder = tmp_path / f"case{len(os.listdir(tmp_path))}"
    folder.mkdir()
    base_content = pattern(9, DISK_SIZE // 2)  # the base covers half the overlay
    base = folder / "base.qcow2"
    (folder / "base.raw").write_bytes(base_content)
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4k", folder / "base.raw", base)
    overlay = folder / "overlay.qcow2"
    create_overlay(overlay, base, size=DISK_SIZE, cluster_size=CLUSTER)
    model = bytearray(DISK_SIZE)
    model[: len(base_content)] = base_content
    with open_qcow2(overlay) as disk:
        for kind, offset, wanted, value in operations:
            length = min(wanted, DISK_SIZE - offset)
            if kind == "write":
                data = bytes([value]) * length
                write(disk, offset, data, pieces=1 + value % 3)
                model[offset : offset + length] = data
            elif kind == "read":
                assert read(disk, offset, length) == model[offset : offset + length]
            elif kind == "flush":
                disk.flush()
            else:
                if kind == "discard":
                    disk.discard(offset, length)
                else:
                    disk.write_zeroes(offset, length, kind == "zeroes")
                model[offset : offset + length] = bytes(length)
        assert read(disk, 0, DISK_SIZE) == model
    check(overlay)
    assert as_raw(overlay, folder) == model
