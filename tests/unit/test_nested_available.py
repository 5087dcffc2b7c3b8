"""Whether the nested host can run here, and what run_nested refuses before starting QEMU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kasou.errors import ConfigError
from kasou.nested import NestedError, nested_available, run_nested


def test_without_qemu_on_path_the_reason_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a real PATH that holds no QEMU
    reason = nested_available()
    assert reason is not None
    assert "qemu-system-x86_64" in reason
    assert "apt-get install qemu-system-x86" in reason


def test_run_nested_without_qemu_raises_the_same_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NestedError, match="apt-get install qemu-system-x86"):
        run_nested(["true"], cwd=Path("/"))


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU")
def test_with_qemu_only_busybox_or_apt_can_be_missing() -> None:
    reason = nested_available()
    assert reason is None or "busybox" in reason or "apt" in reason


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"command": []}, "command"),
        ({"command": "echo hi"}, "command"),
        ({"command": ["echo"], "env": {"NOT-A-NAME": "x"}}, "command"),
        ({"command": ["echo", "\0"]}, "command"),
        ({"command": ["true"], "timeout": 0}, "timeout"),
        ({"command": ["true"], "memory_mib": 64}, "memory"),
        ({"command": ["true"], "cpus": 0}, "cpus"),
        ({"command": ["true"], "cwd": Path("relative")}, "cwd"),
        ({"command": ["true"], "cwd": Path("/no/such/dir")}, "cwd"),
        ({"command": ["true"], "shares": [Path("/")]}, "shares"),
        ({"command": ["true"], "shares": [Path("/proc")]}, "shares"),
        ({"command": ["true"], "shares": [Path("relative")]}, "shares"),
        ({"command": ["true"], "shares": [Path("/no/such/dir")]}, "shares"),
        ({"command": ["true"], "shares": "/work"}, "shares"),
    ],
)
def test_unusable_requests_are_refused_before_booting(
    kwargs: dict[str, object], field: str
) -> None:
    kwargs.setdefault("cwd", Path("/"))
    with pytest.raises(ConfigError) as raised:
        run_nested(**kwargs)  # type: ignore[arg-type]
    assert raised.value.field == field


def test_a_directory_under_tmp_is_shared_so_the_command_can_see_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /tmp is a fresh tmpfs inside, so a cwd there (a CI checkout, say) is shared by itself:
    # the request gets past the checks and stops at the missing QEMU, not at cwd.
    monkeypatch.setenv("PATH", str(tmp_path))
    assert str(tmp_path).startswith("/tmp/")
    with pytest.raises(NestedError, match="qemu"):
        run_nested(["true"], cwd=tmp_path)
    with pytest.raises(NestedError, match="qemu"):
        run_nested(["true"], cwd=tmp_path, shares=[tmp_path])
