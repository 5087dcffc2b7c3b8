"""virtio in the default Linux guest: kasou beside QEMU ``-M microvm``, same kernel, same root
image, same command line, same host. Run by ``make bench`` (bench/run.py's ``virtio-guest``
section); on a host whose KVM cannot boot Linux, bench/run.py runs it inside ``kasou nested``.

The two VMMs, each with 1 vCPU and 512 MiB:

- kasou: ``kasou run`` without --kernel (its root disk through a throw-away qcow2 overlay, the
  agent on COM2 and on vsock) plus ``--disk BENCH,format=raw`` and ``--net tap=TAP``;
- QEMU 7.2: ``-M microvm,rtc=on,acpi=off -enable-kvm -cpu host`` with user-space virtio-mmio
  devices (``force-legacy=false``, no vhost): the root image as ``snapshot=on``, the same raw
  file (``cache=writeback``, like kasou's buffered backend), ``-netdev tap,vhost=off`` on the
  same TAP, and the agent on COM2 (a socket chardev whose other end this script holds).

Both guests get ``kasou.ip=10.0.0.2/24`` and the same MAC. The script makes a persistent TAP
(``kbench0``, 10.0.0.1/24) and deletes it at the end; no route leads anywhere else, and it
refuses to start where 10.0.0.0/24 is in use already. It needs root. Commands run in the
guest through the agent (``AgentSession``: over vsock for kasou, over COM2 for QEMU, which has
no user-space vsock).

Figures (each the median of ``--repeats`` runs; exec: of ``--execs`` runs):

- seq write / seq read: busybox ``dd bs=1M oflag=direct`` (``iflag=direct``) of the whole
  bench disk (a raw file in $TMPDIR, a tmpfs in the nested host), MB/s (10**6 B/s), timed in
  the guest with its CLOCK_MONOTONIC (``kasou-iobench -c``: busybox's date has no nanoseconds)
  around dd;
- rand read 4K dN: ``kasou-iobench`` (the default guest's /sbin), 4 KiB O_DIRECT preads at
  random offsets from N threads, so N in flight; the tool times itself, IOPS;
- net guest->host / host->guest: ``--to-host-mib`` / ``--to-guest-mib`` MiB through busybox
  ``nc`` in the guest and a Python socket on the host's TAP address, timed in the guest around
  nc, MB/s; the receiver checks the byte count. busybox's nc moves 1 KiB per read and write
  (seen with strace), so guest->host is bound by the guest's system calls and packets of
  about 1 KiB: it gets fewer MiB than host->guest, whose sender writes 1 MiB at a time;
- exec ``true``: one command's round trip as the host sees it, from sending it to its exit
  status: over vsock (``AgentSession.exec``), and over COM2 (kasou: the control socket's exec
  request, which the VMM relays on COM2; QEMU: ``AgentSession.exec`` on its COM2 socket).

Beside kasou's transfers: VM exits (the whole VM's, from ``status``) and the device's
interrupts (``devices``) per request, from the control socket's counters before and after;
a request is a virtio-blk request or a virtio-net packet (either direction). The ratio is
kasou's figure over QEMU's: above 1 means kasou moved more; for exec it is time, below 1 means
kasou answered sooner.

Usage: ``python bench/virtio_guest.py [--repeats 3] [--disk-mib 128] [--to-host-mib 4]
[--to-guest-mib 32] [--reads 1000] [--execs 20] [--no-qemu | --no-kasou]``
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kasou.client import AgentSession, ControlClient, open_session
from kasou.image import default_guest

__all__ = ["Figure", "KasouGuest", "QemuGuest", "bench_virtio_guest", "main"]

KASOU = str(Path(sys.executable).with_name("kasou"))
QEMU = "qemu-system-x86_64"
TAP = "kbench0"
HOST_ADDRESS = "10.0.0.1"
GUEST_ADDRESS = "10.0.0.2"
NETWORK = ipaddress.ip_network("10.0.0.0/24")
MAC = "52:54:00:6b:62:01"  # one MAC for both guests: the host's neighbour entry stays right
MEMORY_MIB = 512
BOOT_TIMEOUT = 240.0  # the nested host runs under TCG: a boot there takes tens of seconds
COMMAND_TIMEOUT = 120.0  # the longest command takes about 15 s in the nested host


class BenchError(RuntimeError):
    """A guest or a VMM did not do what the benchmark needs."""


_STARTED = time.monotonic()
_verbose = False


def _note(text: str) -> None:
    """A progress line on stderr, with ``--verbose``."""
    if _verbose:
        print(f"[{time.monotonic() - _STARTED:7.1f} s] {text}", file=sys.stderr, flush=True)


def _tail(path: Path, what: str, lines: int = 15) -> str:
    """The last lines of a log, to say why a guest did not come up."""
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        text = []
    shown = "\n".join(text[-lines:]) if text else "(nothing)"
    return f"--- {what} ({path.name}):\n{shown}"


@dataclass
class Figure:
    """One row's result for one VMM: the median figure, and kasou's counters per request."""

    value: float
    exits_per_request: float | None = None
    irqs_per_request: float | None = None


# --- the guests ---------------------------------------------------------------------------


class Guest:
    """A booted default guest: shell commands through an agent session, and (kasou) counters."""

    name = ""
    session: AgentSession
    process: subprocess.Popen[bytes]
    console: Path  # where the VMM writes the guest's COM1
    stderr: Path

    def _start(self, command: list[str], scratch: Path) -> None:
        """Start the VMM, its stderr in a file of ``scratch``."""
        self.stderr = scratch / f"{self.name.lower()}-stderr.log"
        with self.stderr.open("wb") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )

    def _failed(self, error: Exception) -> BenchError:
        """``error`` from booting, with what the VMM and the guest said."""
        return BenchError(
            f"{self.name}: the guest did not come up: {error}\n"
            f"{_tail(self.stderr, f'{self.name} stderr')}\n{_tail(self.console, 'guest COM1')}"
        )

    def shell(self, script: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``sh -c script`` in the guest; its stdout, or BenchError with its stderr."""
        out, err = bytearray(), bytearray()
        status = self.session.exec(
            ["sh", "-c", script],
            stdout=out.extend,
            stderr=err.extend,
            timeout=timeout,
            forward_signals=False,
        )
        if status != 0:
            raise BenchError(
                f"{self.name}: `{script}` exited with {status}: {err.decode(errors='replace')}"
            )
        return out.decode(errors="replace")

    def timed(self, command: str) -> tuple[float, str]:
        """Seconds ``command`` took by the guest's monotonic clock, and what it printed."""
        script = (
            f"a=$(kasou-iobench -c) || exit 1; {command}; r=$?; b=$(kasou-iobench -c); "
            'echo "span $a $b"; exit $r'
        )
        *printed, last = self.shell(script).rstrip("\n").split("\n")
        words = last.split()
        if len(words) != 5 or words[0] != "span":
            raise BenchError(f"{self.name}: no time span in {last!r}")
        return (int(words[4]) - int(words[2])) / 1e9, "\n".join(printed)

    def exec_true_seconds(self) -> float:
        """One `true` through this guest's agent session, as the host times it."""
        start = time.monotonic_ns()
        status = self.session.exec(["true"], timeout=COMMAND_TIMEOUT, forward_signals=False)
        if status != 0:
            raise BenchError(f"{self.name}: `true` exited with {status}")
        return (time.monotonic_ns() - start) / 1e9

    def exec_ways(self) -> dict[str, Callable[[], float]]:
        """The ways to run `true` in this guest, by the line they take ("vsock", "COM2")."""
        raise NotImplementedError

    def counters(self) -> dict[str, tuple[int, int]] | None:
        """(requests, interrupts) by device id, and "vm": (exits, 0); None where not known."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class KasouGuest(Guest):
    """``kasou run`` on the default guest, as ``kasou run`` without --kernel boots it."""

    name = "kasou"

    def __init__(self, scratch: Path, disk: Path, cmdline: str) -> None:
        self.sock = scratch / "kasou.sock"
        self.console = scratch / "kasou-console.log"
        command = [
            KASOU,
            "run",
            "--cmdline",
            cmdline,
            "--vcpus",
            "1",
            "--memory",
            f"{MEMORY_MIB}M",
            "--console",
            f"file:{self.console}",
            "--api-sock",
            str(self.sock),
            "--disk",
            f"{disk},format=raw",
            "--net",
            f"tap={TAP},mac={MAC}",
        ]
        self._start(command, scratch)
        try:
            deadline = time.monotonic() + BOOT_TIMEOUT
            while not self.sock.exists():  # another process's start-up, with a deadline
                if self.process.poll() is not None:
                    raise BenchError(f"kasou run ended with status {self.process.returncode}")
                if time.monotonic() > deadline:
                    raise BenchError("kasou run did not open its control socket")
                time.sleep(0.01)
            self.control = ControlClient(self.sock, timeout=BOOT_TIMEOUT)
            self.control.execute(["true"], timeout=BOOT_TIMEOUT)  # returns once the agent is up
            uds = self.control.request("status")["vsock"]["uds"]
            self.session = open_session(uds, timeout=BOOT_TIMEOUT)
        except Exception as error:
            self.close()
            raise self._failed(error) from error
        except BaseException:
            self.close()
            raise

    def exec_ways(self) -> dict[str, Callable[[], float]]:
        return {"vsock": self.exec_true_seconds, "COM2": self._exec_true_com2_seconds}

    def _exec_true_com2_seconds(self) -> float:
        start = time.monotonic_ns()
        result = self.control.execute(["true"], timeout=COMMAND_TIMEOUT)
        if result["status"] != 0:
            raise BenchError(f"kasou: `true` over COM2 exited with {result['status']}")
        return (time.monotonic_ns() - start) / 1e9

    def counters(self) -> dict[str, tuple[int, int]] | None:
        figures = {"vm": (int(self.control.request("status")["exits"]), 0)}
        for device in self.control.request("devices")["devices"]:
            counters: dict[str, Any] = device["counters"]
            if device["type"] == "block":
                requests = int(counters["requests"])
            elif device["type"] == "net":
                requests = int(counters["tx_packets"]) + int(counters["rx_packets"])
            else:
                continue
            figures[device["id"]] = (requests, int(device["interrupts"]))
        return figures

    def device_id(self, kind: str, size: int | None = None) -> str:
        """The control socket's id of the ``kind`` device (of ``size`` bytes for a disk)."""
        for device in self.control.request("devices")["devices"]:
            if device["type"] == kind and (size is None or device["counters"]["size"] == size):
                return str(device["id"])
        raise BenchError(f"kasou lists no {kind} device" + (f" of {size} bytes" if size else ""))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
        with contextlib.suppress(Exception):
            self.control.request("stop")
        with contextlib.suppress(Exception):
            self.control.close()
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class QemuGuest(Guest):
    """QEMU -M microvm on the same kernel, root image, command line, disk file and TAP."""

    name = "QEMU"

    def __init__(self, scratch: Path, disk: Path, cmdline: str) -> None:
        guest = default_guest(build=False)
        agent = scratch / "qemu-agent.sock"
        self.console = scratch / "qemu-console.log"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(agent))
        self.listener.listen(1)
        self.listener.settimeout(1.0)  # to notice a QEMU that ended instead of connecting
        # acpi=off: the default guest's kernel has no ACPI, and with ACPI on QEMU announces
        # its virtio-mmio slots only in its DSDT, not on the command line (seen with 7.2: the
        # kernel found no disk). The root disk comes first, so that it is /dev/vda.
        command = [
            QEMU,
            "-M",
            "microvm,rtc=on,acpi=off",
            "-enable-kvm",
            "-cpu",
            "host",
            "-smp",
            "1",
            "-m",
            str(MEMORY_MIB),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-kernel",
            str(guest.kernel),
            "-append",
            cmdline,
            "-serial",
            f"file:{self.console}",
            "-chardev",
            f"socket,id=agent,path={agent}",
            "-device",
            "isa-serial,chardev=agent,iobase=0x2f8,irq=3",
            "-global",
            "virtio-mmio.force-legacy=false",
            "-drive",
            f"file={guest.rootfs},format=raw,if=none,id=r,snapshot=on",
            "-device",
            "virtio-blk-device,drive=r",
            "-drive",
            f"file={disk},format=raw,if=none,id=d,cache=writeback,aio=threads",
            "-device",
            "virtio-blk-device,drive=d",
            "-netdev",
            f"tap,id=n,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device",
            f"virtio-net-device,netdev=n,mac={MAC}",
        ]
        self._start(command, scratch)
        try:
            self.session = AgentSession(self._accept(time.monotonic() + BOOT_TIMEOUT))
            self.session.wait_ready(BOOT_TIMEOUT)
        except Exception as error:
            self.close()
            raise self._failed(error) from error
        except BaseException:
            self.close()
            raise

    def _accept(self, deadline: float) -> socket.socket:
        """QEMU's connection to COM2's socket (it connects as it starts)."""
        while True:
            try:
                connection, _ = self.listener.accept()
                return connection
            except TimeoutError:
                if self.process.poll() is not None:
                    raise BenchError(f"QEMU ended with status {self.process.returncode}") from None
                if time.monotonic() > deadline:
                    raise BenchError("QEMU did not connect to its COM2 socket") from None

    def exec_ways(self) -> dict[str, Callable[[], float]]:
        return {"COM2": self.exec_true_seconds}  # QEMU has no user-space vsock

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
        self.process.kill()  # microvm has no ACPI: a powered-off guest would not end QEMU anyway
        self.process.wait()
        self.listener.close()


