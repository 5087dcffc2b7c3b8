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

from kasou.client import ControlClient
from kasou.errors import KasouError

__all__ = ["demo"]

COMMANDS = (["uname", "-a"], ["nproc"], ["free", "-m"])
KASOU = str(Path(sys.executable).with_name("kasou"))


def demo(vcpus: int, here: bool) -> int:
    out = Console()
    from kasou.cli.fastrun import default_guest
    from kasou.kvm.host import probe_host

    guest = default_guest()
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
        sock, console = Path(scratch) / "vm.sock", Path(scratch) / "console.log"
        started = time.monotonic_ns()
        process = subprocess.Popen(
            [
                KASOU,
                "run",
                "--kernel",
                str(guest.kernel),
                "--initrd",
                str(guest.initrd),
                "--cmdline",
                guest.cmdline,
                "--vcpus",
                str(vcpus),
                "--memory",
                "512M",
                "--console",
                f"file:{console}",
                "--api-sock",
                str(sock),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "KASOU_TRACE_START": "1"},
        )
        try:
            return _drive(out, process, sock, started, vcpus)
        finally:
            if process.poll() is None:
                process.terminate()
            process.wait(30)


def _drive(
    out: Console, process: subprocess.Popen[bytes], sock: Path, started: int, vcpus: int
) -> int:
    deadline = time.monotonic() + 60
    while not sock.exists():  # kasou's own start-up, bounded
        if process.poll() is not None:
            out.print(f"[red]kasou run ended: {process.communicate()[1].decode()}[/red]")
            return 1
        if time.monotonic() > deadline:
            out.print("[red]kasou run did not open its control socket[/red]")
            return 1
        time.sleep(0.01)
    try:
        with ControlClient(sock, timeout=300) as client:
            for argv in COMMANDS:
                result = client.execute(argv, timeout=120)
                out.print(f"[bold cyan]guest$ {' '.join(argv)}[/bold cyan]")
                out.print(result["stdout"].rstrip(), markup=False, highlight=False)
            ready_ns = client.request("status")["agent"]["ready_ns"]
            client.execute(["poweroff"], timeout=60)
    except KasouError as error:
        if "rebooted" not in str(error) and "closed" not in str(error):
            out.print(f"[red]{error}[/red]")
            return 1
    status = process.wait(120)
    stderr = process.stderr.read().decode() if process.stderr else ""
    first_run = next(
        (
            int(line.rsplit(" ", 1)[1])
            for line in stderr.splitlines()
            if line.startswith("kasou: first KVM_RUN at ")
        ),
        None,
    )
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
