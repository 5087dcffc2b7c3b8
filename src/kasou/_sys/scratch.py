"""Scratch folders: the files one kasou process makes for its run alone (a restored disk's
throw-away overlay, a cloud-init seed, a kernel unpacked from an image) and removes at its
end.

A process killed with SIGKILL cannot remove its own, so each folder is named by the process
that made it, ``TMP/kasou-KIND-PID-RANDOM``, and every new scratch folder first sweeps away
those whose process is gone. A folder of a process still running, or of a pid now reused by
another process, is left alone. This module does not know what the folders hold.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["pid_alive", "scratch_folder", "sweep_scratch"]

_PREFIX = "kasou-"


def scratch_folder(kind: str) -> Path:
    """A new private (0700) folder for this process's ``kind`` of scratch files (a word
    without dashes: ``restore``, ``seed``), after sweeping those of processes that died."""
    if not kind.isalnum():
        raise ValueError(f"a scratch kind is one word: {kind!r}")
    sweep_scratch()
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{kind}-{os.getpid()}-"))


def sweep_scratch(parent: Path | None = None) -> list[Path]:
    """Remove the scratch folders in ``parent`` (the temporary folder) whose process is
    gone; return them."""
    folder = Path(tempfile.gettempdir()) if parent is None else parent
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        parts = entry.name.split("-")
        if len(parts) != 4 or parts[0] != _PREFIX[:-1] or not parts[2].isdigit():
            continue
        if pid_alive(int(parts[2])) or not entry.is_dir(follow_symlinks=False):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts; so does a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return pid > 0