# --- the measurements ---------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What to measure, and how much of it."""

    repeats: int
    disk_bytes: int
    to_host_bytes: int
    to_guest_bytes: int
    reads: int
    execs: int


@dataclass(frozen=True)
class Row:
    """One line of the table: its name, its unit and how one sample of it is taken."""

    name: str
    unit: str  # "MB/s", "IOPS" or "ms"
    device: str  # which of kasou's devices its requests go to: "disk", "net", or ""
    sample: Callable[[Guest, Plan, str], float]


def _seq_write(guest: Guest, plan: Plan, dev: str) -> float:
    seconds, _ = guest.timed(
        f"dd if=/dev/zero of=/dev/{dev} bs=1M count={plan.disk_bytes >> 20} oflag=direct "
        "2>/dev/null"
    )
    return plan.disk_bytes / seconds / 1e6


def _seq_read(guest: Guest, plan: Plan, dev: str) -> float:
    seconds, _ = guest.timed(
        f"dd if=/dev/{dev} of=/dev/null bs=1M count={plan.disk_bytes >> 20} iflag=direct "
        "2>/dev/null"
    )
    return plan.disk_bytes / seconds / 1e6


def _rand_read(depth: int) -> Callable[[Guest, Plan, str], float]:
    def sample(guest: Guest, plan: Plan, dev: str) -> float:
        printed = guest.shell(f"kasou-iobench -n {plan.reads} -t {depth} /dev/{dev}")
        words = dict(word.split("=", 1) for word in printed.split()[1:] if "=" in word)
        if int(words.get("reads", -1)) != plan.reads:
            raise BenchError(f"{guest.name}: kasou-iobench printed {printed!r}")
        return float(words["iops"])

    return sample


