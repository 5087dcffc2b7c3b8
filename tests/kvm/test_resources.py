"""CPU quota, pinning and the cgroup's lifetime on this host's real cgroups: ``kasou run``
with limits as a user runs it, measured from the group's own CPU accounting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.client import ControlClient
from kasou.guestkit import cmdline
from kasou.resources import find_hierarchy

from .conftest import KASOU, kasou_with_socket

if os.geteuid() != 0 or "cpu" not in find_hierarchy().available:
    pytest.skip("needs root and a cgroup cpu controller", allow_module_level=True)


def _groups() -> set[str]:
    """The VM groups under kasou's cpu hierarchy now."""
    parent = find_hierarchy().own_folder("cpu") / "kasou"
    return (
        {folder.name for folder in parent.iterdir() if folder.is_dir()}
        if parent.exists()
        else set()
    )


@contextlib.contextmanager
def kasou(
    elf: Path, sock: Path, *options: str, vcpus: int = 1
) -> Iterator[subprocess.Popen[bytes]]:
    """``kasou run`` spinning in ring 3 (``counter``) with a control socket; killed if the
    test leaves it running."""
    with kasou_with_socket(
        [
            KASOU,
            "run",
            "--kernel",
            str(elf),
            "--memory",
            "64M",
            "--vcpus",
            str(vcpus),
            "--cmdline",
            cmdline("counter"),
            "--console",
            "none",
            "--api-sock",
            str(sock),
            *options,
        ],
        sock,
    ) as process:
        yield process


def _cpu_share(client: ControlClient, seconds: float = 2.0) -> float:
    """The share of one host CPU the VM's group used over ``seconds`` of wall time."""
    first, start = client.limits()["usage"]["cpu_seconds"], time.monotonic()
    time.sleep(seconds)  # the measuring window, not a wait for anything
    last, end = client.limits()["usage"]["cpu_seconds"], time.monotonic()
    return float(last - first) / (end - start)


def test_a_quota_holds_a_spinning_guest_and_changes_live(guest_elf: Path, tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    with kasou(guest_elf, sock, "--cpus-quota", "0.5"), ControlClient(sock) as client:
        assert client.limits()["cgroup"]["version"] == 1
        assert abs(_cpu_share(client) - 0.5) <= 0.1
        assert client.limits(cpus_quota=0.2)["cpus_quota"] == 0.2
        assert abs(_cpu_share(client) - 0.2) <= 0.1


def _last_cpu(pid: int, tid: int) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2 :].split()[36])


def test_pinned_vcpu_threads_run_on_their_cpus(guest_elf: Path, tmp_path: Path) -> None:
    sock = tmp_path / "vm.sock"
    with kasou(guest_elf, sock, "--cpu-pin", "0=1,1=0", vcpus=2) as process:
        deadline = time.monotonic() + 30
        vcpus: dict[int, int] = {}
        while len(vcpus) < 2:  # the socket answers before the vCPU threads exist
            assert time.monotonic() < deadline, "the vCPUs never started"
            with ControlClient(sock) as client:
                report = client.limits()
            vcpus = {vcpu["vcpu"]: vcpu["tid"] for vcpu in report["vcpus"]}
        assert report["cgroup"] is None  # pinning alone makes no group
        assert os.sched_getaffinity(vcpus[0]) == {1}
        assert os.sched_getaffinity(vcpus[1]) == {0}
        # vCPU 0 spins: once it has run since it was pinned, the CPU it last ran on is its
        # pinned one (proc(5), field 39 of /proc/PID/task/TID/stat).
        while _last_cpu(process.pid, vcpus[0]) != 1:
            assert time.monotonic() < deadline, "vCPU 0 never ran on CPU 1"
            time.sleep(0.05)
        with ControlClient(sock) as client:
            client.limits(cpu_pin="0=0")
        assert os.sched_getaffinity(vcpus[0]) == {0}
        assert os.sched_getaffinity(vcpus[1]) == set(os.sched_getaffinity(0))


def test_the_group_goes_with_kasou_and_a_killed_ones_with_the_next(
    guest_elf: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "vm.sock"
    with kasou(guest_elf, sock, "--cpus-quota", "1") as process:
        assert f"kasou-{process.pid}" in _groups()
        with ControlClient(sock) as client:
            client.request("stop")
        assert process.wait(30) == 0
    assert f"kasou-{process.pid}" not in _groups()
    with kasou(guest_elf, sock, "--cpus-quota", "1") as killed:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    assert f"kasou-{killed.pid}" in _groups()  # nobody removed it
    sock.unlink()
    with kasou(guest_elf, sock, "--cpus-quota", "1") as process:
        assert f"kasou-{killed.pid}" not in _groups()
        assert f"kasou-{process.pid}" in _groups()


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--cpu-pin", "0=99", "kasou may run on CPUs"),
        ("--cpu-pin", "3=0", "vCPU 3 does not exist"),
        ("--memory-limit", "32M", "below guest RAM"),
        ("--cpus-quota", "-1", "too little"),
        ("--cpus-quota", "500", "more than the"),
    ],
)
def test_bad_limits_exit_2_with_one_line_and_no_group(
    guest_elf: Path, tmp_path: Path, option: str, value: str, words: str
) -> None:
    before = _groups()
    result = subprocess.run(
        [
            KASOU,
            "run",
            "--kernel",
            str(guest_elf),
            "--memory",
            "64M",
            "--cmdline",
            cmdline("hello"),
            "--cpus-quota",
            "0.5",
            option,
            value,
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert _groups() <= before
