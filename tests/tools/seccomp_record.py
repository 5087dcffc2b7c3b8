"""Record which system calls each kasou thread role makes, and write the seccomp lists.

Runs representative ``kasou run`` workloads (guest-kit guests on this /dev/kvm) under
``strace -f -qq -Y``, sorts every call by the name of the thread that made it (``-Y`` prints
each thread's comm at the time of the call, so a new thread's first calls, made before it
names itself and installs its own filter, count for its creator, whose filter they pass), and
writes ``src/kasou/jail/syscalls/{vcpu,device,control}.txt`` with the date, the kernel and the
workloads in a header. ``base.txt`` is kept by hand, and so is what kasou.jail.seccomp's own
code calls on filtered threads (``_OWN_CALLS`` there). kasou runs with ``--no-seccomp``, so a
call the lists miss does not end the recording. Run as root::

    .venv/bin/python tests/tools/seccomp_record.py            # write the lists
    .venv/bin/python tests/tools/seccomp_record.py --check    # only print what is missing

Paths only a Linux guest reaches (TAP traffic, vsock exec and cp, scratch overlays) are found
by kasou's recording mode instead: with ``KASOU_TEST_HOOKS=1 KASOU_SECCOMP_RECORD=FILE`` a
call outside the lists is written to FILE and let through, so the e2e tier can run whole::

    .venv/bin/kasou nested --share /tmp/rec -- sh -c \
        "KASOU_TEST_HOOKS=1 KASOU_SECCOMP_RECORD=/tmp/rec/calls.txt .venv/bin/pytest -q tests/e2e"

What it finds goes below the mark at the end of a list file (``KEPT``), which this script
keeps when it writes the file again.

Thread names to roles: ``kasou-vcpuN`` -> vcpu; ``kasou-kasou-eve`` (the runner's
loop, and its control workers, which keep its name) and the main thread (``kasou``, from the
first vCPU's start on) -> control; other ``kasou-*`` threads (``kasou-<vm>-virtio``, one loop
per disk) -> device.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kasou.guestkit import build_guest, cmdline

ROOT = Path(__file__).resolve().parents[2]
LISTS = ROOT / "src" / "kasou" / "jail" / "syscalls"
KASOU = str(Path(sys.executable).with_name("kasou"))
EVENTS = "kasou-kasou-events"[:15]  # the runner's loop of a VM named kasou, as comm shows it
_LINE = re.compile(r"^(\d+)<([^>]*)> +(?:<\.\.\. (\w+) resumed>|(\w+)\()")


def role_of(comm: str) -> str | None:
    if re.fullmatch(r"kasou-vcpu\d+", comm):
        return "vcpu"
    if comm == "kasou-seccomp":
        return None  # the spawner (its list is the union) or the reporter (its own list)
    if comm == EVENTS:
        return "control"
    if comm.startswith("kasou-"):
        return "device"
    if comm == "kasou":
        return "control"
    return None  # strace itself before its exec of kasou


def parse_strace(text: str) -> dict[str, set[str]]:
    """Syscall names by role from an ``strace -f -qq -Y`` log. The VMM's main thread (comm
    ``kasou``, the one that makes KVM_CREATE_VM) takes its filter just after the first boot's
    vCPUs start, so its calls count from the first vCPU thread's first call on: what comes
    before is set-up (opening /dev/kvm, a jail's mounts and privilege drop), made without a
    filter. Other ``kasou`` threads (a jail's supervisor, a new thread before it names
    itself, under its creator's filter) do not count."""
    found: dict[str, set[str]] = {"vcpu": set(), "device": set(), "control": set()}
    started = False
    main: set[int] = set()
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        comm, tid = match.group(2), int(match.group(1))
        role = role_of(comm)
        if " KVM_CREATE_VM," in line:
            main.add(tid)
        if role == "vcpu":
            started = True
        elif comm == "kasou" and (not started or tid not in main):
            continue
        name = match.group(3) or match.group(4)
        if role is not None and name:
            found[role].add(name)
    return found


def _request(sock: Path, message: dict[str, object], timeout: float = 30) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(timeout)
        client.connect(str(sock))
        client.sendall((json.dumps(message) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, object] = json.loads(data)
    return reply


def _wait_for(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} never appeared in {path}")


@contextlib.contextmanager
def _traced(log: Path, args: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    command = ["strace", "-f", "-qq", "-Y", "-o", str(log), KASOU, "run", "--no-seccomp", *args]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        yield process
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _vsock_echo(path: Path) -> Callable[[], None]:
    """The host end of the guest kit's vsock workload: echo what the guest sends."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with contextlib.suppress(OSError):
            client, _ = server.accept()
            with client:
                data = client.recv(4096)
                client.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server.close


def _start_traced(log: Path, args: list[str]) -> subprocess.Popen[bytes]:
    """Another traced ``kasou run`` beside a workload's (a migration's destination)."""
    command = ["strace", "-f", "-qq", "-Y", "-o", str(log), KASOU, "run", "--no-seccomp", *args]
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _ask(sock: Path, message: dict[str, object]) -> object:
    reply = _request(sock, message)
    if not reply.get("ok"):
        raise RuntimeError(f"{message}: {reply}")
    return reply.get("result")


def _wait_path(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} never appeared")
        time.sleep(0.05)


Drive = Callable[[subprocess.Popen[bytes]], None]


def workloads(elf: Path, work: Path) -> Iterator[tuple[str, list[str], Drive]]:
    disk = work / "disk.raw"
    disk.write_bytes(bytes(16 << 20))
    kernel = ["--kernel", str(elf), "--memory", "64M"]
    sock = work / "api.sock"
    console = work / "console.log"
    snapshot = work / "snap"

    def control(process: subprocess.Popen[bytes]) -> None:
        _wait_for(console, "counter_addr")
        messages: tuple[dict[str, object], ...] = (
            {"request": "status"},
            {"request": "devices"},
            {"request": "balloon", "target": "8M"},
            {"request": "pause"},
            {"request": "resume"},
            {"request": "limits"},
            {"request": "limits", "cpus_quota": 0.5, "cpu_pin": "0=0"},
            {"request": "rate-limit", "device": "block0", "bw": "32M", "iops": 2000},
            {"request": "rate-limit", "device": "block0"},
            {"request": "reclaim"},
            {"request": "reclaim", "step": "4M"},
            {"request": "snapshot", "path": str(snapshot)},
            {"request": "status"},
            {"request": "stop"},
        )
        for message in messages:
            _ask(sock, message)

    def restored(process: subprocess.Popen[bytes]) -> None:
        _wait_path(sock)
        _ask(sock, {"request": "status"})
        _ask(sock, {"request": "pause"})
        _ask(sock, {"request": "resume"})
        _ask(sock, {"request": "stop"})

    def migrate(process: subprocess.Popen[bytes]) -> None:
        _wait_for(console, "counter_addr")
        incoming, destination_sock = work / "in.sock", work / "dest.sock"
        destination = _start_traced(
            work / "strace.destination",
            [
                "--incoming", f"unix:{incoming}", "--api-sock", str(destination_sock),
                "--console", f"file:{work / 'dest.log'}",
            ],
        )  # fmt: skip
        try:
            _wait_path(incoming)
            _ask(sock, {"request": "migrate", "url": f"unix:{incoming}"})
            process.wait(60)  # the source ends once its VM has gone
            _ask(destination_sock, {"request": "status"})
            _ask(destination_sock, {"request": "stop"})
            destination.wait(60)
        finally:
            if destination.poll() is None:
                destination.kill()
                destination.wait()

    def hostile(process: subprocess.Popen[bytes]) -> None:
        while process.poll() is None:  # the control socket answers all along
            with contextlib.suppress(OSError, ValueError):
                _request(sock, {"request": "status"}, timeout=10)
            time.sleep(0.2)

    def reboot(process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                result = _request(sock, {"request": "status"}).get("result")
                if isinstance(result, dict) and result.get("boots", 0) >= 3:
                    break
            time.sleep(0.05)
        _request(sock, {"request": "stop"})

    def jailed(process: subprocess.Popen[bytes]) -> None:
        _wait_for(console, "counter_addr")
        for name in ("status", "devices", "limits", "stop"):
            _ask(sock, {"request": name})

    def ends(process: subprocess.Popen[bytes]) -> None:
        pass

    counter = [
        *kernel,
        "--disk", f"{disk},format=raw,bw=64M,iops=5000",
        "--balloon", "--reclaim", "max=16M",
        "--rng",
        "--vsock", f"cid=3,uds={work / 'v.sock'}",
        "--console", f"file:{console}",
        "--api-sock", str(sock),
        "--cpus-quota", "1", "--cpu-pin", "0=0",
        "--cmdline", cmdline("counter"),
    ]  # fmt: skip
    yield (
        "counter guest with a disk (bw=, iops=), balloon with --reclaim, rng, vsock, console"
        " file, --cpus-quota, --cpu-pin, control requests (status, devices, balloon, pause,"
        " resume, limits, rate-limit, reclaim, snapshot, stop)",
        counter,
        control,
    )
    yield (
        "restore of that snapshot (kasou run --restore), pause, resume, stop",
        ["--restore", str(snapshot), "--api-sock", str(sock), "--console", f"file:{console}"],
        restored,
    )
    yield (
        "live migration of a counter guest to a second kasou (--incoming unix:PATH)",
        [*kernel, "--api-sock", str(sock), "--console", f"file:{console}", "--cmdline",
         cmdline("counter")],
        migrate,
    )  # fmt: skip
    for name, size in (("a.raw", 16 << 20), ("b.raw", 8 << 20)):
        (work / name).write_bytes(bytes(size))
    yield (
        "hostile (count=150000) with two disks, rng, balloon, vsock, virtio-console socket",
        [
            *kernel,
            "--disk", f"{work / 'a.raw'},format=raw", "--disk", f"{work / 'b.raw'},format=raw",
            "--rng", "--balloon", "--vsock", f"cid=5,uds={work / 'hv.sock'}",
            "--virtio-console", f"sock={work / 'vc.sock'}",
            "--api-sock", str(sock), "--console", f"file:{console}",
            "--cmdline", cmdline("hostile", count=150_000, seed=1),
        ],
        hostile,
    )  # fmt: skip
    yield "vblk on a raw disk", [*kernel, "--disk", str(disk), "--cmdline", cmdline("vblk")], ends
    yield (
        "vblk-bench write and read",
        [*kernel, "--disk", str(disk), "--cmdline", cmdline("vblk-bench", mode="write")],
        ends,
    )
    yield "vrng", [*kernel, "--rng", "--cmdline", cmdline("vrng")], ends
    yield "pio exits", [*kernel, "--cmdline", cmdline("pio", count=20000)], ends
    yield "serial echo", [*kernel, "--cmdline", cmdline("hello")], ends
    yield (
        "smp on 2 vCPUs",
        ["--kernel", str(elf), "--memory", "64M", "--vcpus", "2", "--cmdline", cmdline("smp")],
        ends,
    )
    yield (
        "guest reboots with --on-reboot restart, then stop",
        [*kernel, "--on-reboot", "restart", "--api-sock", str(sock), "--cmdline", cmdline("reset")],
        reboot,
    )
    vsock = work / "vs.sock"
    yield (
        "vsock echo with the host",
        [*kernel, "--vsock", f"cid=3,uds={vsock}", "--cmdline", cmdline("vsock")],
        ends,
    )
    if os.geteuid() == 0:
        yield (
            "--jail, counter guest with a disk and control requests, then stop",
            [
                *kernel, "--jail", "--jail-dir", str(work / "jails"), "--disk", str(disk),
                "--api-sock", str(sock), "--console", f"file:{console}",
                "--cmdline", cmdline("counter"),
            ],
            jailed,
        )  # fmt: skip


def record() -> tuple[dict[str, set[str]], list[str]]:
    elf = build_guest()
    found: dict[str, set[str]] = {"vcpu": set(), "device": set(), "control": set()}
    done: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for index, (what, args, drive) in enumerate(workloads(elf, work)):
            log = work / f"strace.{index}"
            closer = None
            if "vsock echo" in what:
                closer = _vsock_echo(work / "vs.sock_1234")
            with _traced(log, args) as process:
                drive(process)
            if closer is not None:
                closer()
            logs = [log, work / "strace.destination"]
            for path in logs:
                if path.exists():
                    for role, names in parse_strace(path.read_text(errors="replace")).items():
                        found[role] |= names
            (work / "strace.destination").unlink(missing_ok=True)
            if process.returncode != 0:
                stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise RuntimeError(f"{what}: exit {process.returncode}: {stderr}")
            done.append(f"{what} (exit {process.returncode})")
            for name in ("api.sock", "console.log", "dest.sock"):
                (work / name).unlink(missing_ok=True)
    return found, done


KEPT = "# --- kept when tests/tools/seccomp_record.py writes this file again ---"


def write_lists(found: dict[str, set[str]], done: list[str]) -> None:
    base = set()
    for line in (LISTS / "base.txt").read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            base.add(name)
    today = datetime.date.today().isoformat()
    for role, names in found.items():
        header = [
            f"# seccomp allow-list of kasou's {role} threads (with base.txt).",
            f"# Recorded {today} by tests/tools/seccomp_record.py on Linux {os.uname().release}",
            "# (strace -f -qq -Y of kasou run), workloads:",
            *(f"#   - {what}" for what in done),
            "# Do not edit by hand: add a workload and record again.",
        ]
        body = sorted(names - base)
        path = LISTS / f"{role}.txt"
        # What the file has from the mark on stays: calls added by hand, and those the
        # e2e tier's recording mode found (KASOU_SECCOMP_RECORD, jail/seccomp.py).
        old = path.read_text() if path.exists() else ""
        kept = old[old.index(KEPT) :].rstrip("\n").splitlines() if KEPT in old else []
        path.write_text("\n".join([*header, *body, *kept]) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="print what the lists miss")
    options = parser.parse_args()
    found, done = record()
    for what in done:
        print("workload:", what)
    if options.check:
        from kasou.jail.seccomp import load_lists

        lists = load_lists()
        missing = {role: sorted(names - lists[role]) for role, names in found.items()}
        print(json.dumps(missing, indent=1))
        return 1 if any(missing.values()) else 0
    write_lists(found, done)
    for role, names in found.items():
        print(f"{role}: {len(names)} system calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
