"""The cost of isolation, and how closely kasou's limits hold.

Cost: the same guest-kit runs with kasou's defaults (seccomp filters on every thread) beside
``--no-seccomp`` (no filter) and beside ``--jail`` (namespaces, pivot_root, an unprivileged
uid, seccomp): the exit round trip (PIO and MMIO, as in run.py's exits section), 4 KiB
random-read IOPS on virtio-blk (``vblk-bench``, 40,000 requests at depth 1 on a 64 MiB file
in the page cache) and the start
(exec of ``kasou run`` to the first KVM_RUN, stamped by kasou with KASOU_TRACE_START). The
ratio is the isolated figure over the bare one: for times, above 1 is the cost (target:
1.05 or less).

Accuracy: a guest spinning in ring 3 (``counter``) under ``--cpus-quota`` Q uses the host CPU
time of its whole kasou process over a few seconds, read from /proc/PID/stat; a disk limited
to ``bw=`` B or ``iops=`` M is read by ``vblk-bench`` for two seconds' worth at the limit
and measured from the guest's start and end lines (the bucket starts full: a tenth of a
second's worth comes at once). The ratio is measured over asked.

Every figure is the median of repeated runs. There is no peer here: QEMU has no jailer or
built-in seccomp allow-list of its own to compare with (libvirt adds them around it), and
Firecracker's jailer does not run this guest. Usage: ``python bench/isolation.py
[--repeats N]``, or ``make bench`` (section ``isolation``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kasou_peer
from kasou.guestkit import build_guest

__all__ = ["bench_isolation", "main"]

MODES: dict[str, list[str]] = {
    "bare (--no-seccomp)": ["--no-seccomp"],
    "seccomp (default)": [],
    "--jail + seccomp": ["--jail"],
}
TICKS = os.sysconf("SC_CLK_TCK")


def _median(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def _exit_seconds(elf: Path, workload: str, count: int, extra: Sequence[str]) -> float:
    def interval(n: int) -> float:
        run = kasou_peer.run_guest(elf, f"kasou.test={workload} count={n}", extra=extra)
        if run.status != 0:
            raise RuntimeError(f"kasou {' '.join(extra)} failed: {run.stderr}")
        return run.first("count=").at - run.first("kasou-guest: boot=").at

    return (interval(count) - interval(0)) / count


def _iops(
    elf: Path, disk: Path, extra: Sequence[str], rate: str = "", requests: int = 40000
) -> float:
    command = f"kasou.test=vblk-bench mode=randread size=4096 count={requests} depth=1"
    option = f"{disk},format=raw{rate}"
    run = kasou_peer.run_guest(elf, command, extra=[*extra, "--disk", option])
    if run.status != 0:
        raise RuntimeError(f"kasou {' '.join(extra)} failed: {run.stderr}")
    return requests / (run.first("vblk-bench end").at - run.first("vblk-bench start").at)


def _read_mbps(elf: Path, disk: Path, rate: str, count: int) -> float:
    size = 65536
    command = f"kasou.test=vblk-bench mode=read size={size} count={count} depth=4"
    run = kasou_peer.run_guest(elf, command, extra=["--disk", f"{disk},format=raw{rate}"])
    if run.status != 0:
        raise RuntimeError(f"kasou failed: {run.stderr}")
    seconds = run.first("vblk-bench end").at - run.first("vblk-bench start").at
    return count * size / seconds / 1e6


def _start_seconds(elf: Path, extra: Sequence[str]) -> float:
    start = time.monotonic_ns()
    env = {"KASOU_TRACE_START": "1"}
    run = kasou_peer.run_guest(elf, "kasou.test=hello", env=env, extra=extra)
    for line in run.stderr.splitlines():
        if line.startswith("kasou: first KVM_RUN at "):
            return (int(line.rsplit(" ", 1)[1]) - start) / 1e9
    raise RuntimeError(f"kasou printed no start mark: {run.stderr}")


def _cpu_share(elf: Path, quota: float, seconds: float = 3.0) -> float:
    """Host CPUs used by a kasou whose guest spins in ring 3, under ``--cpus-quota``."""
    command = [
        kasou_peer.KASOU, "run", "--kernel", str(elf), "--memory", "64M",
        "--cmdline", "kasou.test=counter", "--cpus-quota", str(quota),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        while b"counter_addr=" not in process.stdout.readline():
            if process.poll() is not None:
                raise RuntimeError("kasou ended before its guest spun")
        used, at = _cpu_seconds(process.pid), time.monotonic()
        time.sleep(seconds)  # the measuring window
        return (_cpu_seconds(process.pid) - used) / (time.monotonic() - at)
    finally:
        process.terminate()
        process.wait(30)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (proc(5))


def bench_isolation(elf: Path, repeats: int, count: int = 100_000) -> None:
    print(f"\n## isolation: cost of seccomp and the jail (median of {repeats} runs)")
    print("   ratio: isolated over bare; for times above 1 is the cost (target 1.05 or less)")
    with tempfile.TemporaryDirectory(prefix="kasou-bench-") as scratch:
        disk = Path(scratch) / "disk.raw"
        with disk.open("wb") as file:
            file.truncate(64 << 20)
        rows: dict[str, dict[str, float]] = {}
        for mode, extra in MODES.items():
            rows[mode] = {
                "pio µs": _median(repeats, lambda e=extra: _exit_seconds(elf, "pio", count, e))
                * 1e6,
                "mmio µs": _median(repeats, lambda e=extra: _exit_seconds(elf, "mmio", count, e))
                * 1e6,
                "randread IOPS": _median(repeats, lambda e=extra: _iops(elf, disk, e)),
                "start ms": _median(max(repeats, 5), lambda e=extra: _start_seconds(elf, e)) * 1e3,
            }
        bare = rows["bare (--no-seccomp)"]
        print(f"   {'':<22}" + "".join(f"{name:>16}" for name in bare))
        for mode, figures in rows.items():
            cells = "".join(f"{value:>16.2f}" for value in figures.values())
            print(f"   {mode:<22}{cells}")
            if figures is not bare:
                ratios = "".join(f"{value / bare[name]:>15.3f}x" for name, value in figures.items())
                print(f"   {'  ratio':<22}{ratios}")

        print(f"\n## isolation: accuracy of limits (median of {repeats} runs)")
        print(f"   {'limit':<26}{'asked':>10}{'measured':>12}{'measured/asked':>16}")
        for quota in (0.25, 0.5):
            used = _median(repeats, lambda q=quota: _cpu_share(elf, q))
            print(
                f"   {'--cpus-quota (CPUs)':<26}{quota:>10.2f}{used:>12.3f}{used / quota:>15.3f}x"
            )
        for bandwidth in (20, 50):
            rate = f",bw={bandwidth}M"
            count = bandwidth * 2**20 * 2 // 65536  # two seconds' worth at the limit
            got = _median(repeats, lambda r=rate, c=count: _read_mbps(elf, disk, r, c))
            asked = bandwidth * 2**20 / 1e6
            print(f"   {'disk bw= (MB/s)':<26}{asked:>10.1f}{got:>12.1f}{got / asked:>15.3f}x")
        for iops in (500, 2000):
            got = _median(repeats, lambda i=iops: _iops(elf, disk, [], f",iops={i}", 2 * i))
            print(f"   {'disk iops= (IOPS)':<26}{iops:>10}{got:>12.0f}{got / iops:>15.3f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--count", type=int, default=100_000, help="exits per loop")
    args = parser.parse_args()
    bench_isolation(build_guest(), args.repeats, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
