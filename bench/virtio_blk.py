"""virtio-blk throughput through the guest kit's own driver: kasou beside QEMU microvm.

Both VMMs boot the guest kit's same ELF with one virtio-blk disk on the same raw file (kasou:
``--disk``; QEMU: ``-M microvm`` with ``-device virtio-blk-device``, its user-space virtio,
no vhost, ``cache=writeback`` like kasou's buffered backend) and run the ``vblk-bench``
workload: N requests of one size, D in flight, the data path in guest ring 3, completions
found by polling the used ring (interrupts suppressed) unless the row says ``irq``.

Definitions:
- time: from the guest's ``vblk-bench start`` line to its ``vblk-bench end`` line on COM1,
  stamped by the host as they arrive; the figure is bytes (or requests) over that time;
- notifies/req: QueueNotify writes (each an exit) per request, as the guest counted them;
  irqs/req: interrupts the guest took per request (0 while polling);
- host: this process reading the same file with ``os.preadv`` in the same request sizes,
  once through the page cache (the file warm, as both VMMs see it after their first run) and
  once opened ``O_DIRECT`` (the storage itself; no cache dropped).

Every figure is the median of repeated runs; the ratio is kasou's over QEMU's, and above 1
means kasou moved more data. Usage: ``python bench/virtio_blk.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kasou_peer
import qemu_peer

__all__ = ["ROWS", "Row", "Sample", "bench_virtio_blk", "host_figures", "main"]

DISK_BYTES = 256 << 20
SECTOR = 512


class Row(NamedTuple):
    """One measurement: a ``vblk-bench`` run, and how its figure is shown."""

    name: str
    mode: str  # read, write, randread
    size: int  # bytes per request
    requests: int
    depth: int  # in flight
    irq: bool = False

    @property
    def cmdline(self) -> str:
        return (
            f"kasou.test=vblk-bench mode={self.mode} size={self.size} count={self.requests} "
            f"depth={self.depth} irq={int(self.irq)}"
        )

    @property
    def iops(self) -> bool:
        return self.mode == "randread"


ROWS = (
    Row("seq read 64K d4", "read", 64 << 10, 4096, 4),
    Row("seq write 64K d4", "write", 64 << 10, 4096, 4),
    Row("rand read 4K d1", "randread", 4 << 10, 8000, 1),
    Row("rand read 4K d8", "randread", 4 << 10, 16000, 8),
    Row("rand read 4K d1 irq", "randread", 4 << 10, 4000, 1, irq=True),
)


class Sample(NamedTuple):
    seconds: float
    notifies: int
    irqs: int


def _sample(lines: Sequence[tuple[float, str]], row: Row, who: str) -> Sample:
    start = end = None
    for at, text in lines:
        if text.startswith("vblk-bench start ") and start is None:
            start = at
        elif text.startswith("vblk-bench end "):
            end = (at, dict(word.split("=", 1) for word in text.split()[2:]))
    if start is None or end is None:
        shown = "\n".join(text for _, text in lines)
        raise RuntimeError(f"{who}: {row.name}: the guest printed no start/end lines:\n{shown}")
    return Sample(end[0] - start, int(end[1]["notifies"]), int(end[1]["irqs"]))


def kasou_sample(elf: Path, disk: Path, row: Row) -> Sample:
    run = kasou_peer.run_guest(elf, row.cmdline, extra=["--disk", f"{disk},format=raw"])
    return _sample([(line.at, line.text) for line in run.lines], row, "kasou")


def qemu_sample(elf: Path, disk: Path, row: Row) -> Sample:
    devices = [
        "-global",
        "virtio-mmio.force-legacy=false",
        "-drive",
        f"id=d0,file={disk},format=raw,if=none,cache=writeback,aio=threads",
        "-device",
        "virtio-blk-device,drive=d0",
    ]
    run = qemu_peer.run_guest(
        elf, row.cmdline, kvm=True, machine="microvm", extra=devices, timeout=300
    )
    return _sample([(line.at, line.text) for line in run.lines], row, "QEMU")


def _median_sample(repeats: int, measure: Callable[[], Sample]) -> Sample:
    samples = [measure() for _ in range(repeats)]
    return Sample(
        statistics.median(s.seconds for s in samples),
        int(statistics.median(s.notifies for s in samples)),
        int(statistics.median(s.irqs for s in samples)),
    )


def _figure(row: Row, sample: Sample) -> float:
    """MB/s (10**6 bytes), or requests per second for random reads."""
    if row.iops:
        return row.requests / sample.seconds
    return row.requests * row.size / sample.seconds / 1e6


def _host_read(path: Path, size: int, count: int, *, direct: bool, rand: bool) -> float:
    """Seconds for ``count`` preadv calls of ``size`` bytes from ``path``."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buffer = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants
    blocks = os.fstat(fd).st_size // size
    offsets = (
        [random.randrange(blocks) * size for _ in range(count)]
        if rand
        else [(i % blocks) * size for i in range(count)]
    )
    try:
        start = time.monotonic()
        for offset in offsets:
            os.preadv(fd, [buffer], offset)
        return time.monotonic() - start
    finally:
        buffer.close()
        os.close(fd)