def _net_to_host(guest: Guest, plan: Plan, _dev: str) -> float:
    """Guest -> host: busybox dd into nc; this process counts what arrives."""
    received = [0]
    with socket.create_server((HOST_ADDRESS, 0)) as server:
        server.settimeout(COMMAND_TIMEOUT)
        port = server.getsockname()[1]

        def drain() -> None:
            with contextlib.suppress(OSError):
                connection, _ = server.accept()
                with connection:
                    connection.settimeout(COMMAND_TIMEOUT)
                    buffer = bytearray(1 << 20)
                    while count := connection.recv_into(buffer):
                        received[0] += count

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        blocks = plan.to_host_bytes >> 16
        seconds, _ = guest.timed(
            f"dd if=/dev/zero bs=64k count={blocks} 2>/dev/null | nc {HOST_ADDRESS} {port}"
        )
        thread.join(COMMAND_TIMEOUT)
    if received[0] != plan.to_host_bytes:
        raise BenchError(f"{guest.name}: the host got {received[0]} of {plan.to_host_bytes} B")
    return plan.to_host_bytes / seconds / 1e6


def _net_to_guest(guest: Guest, plan: Plan, _dev: str) -> float:
    """Host -> guest: this process sends; busybox nc in the guest counts with wc."""
    with socket.create_server((HOST_ADDRESS, 0)) as server:
        server.settimeout(COMMAND_TIMEOUT)
        port = server.getsockname()[1]

        def feed() -> None:
            with contextlib.suppress(OSError):
                connection, _ = server.accept()
                with connection:
                    connection.settimeout(COMMAND_TIMEOUT)
                    chunk = bytes(1 << 20)
                    for _ in range(plan.to_guest_bytes >> 20):
                        connection.sendall(chunk)

        thread = threading.Thread(target=feed, daemon=True)
        thread.start()
        seconds, printed = guest.timed(f"nc {HOST_ADDRESS} {port} </dev/null | wc -c")
        thread.join(COMMAND_TIMEOUT)
    if printed.strip() != str(plan.to_guest_bytes):
        raise BenchError(
            f"{guest.name}: the guest got {printed.strip()} of {plan.to_guest_bytes} B"
        )
    return plan.to_guest_bytes / seconds / 1e6


