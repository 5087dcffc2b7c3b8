"""The nested host's cache: an entry is complete or absent, never half-built."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kasou.nested import NestedError, prepare
from kasou.nested._cache import ensure_entry
from kasou.nested._image import INITRAMFS, KERNEL, STOCK_BZIMAGE, _cache_key, find_busybox


def fill(directory: Path) -> None:
    (directory / "data").write_text("built")


def test_an_entry_is_built_once(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(directory: Path) -> None:
        calls.append(directory)
        fill(directory)

    first = ensure_entry(tmp_path, "key", build)
    second = ensure_entry(tmp_path, "key", build)
    assert first == second == tmp_path / "key"
    assert (first / "data").read_text() == "built"
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]  # no temporary left


def test_a_leftover_temporary_directory_is_ignored(tmp_path: Path) -> None:
    # What a build killed half-way leaves: a temporary directory named after the key.
    leftover = tmp_path / ".tmp-key-abc123"
    leftover.mkdir()
    (leftover / "data").write_text("half")
    entry = ensure_entry(tmp_path, "key", fill)
    assert (entry / "data").read_text() == "built"
    assert leftover.exists()  # it may still be someone's build in progress


def test_a_day_old_leftover_is_removed(tmp_path: Path) -> None:
    leftover = tmp_path / ".tmp-key-abc123"
    leftover.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(leftover, (day_ago, day_ago))
    ensure_entry(tmp_path, "other", fill)
    assert not leftover.exists()


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(directory: Path) -> None:
        fill(directory)
        raise RuntimeError("download failed")

    with pytest.raises(RuntimeError, match="download failed"):
        ensure_entry(tmp_path, "key", build)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(find_busybox() is None, reason="needs busybox-static")
def test_prepare_uses_a_complete_entry_and_ignores_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KASOU_CACHE_DIR", str(tmp_path))
    busybox = find_busybox()
    assert busybox is not None
    key = _cache_key(busybox.read_bytes())
    leftover = tmp_path / "nested" / f".tmp-{key}-x"
    leftover.mkdir(parents=True)
    entry = tmp_path / "nested" / key
    entry.mkdir()
    (entry / KERNEL).write_bytes(b"kernel")
    (entry / INITRAMFS).write_bytes(b"initramfs")
    (entry / STOCK_BZIMAGE).write_bytes(b"bzImage")
    # No download happens: prepare() returns at once (PATH without apt proves it).
    monkeypatch.setenv("PATH", str(tmp_path))
    assert prepare() == entry


@pytest.mark.skipif(find_busybox() is None, reason="needs busybox-static")
def test_prepare_refuses_an_entry_missing_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KASOU_CACHE_DIR", str(tmp_path))
    busybox = find_busybox()
    assert busybox is not None
    entry = tmp_path / "nested" / _cache_key(busybox.read_bytes())
    entry.mkdir(parents=True)
    (entry / KERNEL).write_bytes(b"kernel")
    with pytest.raises(NestedError, match="delete it and retry"):
        prepare()
