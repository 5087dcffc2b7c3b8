"""The initramfs writer (kasou.image._cpio), read back by the system's cpio tool."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kasou.image._cpio import Entry, write_cpio, write_cpio_gz

ENTRIES = [
    Entry("bin", "dir", 0o755),
    Entry("bin/hello", "file", 0o755, b"#!/bin/sh\necho hello\n"),
    Entry("bin/sh", "symlink", 0o777, b"/bin/busybox"),
    Entry("dev", "dir", 0o755),
    Entry("dev/console", "chardev", 0o600, rdev=(5, 1)),
    Entry("dev/null", "chardev", 0o666, rdev=(1, 3)),
    Entry("etc", "dir", 0o755),
    Entry("etc/odd", "file", 0o644, b"x" * 5),  # a size that needs padding
    Entry("tmp", "dir", 0o1777),
]


def _archive(entries: list[Entry]) -> bytes:
    out = io.BytesIO()
    write_cpio(entries, out)
    return out.getvalue()


def test_layout_is_newc_with_a_trailer() -> None:
    raw = _archive(ENTRIES[:2])
    assert raw.startswith(b"070701")
    assert b"TRAILER!!!\0" in raw
    # Each header and each file's data start on a 4-byte boundary.
    assert raw.index(b"070701", 6) % 4 == 0
    assert len(raw) % 4 == 0


def test_same_entries_give_the_same_bytes_even_gzipped() -> None:
    first, second = io.BytesIO(), io.BytesIO()
    write_cpio_gz(ENTRIES, first)
    write_cpio_gz(ENTRIES, second)
    assert first.getvalue() == second.getvalue()
    assert gzip.decompress(first.getvalue()) == _archive(ENTRIES)


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_cpio_tool_lists_modes_owners_and_device_numbers() -> None:
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"],
        input=_archive(ENTRIES),
        capture_output=True,
        check=True,
    ).stdout.decode()
    # "mode links owner group size date name [-> target]": key each line by its name.
    lines = {line.split(" -> ")[0].split()[-1]: line for line in listing.splitlines()}
    assert lines["bin/hello"].startswith("-rwxr-xr-x   1 root     root           21")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("-> /bin/busybox")
    assert lines["dev/console"].startswith("crw-------") and " 5,   1 " in lines["dev/console"]
    assert lines["dev/null"].startswith("crw-rw-rw-") and " 1,   3 " in lines["dev/null"]
    assert lines["tmp"].startswith("drwxrwxrwt")
    assert all("Jan  1  1970" in line for line in lines.values())


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs the cpio tool")
def test_cpio_tool_extracts_the_same_files(tmp_path: Path) -> None:
    files = [e for e in ENTRIES if e.kind != "chardev"]  # mknod would need root
    subprocess.run(
        ["cpio", "-id", "--quiet", "--no-preserve-owner"],
        input=_archive(files),
        cwd=tmp_path,
        check=True,
    )
    assert (tmp_path / "bin/hello").read_bytes() == b"#!/bin/sh\necho hello\n"
    assert stat.S_IMODE((tmp_path / "bin/hello").stat().st_mode) == 0o755
    assert (tmp_path / "etc/odd").read_bytes() == b"xxxxx"
    assert os.readlink(tmp_path / "bin/sh") == "/bin/busybox"


@pytest.mark.parametrize("path", ["/bin", "a/../b", "a//b", ""])
def test_paths_must_be_relative_and_normalised(path: str) -> None:
    with pytest.raises(ValueError, match="relative"):
        _archive([Entry(path, "dir", 0o755)])
