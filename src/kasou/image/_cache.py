"""Where the default guest is cached, and how a build gets into the cache without ever leaving
a half-built entry there.

Layout under ``cache_dir()``::

    guest/kernel/<key>/       vmlinux, bzImage, config, manifest.json
    guest/userland/<key>/     initrd.cpio.gz, rootfs.ext4, manifest.json
    guest/logs/               one log per build step, kept after a failure
    guest/tmp/                builds in progress (same file system, so the final rename is atomic)
    guest/lock                held (flock) while a build runs
    debian-12/                the Debian 12 image (``_debian``): ``<key>/`` entries, and logs/,
                              tmp/ and lock of its own, used as above

An entry is complete exactly when its directory exists under its key: a build writes into a
temporary directory and renames it into place as its last step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# json, fcntl, shutil and tempfile are imported where used: finding the cache must stay cheap,
# it is on the path of every `kasou` command that boots the default guest.

__all__ = [
    "MANIFEST",
    "build_lock",
    "cache_dir",
    "guest_dir",
    "install",
    "log_dir",
    "read_manifest",
    "staging_dir",
]

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """kasou's cache: ``$KASOU_CACHE_DIR``, else ``$XDG_CACHE_HOME/kasou``, else
    ``~/.cache/kasou`` (XDG Base Directory Specification 0.8)."""
    explicit = os.environ.get("KASOU_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The spec says a relative $XDG_CACHE_HOME is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "kasou"
    return Path.home() / ".cache" / "kasou"


def guest_dir() -> Path:
    return cache_dir() / "guest"


def log_dir(root: Path | None = None) -> Path:
    """Where build logs are kept: ``logs/`` under ``root`` (the default guest's directory
    unless given)."""
    path = (guest_dir() if root is None else root) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_manifest(entry: Path) -> dict[str, str] | None:
    """The manifest of a complete cache entry, or None if ``entry`` is not one."""
    import json

    try:
        data = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return None
    return data


@contextlib.contextmanager
def build_lock(root: Path | None = None) -> Iterator[None]:
    """Serialise builds between processes (two `kasou` commands building at once): the lock
    is ``root/lock`` (``root`` is the default guest's directory unless given)."""
    import fcntl
    import shutil

    root = guest_dir() if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Builds are serialised by this lock, so whatever is left in tmp/ now was left by a
        # build that was killed: remove it.
        shutil.rmtree(root / "tmp", ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(name: str, root: Path | None = None) -> Iterator[Path]:
    """A fresh temporary directory in ``root/tmp`` (``root`` is the default guest's directory
    unless given), removed on the way out whatever happens."""
    import shutil
    import tempfile

    tmp = (guest_dir() if root is None else root) / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def install(built: Path, kind: str, key: str, manifest: dict[str, str]) -> Path:
    """Move the finished build ``built`` (a directory inside a ``staging_dir``) to
    ``guest/<kind>/<key>`` and drop every other entry of that kind (they are stale). Returns the
    entry's path."""
    import json
    import shutil

    (built / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    parent = guest_dir() / kind
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / key
    if final.exists():
        # A forced rebuild: move the old entry into the staging directory (removed with it)
        # so that the rename below is atomic.
        final.rename(built.parent / f"replaced-{key}")
    built.rename(final)
    for other in parent.iterdir():
        if other.name != key:
            shutil.rmtree(other, ignore_errors=True)
    return final
