"""``kasou run --jail``: what the jailed VMM can see and do, read from the host side
(/proc/PID/root, /proc/PID/status, /proc/PID/ns), and that no jail outlives its VM, however
the VM or kasou ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kasou.client.control import ControlClient
from kasou.guestkit import cmdline
from kasou.jail import DEFAULT_ID

from .conftest import KASOU, kasou_with_socket, wait_gone

if os.geteuid() != 0:
    pytest.skip("--jail needs root", allow_module_level=True)


def _args(elf: Path, base: Path, workload: str, *options: str) -> list[str]:
    return [
        KASOU,
        "run",
        "--jail",
        "--jail-dir",
        str(base),
        "--kernel",
        str(elf),
        "--memory",
        "64M",
        "--console",
        "none",
        "--cmdline",
        cmdline(workload),
        *options,
    ]


class Jailed:
    """A jailed ``kasou run``: the supervisor, and the VMM child it forked."""

    def __init__(self, process: subprocess.Popen[bytes], sock: Path) -> None:
        self.process = process
        self.sock = sock
        pid = process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert len(children) == 1, children
        self.child = int(children[0])

    def status(self) -> dict[str, str]:
        lines = Path(f"/proc/{self.child}/status").read_text().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)


@contextlib.contextmanager
def jailed(
    elf: Path, base: Path, sock: Path, workload: str = "wait", *options: str
) -> Iterator[Jailed]:
    command = _args(elf, base, workload, "--api-sock", str(sock), *options)
    with kasou_with_socket(command, sock) as process:
        yield Jailed(process, sock)


def test_the_jailed_vmm_sees_only_its_jail(guest_elf: Path, tmp_path: Path) -> None:
    base, sock = tmp_path / "jails", tmp_path / "vm.sock"
    marker = Path("/root") / f"kasou-jail-marker-{os.getpid()}"
    marker.write_text("host only")
    try:
        with jailed(guest_elf, base, sock) as vm:
            # The control socket works from the host, through the jail.
            client, deadline = ControlClient(sock), time.monotonic() + 30
            while client.request("status")["state"] != "running":  # booting, in the jail
                assert time.monotonic() < deadline, "the VM did not start"
                time.sleep(0.01)
            root = Path(f"/proc/{vm.child}/root")
            assert not (root / str(marker).lstrip("/")).exists()
            assert marker.exists()
            assert (root / str(guest_elf).lstrip("/")).is_file()
            assert sorted(p.name for p in (root / "dev").iterdir()) == [
                "kvm",
                "net",
                "null",
                "urandom",
            ]
            # Only its own PID namespace: the VMM is PID 1, its reporter 2; no host process.
            pids = [p.name for p in (root / "proc").iterdir() if p.name.isdigit()]
            assert pids == ["1", "2"]  # the VMM and its seccomp reporter (jail/seccomp.py)
            # No network but lo without a TAP.
            devices = Path(f"/proc/{vm.child}/net/dev").read_text().splitlines()[2:]
            assert [line.split(":")[0].strip() for line in devices] == ["lo"]
            status = vm.status()
            assert status["Uid"].split() == [str(DEFAULT_ID)] * 4
            assert status["Gid"].split() == [str(DEFAULT_ID)] * 4
            for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(status[capabilities], 16) == 0, capabilities
            assert status["NoNewPrivs"].strip() == "1"
            assert status["NSpid"].split()[-1] == "1"
            for kind in ("mnt", "pid", "ipc", "uts", "net"):
                assert os.readlink(f"/proc/{vm.child}/ns/{kind}") != os.readlink(
                    f"/proc/self/ns/{kind}"
                ), kind
            limits = Path(f"/proc/{vm.child}/limits").read_text()
            assert "Max core file size        0" in limits
            assert len(os.listdir(base)) == 1
            ControlClient(sock).request("stop")
            assert vm.process.wait(30) == 0
    finally:
        marker.unlink()
    assert os.listdir(base) == []
    assert not os.path.lexists(sock)


def test_kill_9_of_the_vmm_leaves_no_jail(guest_elf: Path, tmp_path: Path) -> None:
    base, sock = tmp_path / "jails", tmp_path / "vm.sock"
    with jailed(guest_elf, base, sock) as vm:
        os.kill(vm.child, signal.SIGKILL)
        assert vm.process.wait(30) == 128 + signal.SIGKILL
    assert os.listdir(base) == []
    assert not os.path.lexists(sock)


def test_kill_9_of_the_supervisor_kills_the_vmm_and_the_next_run_sweeps(
    guest_elf: Path, tmp_path: Path
) -> None:
    base, sock = tmp_path / "jails", tmp_path / "vm.sock"
    with jailed(guest_elf, base, sock) as vm:
        vm.process.kill()
        vm.process.wait(30)
        wait_gone(vm.child)  # PR_SET_PDEATHSIG
        assert len(os.listdir(base)) == 1  # nobody was left to clean up
    result = subprocess.run(
        _args(guest_elf, base, "hello"), capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert os.listdir(base) == []


def _one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_jail_input_exits_2_and_leaves_nothing(guest_elf: Path, tmp_path: Path) -> None:
    base = tmp_path / "jails"
    base.mkdir()
    run = subprocess.run
    result = run([*_args(guest_elf, base, "hello"), "--jail-uid", "0"], capture_output=True)
    assert "jail-uid" in _one_error_line(result)
    result = run(_args(guest_elf, Path("/proc/kasou-jails"), "hello"), capture_output=True)
    assert "not a writable folder" in _one_error_line(result)
    assert not Path("/proc/kasou-jails").exists()
    # The folder kasou would make exists (exec keeps the shell's pid).
    command = f'mkdir "{base}/kasou-$$" && exec "$@"'
    result = run(["sh", "-c", command, "sh", *_args(guest_elf, base, "hello")], capture_output=True)
    assert "exists" in _one_error_line(result)
    (leftover,) = os.listdir(base)
    assert os.listdir(base / leftover) == []  # nothing added to it
    result = run([*_args(guest_elf, base, "hello")[:2], "--jail-uid", "5"], capture_output=True)
    assert "add --jail" in _one_error_line(result)


def test_files_are_lent_to_the_jail_and_given_back(guest_elf: Path, tmp_path: Path) -> None:
    disk, log = tmp_path / "disk.raw", tmp_path / "console.log"
    disk.write_bytes(bytes(1 << 20))
    disk.chmod(0o600)  # only root may read it on the host
    args = _args(guest_elf, tmp_path / "jails", "hello", "--disk", "disk.raw")
    args[args.index("none")] = f"file:{log}"
    result = subprocess.run(args, capture_output=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hello from ring 3" in log.read_text()
    for path in (disk, log):
        assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
    assert disk.stat().st_mode & 0o777 == 0o600


def test_a_jailed_vm_changes_its_own_limits_live(guest_elf: Path, tmp_path: Path) -> None:
    """The supervisor makes the cgroup and hands its folder to the jail: the VMM, without
    capabilities and without the host's cgroup tree, changes its quota itself."""
    from kasou.errors import KasouError
    from kasou.resources._limits import QUOTA_PERIOD_US

    base, sock = tmp_path / "jails", tmp_path / "vm.sock"
    with jailed(guest_elf, base, sock, "counter", "--cpus-quota", "0.5") as vm:
        with ControlClient(sock, timeout=10) as client:
            report = client.request("limits", cpus_quota=0.2)
            folder = Path(report["cgroup"]["folders"]["cpu"])
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            assert quota == round(0.2 * QUOTA_PERIOD_US)
            assert str(vm.child) in (folder / "cgroup.procs").read_text().split()
            with pytest.raises(KasouError, match="only limits given at the start"):
                client.request("limits", pids_limit=100)
            client.request("stop")
        assert vm.process.wait(30) == 0
    assert not folder.exists()
