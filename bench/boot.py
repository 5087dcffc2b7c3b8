"""Boot time of the default guest, kasou beside QEMU ``-M microvm,acpi=on`` (same kernel,
initramfs and command line, same host; both describe the machine to the guest through ACPI).
Run by ``make bench``; on a host whose KVM cannot boot Linux,
``bench/run.py`` runs this inside ``kasou nested``.

Two figures, each the median of ``--runs`` boots of each VMM:

- boot to agent: from the VMM's process start (the harness's clock just before it spawns the
  VMM) to the guest agent's READY frame arriving on COM2 (kasou stamps its arrival itself;
  for QEMU the harness holds the other end of COM2's socket and stamps it);
- VMM start: from the process start to the VMM's first KVM_RUN (kasou stamps it when
  KASOU_TRACE_START is set; QEMU's `kvm_vcpu_ioctl` trace event with a timestamp). For QEMU
  this is measured in separate runs, since tracing every vCPU ioctl slows the rest of its
  boot.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qemu_peer
from kasou.agent import protocol
from kasou.cli.demo import launch_default_guest
from kasou.client import ControlClient
from kasou.image import default_guest

KASOU = str(Path(sys.executable).with_name("kasou"))
QEMU = "qemu-system-x86_64"
READY = protocol.ready_frame()
TIMEOUT = 180.0


def kasou_boot(scratch: Path, vcpus: int) -> tuple[float, float]:
    booting = launch_default_guest(scratch, vcpus, root_disk=False)  # as QEMU's: initramfs
    try:
        with ControlClient(booting.sock, timeout=TIMEOUT) as client:
            client.execute(["true"], timeout=TIMEOUT)  # returns once the agent is up
            ready = client.request("status")["agent"]["ready_ns"]
            client.request("stop")
        booting.process.wait(60)
        first_run = booting.first_kvm_run_ns()
        if first_run is None:
            raise RuntimeError("kasou printed no start mark")
        return (ready - booting.started_ns) / 1e9, (first_run - booting.started_ns) / 1e9
    finally:
        booting.close()


def qemu_command(scratch: Path, vcpus: int, agent: Path) -> list[str]:
    guest = default_guest(build=False)
    return [
        QEMU,
        "-M",
        "microvm,acpi=on,rtc=on",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        str(vcpus),
        "-m",
        "512",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        guest.cmdline,
        "-serial",
        "null",
        "-chardev",
        f"socket,id=agent,path={agent}",
        "-device",
        "isa-serial,chardev=agent,iobase=0x2f8,irq=3",
    ]


def qemu_boot(scratch: Path, vcpus: int) -> float:
    agent = scratch / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(agent))
    listener.listen(1)
    listener.settimeout(TIMEOUT)
    start = time.monotonic_ns()
    process = subprocess.Popen(
        qemu_command(scratch, vcpus, agent),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        connection, _ = listener.accept()
        connection.settimeout(TIMEOUT)
        seen = b""
        while READY not in seen:
            chunk = connection.recv(4096)
            if not chunk:
                raise RuntimeError("QEMU closed COM2 before the agent was ready")
            seen += chunk
        ready = time.monotonic_ns()
        connection.close()
        return (ready - start) / 1e9
    finally:
        process.kill()  # microvm has no ACPI: a powered-off guest would not end QEMU anyway
        process.wait()
        listener.close()
        agent.unlink()


def qemu_start(scratch: Path, vcpus: int) -> float:
    trace = scratch / "trace.log"
    agent = scratch / "agent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(agent))
    listener.listen(1)
    start = time.time()
    process = subprocess.Popen(
        [
            *qemu_command(scratch, vcpus, agent),
            "-msg",
            "timestamp=on",
            "-trace",
            f"enable=kvm_vcpu_ioctl,file={trace}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return qemu_peer.first_kvm_run_seconds(trace, start, TIMEOUT)
    finally:
        process.kill()
        process.wait()
        listener.close()
        agent.unlink()
        trace.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description="boot time, kasou beside QEMU microvm")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--vcpus", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kasou-boot-") as folder:
        scratch = Path(folder)
        kasou = [kasou_boot(scratch, args.vcpus) for _ in range(args.runs)]
        qemu_ready = [qemu_boot(scratch, args.vcpus) for _ in range(args.runs)]
        qemu_first = [qemu_start(scratch, args.vcpus) for _ in range(args.runs)]
    k_ready = statistics.median(ready for ready, _ in kasou)
    k_first = statistics.median(first for _, first in kasou)
    q_ready, q_first = statistics.median(qemu_ready), statistics.median(qemu_first)
    print(f"\n## boot (default guest, {args.vcpus} vCPU, 512 MiB; median of {args.runs} boots)")
    print(f"   {'figure':<14} {'kasou':>10} {'QEMU microvm':>13} {'kasou/QEMU':>11}  definition")
    print(
        f"   {'boot to agent':<14} {k_ready * 1e3:>8.0f}ms {q_ready * 1e3:>11.0f}ms "
        f"{k_ready / q_ready:>10.2f}x  process start -> guest agent READY on COM2"
    )
    print(
        f"   {'VMM start':<14} {k_first * 1e3:>8.0f}ms {q_first * 1e3:>11.0f}ms "
        f"{k_first / q_first:>10.2f}x  process start -> first KVM_RUN"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
