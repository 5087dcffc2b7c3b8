"""``kasou.loader.read_ahead``: a kernel read before its VM's request (the warm template's
spare) is what the next load gets, and only while the file is the one that was read."""

from __future__ import annotations

import struct
from pathlib import Path

from kasou.loader import load_kernel, read_ahead
from kasou.memory import GuestMemory

MiB = 1 << 20
KERNEL_AT = 2 * MiB


def _kernel(path: Path, content: bytes) -> Path:
    """An x86-64 ELF executable with one PT_LOAD of ``content`` at ``KERNEL_AT`` (System V
    ABI: the ELF header, then one program header, then the segment's bytes)."""
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, KERNEL_AT, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    segment = struct.pack(
        "<IIQQQQQQ", 1, 7, 120, KERNEL_AT, KERNEL_AT, len(content), len(content), 0x1000
    )
    path.write_bytes(header + segment + content)
    return path


def _loaded(path: Path, size: int) -> bytes:
    memory = GuestMemory.create([(0, 16 * MiB)])
    try:
        load_kernel(memory, path)
        return memory.read(KERNEL_AT, size)
    finally:
        memory.close()


def test_a_kernel_read_ahead_is_loaded_once(tmp_path: Path) -> None:
    kernel = _kernel(tmp_path / "vmlinux", b"first kernel")
    read_ahead(kernel)
    assert _loaded(kernel, 12) == b"first kernel"
    assert _loaded(kernel, 12) == b"first kernel"  # read again: nothing is left ahead


def test_a_kernel_changed_since_it_was_read_ahead_is_read_again(tmp_path: Path) -> None:
    kernel = _kernel(tmp_path / "vmlinux", b"first kernel")
    read_ahead(kernel)
    _kernel(tmp_path / "vmlinux.new", b"second kernel!").replace(kernel)
    assert _loaded(kernel, 14) == b"second kernel!"


def test_a_kernel_read_ahead_is_not_loaded_for_another_file(tmp_path: Path) -> None:
    read_ahead(_kernel(tmp_path / "a", b"kernel A"))
    assert _loaded(_kernel(tmp_path / "b", b"kernel B"), 8) == b"kernel B"


def test_a_file_that_is_no_kernel_is_left_for_the_load_to_report(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a kernel")
    read_ahead(junk)  # no error here
    kernel = _kernel(tmp_path / "vmlinux", b"kernel")
    assert _loaded(kernel, 6) == b"kernel"