ROWS = (
    Row("seq write 1M", "MB/s", "disk", _seq_write),
    Row("seq read 1M", "MB/s", "disk", _seq_read),
    Row("rand read 4K d1", "IOPS", "disk", _rand_read(1)),
    Row("rand read 4K d4", "IOPS", "disk", _rand_read(4)),
    Row("net guest->host", "MB/s", "net", _net_to_host),
    Row("net host->guest", "MB/s", "net", _net_to_guest),
)


def _bench_disk_name(guest: Guest, size: int) -> str:
    """The guest's name (vdb) for the disk of ``size`` bytes: the root image is another."""
    sectors = size // 512
    found = guest.shell(
        f'for d in /sys/block/vd*; do [ "$(cat $d/size)" = {sectors} ] && echo ${{d##*/}}; '
        "done; true"
    ).split()
    if len(found) != 1:
        raise BenchError(f"{guest.name}: disks of {size} bytes in the guest: {found}")
    return found[0]


def measure(guest: Guest, plan: Plan) -> dict[str, Figure]:
    """Every row's figure for one booted guest."""
    dev = _bench_disk_name(guest, plan.disk_bytes)
    _note(f"{guest.name}: up; the bench disk is /dev/{dev}")
    ids: dict[str, str] = {}
    if isinstance(guest, KasouGuest):
        ids = {"disk": guest.device_id("block", plan.disk_bytes), "net": guest.device_id("net")}
    results: dict[str, Figure] = {}
    for row in ROWS:
        before = guest.counters()
        samples = []
        for _ in range(plan.repeats):
            try:
                samples.append(row.sample(guest, plan, dev))
            except Exception as error:
                raise BenchError(f"{guest.name}: {row.name}: {error}") from error
            _note(f"{guest.name}: {row.name}: {samples[-1]:,.2f} {row.unit}")
        after = guest.counters()
        figure = Figure(statistics.median(samples))
        if before is not None and after is not None and row.device in ids:
            key = ids[row.device]
            requests = after[key][0] - before[key][0]
            if requests > 0:
                figure.exits_per_request = (after["vm"][0] - before["vm"][0]) / requests
                figure.irqs_per_request = (after[key][1] - before[key][1]) / requests
        results[row.name] = figure
    for line, exec_true in guest.exec_ways().items():
        exec_true()  # warm-up, not counted
        samples = [exec_true() for _ in range(plan.execs)]
        results[f"exec true {line}"] = Figure(statistics.median(samples) * 1e3)
        _note(f"{guest.name}: exec true {line}: {results[f'exec true {line}'].value:.2f} ms")
    return results


