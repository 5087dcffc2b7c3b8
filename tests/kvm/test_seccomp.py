"""seccomp in a running ``kasou run``: every thread filtered, a forbidden call reported by
name and the VMM killed, a VM with every TAP-less device and the control requests running to
its normal end under the filters, and no reporter process left behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.client import ControlClient
from kasou.errors import HostError
from kasou.guestkit import cmdline

from .conftest import wait_gone

KASOU = str(Path(sys.executable).with_name("kasou"))


def _kasou(elf: Path, *options: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [KASOU, "run", "--kernel", str(elf), "--memory", "64M", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=None if env is None else {**os.environ, **env},
    )


@contextlib.contextmanager
def _running(elf: Path, sock: Path, *options: str) -> Iterator[subprocess.Popen[str]]:
    process = _kasou(elf, "--api-sock", str(sock), "--cmdline", cmdline("counter"), *options)
    try:
        deadline = time.monotonic() + 30
        while True:  # another process's start-up, bounded
            assert process.poll() is None, process.communicate()
            with contextlib.suppress(OSError, HostError), ControlClient(sock, timeout=10) as client:
                if client.request("status")["state"] == "running":
                    break
            assert time.monotonic() < deadline, "the VM did not start"
            time.sleep(0.02)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _seccomp_modes(pid: int) -> dict[str, str]:
    modes = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            comm = (task / "comm").read_text().strip()
            for line in (task / "status").read_text().splitlines():
                if line.startswith("Seccomp:"):
                    modes[f"{comm}/{task.name}"] = line.split()[1]
    return modes


@pytest.mark.parametrize(
    ("role", "thread"),
    [("vcpu", "kasou-vcpu0"), ("device", "kasou-kasou-vir"), ("control", "kasou-kasou-eve")],
)
def test_a_forbidden_call_is_named_and_kills_kasou(guest_elf: Path, role: str, thread: str) -> None:
    process = _kasou(
        guest_elf, "--rng", "--cmdline", cmdline("counter"),
        env={"KASOU_TEST_HOOKS": "1", "KASOU_SECCOMP_PROBE": role},
    )  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -9, stderr
    assert stderr == (
        f"kasou: seccomp: thread {thread} made a forbidden system call: getppid (110); stopping\n"
    )


def test_every_thread_and_the_reporter_run_filtered(guest_elf: Path, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    with _running(guest_elf, sock, "--rng", "--disk", _disk(tmp_path, "a.raw")) as process:
        # The main thread finishes its setup (and installs its filter) a moment after the
        # vCPUs run and the control socket answers.
        deadline = time.monotonic() + 10
        while set((modes := _seccomp_modes(process.pid)).values()) != {"2"}:
            assert time.monotonic() < deadline, modes
            time.sleep(0.01)  # another process's setup, bounded
        assert {name.split("/")[0] for name in modes} >= {
            "kasou", "kasou-seccomp", "kasou-vcpu0", "kasou-kasou-eve", "kasou-kasou-vir",
            "kasou-block0",
        }  # fmt: skip
        assert set(modes.values()) == {"2"}, modes
        (reporter,) = _children(process.pid)
        assert set(_seccomp_modes(reporter).values()) == {"2"}
        assert Path(f"/proc/{reporter}/comm").read_text().strip() == "kasou-seccomp"
        process.kill()  # kill -9 of kasou: PR_SET_PDEATHSIG ends the reporter too
        process.wait()
        wait_gone(reporter)


def test_no_seccomp_leaves_the_threads_unfiltered(guest_elf: Path, tmp_path: Path) -> None:
    with _running(guest_elf, tmp_path / "api.sock", "--no-seccomp") as process:
        assert set(_seccomp_modes(process.pid).values()) == {"0"}
        assert _children(process.pid) == []


def _disk(folder: Path, name: str, size: int = 16 << 20) -> str:
    with (folder / name).open("wb") as disk:
        disk.truncate(size)
    return f"{folder / name},format=raw"


def test_a_busy_vm_runs_its_requests_and_ends_normally(guest_elf: Path, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    devices = [
        "--disk", _disk(tmp_path, "a.raw"), "--disk", _disk(tmp_path, "b.raw", 8 << 20),
        "--rng", "--balloon", "--vsock", f"cid=5,uds={tmp_path / 'v.sock'}",
        "--virtio-console", f"sock={tmp_path / 'vc.sock'}",
        "--console", f"file:{tmp_path / 'console.log'}",
    ]  # fmt: skip
    with _running(guest_elf, sock, *devices) as process:
        (reporter,) = _children(process.pid)
        with ControlClient(sock, timeout=30) as client:
            assert client.request("status")["state"] == "running"
            client.request("pause")
            client.request("resume")
            assert len(client.request("devices")["devices"]) >= 6
            client.request("balloon", target="8M")
            client.request("limits")
            client.request("snapshot", path=str(tmp_path / "snap"))
            client.request("stop")
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
        assert "seccomp" not in stderr
        assert (tmp_path / "snap").is_dir()
        wait_gone(reporter)  # reaped by kasou at its end


def test_the_recording_mode_writes_the_call_and_lets_it_through(
    guest_elf: Path, tmp_path: Path
) -> None:
    """How the lists learn what only a Linux guest reaches (tests/tools/seccomp_record.py):
    the call outside the list is written down and the VM goes on to its normal end."""
    record = tmp_path / "calls.txt"
    env = {"KASOU_TEST_HOOKS": "1", "KASOU_SECCOMP_PROBE": "vcpu"}
    process = _kasou(
        guest_elf, "--cmdline", cmdline("hello"),
        env={**env, "KASOU_SECCOMP_RECORD": str(record)},
    )  # fmt: skip
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert record.read_text() == (
        "kasou: seccomp: thread kasou-vcpu0 made a forbidden system call: getppid (110); stopping\n"
    )
