"""kasou.daemon with guest-kit VMs: lifecycle, restart policies, re-attaching after the
daemon is killed, and many VMs at once without leaks.

Waits are on the daemon's event log (``wait_events``) or on its own blocking calls, never on
sleeps.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kasou.daemon import Daemon, RestartTiming
from kasou.errors import NotFoundError, StateError
from kasou.guestkit import cmdline
from kasou.spec import Limits, RestartPolicy, VmSpec, VmState, VmUpdate

# Short backoffs so a crash loop plays out in about a second; the policy logic is the same.
TIMING = RestartTiming(first=0.05, cap=0.4)


def _spec(
    name: str,
    kernel: Path,
    workload: str = "wait",
    args: dict[str, int] | None = None,
    **fields: object,
) -> VmSpec:
    return VmSpec(
        name=name,
        kernel=str(kernel),
        memory="16M",
        cmdline="console=ttyS0 " + cmdline(workload, **(args or {})),
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Sockets live under it: keep the path short (sun_path is 108 bytes).
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="kd"))
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


@pytest.fixture
def daemon(state_dir: Path) -> Iterator[Daemon]:
    opened = Daemon.open(state_dir, timing=TIMING)
    yield opened
    opened.close(stop_vms=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def _wait_state(daemon: Daemon, name: str, state: VmState, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while daemon.get(name).state is not state:
        left = deadline - time.monotonic()
        assert left > 0, f"{name} is {daemon.get(name).state}, never {state}"
        events = daemon.wait_events(seen, left)
        seen = events[-1].id if events else seen


def test_create_start_pause_stop_delete(daemon: Daemon, guest_elf: Path) -> None:
    info = daemon.create(_spec("web", guest_elf), start=True)
    assert info.state is VmState.RUNNING and info.pid is not None
    assert _alive(info.pid)
    assert daemon.request("web", "status")["state"] in ("booting", "running")
    with pytest.raises(StateError, match="it must be paused"):
        daemon.resume("web")
    assert daemon.pause("web").state is VmState.PAUSED
    assert daemon.request("web", "status")["state"] == "paused"
    assert daemon.resume("web").state is VmState.RUNNING
    with pytest.raises(StateError, match="force"):
        daemon.delete("web")

    daemon.update("web", VmUpdate(labels={"tier": "front"}, memory="24M"))
    assert [vm.name for vm in daemon.list(labels={"tier": "front"})] == ["web"]
    assert daemon.list(labels={"tier": "back"}) == []
    assert daemon.get("web").spec.memory == "24M"  # from the next start on

    stopped = daemon.stop("web")
    assert stopped.state is VmState.STOPPED and stopped.pid is None
    assert not _alive(info.pid)
    paths = daemon.paths("web")
    assert not paths.api_sock.exists()
    assert paths.console_log.exists()  # the console went to its log
    assert not paths.console_sock.exists()
    with pytest.raises(StateError):
        daemon.request("web", "status")

    assert daemon.start("web").state is VmState.RUNNING  # a stopped VM starts again
    daemon.delete("web", force=True)
    with pytest.raises(NotFoundError):
        daemon.get("web")
    assert not paths.dir.exists()
    kinds = [e.kind for e in daemon.events(vm="web")]
    assert kinds[0] == "created" and kinds[-1] == "deleted"
    assert kinds.count("started") == 2


def test_console_socket_and_log(daemon: Daemon, guest_elf: Path) -> None:
    daemon.create(_spec("echo", guest_elf, "echo", {"n": 3}), start=True)
    paths = daemon.paths("echo")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as console:
        console.settimeout(30)
        console.connect(str(paths.console_sock))
        console.sendall(b"ok\n")  # the guest echoes 3 characters, then ends with status 0
        seen = b""
        while b"ok" not in seen:
            chunk = console.recv(4096)
            assert chunk, f"the console closed after {seen!r}"
            seen += chunk
    _wait_state(daemon, "echo", VmState.STOPPED)  # exited by itself with 0: stopped
    assert daemon.get("echo").exit_status == 0
    assert "echo: ready" in paths.console_log.read_text()


def test_metrics_and_live_limits(daemon: Daemon, guest_elf: Path) -> None:
    pid = daemon.create(_spec("m", guest_elf), start=True).pid
    daemon.create(_spec("idle", guest_elf))  # not running: no sample
    (sample,) = daemon.metrics()
    assert (sample.name, sample.pid, sample.guest_memory) == ("m", pid, 16 << 20)
    assert 0 < sample.memory_pss <= sample.memory_rss
    assert set(sample.exits) == {"io", "mmio", "other"}  # the VM's status answered with them
    daemon.update("m", VmUpdate(limits=Limits(pids_limit=64)))
    assert daemon.request("m", "limits")["pids_limit"] == 64  # applied live, not only stored


def test_on_failure_crash_loop_ends_failed(daemon: Daemon, guest_elf: Path) -> None:
    daemon.create(_spec("crash", guest_elf, "triple", restart=RestartPolicy.ON_FAILURE))
    daemon.start("crash")
    _wait_state(daemon, "crash", VmState.FAILED)
    info = daemon.get("crash")
    assert info.restarts == TIMING.limit
    assert info.exit_status == 1  # kasou run's status for a guest crash
    assert "crash loop" in info.message
    kinds = [e.kind for e in daemon.events(vm="crash")]
    assert kinds.count("exited") == TIMING.limit + 1
    assert kinds.count("restarted") == TIMING.limit
    assert kinds.count("backoff") == TIMING.limit
    assert kinds[-1] == "failed"
    # Each backoff doubles the last, up to the cap.
    delays = [
        e.message.rsplit(" in ", 1)[1] for e in daemon.events(vm="crash") if e.kind == "backoff"
    ]
    assert delays == ["0.05 s", "0.1 s", "0.2 s", "0.4 s", "0.4 s"]
    # A user start clears the count and the loop begins again.
    assert daemon.start("crash").restarts == 0


def test_never_stays_failed(daemon: Daemon, guest_elf: Path) -> None:
    daemon.create(_spec("once", guest_elf, "triple"), start=True)
    _wait_state(daemon, "once", VmState.FAILED)
    last = daemon.events()[-1].id
    # Longer than any backoff: a restart would show here.
    assert daemon.wait_events(last, 4 * TIMING.cap) == []
    info = daemon.get("once")
    assert info.state is VmState.FAILED and info.restarts == 0 and info.pid is None


_RUNNER = """
import json, sys
from pathlib import Path
from kasou.daemon import Daemon
from kasou.spec import VmSpec
daemon = Daemon.open(Path(sys.argv[1]))
pids = {}
for index in range(int(sys.argv[2])):
    spec = VmSpec.model_validate({**json.loads(sys.argv[3]), "name": f"vm{index}"})
    pids[spec.name] = daemon.create(spec, start=True).pid