# --- the host's side: the disk file and the TAP ---------------------------------------------


def _make_disk(folder: Path, size: int) -> Path:
    """A raw file of ``size`` bytes written in full (no holes: reads touch real pages)."""
    path = folder / "bench-disk.raw"
    chunk = bytes(range(256)) * 4096
    with path.open("wb") as file:
        for _ in range(size // len(chunk)):
            file.write(chunk)
    return path


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done.stdout


def _check_network_free() -> None:
    """Refuse to touch a host where TAP exists or 10.0.0.0/24 is in use already."""
    if Path("/sys/class/net", TAP).exists():
        raise BenchError(f"an interface named {TAP} exists already: remove it or free the name")
    for line in _ip("-4", "-o", "addr", "show").splitlines():
        words = line.split()
        address = ipaddress.ip_interface(words[words.index("inet") + 1])
        if address.network.overlaps(NETWORK):
            raise BenchError(f"{NETWORK} overlaps {address} on {words[1]}: this host uses it")
    for line in _ip("-4", "route", "show").splitlines():
        for word in line.split()[:2]:  # "10.1.0.0/16 dev ...", or "blackhole 10.1.0.0/16"
            try:
                target = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue  # "default", a route type
            if target.overlaps(NETWORK):
                raise BenchError(f"{NETWORK} overlaps this host's route {line.strip()!r}")
            break


@contextlib.contextmanager
def host_tap() -> Iterator[None]:
    """A persistent TAP with the host's address, removed on the way out."""
    _check_network_free()
    _ip("tuntap", "add", "dev", TAP, "mode", "tap")
    try:
        _ip("addr", "add", f"{HOST_ADDRESS}/{NETWORK.prefixlen}", "dev", TAP)
        _ip("link", "set", TAP, "up")
        yield
    finally:
        _ip("link", "del", TAP)


# --- the table ----------------------------------------------------------------------------


def _value(figure: Figure | None, unit: str) -> str:
    if figure is None:
        return f"{'-':>13}"
    number = f"{figure.value:,.2f}" if unit == "ms" or figure.value < 10 else f"{figure.value:,.1f}"
    return f"{number:>8} {unit:<4}"


def _per(value: float | None) -> str:
    return f"{'-':>7}" if value is None else f"{value:>7.2f}"


def _file_system(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/self/mountinfo)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            point, after = fields[4], fields[fields.index("-") + 1]
            inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, after
    return kind


def _qemu_version() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        done = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True)
        return done.stdout.removeprefix("QEMU emulator version ").split()[0]
    return "?"


