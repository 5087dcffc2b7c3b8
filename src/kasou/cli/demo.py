"""``kasou demo`` (``make demo``): boot the default guest and run a few commands in it.

On a host whose KVM boots Linux it runs right here; elsewhere (PVM, no KVM) it runs itself
inside ``kasou nested``. It prints the guest's answers and two boot times:

- boot to agent: from ``kasou run``'s process start to the guest agent's ready signal;
- VMM start: from ``kasou run``'s process start to its first KVM_RUN.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from kasou.cli.fastrun import default_guest
from kasou.client import ControlClient
from kasou.errors import HostError, KasouError

__all__ = ["Booting", "demo", "launch_default_guest"]

COMMANDS = (["uname", "-a"], ["nproc"], ["free", "-m"], ["df", "-h", "/"])
KASOU = str(Path(sys.executable).with_name("kasou"))


def demo(vcpus: int, here: bool) -> int:
    out = Console()
    from kasou.kvm.host import probe_host

    default_guest()  # built (with a progress display) before anything is timed
    host = probe_host()
    if not here and not host.backend.boots_linux:
        from kasou.nested import run_nested

        out.print(
            f"[bold]This host's KVM is {host.backend.value}[/bold]: it cannot boot Linux, so "
            "the demo runs inside a nested host (QEMU TCG with AMD-V; slower than hardware)."
        )
        result = run_nested([KASOU, "demo", "--here", "--vcpus", str(vcpus)], cwd=Path.cwd())
        return result.status
    with tempfile.TemporaryDirectory(prefix="kasou-demo-") as scratch:
        try:
            booting = launch_default_guest(Path(scratch), vcpus, console="file")
        except KasouError as error:
            out.print(f"[red]{error}[/red]")
            return 1
        try:
            return _drive(out, booting, vcpus)
        finally:
            booting.close()


class Booting:
    """A ``kasou run`` of the default guest, started with its control socket up."""

    def __init__(self, process: subprocess.Popen[bytes], sock: Path, started_ns: int) -> None:
        self.process = process
        self.sock = sock
        self.started_ns = started_ns  # CLOCK_MONOTONIC just before the process was spawned

    def first_kvm_run_ns(self) -> int | None:
        """When the boot vCPU first entered the guest (read from kasou's stderr, once it
        has ended)."""
        stderr = self.process.stderr.read().decode() if self.process.stderr else ""
        for line in stderr.splitlines():
            if line.startswith("kasou: first KVM_RUN at "):
                return int(line.rsplit(" ", 1)[1])
        return None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(30)


def launch_default_guest(
    scratch: Path, vcpus: int, console: str = "none", root_disk: bool = True
) -> Booting:
    """Start ``kasou run`` on the default guest (512 MiB, COM1 to ``scratch``/console.log
    with ``console="file"``) and wait for its control socket. With ``root_disk`` it boots as
    ``kasou run`` without --kernel does (root on virtio-blk through an overlay, the agent on
    vsock too); otherwise from its initramfs. Used by the demo and by bench/boot.py, so both
    time the same thing."""
    guest = default_guest()
    sock = scratch / "vm.sock"
    target = f"file:{scratch / 'console.log'}" if console == "file" else console
    boot = (
        []
        if root_disk
        else [
            "--kernel",
            str(guest.kernel),
            "--initrd",
            str(guest.initrd),
            "--cmdline",
            guest.cmdline,
        ]
    )
    started = time.monotonic_ns()
    process = subprocess.Popen(
        [
            KASOU,
            "run",
            *boot,
            "--vcpus",
            str(vcpus),
            "--memory",
            "512M",
            "--console",
            target,
            "--api-sock",
            str(sock),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "KASOU_TRACE_START": "1"},
    )
    booting = Booting(process, sock, started)
    deadline = time.monotonic() + 120
    while not sock.exists():  # kasou's own start-up, bounded
        if process.poll() is not None:
            raise HostError(f"kasou run ended: {process.communicate()[1].decode().strip()}")
        if time.monotonic() > deadline:
            booting.close()
            raise HostError("kasou run did not open its control socket within 120 s")
        time.sleep(0.005)
    return booting


def _drive(out: Console, booting: Booting, vcpus: int) -> int:
    from kasou.client.agent import open_session

    try:
        with ControlClient(booting.sock, timeout=300) as client:
            client.execute(["true"], timeout=120)  # the agent is up (on COM2: the boot mark)
            vm = client.request("status")
            ready_ns = vm["agent"]["ready_ns"]
            # The commands go over virtio-vsock, their output streamed as it comes.
            with open_session(vm["vsock"]["uds"], timeout=60) as session:
                for argv in COMMANDS:
                    out.print(f"[bold cyan]guest$ {' '.join(argv)}[/bold cyan]")
                    chunks: list[bytes] = []
                    session.exec(argv, stdout=chunks.append, timeout=120)
                    text = b"".join(chunks).decode(errors="replace").rstrip()
                    out.print(text, markup=False, highlight=False)
            out.print("[bold cyan]kasou devices[/bold cyan]")
            for device in client.request("devices")["devices"]:
                counters = device["counters"]
                shown = {
                    key: counters[key]
                    for key in ("reads", "writes", "bytes_to_guest", "bytes_from_guest", "bytes")
                    if key in counters
                }
                out.print(f"  {device['id']:<8} {device['type']:<8} {shown}", highlight=False)
            client.execute(["poweroff"], timeout=60)
    except KasouError as error:
        if "rebooted" not in str(error) and "closed" not in str(error):
            out.print(f"[red]{error}[/red]")
            return 1
    status = booting.process.wait(120)
    first_run = booting.first_kvm_run_ns()
    started = booting.started_ns
    out.print(
        f"\n[bold]boot to agent[/bold] {(ready_ns - started) / 1e6:8.1f} ms"
        "  (kasou run process start -> guest agent ready)"
    )
    if first_run is not None:
        out.print(
            f"[bold]VMM start[/bold]     {(first_run - started) / 1e6:8.1f} ms"
            "  (kasou run process start -> first KVM_RUN)"
        )
    out.print(f"guest powered off; kasou run exited with status {status} ({vcpus} vCPU)")
    return status
