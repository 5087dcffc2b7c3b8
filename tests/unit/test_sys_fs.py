"""Copying a file fast and sparse (kasou._sys.fs.copy_sparse): the copy reads the same,
keeps the source's holes, and a qcow2 image copied so still opens."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou._sys.fs import copy_sparse
from kasou.disk import create_qcow2, open_disk

MIB = 1 << 20


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _sparse_file(path: Path, size: int, pieces: dict[int, bytes]) -> None:
    with path.open("wb") as out:
        out.truncate(size)
        for offset, data in pieces.items():
            out.seek(offset)
            out.write(data)


def _pieces() -> dict[int, bytes]:
    """4 MiB of data in three places of a 256 MiB file, the last one at its very end."""
    return {
        0: os.urandom(MIB),
        100 * MIB + 4096: os.urandom(2 * MIB),
        255 * MIB: os.urandom(MIB),
    }


def test_a_sparse_file_stays_sparse(tmp_path: Path) -> None:
    source, target = tmp_path / "a.raw", tmp_path / "b.raw"
    _sparse_file(source, 256 * MIB, _pieces())
    assert _allocated(source) < 8 * MIB  # the file system keeps holes here

    copied = copy_sparse(source, target)

    assert target.stat().st_size == 256 * MIB
    assert target.read_bytes() == source.read_bytes()
    assert _allocated(target) <= _allocated(source) + MIB
    assert copied.how in ("reflink", "extents")
    if copied.how == "extents":
        assert 4 * MIB <= copied.data_bytes < 8 * MIB  # only the data was read


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A folder on another file system than tmp_path (tmpfs), where copy_file_range(2)
    between the two cannot work and the copy reads and writes."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here")
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="kasou-fs-"))
    yield path
    for entry in path.iterdir():
        entry.unlink()
    path.rmdir()


def test_a_copy_across_file_systems_is_sparse_too(tmp_path: Path, shm_dir: Path) -> None:
    source, target = shm_dir / "a.raw", tmp_path / "b.raw"
    pieces = _pieces()
    pieces[50 * MIB] = bytes(2 * MIB)  # zeros written as data: they may become a hole
    _sparse_file(source, 256 * MIB, pieces)

    copied = copy_sparse(source, target)

    assert target.read_bytes() == source.read_bytes()
    assert _allocated(target) <= 5 * MIB
    assert copied.data_bytes <= 8 * MIB


def test_files_of_holes_only_and_empty_files(tmp_path: Path) -> None:
    holes, empty = tmp_path / "holes", tmp_path / "empty"
    _sparse_file(holes, 64 * MIB, {})
    empty.touch()

    copy_sparse(holes, tmp_path / "holes.copy")
    copy_sparse(empty, tmp_path / "empty.copy")

    assert (tmp_path / "holes.copy").stat().st_size == 64 * MIB
    assert _allocated(tmp_path / "holes.copy") == 0
    assert (tmp_path / "empty.copy").stat().st_size == 0


def test_an_existing_target_is_not_overwritten(tmp_path: Path) -> None:
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        copy_sparse(source, target)
    assert target.read_bytes() == b"old"


def test_a_copied_qcow2_image_opens_with_the_same_data(tmp_path: Path) -> None:
    source, target = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    create_qcow2(source, 64 * MIB)
    data = os.urandom(3 * 65536)
    disk = open_disk(source)
    disk.writev(10 * MIB, [memoryview(data)])
    disk.flush()
    disk.close()

    copy_sparse(source, target)

    copy = open_disk(target, read_only=True)
    try:
        assert copy.format == "qcow2" and copy.size == 64 * MIB
        buffer = bytearray(len(data))
        copy.readv(10 * MIB, [memoryview(buffer)])
        assert bytes(buffer) == data
    finally:
        copy.close()