def host_figures(path: Path, repeats: int) -> list[tuple[str, str]]:
    """The host's own figures on ``path``: (name, value) pairs."""
    figures = []
    for name, size, count, rand in (
        ("seq read 64K", 64 << 10, 2048, False),
        ("rand read 4K", 4 << 10, 4000, True),
    ):
        for direct in (False, True):
            label = f"{name} {'O_DIRECT' if direct else 'page cache'}"
            try:
                seconds = statistics.median(
                    _host_read(path, size, count, direct=direct, rand=rand) for _ in range(repeats)
                )
            except OSError as error:
                figures.append((label, f"unavailable ({error.strerror})"))
                continue
            value = count / seconds if rand else count * size / seconds / 1e6
            figures.append((label, f"{value:,.0f} {'IOPS' if rand else 'MB/s'}"))
    return figures


def _make_disk(folder: Path) -> Path:
    """A raw file of ``DISK_BYTES`` written in full (no holes: reads touch real data)."""
    path = folder / "bench-disk.raw"
    chunk = bytes(range(256)) * 4096
    with path.open("wb") as file:
        for _ in range(DISK_BYTES // len(chunk)):
            file.write(chunk)
    return path


def bench_virtio_blk(elf: Path, repeats: int, with_qemu: bool, folder: Path | None = None) -> None:
    """Prints the virtio-blk section: one line per row, then the host's own figures."""
    print(
        f"\n## virtio-blk (guest-kit driver in ring 3, {DISK_BYTES >> 20} MiB raw file, "
        f"median of {repeats} runs)"
    )
    print("   definition: bytes or requests between the guest's start and end lines; the host")
    print("   stamps both lines; notifies and irqs per request as the guest counted them")
    with tempfile.TemporaryDirectory(prefix="kasou-bench-", dir=folder) as tmp:
        disk = _make_disk(Path(tmp))
        print(
            f"   {'row':<20} {'kasou':>12} {'notif/req':>9} {'irq/req':>7} "
            f"{'QEMU':>12} {'notif/req':>9} {'irq/req':>7} {'kasou/QEMU':>10}"
        )
        for row in ROWS:
            unit = "IOPS" if row.iops else "MB/s"
            kasou = _median_sample(repeats, partial(kasou_sample, elf, disk, row))
            line = (
                f"   {row.name:<20} {_figure(row, kasou):>7,.0f} {unit:<4} "
                f"{kasou.notifies / row.requests:>9.2f} {kasou.irqs / row.requests:>7.2f}"
            )
            if with_qemu:
                qemu = _median_sample(repeats, partial(qemu_sample, elf, disk, row))
                ratio = _figure(row, kasou) / _figure(row, qemu)
                line += (
                    f" {_figure(row, qemu):>7,.0f} {unit:<4} {qemu.notifies / row.requests:>9.2f} "
                    f"{qemu.irqs / row.requests:>7.2f} {ratio:>9.2f}x"
                )
            else:
                line += f" {'(no QEMU)':>12}"
            print(line)
        print("   host, same file, os.preadv in a loop:")
        for label, value in host_figures(disk, repeats):
            print(f"     {label:<28} {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="folder for the disk file (default: $TMPDIR)")
    options = parser.parse_args(argv)

    from kasou.guestkit import build_guest

    with_qemu = shutil.which(qemu_peer.QEMU) is not None and qemu_peer.kvm_usable()
    if not with_qemu:
        print("QEMU with KVM is not available here: kasou's figures only")
    bench_virtio_blk(build_guest(), options.repeats, with_qemu, options.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