def print_table(
    plan: Plan, disk_on: str, kasou: dict[str, Figure], qemu: dict[str, Figure] | None
) -> None:
    peer = f"kasou beside QEMU {_qemu_version()} microvm" if qemu is not None else "kasou alone"
    print(
        f"\n## virtio in the default guest (1 vCPU, {MEMORY_MIB} MiB; {peer}; "
        f"median of {plan.repeats}, exec of {plan.execs})"
    )
    definition = (
        f"a {plan.disk_bytes >> 20} MiB raw disk file on {disk_on}: busybox dd bs=1M with "
        f"O_DIRECT, and {plan.reads} random 4 KiB O_DIRECT reads (kasou-iobench; dN: N "
        f"threads); busybox nc, {plan.to_host_bytes >> 20} MiB guest->host and "
        f"{plan.to_guest_bytes >> 20} MiB host->guest, all timed by the guest; exec `true` "
        "round trip as the host sees it. For kasou: VM exits and the device's interrupts per "
        "virtio request (net: per packet, both ways). Ratio kasou/QEMU: above 1 kasou moved "
        "more (ms: below 1 kasou answered sooner)"
    )
    print(textwrap.fill(definition, 96, initial_indent="   definition: ", subsequent_indent="   "))
    print(
        f"   {'row':<17} {'kasou':>13} {'exits/req':>9} {'irq/req':>7} {'QEMU':>13} "
        f"{'kasou/QEMU':>10}"
    )
    names = [row.name for row in ROWS] + ["exec true vsock", "exec true COM2"]
    units = {row.name: row.unit for row in ROWS}
    for name in names:
        unit = units.get(name, "ms")
        mine = kasou.get(name)
        theirs = None if qemu is None else qemu.get(name)
        line = (
            f"   {name:<17} {_value(mine, unit)} "
            f"{_per(mine.exits_per_request if mine else None):>9} "
            f"{_per(mine.irqs_per_request if mine else None)} {_value(theirs, unit)}"
        )
        if qemu is None:
            line += f" {'(no QEMU)':>10}"
        elif mine is not None and theirs is not None:
            line += f" {mine.value / theirs.value:>9.2f}x"
        else:
            line += f" {'(no vsock)' if 'vsock' in name else '-':>10}"
        print(line)


