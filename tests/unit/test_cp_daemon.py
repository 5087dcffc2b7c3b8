"""``kasou cp`` through kasoud: which side of the copy is a guest (``NAME:/PATH``), and the
local half of a copy out of a guest (written whole or not at all)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasou.cli.cp_daemon import GuestPath, _plan, _write_local, parse_guest_path
from kasou.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("web:/etc/hostname", GuestPath("web", "/etc/hostname")),
        ("web-2:/", GuestPath("web-2", "/")),
        ("web:etc/hostname", None),  # a guest path must be absolute
        ("./web:/etc", None),  # a local path that holds a colon
        ("/tmp/a:/b", None),
        ("Bad Name:/x", None),  # not a VM name
        ("hostname", None),
        (":/etc/hostname", None),  # the --sock form's guest path
    ],
)
def test_guest_paths_are_name_colon_absolute_path(text: str, parsed: GuestPath | None) -> None:
    assert parse_guest_path(text) == parsed


def test_the_plan_names_the_guest_side_and_the_direction() -> None:
    assert _plan("web:/etc/motd", "out") == (GuestPath("web", "/etc/motd"), Path("out"), True)
    assert _plan("in.txt", "web:/root/") == (GuestPath("web", "/root/"), Path("in.txt"), False)
    with pytest.raises(ConfigError, match="both paths are in guests"):
        _plan("a:/x", "b:/y")
    with pytest.raises(ConfigError, match="NAME:/PATH"):
        _plan("here", "there")


def test_a_local_copy_replaces_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "motd"
    target.write_bytes(b"old")
    _write_local(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["motd"]  # no temporary left behind


def test_a_failed_local_copy_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "motd"
    target.mkdir()  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        _write_local(target, b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["motd"]
    assert list(target.iterdir()) == []
