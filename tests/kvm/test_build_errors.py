"""A VM that cannot be built leaves nothing behind in the process: no fds, no threads,
no mappings."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kasou.errors import KasouError
from kasou.vmm import VmConfig, build_vm
from kasou.vmm.config import ConsoleConfig


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    with open("/proc/self/maps", encoding="ascii") as maps:
        return sum(1 for _ in maps)


@pytest.mark.parametrize("problem", ["not-a-kernel", "initrd-too-big"])
def test_failed_build_releases_everything(guest_elf: Path, tmp_path: Path, problem: str) -> None:
    kernel, initrd = guest_elf, None
    if problem == "not-a-kernel":
        kernel = tmp_path / "junk"
        kernel.write_bytes(os.urandom(8192))
    else:
        initrd = tmp_path / "initrd"
        with open(initrd, "wb") as handle:
            handle.truncate(64 << 20)
    good = VmConfig(kernel=guest_elf, memory=32 << 20, console=ConsoleConfig("none"))
    build_vm(good, console_output=lambda data: None).close()  # warm caches and imports first
    bad = VmConfig(kernel=kernel, initrd=initrd, memory=32 << 20, console=ConsoleConfig("none"))
    fds, threads, maps = _open_fds(), threading.active_count(), _mappings()
    with pytest.raises(KasouError):
        build_vm(bad, console_output=lambda data: None)
    assert _open_fds() == fds
    assert threading.active_count() == threads
    assert _mappings() == maps
