"""The outer VM's initramfs, read back by the system's cpio and checked by busybox sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kasou.nested._image import build_initramfs, init_script

MODULES = [("9pnet", b"\x7fELF 9pnet"), ("virtio", b"\x7fELF virtio"), ("kvm_amd", b"\x7fELF kvm")]
BUSYBOX = b"\x7fELF pretend busybox"

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")


def cpio(archive: bytes, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        ["cpio", "--quiet", *args], input=archive, capture_output=True, check=True, cwd=cwd
    )
    return result.stdout.decode()


@pytest.fixture(scope="module")
def archive() -> bytes:
    import gzip

    return gzip.decompress(build_initramfs(BUSYBOX, MODULES))


@needs_cpio
def test_the_archive_holds_init_busybox_console_and_modules(archive: bytes) -> None:
    listing = {}
    for line in cpio(archive, "-t", "-v").splitlines():
        fields = line.split()
        listing[fields[-1] if "->" not in fields else fields[-3]] = fields[0]
    assert listing["init"] == "-rwxr-xr-x"
    assert listing["bin/busybox"] == "-rwxr-xr-x"
    assert listing["bin/sh"].startswith("l")
    assert listing["dev/console"].startswith("c")
    for name, _ in MODULES:
        assert listing[f"lib/modules/{name}.ko"].startswith("-")


@needs_cpio
def test_files_come_back_byte_for_byte(archive: bytes, tmp_path: Path) -> None:
    cpio(archive, "-i", "-d", "--no-absolute-filenames", "bin/busybox", "lib/*", cwd=tmp_path)
    assert (tmp_path / "bin/busybox").read_bytes() == BUSYBOX
    for name, image in MODULES:
        assert (tmp_path / f"lib/modules/{name}.ko").read_bytes() == image


@needs_cpio
def test_init_loads_the_modules_in_the_given_order(archive: bytes, tmp_path: Path) -> None:
    cpio(archive, "-i", "init", cwd=tmp_path)
    init = (tmp_path / "init").read_text()
    assert init.startswith("#!/bin/sh\n")
    assert "for module in 9pnet virtio kvm_amd; do" in init


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox")
def test_init_is_valid_busybox_shell(tmp_path: Path) -> None:
    path = tmp_path / "init"
    path.write_text(init_script([name for name, _ in MODULES]))
    result = subprocess.run(
        ["busybox", "sh", "-n", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "@" not in path.read_text()  # every placeholder filled


def test_same_inputs_give_the_same_bytes() -> None:
    assert build_initramfs(BUSYBOX, MODULES) == build_initramfs(BUSYBOX, MODULES)
