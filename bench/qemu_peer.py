"""Boots kasou's test guest under QEMU: the proof that the guest works, and the bench peer.

The guest kit's ELF (``kasou.guestkit.build_guest()``) is a Multiboot image too, so QEMU boots
it with ``-kernel``. ``QemuGuest`` starts QEMU with COM1 on a pipe, stamps each line the
guest prints with the time it arrived, takes bytes for COM1's input, and answers monitor
commands and QMP commands. Waits block on the reader thread's queue with a deadline; only
the first QMP connection polls (each millisecond) for the socket a QEMU just started creates.

As a script it boots one workload and prints what the guest printed, with times::

    python bench/qemu_peer.py hello
    python bench/qemu_peer.py pio count=1000000 --kvm
    python bench/qemu_peer.py --bench-pio 1000000 --kvm   # µs per exit

The per-exit figure is the time from the guest's boot line to its ``count=`` line, less the
same interval of a ``count=0`` run, over the count.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "QEMU",
    "Line",
    "QemuError",
    "QemuGuest",
    "QemuRun",
    "kvm_usable",
    "pio_exit_seconds",
    "qemu_command",
    "run_guest",
]

QEMU = "qemu-system-x86_64"


class QemuError(Exception):
    """QEMU or the guest did not do what a wait expected in time."""


@dataclass(frozen=True)
class Line:
    """A line the guest printed on COM1, ``at`` seconds after QEMU started."""

    at: float
    text: str


@dataclass(frozen=True)
class QemuRun:
    """Everything one boot printed, and how QEMU ended."""

    lines: tuple[Line, ...]
    returncode: int

    @property
    def texts(self) -> list[str]:
        return [line.text for line in self.lines]

    def first(self, prefix: str) -> Line:
        """The first line starting with ``prefix``."""
        for line in self.lines:
            if line.text.startswith(prefix):
                return line
        raise QemuError(f"no line starting {prefix!r} in {self.texts}")

    def value(self, key: str) -> str:
        """The value of the first ``key=value`` line."""
        return self.first(f"{key}=").text.split("=", 1)[1]


def kvm_usable() -> bool:
    """Whether this process can open /dev/kvm (PVM or hardware) for QEMU's ``-enable-kvm``."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def qemu_command(
    elf: Path,
    cmdline: str,
    *,
    kvm: bool = False,
    cpus: int = 1,
    memory_mib: int = 64,
    qmp: Path | None = None,
    machine: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line that boots ``elf`` with ``cmdline``, COM1 on stdio.

    ``cpus`` become separate sockets: SeaBIOS lists only the first logical CPU of each
    package in its MP table, and the guest's ``smp`` workload reads that table. ``machine``
    is ``-M`` (QEMU's default PC when None); ``extra`` is appended (devices, drives).
    """
    command = [
        QEMU,
        *(["-M", machine] if machine else []),
        *(["-enable-kvm"] if kvm else ["-accel", "tcg"]),
        "-m",
        str(memory_mib),
        "-smp",
        f"{cpus},sockets={cpus},cores=1,threads=1",
        "-display",
        "none",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-kernel",
        str(elf),
        "-append",
        cmdline,
    ]
    if qmp is not None:
        command += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return command + list(extra)


class QemuGuest:
    """A running QEMU with the guest; use as a context manager (it kills QEMU on exit)."""

    def __init__(
        self,
        elf: Path,
        cmdline: str,
        *,
        kvm: bool = False,
        cpus: int = 1,
        memory_mib: int = 64,
        qmp: bool = False,
        machine: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kasou-qemu-")
        self._qmp_path = Path(self._tmp.name) / "qmp.sock" if qmp else None
        self.command = qemu_command(
            elf,
            cmdline,
            kvm=kvm,
            cpus=cpus,
            memory_mib=memory_mib,
            qmp=self._qmp_path,
            machine=machine,
            extra=extra,
        )
        self._lines: queue.Queue[Line | None] = queue.Queue()
        self.lines: list[Line] = []
        self.stderr = ""
        self._started = time.monotonic()
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        self._qmp: socket.socket | None = None
        self._qmp_buffer = b""

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            text = raw.decode(errors="replace").rstrip("\r\n")
            self._lines.put(Line(time.monotonic() - self._started, text))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read().decode(errors="replace")

    def wait_for(self, prefix: str, timeout: float = 60.0) -> Line:
        """Waits for a line starting with ``prefix``; earlier lines are kept in ``lines``."""
        deadline = time.monotonic() + timeout
        for line in self.lines:
            if line.text.startswith(prefix):
                return line
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"no {prefix!r} within {timeout} s; got {self.texts}")
            try:
                got = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if got is None:
                self._lines.put(None)
                raise QemuError(
                    f"QEMU ended before {prefix!r}; got {self.texts}; stderr: {self.stderr}"
                )
            self.lines.append(got)
            if got.text.startswith(prefix):
                return got

    def wait_exit(self, timeout: float = 60.0) -> QemuRun:
        """Waits for QEMU to end (the guest reset or shut down) and for all its output."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise QemuError(f"QEMU still running after {timeout} s; got {self.texts}") from exc
        while True:
            line = self._lines.get(timeout=timeout)
            if line is None:
                self._lines.put(None)
                break
            self.lines.append(line)
        self._stderr_reader.join(timeout)
        return QemuRun(tuple(self.lines), returncode)

    @property
    def texts(self) -> list[str]:
        return [line.text for line in self.lines]

    def send(self, data: bytes) -> None:
        """Writes bytes to COM1's input."""
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def _qmp_message(self, timeout: float) -> dict[str, object]:
        assert self._qmp is not None
        self._qmp.settimeout(timeout)
        while b"\n" not in self._qmp_buffer:
            chunk = self._qmp.recv(65536)
            if not chunk:
                raise QemuError("QMP connection closed")
            self._qmp_buffer += chunk
        line, self._qmp_buffer = self._qmp_buffer.split(b"\n", 1)
        message: dict[str, object] = json.loads(line)
        return message

    def _qmp_execute(self, command: str, arguments: dict[str, object], timeout: float) -> object:
        assert self._qmp is not None
        request = {"execute": command, "arguments": arguments}
        self._qmp.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._qmp_message(timeout)
            if "event" in message:
                continue
            if "error" in message:
                raise QemuError(f"QMP {command} failed: {message['error']}")
            return message["return"]

    def _qmp_connect(self, timeout: float) -> None:
        """Connects to QMP, waiting up to ``timeout`` for QEMU to create its socket (a QEMU
        just started has not yet)."""
        if self._qmp_path is None:
            raise QemuError("start QemuGuest with qmp=True to use QMP or the monitor")
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._qmp_path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as error:
                sock.close()
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise QemuError(f"no QMP socket from QEMU: {error}") from None
                time.sleep(0.001)
        self._qmp = sock
        self._qmp_message(timeout)  # the greeting
        self._qmp_execute("qmp_capabilities", {}, timeout)

    def qmp(
        self, command: str, arguments: dict[str, object] | None = None, timeout: float = 30.0
    ) -> object:
        """Runs a QMP command and returns its ``return`` value (events are skipped)."""
        if self._qmp is None:
            self._qmp_connect(timeout)
        return self._qmp_execute(command, arguments or {}, timeout)

    def monitor(self, command_line: str, timeout: float = 30.0) -> str:
        """Runs a human monitor command (``xp``, ``info registers``) through QMP."""
        result = self.qmp("human-monitor-command", {"command-line": command_line}, timeout)
        return str(result)

    def read_u64(self, gpa: int) -> int:
        """Reads 8 bytes of guest-physical memory through the monitor's ``xp``."""
        out = self.monitor(f"xp /1gx {gpa:#x}")
        # "0000000000200000: 0x000000000001e240"
        return int(out.split(":", 1)[1].split()[0], 16)

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        self._tmp.cleanup()

    def __enter__(self) -> QemuGuest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def first_kvm_run_seconds(trace: Path, start: float, timeout: float) -> float:
    """Seconds from ``start`` (time.time()) to QEMU's first KVM_RUN, read from the file its
    ``-trace enable=kvm_vcpu_ioctl,file=TRACE`` writes (lines are stamped only with
    ``-msg timestamp=on``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if trace.exists():
            for line in trace.read_text(errors="replace").splitlines():
                # "PID@SECONDS.MICROS:kvm_vcpu_ioctl cpu_index 0, type 0xae80, ..."
                if "type 0xae80," in line:
                    return float(line.split("@", 1)[1].split(":", 1)[0]) - start
        time.sleep(0.002)  # QEMU writing its trace, bounded by the deadline
    raise RuntimeError("QEMU never entered KVM_RUN")


def run_guest(
    elf: Path,
    cmdline: str,
    *,
    kvm: bool = False,
    cpus: int = 1,
    timeout: float = 120.0,
    machine: str | None = None,
    extra: Sequence[str] = (),
) -> QemuRun:
    """Boots a workload that ends by itself and returns what it printed."""
    with QemuGuest(elf, cmdline, kvm=kvm, cpus=cpus, machine=machine, extra=extra) as guest:
        return guest.wait_exit(timeout)


def pio_exit_seconds(elf: Path, count: int, *, kvm: bool) -> float:
    """Seconds per ring-0 ``outb`` exit: the ``pio`` workload's loop time over ``count``.

    The loop time is the interval between the guest's boot line and its ``count=`` line,
    less that interval with ``count=0`` (printing, and the set-up between the two lines).
    """

    def interval(n: int) -> float:
        run = run_guest(elf, f"kasou.test=pio count={n}", kvm=kvm, timeout=600)
        return run.first("count=").at - run.first("kasou-guest: boot=").at

    return (interval(count) - interval(0)) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test", nargs="?", default="hello", help="workload name")
    parser.add_argument("args", nargs="*", help="key=value arguments for the workload")
    parser.add_argument("--kvm", action="store_true", help="-enable-kvm instead of TCG")
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--bench-pio", type=int, metavar="COUNT", help="time COUNT pio exits")
    options = parser.parse_args(argv)

    from kasou.guestkit import build_guest

    elf = build_guest()
    if shutil.which(QEMU) is None:
        print(f"{QEMU} is not installed (apt-get install qemu-system-x86)", file=sys.stderr)
        return 2
    if options.bench_pio:
        per_exit = pio_exit_seconds(elf, options.bench_pio, kvm=options.kvm)
        accel = "kvm" if options.kvm else "tcg"
        print(f"qemu {accel}: {per_exit * 1e6:.2f} µs per pio exit ({options.bench_pio} exits)")
        return 0
    cmdline = " ".join([f"kasou.test={options.test}", *options.args])
    run = run_guest(elf, cmdline, kvm=options.kvm, cpus=options.cpus)
    for line in run.lines:
        print(f"{line.at:8.3f}  {line.text}")
    print(f"QEMU exited with {run.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
