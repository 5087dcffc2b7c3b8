"""A VM moved live from one kasoud to another (``client.vms.move``, ``kasou migrate NAME
--to-host``), two kasouds side by side on this host, each on its own state folder and socket.

The guest is the guest kit's ``memcheck`` workload: it rewrites its memory area pass after
pass, checking every word, and prints ``memcheck: pass P`` every 8th pass. A VM that moved
goes on at the destination from the pass it had reached (never printing ``memcheck: ready``
again, no wrong word). A move that fails leaves the VM running at the source, the same
process, and nothing on the destination: no VM, no listening socket. The VM's definition
moves with it: once it runs at the destination, a restart there (or its restart policy after
a crash) boots it afresh from its kernel, and memcheck prints ``memcheck: ready`` again.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kasou.guestkit import FAIL_PREFIX, cmdline
from kasou.sdk import AsyncClient, Client, Conflict, GuestFailure, InvalidSpec, NotFound
from kasou.spec import Operation, RestartPolicy, VmInfo, VmState

from ._kasoud import Kasoud, free_port, remove_tmp, short_tmp
from .test_migration import CuttingProxy

pytestmark = pytest.mark.kvm

PASS = re.compile(r"memcheck: pass (\d+)\n")
READY = "memcheck: ready"
KASOU = str(Path(sys.executable).parent / "kasou")


class Side:
    """One kasoud and an SDK client on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kasoud = Kasoud(root)
        self.client = Client(self.kasoud.sock)

    def passes(self, name: str) -> list[int]:
        text = self.client.vms.logs(name)
        assert FAIL_PREFIX not in text, text
        return [int(p) for p in PASS.findall(text)]

    def names(self) -> list[str]:
        return [vm.name for vm in self.client.vms.list()]

    def kinds(self, name: str) -> list[str]:
        return [event.kind for event in self.client.event_log(vm=name)]

    def close(self) -> int:
        self.client.close()
        if self.kasoud.process.poll() is None:
            self.kasoud.remove_all()
        return self.kasoud.terminate()


@pytest.fixture
def pair() -> Iterator[tuple[Side, Side]]:
    roots = (short_tmp(), short_tmp())
    sides: list[Side] = []
    try:
        sides = [Side(root) for root in roots]
        yield sides[0], sides[1]
    finally:
        statuses = [side.close() for side in sides]
        for root in roots:
            remove_tmp(root)
    assert statuses == [0, 0]


def _until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a log the VM writes; the deadline decides


def _memcheck(side: Side, name: str, guest_elf: Path) -> VmInfo:
    vm = side.client.vms.create(
        name=name,
        kernel=str(guest_elf),
        memory="64M",
        cmdline="console=ttyS0 " + cmdline("memcheck", mib=8, report=8),
        labels={"tier": "db", "team": "blue"},
        restart=RestartPolicy.ON_FAILURE,
        start=True,
    )
    _until(f"{name}'s memcheck", lambda: len(side.passes(name)) >= 2)
    return vm


def _goes_on(side: Side, name: str, reached: int) -> None:
    """``name`` runs memcheck on from pass ``reached`` at ``side``: not booted again."""
    _until(f"{name} to go on", lambda: len(side.passes(name)) >= 2)
    after = side.passes(name)
    assert after[0] >= reached and after == sorted(after), after
    assert READY not in side.client.vms.logs(name)


def _runs_on(side: Side, name: str, pid: int | None) -> None:
    """``name`` still runs at ``side`` as the same process, and memcheck makes progress."""
    vm = side.client.vms.get(name)
    assert vm.state is VmState.RUNNING and vm.pid == pid, vm
    seen = len(side.passes(name))
    _until(f"{name} to go on at the source", lambda: len(side.passes(name)) >= seen + 2)


def _arrived(side: Side, name: str, reached: int) -> VmInfo:
    vm = side.client.vms.get(name)
    assert vm.state is VmState.RUNNING
    assert vm.spec.labels == {"tier": "db", "team": "blue"}
    assert vm.spec.restart is RestartPolicy.ON_FAILURE and vm.spec.memory == "64M"
    _goes_on(side, name, reached)
    return vm


def test_a_vm_moves_to_another_kasoud_and_back(pair: tuple[Side, Side], guest_elf: Path) -> None:
    a, b = pair
    _memcheck(a, "db", guest_elf)
    listen = b.root / "in.sock"
    seen: list[Operation] = []
    reached = a.passes("db")[-1]
    moved = a.client.vms.move("db", b.client, listen=f"unix:{listen}", progress=seen.append)
    assert moved.state is VmState.RUNNING and moved.name == "db"
    _arrived(b, "db", reached)
    assert a.names() == [] and b.names() == ["db"]
    assert not listen.exists()
    assert seen[-1].state.value == "done" and seen[-1].result is not None
    assert all(0 <= op.progress <= 1 for op in seen)
    # The source's log tells the story to the end; the destination's from its arrival.
    told = a.kinds("db")
    assert told.index("migrating") < told.index("migrated") < told.index("deleted"), told
    assert b.kinds("db")[:3] == ["created", "started", "running"]

    # Back over TCP, with the async client.
    reached = b.passes("db")[-1]
    port = free_port()

    async def back() -> VmInfo:
        async with AsyncClient(b.kasoud.sock) as there, AsyncClient(a.kasoud.sock) as here:
            return await there.vms.move("db", here, listen=f"tcp://127.0.0.1:{port}")

    assert asyncio.run(back()).state is VmState.RUNNING
    _arrived(a, "db", reached)
    assert b.names() == [] and a.names() == ["db"]
    assert "migrated" in b.kinds("db")


