"""``make bench``: kasou's figures beside QEMU's on the same host and the same guest.

Each figure is the median of repeated runs. Every ratio printed is kasou's figure over
QEMU's (for times and memory, below 1 means kasou is better). Benchmarks are measurements,
never test assertions.

Sections (issue: core VMM):
- exit round trip: a ring-0 loop of N `out` to port 0x80 (PIO) or N 32-bit writes to an
  unclaimed MMIO address (0xd0000000), timed from the guest's boot line to its `count=` line
  on COM1, less a count=0 run, over N; both VMMs boot the guest kit's same ELF (kasou by the
  64-bit Linux boot protocol, QEMU as Multiboot);
- start: `kasou run` process exec to the boot vCPU's first KVM_RUN (CLOCK_MONOTONIC, stamped
  by kasou when KASOU_TRACE_START is set);
- memory: resident memory of the VMM process outside guest RAM (mappings at least as large as
  the guest's memory), with a 512 MiB guest that has booted;
- boot: the default Linux guest, kasou beside QEMU -M microvm (bench/boot.py), directly on a
  host whose KVM boots Linux, else inside `kasou nested`;
- virtio-blk: sequential 64 KiB read and write MB/s and 4 KiB random-read IOPS through the
  guest kit's own virtio driver, kasou beside QEMU -M microvm on the same raw file, with the
  host's own preadv figures on that file (bench/virtio_blk.py);
- virtio-guest: the default Linux guest on virtio, kasou beside QEMU -M microvm with
  user-space virtio: dd and random-read IOPS on a second disk, TCP through a TAP both ways,
  and the exec round trip over vsock and COM2 (bench/virtio_guest.py), where Linux boots, as
  for boot;
- snapshot: `kasou snapshot create` time, MB/s and pause for 512 MiB and 4 GiB guests,
  restore to the first KVM_RUN (`kasou run --restore`), and live migration over loopback TCP
  of an idle and a 250 MiB/s-dirtying 1 GiB guest (`kasou migrate`), beside QEMU's migrate
  to a file, `-incoming defer` restore and QEMU-to-QEMU migration, the guest kit's memcheck
  going on after each (bench/snapshot.py);
- distro: Debian 12 as users bring it (the image `kasou image build --distro debian-12`
  makes), kasou `run --image` beside QEMU -M microvm,acpi=on with the same kernel, initramfs
  and disk: process start to systemd's multi-user target (bench/distro_boot.py), where
  Linux boots, as for boot;
- isolation: the cost of seccomp and `--jail` on the exit round trip, random-read IOPS and
  start, and how closely `--cpus-quota` and a disk's `bw=`/`iops=` limits hold
  (bench/isolation.py);
- daemon: kasoud's request to first KVM_RUN from its warm template beside a cold `kasou run`
  and QEMU's exec, VMs started per second, PSS per VM with 1, 10 and 50 VMs, and API
  latency at 200 requests/s (bench/daemon.py);
- sandbox: a `kasou.Sandbox` cloned from a template through kasoud, request to first exec
  answered, beside a cold `kasou run` of the default guest to its first exec
  (bench/sandbox.py), where Linux boots, as for boot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import daemon
import isolation
import kasou_peer
import qemu_peer
import snapshot
import virtio_blk
from kasou._sys.proc import resident_bytes
from kasou.guestkit import build_guest


def median_of(repeats: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    samples = [measure() for _ in range(repeats)]
    return statistics.median(samples), samples


def qemu_exit_seconds(elf: Path, workload: str, count: int) -> float:
    def interval(n: int) -> float:
        run = qemu_peer.run_guest(elf, f"kasou.test={workload} count={n}", kvm=True, timeout=600)
        return run.first("count=").at - run.first("kasou-guest: boot=").at

    return (interval(count) - interval(0)) / count


def bench_exits(elf: Path, count: int, repeats: int, with_qemu: bool) -> None:
    print(f"\n## exit round trip (ring-0 loop of {count} exits, median of {repeats} runs)")
    print("   definition: (time from boot line to count= line) - (same with count=0), / count")
    print(
        f"   {'exit':<6} {'kasou µs':>9} {'kasou exits/s':>14} {'QEMU µs':>9} "
        f"{'QEMU exits/s':>13} {'kasou/QEMU time':>16}"
    )
    for workload in ("pio", "mmio"):
        kasou, _ = median_of(repeats, lambda w=workload: kasou_peer.exit_seconds(elf, w, count))
        if with_qemu:
            qemu, _ = median_of(repeats, lambda w=workload: qemu_exit_seconds(elf, w, count))
            peer = f"{qemu * 1e6:>9.2f} {1 / qemu:>13,.0f} {kasou / qemu:>15.2f}x"
        else:
            peer = f"{'-':>9} {'-':>13} {'(no QEMU)':>16}"
        print(f"   {workload:<6} {kasou * 1e6:>9.2f} {1 / kasou:>14,.0f} {peer}")


def start_seconds(elf: Path) -> float:
    start = time.monotonic_ns()
    run = kasou_peer.run_guest(elf, "kasou.test=hello", env={"KASOU_TRACE_START": "1"})
    for line in run.stderr.splitlines():
        if line.startswith("kasou: first KVM_RUN at "):
            return (int(line.rsplit(" ", 1)[1]) - start) / 1e9
    raise RuntimeError(f"kasou printed no start mark: {run.stderr}")


def python_seconds() -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.monotonic() - start


def bench_start(elf: Path, repeats: int) -> None:
    print(f"\n## start (median of {repeats} runs; target: 60 ms or less)")
    print("   definition: exec of `kasou run` to the boot vCPU's first KVM_RUN")
    start, samples = median_of(repeats, lambda: start_seconds(elf))
    bare, _ = median_of(repeats, python_seconds)
    print(
        f"   kasou: {start * 1e3:.1f} ms (min {min(samples) * 1e3:.1f}, max "
        f"{max(samples) * 1e3:.1f}); for scale, `python -c pass` takes {bare * 1e3:.1f} ms"
    )


def rss_outside_guest(pid: int, guest_bytes: int) -> int:
    """Resident memory of ``pid`` outside mappings at least as large as guest RAM."""
    return resident_bytes(pid, lambda low, high: high - low >= guest_bytes)


def measure_rss(command: list[str], guest_bytes: int, ready: bytes) -> int:
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        seen = b""
        while ready not in seen:
            chunk = process.stdout.read1(4096)
            if not chunk:
                raise RuntimeError(f"{command[0]} ended before the guest printed {ready!r}")
            seen += chunk
        return rss_outside_guest(process.pid, guest_bytes)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def bench_memory(elf: Path, repeats: int, with_qemu: bool) -> None:
    guest = 512 << 20
    print(f"\n## memory (512 MiB guest, booted; median of {repeats}; target: kasou 40 MiB or less)")
    print("   definition: VmRSS of the VMM process minus the resident part of guest RAM")
    kasou_cmd = [
        kasou_peer.KASOU,
        "run",
        "--kernel",
        str(elf),
        "--memory",
        "512M",
        "--cmdline",
        "kasou.test=counter",
    ]
    kasou, _ = median_of(repeats, lambda: measure_rss(kasou_cmd, guest, b"counter_addr="))
    line = f"   kasou: {kasou / 2**20:.1f} MiB"
    if with_qemu:
        qemu_cmd = qemu_peer.qemu_command(elf, "kasou.test=counter", kvm=True, memory_mib=512)
        qemu, _ = median_of(repeats, lambda: measure_rss(qemu_cmd, guest, b"counter_addr="))
        line += f"   QEMU: {qemu / 2**20:.1f} MiB   kasou/QEMU: {kasou / qemu:.2f}x (lower is less)"
    print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000, help="exits per loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only",
        choices=(
            "exits",
            "start",
            "memory",
            "boot",
            "virtio-blk",
            "virtio-guest",
            "distro",
            "snapshot",
            "isolation",
            "daemon",
            "sandbox",
        ),
        action="append",
    )
    parser.add_argument("--boot-runs", type=int, default=10)
    parser.add_argument("--virtio-repeats", type=int, default=3, help="virtio-guest transfers")
    parser.add_argument("--distro-runs", type=int, default=3, help="Debian boots per VMM")
    args = parser.parse_args()
    with_qemu = shutil.which(qemu_peer.QEMU) is not None and qemu_peer.kvm_usable()
    if not with_qemu:
        print("QEMU with KVM is not available here: kasou's figures only")
    elf = build_guest()
    print(f"host: {os.uname().release}, /dev/kvm backend: ", end="")
    from kasou.kvm.host import probe_host

    print(probe_host().backend.value)
    sections = args.only or [
        "exits", "start", "memory", "virtio-blk", "snapshot", "isolation", "daemon", "boot",
        "virtio-guest", "distro", "sandbox",
    ]  # fmt: skip
    if "exits" in sections:
        bench_exits(elf, args.count, args.repeats, with_qemu)
    if "start" in sections:
        bench_start(elf, max(args.repeats, 10))
    if "memory" in sections:
        bench_memory(elf, args.repeats, with_qemu)
    if "virtio-blk" in sections:
        virtio_blk.bench_virtio_blk(elf, args.repeats, with_qemu)
    if "snapshot" in sections:
        snapshot.bench_snapshot(elf, args.repeats, with_qemu)
    if "isolation" in sections:
        isolation.bench_isolation(elf, args.repeats, args.count // 2)
    if "daemon" in sections:
        daemon.bench_daemon(elf, args.repeats, with_qemu)
    if "boot" in sections:
        bench_boot(args.boot_runs)
    if "virtio-guest" in sections:
        bench_virtio_guest(args.virtio_repeats)
    if "distro" in sections:
        bench_distro(args.distro_runs)
    if "sandbox" in sections:
        bench_sandbox(args.boot_runs // 2 or 1)
    return 0


def bench_boot(runs: int) -> None:
    """bench/boot.py, where Linux boots: here, or inside the nested host."""
    _where_linux_boots("boot", "boot.py", ["--runs", str(runs)])


def bench_sandbox(runs: int) -> None:
    """bench/sandbox.py, where Linux boots: here, or inside the nested host."""
    _where_linux_boots("sandbox", "sandbox.py", ["--runs", str(runs)])


def bench_virtio_guest(repeats: int) -> None:
    """bench/virtio_guest.py, where Linux boots: here, or inside the nested host."""
    _where_linux_boots("virtio-guest", "virtio_guest.py", ["--repeats", str(repeats)])


def bench_distro(runs: int) -> None:
    """bench/distro_boot.py (Debian 12 image), where Linux boots: here, or inside the nested
    host. The image is built first, here: mmdebstrap needs Debian's mirror."""
    subprocess.run(
        [kasou_peer.KASOU, "image", "build", "--distro", "debian-12"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    _where_linux_boots("distro", "distro_boot.py", ["--runs", str(runs)])


def _where_linux_boots(section: str, script: str, args: list[str]) -> None:
    """Run ``script`` from this folder on this host if its KVM boots Linux, else inside
    ``kasou nested``, the default guest built first."""
    from kasou.kvm.host import probe_host

    command = [sys.executable, str(Path(__file__).with_name(script)), *args]
    subprocess.run([kasou_peer.KASOU, "image", "build"], check=True, stdout=subprocess.DEVNULL)
    if probe_host().backend.boots_linux:
        subprocess.run(command, check=True)
        return
    print(
        f"\n({section}: this host's KVM cannot boot Linux; measuring inside `kasou nested`, "
        "where the host CPU itself is emulated by QEMU TCG)"
    )
    subprocess.run([kasou_peer.KASOU, "nested", "--", *command], check=True)


if __name__ == "__main__":
    sys.exit(main())
