"""Building a cache entry so that no one sees it half-built.

An entry ``<cache>/nested/<key>`` is built in a sibling temporary directory named
``.tmp-<key>-<random>`` and renamed into place when complete; rename(2) within one file system
is atomic, so a reader finds either nothing or the whole entry. A temporary directory left by
a build that was killed is never read (its name is not a key); it is removed once it is older
than a day, in case its builder is still running. Two processes building the same key at once
both build; the first rename wins and the other's copy is discarded.

It does not know what an entry holds: the caller's ``build`` fills the directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["ensure_entry"]

_TEMP_PREFIX = ".tmp-"
_STALE_SECONDS = 24 * 3600


def ensure_entry(parent: Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return ``parent/key``, calling ``build(directory)`` to fill it first if it is missing.

    ``build`` gets an empty private directory; if it raises, the directory is removed and the
    error propagates, leaving no entry.
    """
    if not key or key.startswith(".") or "/" in key:
        raise ValueError(f"not a usable cache key: {key!r}")
    entry = parent / key
    if entry.is_dir():
        return entry
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent)
    work = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{key}-", dir=parent))
    try:
        build(work)
        os.chmod(work, 0o755)  # mkdtemp made it 0700
        try:
            os.rename(work, entry)
        except OSError:
            if not entry.is_dir():
                raise
            # Another process finished the same entry first; its copy is as good as ours.
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return entry


def _remove_stale_temporaries(parent: Path) -> None:
    cutoff = time.time() - _STALE_SECONDS
    for child in parent.iterdir():
        if not child.name.startswith(_TEMP_PREFIX):
            continue
        try:
            if child.lstat().st_mtime < cutoff:
                shutil.rmtree(child, ignore_errors=True)
        except OSError:
            continue