def test_a_name_taken_at_the_destination_is_a_conflict(
    pair: tuple[Side, Side], guest_elf: Path
) -> None:
    a, b = pair
    here = _memcheck(a, "web", guest_elf)
    there = b.client.vms.create(name="web", kernel=str(guest_elf), memory="32M")
    events = (len(a.client.event_log()), len(b.client.event_log()))
    with pytest.raises(Conflict, match="has a VM named 'web' already"):
        a.client.vms.move("web", b.client, listen=f"unix:{b.root / 'in.sock'}")
    assert b.client.vms.get("web") == there
    assert (len(a.client.event_log()), len(b.client.event_log())) == events
    _runs_on(a, "web", here.pid)


def test_a_failed_move_leaves_the_vm_at_the_source_and_nothing_there(
    pair: tuple[Side, Side], guest_elf: Path
) -> None:
    a, b = pair
    pid = _memcheck(a, "app", guest_elf).pid

    # A listen URL the destination cannot bind: the port is taken.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(GuestFailure, match=r"did not wait on .*(in use|Address)"):
            a.client.vms.move("app", b.client, listen=busy)
    assert b.names() == []
    _runs_on(a, "app", pid)

    # The link cut in the first copy round: the destination's VM ends half-filled.
    listen, proxy_path = b.root / "in.sock", b.root / "proxy.sock"
    proxy = CuttingProxy(proxy_path, listen, 2 << 20, None)
    try:
        with pytest.raises(GuestFailure, match="runs on at the source"):
            a.client.vms.move(
                "app", b.client, listen=f"unix:{listen}", connect=f"unix:{proxy_path}"
            )
    finally:
        proxy.close()
    assert b.names() == [] and not listen.exists()
    _runs_on(a, "app", pid)

    # Nobody at the address the source is told: the destination's VM waits, and is ended.
    with pytest.raises(GuestFailure, match="cannot connect"):
        a.client.vms.move(
            "app", b.client, listen=f"unix:{listen}", connect=f"unix:{b.root / 'nobody'}"
        )
    assert b.names() == [] and not listen.exists()
    _runs_on(a, "app", pid)
    assert a.kinds("app").count("migration-failed") == 2
    with pytest.raises(NotFound):
        b.client.vms.get("app")


def test_the_cli_moves_a_vm(pair: tuple[Side, Side], guest_elf: Path) -> None:
    a, b = pair
    _memcheck(a, "cli", guest_elf)
    reached = a.passes("cli")[-1]
    listen = f"unix:{b.root / 'in.sock'}"

    def kasou(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KASOU, "migrate", *args, "--host", str(a.kasoud.sock)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    missing = kasou("cli", "--to-host", str(b.kasoud.sock))
    assert missing.returncode == 2 and "--listen" in missing.stderr
    done = kasou("cli", "--to-host", str(b.kasoud.sock), "--listen", listen)
    assert done.returncode == 0, done.stderr
    assert "moved cli to" in done.stdout and "running there" in done.stdout
    _arrived(b, "cli", reached)
    assert a.names() == []


def _boots(side: Side, name: str) -> int:
    return side.client.vms.logs(name).count(READY)


def _passes_since_boot(side: Side, name: str) -> list[int]:
    """The memcheck passes after the last boot's ready line (none before the first boot)."""
    side.passes(name)  # no wrong word anywhere
    text = side.client.vms.logs(name)
    return [int(p) for p in PASS.findall(text.rpartition(READY)[2])] if READY in text else []


def test_a_moved_vm_boots_from_its_spec_at_the_destination(
    pair: tuple[Side, Side], guest_elf: Path
) -> None:
    a, b = pair
    declared = _memcheck(a, "db", guest_elf).spec
    reached = a.passes("db")[-1]
    a.client.vms.move("db", b.client, listen=f"unix:{b.root / 'in.sock'}")
    _arrived(b, "db", reached)
    # The destination keeps the whole definition; once the VM runs there, incoming goes.
    _until("the arrival", lambda: b.client.vms.get("db").spec.incoming is None)
    assert b.client.vms.get("db").spec == declared
    arrived = [event for event in b.client.event_log(vm="db") if event.kind == "arrived"]
    assert [event.message for event in arrived] == ["arrived; later starts boot from the spec"]

    # A restart boots the guest afresh (its console shows memcheck's ready line) and it runs.
    assert _boots(b, "db") == 0
    assert b.client.vms.restart("db").state is VmState.RUNNING
    _until("a fresh boot", lambda: _boots(b, "db") == 1)
    _until("memcheck after the restart", lambda: len(_passes_since_boot(b, "db")) >= 2)

    # A crash (the VM process killed): restart=on-failure boots it again, not a wait.
    pid = b.client.vms.get("db").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _until("the restart after the crash", lambda: _boots(b, "db") == 2)
    vm = b.client.vms.get("db")
    assert vm.state is VmState.RUNNING and vm.restarts == 1 and vm.pid != pid, vm
    assert vm.spec.incoming is None
    assert "restarted" in b.kinds("db")
    assert a.names() == [] and not (b.root / "in.sock").exists()


def test_a_move_whose_kernel_is_missing_there_is_refused_before_it_starts(
    pair: tuple[Side, Side], guest_elf: Path
) -> None:
    a, b = pair
    # A kernel only the source had (both kasouds share this host's files): gone once booted.
    kernel = a.root / "vmlinux"
    shutil.copyfile(guest_elf, kernel)
    pid = _memcheck(a, "lone", kernel).pid
    kernel.unlink()
    events = len(b.client.event_log())
    with pytest.raises(InvalidSpec, match=r"kernel.*same path on both hosts.*runs on at the"):
        a.client.vms.move("lone", b.client, listen=f"unix:{b.root / 'in.sock'}")
    assert b.names() == [] and len(b.client.event_log()) == events
    _runs_on(a, "lone", pid)
