"""A Multiboot kernel under ``kasou run`` on a KVM with hardware virtualization (the nested
host's): COM1 shows the command line, modules and loader name it was handed, and kasou exits
with the status the kernel wrote to the ``--debug-exit`` port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kasou.guestkit.multiboot import build_multiboot_hello, expected_lines

from .conftest import KASOU


@pytest.mark.parametrize("address_fields", [False, True], ids=["elf", "address-fields"])
def test_a_multiboot_kernel_reports_its_boot_and_exits_with_its_status(
    tmp_path: Path, address_fields: bool
) -> None:
    kernel = build_multiboot_hello(tmp_path / "cache", address_fields=address_fields)
    contents = [b"multiboot module one\n", bytes(range(40))]
    modules = [tmp_path / "one.txt", tmp_path / "two.bin"]
    for path, data in zip(modules, contents, strict=True):
        path.write_bytes(data)
    console = tmp_path / "com1.txt"
    result = subprocess.run(
        [
            KASOU, "run",
            "--kernel", str(kernel),
            "--initrd", str(modules[0]),
            "--initrd", str(modules[1]),
            "--cmdline", "exit=42",
            "--debug-exit", "0xf4",
            "--memory", "64M",
            "--console", f"file:{console}",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == (42 << 1) | 1, result.stderr
    pairs = zip(modules, contents, strict=True)
    assert console.read_text().splitlines() == expected_lines(
        f"{kernel} exit=42", [(str(path), data) for path, data in pairs], loader="kasou"
    )
