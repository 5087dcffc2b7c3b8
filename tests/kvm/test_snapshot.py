"""Snapshots on /dev/kvm: a guest-kit guest checking its own memory (the ``memcheck``
workload: every word it rewrites, it first checks holds what it last wrote) is saved,
restored, cloned ten times and merged from diffs, and goes on exactly where it was, in
memory and in its counters, without a single word wrong.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from kasou.errors import HostError, SnapshotError
from kasou.guestkit import FAIL_PREFIX
from kasou.guestkit.memcheck import MemcheckStatus, read_status
from kasou.memory import MemoryFile
from kasou.vmm import Vm, build_vm
from kasou.vmm.lifecycle import VmState
from kasou.vmm.snapshot import (
    MEMORY_FILE,
    create_snapshot,
    load_snapshot,
    merge_snapshots,
    snapshot_info,
)

from .conftest import BootFactory, ConsoleCapture

READY = "memcheck: ready"
MIB = 8


def _snapshot_memory(folder: Path, layout: tuple[tuple[int, int], ...]) -> MemoryFile:
    return MemoryFile(folder / MEMORY_FILE, layout)


def _wait_progress(vm: Vm, console: ConsoleCapture, after: int, passes: int = 3) -> None:
    """Wait until the guest has checked every page ``passes`` more times than at ``after``
    pages done (so every word was verified since), and printed no failure."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert FAIL_PREFIX not in console.text, console.text
        status = _status(vm)
        if status is not None and status.pages >= after + passes * status.area_pages:
            assert status.mismatches == 0
            return
        time.sleep(0.02)
    raise AssertionError(f"memcheck made no progress after the restore:\n{console.text}")


def _status(vm: Vm) -> MemcheckStatus | None:
    try:
        return read_status(vm.memory)
    except Exception:
        return None


def _restore(folder: Path, scratch: list[Path], **changes: object) -> tuple[Vm, ConsoleCapture]:
    image = load_snapshot(folder, scratch=scratch, **changes)  # type: ignore[arg-type]
    console = ConsoleCapture()
    vm = build_vm(image.config, console_output=console.write, restore=image)
    vm.start()
    return vm, console


def test_snapshot_restore_goes_on_exactly(boot: BootFactory, tmp_path: Path) -> None:
    booted = boot("memcheck", mib=MIB, report=0)
    booted.console.wait_for(READY)
    _wait_progress(booted.vm, booted.console, after=0, passes=2)
    folder = tmp_path / "snap"
    result = create_snapshot(booted.vm, folder)
    assert result["kind"] == "full" and booted.vm.state is VmState.RUNNING
    saved = read_status(_snapshot_memory(folder, booted.vm.memory.layout))
    assert saved.pages >= 2 * saved.area_pages
    # The source runs on after its snapshot.
    _wait_progress(booted.vm, booted.console, after=saved.pages, passes=1)
    booted.stop()
    # Zero pages are holes: the file holds about what the guest touched, not its 64 MiB.
    info = snapshot_info(folder)
    assert info["memory_file_bytes"] < 32 << 20
    restored, console = _restore(folder, [])
    try:
        first = _status(restored)
        assert first is not None and first.pages >= saved.pages
        _wait_progress(restored, console, after=saved.pages)
    finally:
        restored.close()


def test_ten_clones_go_on_from_one_snapshot(boot: BootFactory, tmp_path: Path) -> None:
    booted = boot("memcheck", mib=MIB, report=0)
    booted.console.wait_for(READY)
    _wait_progress(booted.vm, booted.console, after=0, passes=1)
    folder = tmp_path / "snap"
    create_snapshot(booted.vm, folder, stop=True)
    assert booted.vm.wait(10) is not None
    saved = read_status(_snapshot_memory(folder, booted.vm.memory.layout))
    clones: list[tuple[Vm, ConsoleCapture]] = []
    scratch: list[Path] = []
    try:
        for _ in range(10):
            clones.append(_restore(folder, scratch, clone=True))
        for vm, console in clones:
            _wait_progress(vm, console, after=saved.pages, passes=2)
    finally:
        for vm, _ in clones:
            vm.close()
    # Each clone wrote its own copy of the pages: the snapshot is as it was.
    again = read_status(_snapshot_memory(folder, booted.vm.memory.layout))
    assert again.pages == saved.pages


def test_diff_snapshots_merge_into_the_latest_state(boot: BootFactory, tmp_path: Path) -> None:
    booted = boot("memcheck", mib=MIB, report=0)
    booted.console.wait_for(READY)
    _wait_progress(booted.vm, booted.console, after=0, passes=1)
    base, diff1, diff2 = tmp_path / "base", tmp_path / "diff1", tmp_path / "diff2"
    with pytest.raises(SnapshotError, match="take a full one first"):
        create_snapshot(booted.vm, diff1, diff=True)
    create_snapshot(booted.vm, base)
    full_pages = snapshot_info(base)["memory_pages"]
    _wait_progress(booted.vm, booted.console, after=0, passes=1)
    first = create_snapshot(booted.vm, diff1, diff=True)
    time.sleep(0.05)
    second = create_snapshot(booted.vm, diff2, diff=True, stop=True)
    assert first["kind"] == second["kind"] == "diff"
    # A diff holds what was written since the previous snapshot: the memcheck area and a few
    # pages, far fewer than the full snapshot's.
    assert 0 < second["pages"] < full_pages
    layout = booted.vm.memory.layout
    latest = read_status(_snapshot_memory(diff2, layout))
    with pytest.raises(SnapshotError, match="diff snapshot"):
        load_snapshot(diff2, scratch=[])
    with pytest.raises(SnapshotError, match="does not apply"):
        merge_snapshots(base, [diff2])
    merge_snapshots(base, [diff1, diff2])
    assert read_status(_snapshot_memory(base, layout)) == latest
    restored, console = _restore(base, [])
    try:
        _wait_progress(restored, console, after=latest.pages)
    finally:
        restored.close()


def test_a_full_disk_leaves_the_vm_running_and_the_old_snapshot_intact(
    boot: BootFactory, tmp_path: Path
) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        check=False,
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {made.stderr.decode().strip()}")
    try:
        booted = boot("memcheck", mib=1, report=0)
        booted.console.wait_for(READY)
        folder = mount / "snap"
        create_snapshot(booted.vm, folder)  # a 1 MiB area fits in 4 MiB
        old = snapshot_info(folder)
        booted.pause()
        booted.vm.memory.fill(32 << 20, 8 << 20, 0x5A)  # 8 MiB more to write: it cannot fit
        booted.resume()
        with pytest.raises(HostError, match="runs on"):
            create_snapshot(booted.vm, folder)
        assert booted.vm.state is VmState.RUNNING
        assert [path.name for path in mount.iterdir()] == ["snap"]
        assert snapshot_info(folder)["id"] == old["id"]
        status = _status(booted.vm)
        assert status is not None
        _wait_progress(booted.vm, booted.console, after=status.pages, passes=1)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