print(json.dumps(pids), flush=True)
sys.stdin.read()
"""


def test_reattach_after_the_daemon_is_killed(state_dir: Path, guest_elf: Path) -> None:
    spec = _spec("template", guest_elf).model_dump_json()
    runner = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(state_dir), "10", spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert runner.stdout is not None
    pids = json.loads(runner.stdout.readline())
    assert len(pids) == 10
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    assert all(_alive(pid) for pid in pids.values())  # the VMs outlive their daemon

    daemon = Daemon.open(state_dir, timing=TIMING)
    try:
        for name, pid in pids.items():
            info = daemon.get(name)
            assert (info.state, info.pid) == (VmState.RUNNING, pid)
            assert daemon.request(name, "status")["state"] == "running"
        assert sum(e.kind == "reattached" for e in daemon.events()) == 10

        stopped = daemon.stop("vm3")  # its end is seen through the pidfd
        assert stopped.state is VmState.STOPPED
        assert not _alive(pids["vm3"])
        os.kill(pids["vm4"], signal.SIGKILL)  # an end nobody asked for, no exit file
        _wait_state(daemon, "vm4", VmState.FAILED)
        assert "killed" in daemon.get("vm4").message
    finally:
        daemon.close(stop_vms=True)
    assert not any(_alive(pid) for pid in pids.values())


def test_a_dead_vm_is_not_taken_for_a_reused_pid(state_dir: Path, guest_elf: Path) -> None:
    daemon = Daemon.open(state_dir, timing=TIMING)
    pid = daemon.create(_spec("one", guest_elf), start=True).pid
    assert pid is not None
    daemon.close()  # the VM runs on
    os.kill(pid, signal.SIGKILL)
    # Meanwhile, a process of someone else's under the same pid: the store's start time
    # must not match it. (We cannot force pid reuse; a process with that pid but another
    # start time stands in for it by rewriting the record's start time.)
    from kasou.daemon import SqliteStore

    store = SqliteStore(state_dir / "kasou.db")
    record = store.get("one")
    assert record is not None and record.pid == pid
    record.pid, record.pid_start = os.getpid(), 1  # alive, but started at another time
    store.put(record)
    store.close()
    daemon = Daemon.open(state_dir, timing=TIMING)
    try:
        info = daemon.get("one")
        assert info.state is VmState.FAILED and info.pid is None
        assert _alive(os.getpid())
    finally:
        daemon.close()


def test_host_shutdown_stops_every_vm_by_its_deadline(daemon: Daemon, guest_elf: Path) -> None:
    pids = [daemon.create(_spec(f"h{i}", guest_elf), start=True).pid for i in range(3)]
    daemon.create(_spec("down", guest_elf))  # declared, never started: left alone
    started = time.monotonic()
    # The guest kit does not answer the ACPI power button: stop ends them at the deadline.
    daemon.host_shutdown(deadline=1.0)
    assert time.monotonic() - started < 3.0
    assert [vm.state for vm in daemon.list()] == [VmState.CREATED] + [VmState.STOPPED] * 3
    assert not any(_alive(pid) for pid in pids if pid is not None)
    assert sum(e.kind == "shutting-down" for e in daemon.events()) == 3


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _processes_in(folder: Path) -> list[int]:
    """Processes whose working folder is under ``folder`` (each VM runs in its own)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(str(folder)) and _alive(int(entry)):
                found.append(int(entry))
    return found


def test_fifty_vms_at_once_leave_nothing_behind(
    daemon: Daemon, state_dir: Path, guest_elf: Path
) -> None:
    daemon.list()
    gc.collect()  # objects of earlier tests that hold an fd go now, not during this one
    before = _fds()

    def life(index: int) -> int:
        name = f"s{index}"
        info = daemon.create(_spec(name, guest_elf), start=True)
        assert info.state is VmState.RUNNING and info.pid is not None
        assert daemon.stop(name).state is VmState.STOPPED
        daemon.delete(name)
        return info.pid

    with ThreadPoolExecutor(max_workers=50) as pool:
        pids = list(pool.map(life, range(50)))
    assert len(set(pids)) == 50
    assert daemon.list() == []
    assert not any(_alive(pid) for pid in pids)
    assert _processes_in(state_dir / "vms") == []
    assert list((state_dir / "vms").iterdir()) == []
    assert list(state_dir.rglob("*.sock")) == []
    assert _fds() <= before  # a leak adds fds (one may close meanwhile: a reaped pidfd)
