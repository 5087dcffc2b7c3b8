"""Pointing a qcow2 image at another backing file (kasou.disk.set_backing_name): only the
name changes, the image opens over the new file, and a name that does not fit is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kasou.disk import (
    DiskError,
    create_overlay,
    create_qcow2,
    inspect_disk,
    open_disk,
    set_backing_name,
)

MIB = 1 << 20


def _read(path: Path, offset: int, length: int) -> bytes:
    disk = open_disk(path, read_only=True)
    try:
        buffer = bytearray(length)
        disk.readv(offset, [memoryview(buffer)])
        return bytes(buffer)
    finally:
        disk.close()


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], check=False, capture_output=True, text=True)


def test_an_image_opens_over_its_new_backing_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    base = tmp_path / "a" / "base.raw"
    base.write_bytes(b"A" * 512 + bytes(MIB - 512))
    top = tmp_path / "a" / "top.qcow2"
    create_overlay(top, "base.raw")
    moved = tmp_path / "top.qcow2"
    top.rename(moved)  # "base.raw" is now relative to the wrong folder
    with pytest.raises(DiskError):
        open_disk(moved)

    set_backing_name(moved, str(base))

    assert _read(moved, 0, 512) == b"A" * 512
    info = inspect_disk(moved)
    assert info.backing is not None and info.backing.path == base
    if shutil.which("qemu-img"):  # the peer reads the new name too, and finds no error
        info_run = _qemu_img("info", "--output=json", str(moved))
        assert json.loads(info_run.stdout)["backing-filename"] == str(base), info_run.stderr
        assert _qemu_img("check", str(moved)).returncode == 0


def test_an_image_without_a_backing_file_or_a_name_too_long_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.qcow2"
    create_qcow2(plain, MIB)
    with pytest.raises(DiskError, match="no backing file"):
        set_backing_name(plain, "/base.raw")
    (tmp_path / "base.raw").write_bytes(bytes(MIB))
    small = tmp_path / "small.qcow2"
    create_overlay(small, "base.raw", cluster_size=512)
    with pytest.raises(DiskError, match="does not fit"):
        set_backing_name(small, "/" + "x" * 600)
    assert _read(small, 0, 512) == bytes(512)  # unchanged, still opens
