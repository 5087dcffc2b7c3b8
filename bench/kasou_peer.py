"""Runs kasou the way bench/qemu_peer.py runs QEMU: the guest kit's ELF, COM1 lines stamped
with the time they arrived, so both are measured by the same clock and the same method."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

KASOU = str(Path(sys.executable).with_name("kasou"))


@dataclass(frozen=True)
class Line:
    at: float
    text: str


@dataclass(frozen=True)
class KasouRun:
    lines: list[Line]
    status: int
    stderr: str

    def first(self, prefix: str) -> Line:
        for line in self.lines:
            if line.text.startswith(prefix):
                return line
        raise RuntimeError(f"the guest never printed {prefix!r}: {self.lines} {self.stderr}")


def run_guest(
    elf: Path,
    cmdline: str,
    *,
    cpus: int = 1,
    memory: str = "64M",
    env: dict[str, str] | None = None,
    extra: Sequence[str] = (),
) -> KasouRun:
    """Boot ``elf`` with ``cmdline`` under kasou until the guest ends; stamp each line.
    ``extra`` goes on kasou's command line (``--disk PATH``, ...)."""
    start = time.monotonic()
    process = subprocess.Popen(
        [
            KASOU,
            "run",
            "--kernel",
            str(elf),
            "--memory",
            memory,
            "--vcpus",
            str(cpus),
            "--cmdline",
            cmdline,
            *extra,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert process.stdout is not None and process.stderr is not None
    lines = [
        Line(time.monotonic() - start, raw.decode(errors="replace").rstrip("\r\n"))
        for raw in process.stdout
    ]
    stderr = process.stderr.read().decode(errors="replace")
    return KasouRun(lines, process.wait(), stderr)


def exit_seconds(elf: Path, workload: str, count: int, **args: int) -> float:
    """Seconds per exit of ``workload`` (pio or mmio): the loop time between the boot line
    and the ``count=`` line, less the same interval for ``count=0``, over ``count``."""
    extra = " ".join(f"{key}={value}" for key, value in args.items())

    def interval(n: int) -> float:
        run = run_guest(elf, f"kasou.test={workload} count={n} {extra}".strip())
        return run.first("count=").at - run.first("kasou-guest: boot=").at

    return (interval(count) - interval(0)) / count
