"""``kasou disk create`` and ``kasou disk info``: images qemu-img agrees with, chains shown
level by level, and errors as one line with exit status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kasou.cli import main
from kasou.disk import open_disk

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img missing (apt-get install qemu-utils)"
)


def kasou(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``kasou argv``: (exit status, stdout, stderr), as the console script would."""
    try:
        status = main(argv)
    except SystemExit as leave:
        status = int(leave.code or 0)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def qemu_info(image: Path) -> dict[str, object]:
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    info: dict[str, object] = json.loads(result.stdout)
    return info


@needs_qemu_img
def test_create_makes_an_empty_image_of_the_size_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "empty.qcow2"
    status, out, err = kasou(["disk", "create", "--size", "10G", str(image)], capsys)
    assert (status, err) == (0, "")
    assert out == f"created {image}: qcow2, 10G\n"
    info = qemu_info(image)
    assert info["virtual-size"] == 10 << 30
    assert info["cluster-size"] == 65536


@needs_qemu_img
def test_an_overlay_stores_its_backing_path_relative_to_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "images").mkdir()
    base = tmp_path / "images" / "base.raw"
    base.write_bytes(b"\x42" * (1 << 20))
    monkeypatch.chdir(tmp_path)
    status, out, _ = kasou(
        ["disk", "create", "--backing", "images/base.raw", "images/vm.qcow2"], capsys
    )
    assert status == 0
    assert "1M over images/base.raw (raw)" in out
    info = qemu_info(tmp_path / "images" / "vm.qcow2")
    assert info["backing-filename"] == "base.raw"  # found from wherever the overlay is opened
    assert info["backing-filename-format"] == "raw"
    assert info["virtual-size"] == 1 << 20
    monkeypatch.chdir("/")
    with open_disk(tmp_path / "images" / "vm.qcow2", read_only=True) as disk:
        data = bytearray(4)
        disk.readv(0, [memoryview(data)])
        assert data == b"\x42" * 4


@needs_qemu_img
def test_create_takes_a_size_a_backing_format_and_a_cluster_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(b"QFI\xfb" + bytes(4092))  # looks like qcow2, but the user says raw
    image = tmp_path / "big.qcow2"
    argv = ["disk", "create", "--backing", str(base), "--backing-format", "raw"]
    argv += ["--size", "2G", "--cluster-size", "4K", str(image)]
    status, _, err = kasou(argv, capsys)
    assert (status, err) == (0, "")
    info = qemu_info(image)
    assert info["backing-filename"] == str(base)  # absolute as given
    assert info["backing-filename-format"] == "raw"
    assert (info["virtual-size"], info["cluster-size"]) == (2 << 30, 4096)


@needs_qemu_img
def test_info_shows_the_whole_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x01" * (1 << 20))
    middle = tmp_path / "middle.qcow2"
    top = tmp_path / "top.qcow2"
    assert kasou(["disk", "create", "--backing", str(base), str(middle)], capsys)[0] == 0
    assert kasou(["disk", "create", "--backing", str(middle), str(top)], capsys)[0] == 0
    with open_disk(top) as disk:
        disk.writev(0, [memoryview(b"\x02" * 70000)])  # two clusters
    status, out, err = kasou(["disk", "info", str(top)], capsys)
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"image      {top}"
    assert lines[1] == "format     qcow2 (version 3, clusters of 64K)"
    assert lines[2] == "size       1M (1048576 bytes)"
    assert lines[3].startswith("allocated  131072 bytes in this image, ")
    assert lines[4] == f"backing    {middle} (qcow2)"
    assert f"  image      {middle}" in lines
    assert f"    image      {base}" in lines
    assert "    format     raw" in lines
    assert "    allocated  1048576 bytes in this image, 1048576 bytes on disk" in lines


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["disk", "create", "OUT"], "--size is needed for an image without --backing"),
        (["disk", "create", "--size", "lots", "OUT"], "'lots' is not a size"),
        (["disk", "create", "--size", "1000", "OUT"], "not a whole number of 512-byte sectors"),
        (["disk", "create", "--size", "1M", "--cluster-size", "3K", "OUT"], "power of two"),
        (["disk", "create", "--backing", "MISSING", "OUT"], "cannot open backing file"),
        (
            ["disk", "create", "--backing", "BASE", "--backing-format", "vmdk", "OUT"],
            "unknown backing format 'vmdk'",
        ),
        (["disk", "create", "--size", "1M", "BASE"], "already exists"),
        (["disk", "info", "MISSING"], "cannot open disk image"),
        (["disk", "info", "BAD"], "unusable qcow2 image: qcow2 version 9 is not supported"),
    ],
)
def test_errors_are_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    (tmp_path / "BASE").write_bytes(bytes(4096))
    (tmp_path / "BAD").write_bytes(b"QFI\xfb\0\0\0\x09" + bytes(4088))
    placeholders = {"OUT", "BASE", "MISSING", "BAD"}
    argv = [str(tmp_path / word) if word in placeholders else word for word in argv]
    status, out, err = kasou(argv, capsys)
    assert status == 2
    assert out == ""
    (line,) = err.splitlines()
    assert line.startswith("kasou: error: ")
    assert says in line
    assert not (tmp_path / "OUT").exists()