def bench_virtio_guest(
    plan: Plan,
    with_qemu: bool,
    folder: Path | None = None,
    *,
    with_kasou: bool = True,
    logs: Path | None = None,
) -> None:
    """Boot each VMM once, measure every row, print the section. With ``logs``, the VMMs'
    stderr and the guests' COM1 are copied there at the end, however it ends."""
    guest = default_guest(build=False)
    cmdline = f"{guest.disk_cmdline} kasou.ip={GUEST_ADDRESS}/{NETWORK.prefixlen}"
    with tempfile.TemporaryDirectory(prefix="kasou-vguest-", dir=folder) as tmp:
        scratch = Path(tmp)
        disk = _make_disk(scratch, plan.disk_bytes)
        kasou: dict[str, Figure] = {}
        qemu: dict[str, Figure] | None = None
        try:
            with host_tap():
                if with_kasou:
                    _note("kasou: booting")
                    kasou_guest = KasouGuest(scratch, disk, cmdline)
                    try:
                        kasou = measure(kasou_guest, plan)
                    finally:
                        kasou_guest.close()
                if with_qemu:
                    _note("QEMU: booting")
                    qemu_guest = QemuGuest(scratch, disk, cmdline)
                    try:
                        qemu = measure(qemu_guest, plan)
                    finally:
                        qemu_guest.close()
        finally:
            if logs is not None:
                for log in scratch.glob("*.log"):
                    shutil.copyfile(log, logs / log.name)
        disk_on = _file_system(scratch)
    print_table(plan, disk_on, kasou, qemu)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a whole number of at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=_positive, default=3, help="runs of each transfer")
    parser.add_argument("--disk-mib", type=_positive, default=128, help="size of the bench disk")
    parser.add_argument("--to-host-mib", type=_positive, default=4, help="MiB guest->host")
    parser.add_argument("--to-guest-mib", type=_positive, default=32, help="MiB host->guest")
    parser.add_argument("--reads", type=_positive, default=1000, help="random reads per run")
    parser.add_argument("--execs", type=_positive, default=20, help="exec round trips")
    parser.add_argument("--no-qemu", action="store_true", help="kasou's figures only")
    parser.add_argument("--no-kasou", action="store_true", help="QEMU's figures only")
    parser.add_argument("--dir", type=Path, help="folder for the disk file (default: $TMPDIR)")
    parser.add_argument("--logs", type=Path, help="copy the VMMs' and guests' logs here")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    options = parser.parse_args(argv)
    global _verbose
    _verbose = options.verbose
    from kasou.kvm.host import probe_host

    if not probe_host().backend.boots_linux:
        print("this host's KVM cannot boot Linux: run this in `kasou nested` (bench/run.py does)")
        return 2
    if os.geteuid() != 0:
        print("\n## virtio in the default guest: skipped (the TAP needs root; nested, it is root)")
        return 0
    with_qemu = not options.no_qemu and shutil.which(QEMU) is not None
    if not with_qemu:
        print("QEMU is not available here (or --no-qemu): kasou's figures only")
    plan = Plan(
        repeats=options.repeats,
        disk_bytes=options.disk_mib << 20,
        to_host_bytes=options.to_host_mib << 20,
        to_guest_bytes=options.to_guest_mib << 20,
        reads=options.reads,
        execs=options.execs,
    )
    bench_virtio_guest(
        plan, with_qemu, options.dir, with_kasou=not options.no_kasou, logs=options.logs
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
