"""The warm template (kasou.cli.template, driven through kasou.daemon._template): each VM
is a spare process forked before its request, whose seccomp filters were started ahead of
its VM; what it reports lands in that VM's own log, and spares do not outlive the template."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou.client.control import ControlClient
from kasou.daemon import _template
from kasou.daemon._template import Template
from kasou.errors import KasouError
from kasou.guestkit import cmdline

from .conftest import wait_gone


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="kt-", dir="/tmp"))  # short: socket paths
    yield path
    for entry in sorted(path.rglob("*"), reverse=True):
        entry.rmdir() if entry.is_dir() else entry.unlink()
    path.rmdir()


def _argv(elf: Path, vm: Path) -> list[str]:
    return [
        "--memory",
        "64M",
        "--kernel",
        str(elf),
        "--cmdline",
        f"console=ttyS0 {cmdline('wait')}",
        "--api-sock",
        str(vm / "api.sock"),
        "--console",
        f"sock:{vm / 'console.sock'},log={vm / 'console.log'}",
    ]


def _status(sock: Path, timeout: float = 30.0) -> dict[str, Any]:
    """The VM's ``status`` once its control socket answers (it makes it a few ms in)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with ControlClient(sock, timeout=5.0) as client:
                return client.request("status")
        except (OSError, KasouError):
            if time.monotonic() > deadline:
                raise
        select.select([], [], [], 0.005)  # a poll interval, not a wait for an outcome


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_forbidden_call_is_reported_in_the_vms_own_log(
    folder: Path, guest_elf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The template passes its environment on: the first vCPU thread calls getppid.
    monkeypatch.setenv("KASOU_TEST_HOOKS", "1")
    monkeypatch.setenv("KASOU_SECCOMP_PROBE", "vcpu")
    template = Template(folder / "template.log")
    vm = folder / "vm"
    vm.mkdir()
    try:
        pid = template.spawn(_argv(guest_elf, vm), vm)
        wait_gone(pid, timeout=30)
    finally:
        template.close()
    log = (vm / "stderr.log").read_text()
    assert "made a forbidden system call: getppid (110); stopping" in log, log
    assert "forbidden" not in (folder / "template.log").read_text()
    assert not (vm / "exit").exists()  # killed by the reporter: it wrote no status


def test_each_vm_is_its_own_process_in_its_own_folder(folder: Path, guest_elf: Path) -> None:
    template = Template(folder / "template.log")
    pids = []
    try:
        for index in range(3):
            vm = folder / f"vm{index}"
            vm.mkdir()
            pids.append(template.spawn(_argv(guest_elf, vm), vm))
            # A spare becomes the VM whose request it gets, in that VM's folder.
            assert _status(vm / "api.sock")["state"] in ("created", "booting", "running")
            assert os.readlink(f"/proc/{pids[-1]}/cwd") == str(vm)
        assert len(set(pids)) == 3
    finally:
        template.close()
        for pid in pids:
            os.kill(pid, 9)
            wait_gone(pid)


def test_an_unused_spare_ends_with_the_template(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reaped: list[int] = []
    reap = _template._reap

    def record(pid: int) -> None:
        reaped.append(pid)
        reap(pid)

    monkeypatch.setattr(_template, "_reap", record)
    template = Template(folder / "template.log")
    template.start()  # its first spare is forked before it says it is ready
    template.close()
    assert len(reaped) == 1
    assert not _alive(reaped[0])


def test_a_vm_says_on_the_pipe_it_was_given_when_its_vcpus_run(
    folder: Path, guest_elf: Path
) -> None:
    # kasoud waits for this instead of asking the VM's control socket while it builds.
    template = Template(folder / "template.log")
    vm = folder / "vm"
    vm.mkdir()
    booted, writer = os.pipe()
    pid = None
    try:
        pid = template.spawn(_argv(guest_elf, vm), vm, booted=writer)
        os.close(writer)
        assert select.select([booted], [], [], 30)[0], "the VM kept its end of the pipe"
        assert os.read(booted, 8) == _template.BOOTED
        assert os.read(booted, 8) == b""  # and closed it
        assert _alive(pid)
        assert _status(vm / "api.sock")["state"] == "running"  # built, its vCPU started
    finally:
        os.close(booted)
        template.close()
        if pid is not None:
            os.kill(pid, 9)
            wait_gone(pid)


def test_a_vm_that_cannot_be_built_closes_the_pipe_as_it_ends(
    folder: Path, guest_elf: Path
) -> None:
    template = Template(folder / "template.log")
    vm = folder / "vm"
    vm.mkdir()
    booted, writer = os.pipe()
    try:
        argv = [*_argv(guest_elf, vm), "--memory", "1K"]  # less RAM than any VM takes
        pid = template.spawn(argv, vm, booted=writer)
        os.close(writer)
        assert select.select([booted], [], [], 30)[0], "the VM kept its end of the pipe"
        assert os.read(booted, 8) == b""  # closed as it ended, without a word
        wait_gone(pid)
    finally:
        os.close(booted)
        template.close()
    assert (vm / "exit").read_text() == "2\n"
    assert "kasou: error:" in (vm / "stderr.log").read_text()


def _threads(pid: int) -> list[tuple[str, str]]:
    """Each thread of ``pid``: its name and its seccomp mode (proc(5); 2: filtered)."""
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            comm = (task / "comm").read_text().strip()
            status = (task / "status").read_text().splitlines()
            mode = next(line.split()[1] for line in status if line.startswith("Seccomp:"))
            threads.append((comm, mode))
    return sorted(threads)


def _until(check: Any, timeout: float = 30.0) -> Any:
    """``check()`` once it is true (another process's setup, bounded)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "not within the time allowed"
        select.select([], [], [], 0.005)  # a poll interval, not a wait for an outcome
    return result


def test_a_spare_starts_its_vms_threads_ahead_and_the_vm_takes_them(
    folder: Path, guest_elf: Path
) -> None:
    # The template's own protocol (module docstring), to see the spare before its request.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with open(folder / "template.log", "ab") as log:
        template = subprocess.Popen(
            [sys.executable, "-m", "kasou.cli.template", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    theirs.close()
    ours.settimeout(60)
    spare = last = json.loads(ours.recv(1 << 16))["spare"]
    vm = folder / "vm"
    vm.mkdir()
    try:
        # Waiting for its request: the VM's event loop thread and vCPU thread are started,
        # under their filters, beside the seccomp spawner.
        def parked() -> list[tuple[str, str]]:
            return [thread for thread in _threads(spare) if thread[0] == "kasou-parked"]

        _until(lambda: parked() == [("kasou-parked", "2"), ("kasou-parked", "2")])
        ours.send(json.dumps({"argv": _argv(guest_elf, vm), "dir": str(vm)}).encode())
        assert json.loads(ours.recv(1 << 16))["pid"] == spare
        _until(lambda: _status(vm / "api.sock")["state"] == "running")  # built, vCPU started

        # The VM took both: its threads by their names, every one filtered (the main thread
        # installs its own filter a moment after the vCPUs run).
        def filtered() -> list[tuple[str, str]] | None:
            threads = _threads(spare)
            return threads if {mode for _, mode in threads} == {"2"} else None

        names = [name for name, _ in _until(filtered)]
        assert "kasou-parked" not in names
        assert {"kasou-vcpu0", "kasou-kasou-eve", "kasou-seccomp"} <= set(names)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(spare, 9)
        wait_gone(spare)
        ours.shutdown(socket.SHUT_WR)  # the template ends, and with it its next spare
        with contextlib.suppress(OSError):
            while packet := ours.recv(1 << 16):
                last = json.loads(packet).get("spare") or last
        ours.close()
        template.wait(30)
        if last != spare:
            wait_gone(last)
