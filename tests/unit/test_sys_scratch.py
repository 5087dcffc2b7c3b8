"""Scratch folders outlive a kasou killed with SIGKILL only until the next one starts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou._sys.scratch import scratch_folder, sweep_scratch


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp_path)
    try:
        yield tmp_path
    finally:
        tempfile.tempdir = saved


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_dead_process_s_folders_are_swept_by_the_next_scratch_folder(tmp: Path) -> None:
    dead = tmp / f"kasou-restore-{_dead_pid()}-abc_12"
    dead.mkdir()
    (dead / "disk0.qcow2").write_bytes(b"overlay")
    mine = scratch_folder("restore")
    assert not dead.exists()
    assert mine.parent == tmp and mine.name.startswith(f"kasou-restore-{os.getpid()}-")
    assert mine.stat().st_mode & 0o777 == 0o700


def test_live_processes_and_other_files_are_left_alone(tmp: Path) -> None:
    live = tmp / f"kasou-seed-{os.getpid()}-xyz"
    parent = tmp / f"kasou-root-{os.getppid()}-xyz"
    others = [
        tmp / "kasou-restore-abcdefgh",  # an older kasou's name, without a pid
        tmp / "kasou-nested-123-x-y",
        tmp / "someone-else-1-x",
    ]
    for folder in (live, parent, *others):
        folder.mkdir()
    dead_file = tmp / f"kasou-seed-{_dead_pid()}-file"
    dead_file.write_text("a file, not a scratch folder")
    assert sweep_scratch() == []
    assert all(path.exists() for path in (live, parent, *others, dead_file))


def test_a_kind_is_one_word() -> None:
    with pytest.raises(ValueError, match="one word"):
        scratch_folder("re-store")
