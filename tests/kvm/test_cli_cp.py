"""``kasou cp NAME:PATH LOCAL`` / ``LOCAL NAME:PATH`` through a live kasoud: what it refuses
and how. Guest-kit VMs have no agent, so a copy reaches the guest's side and fails there;
copies that succeed need the default guest (the e2e tier)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._kasoud import Kasoud, guest_spec, running_kasoud
from .conftest import KASOU


@pytest.fixture
def kasoud(guest_elf: Path) -> Iterator[Kasoud]:
    with running_kasoud() as daemon:
        yield daemon


def cp(daemon: Kasoud, *args: str) -> str:
    """``kasou cp ARGS`` that must fail: its one error line."""
    result = subprocess.run(
        [KASOU, "cp", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KASOU_HOST": str(daemon.sock)},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result
    (line,) = result.stderr.splitlines()
    assert line.startswith("kasou: error: ")
    return line


def test_cp_through_kasoud_refuses_clearly(kasoud: Kasoud, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert "ghost" in cp(kasoud, "ghost:/etc/hostname", str(out))  # no such VM
    assert kasoud.api.post("/v1/vms", json=guest_spec("g")).status_code == 201
    assert "it is created, it must be running" in cp(kasoud, "g:/etc/hostname", str(out))
    assert "one SRC and one DEST" in cp(kasoud, "a", "b", "g:/c")
    assert "both paths are in guests" in cp(kasoud, "g:/a", "g:/b")
    assert "NAME:/PATH" in cp(kasoud, str(tmp_path), str(out))
    assert "not a regular file" in cp(kasoud, str(tmp_path / "missing"), "g:/root/")

    assert kasoud.api.post("/v1/vms/g/start").status_code == 200
    cp(kasoud, "g:/etc/hostname", str(out))  # the guest kit has no agent: the guest's error
    cp(kasoud, __file__, "g:/root/")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert kasoud.api.get("/v1/vms/g").json()["state"] == "running"


def test_cp_with_sock_keeps_its_own_form(kasoud: Kasoud, tmp_path: Path) -> None:
    line = cp(kasoud, "--sock", str(tmp_path / "none.sock"), ":/etc/hostname", str(tmp_path))
    assert "none.sock" in line
