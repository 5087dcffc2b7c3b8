"""A memory limit contains a VM, and only that VM: ``--memory-limit`` puts kasou in a memory
cgroup of its own, guest RAM is charged to it as the guest touches it, and when the VM goes
past the group's limit the kernel stops that kasou alone while a neighbour VM goes on.

kasou refuses a limit below guest RAM plus its overhead (a guest cannot use more RAM than it
has), so the test lowers the group's limit behind kasou's back, through the cgroup file as a
host operator or agent could, to play a VM whose memory grows past its limit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kasou.client import ControlClient
from kasou.guestkit import build_guest, cmdline
from kasou.resources import find_hierarchy

KASOU = str(Path(sys.executable).with_name("kasou"))

if os.geteuid() != 0 or "memory" not in find_hierarchy().available:
    pytest.skip("needs root and a cgroup memory controller", allow_module_level=True)


def _memcheck(sock: Path, console: Path, mib: int, *options: str) -> subprocess.Popen[bytes]:
    """A guest that walks ``mib`` MiB of its RAM, touching 5 pages a millisecond."""
    command = [
        KASOU, "run", "--kernel", str(build_guest()), "--memory", f"{16 + mib + 16}M",
        "--cmdline", cmdline("memcheck", mib=mib, rate=5, report=1),
        "--console", f"file:{console}", "--api-sock", str(sock), *options,
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _passes(console: Path) -> int:
    text = console.read_text(errors="replace") if console.exists() else ""
    assert "memcheck: page" not in text, text[-1000:]
    return text.count("memcheck: pass ")


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]  # another process's progress
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_a_vm_past_its_memory_limit_is_stopped_alone(tmp_path: Path) -> None:
    neighbour_sock, neighbour_log = tmp_path / "n.sock", tmp_path / "n.log"
    greedy_sock, greedy_log = tmp_path / "g.sock", tmp_path / "g.log"
    neighbour = _memcheck(neighbour_sock, neighbour_log, 32)
    greedy = _memcheck(greedy_sock, greedy_log, 160, "--memory-limit", "208M")
    try:
        _wait(greedy_sock.exists, 30, "the limited VM's control socket")
        with ControlClient(greedy_sock, timeout=10) as client:
            report = client.request("limits")
        assert report["memory_limit"] == 208 << 20, report
        folder = Path(report["cgroup"]["folders"]["memory"])
        limit_file = next(
            folder / name
            for name in ("memory.limit_in_bytes", "memory.max")
            if (folder / name).exists()
        )
        assert int(limit_file.read_text()) == 208 << 20
        # Its memory is to grow past the limit: 64 MiB, while it walks 160 MiB (set early:
        # a cgroup v1 limit cannot be set below what the group already holds).
        limit_file.write_text(str(64 << 20))
        greedy.wait(60)
        assert greedy.returncode == -9, (greedy.returncode, greedy.stderr)  # the OOM killer
        before = _passes(neighbour_log)
        _wait(lambda: _passes(neighbour_log) > before + 2, 60, "the neighbour's next passes")
        assert neighbour.poll() is None
        with ControlClient(neighbour_sock, timeout=10) as client:
            assert client.request("status")["state"] == "running"
    finally:
        for process in (greedy, neighbour):
            if process.poll() is None:
                process.terminate()
                process.wait(30)
            process.communicate()
    # The group of a kasou killed outright is removed by the next start that has limits.
    follower = _memcheck(tmp_path / "f.sock", tmp_path / "f.log", 8, "--memory-limit", "64M")
    try:
        _wait((tmp_path / "f.sock").exists, 30, "the next VM's control socket")
        assert not folder.exists(), folder
    finally:
        follower.terminate()
        follower.wait(30)
        follower.communicate()
