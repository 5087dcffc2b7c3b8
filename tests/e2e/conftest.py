"""The e2e tier's framework: the default Linux guest under ``kasou run``, on a KVM that boots
Linux (hardware, or the nested host that ``make test`` starts on hosts without one).

``launch`` starts ``kasou run`` as a user would (a subprocess with a control socket and the
console in a file) and hands back a ``RunningGuest``: commands run in the guest through its
agent (``kasou exec``'s path), and the control requests are timed. Monitors that fail the
test when crossed:

- control latency: every control request answered within ``CONTROL_LATENCY_LIMIT``;
- the VMM's memory: kasou's resident memory outside guest RAM stays within
  ``VMM_MEMORY_LIMIT`` (shared/DESIGN.md: 40 MiB is the target).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kasou._sys.proc import resident_bytes
from kasou.client import ControlClient
from kasou.kvm.host import probe_host

KASOU = str(Path(sys.executable).with_name("kasou"))
CONTROL_LATENCY_LIMIT = 10.0  # seconds; generous: the nested host runs under TCG
VMM_MEMORY_LIMIT = 40 << 20
BOOT_TIMEOUT = 120.0

_host = probe_host()
if not _host.backend.boots_linux:
    pytest.skip(
        f"the e2e tier needs a KVM that boots Linux (this host: {_host.backend.value}); "
        "`make test` runs it inside `kasou nested`",
        allow_module_level=True,
    )


class RunningGuest:
    """One ``kasou run`` process and its control socket."""

    def __init__(self, process: subprocess.Popen[bytes], sock: Path, console: Path, memory: int):
        self.process = process
        self.sock = sock
        self.console = console
        self.memory = memory
        self.latencies: list[tuple[str, float]] = []

    def request(self, name: str, **arguments: Any) -> dict[str, Any]:
        start = time.monotonic()
        with ControlClient(self.sock, timeout=BOOT_TIMEOUT) as client:
            try:
                return client.request(name, **arguments)
            finally:
                if name != "exec":  # exec lasts as long as the command does
                    self.latencies.append((name, time.monotonic() - start))

    def run(self, *argv: str, timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
        """Run a command in the guest (waits for the agent first); returns status and output."""
        return self.request("exec", argv=list(argv), timeout=timeout)

    def trigger(self, *argv: str) -> None:
        """Run a command that ends the guest (poweroff, reboot): its reply may never come."""
        from kasou.errors import KasouError

        try:
            self.run(*argv, timeout=60)
        except KasouError as error:
            assert "rebooted" in str(error) or "closed" in str(error), error

    def output(self, *argv: str) -> str:
        result = self.run(*argv)
        assert result["status"] == 0, result
        return str(result["stdout"]).strip()

    def wait(self, timeout: float = BOOT_TIMEOUT) -> int:
        return self.process.wait(timeout)

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def vmm_rss_total(self) -> int:
        """kasou's whole resident memory, guest RAM included."""
        return resident_bytes(self.process.pid)

    def vmm_rss(self) -> int:
        """kasou's resident memory outside guest RAM (mappings at least as large as it)."""
        return resident_bytes(self.process.pid, lambda low, high: high - low >= self.memory)


@pytest.fixture(scope="session")
def default_guest() -> Any:
    from kasou.image import default_guest as find

    return find(build=False)


Launcher = Callable[..., RunningGuest]


@pytest.fixture
def launch(tmp_path: Path, default_guest: Any) -> Iterator[Launcher]:
    """``launch(*extra, vcpus=1, memory="256M", kernel=None, initrd=None, cmdline=None,
    root_disk=False)``. With ``root_disk`` the default guest boots as ``kasou run`` does it
    without --kernel: its root disk on virtio-blk through a throw-away qcow2 overlay, the
    agent on vsock too, an rng; ``cmdline`` is then added to the guest's own."""
    started: list[RunningGuest] = []

    def start(
        *extra: str,
        vcpus: int = 1,
        memory: str = "256M",
        kernel: Path | None = None,
        initrd: Path | None = None,
        cmdline: str | None = None,
        root_disk: bool = False,
    ) -> RunningGuest:
        index = len(started)
        sock, console = tmp_path / f"vm{index}.sock", tmp_path / f"console{index}.log"
        if root_disk:
            boot = ["--cmdline", f"{default_guest.disk_cmdline} {cmdline or ''}".strip()]
        else:
            boot = [
                "--kernel",
                str(kernel or default_guest.kernel),
                "--initrd",
                str(initrd or default_guest.initrd),
                "--cmdline",
                cmdline or default_guest.cmdline,
            ]
        command = [
            KASOU,
            "run",
            *boot,
            "--vcpus",
            str(vcpus),
            "--memory",
            memory,
            "--console",
            f"file:{console}",
            "--api-sock",
            str(sock),
            *extra,
        ]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not sock.exists():  # waiting on another process's startup, with a deadline
            if process.poll() is not None:
                raise AssertionError(f"kasou ended early: {process.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError("kasou's control socket did not appear")
            time.sleep(0.05)
        from kasou.memory import parse_size

        guest = RunningGuest(process, sock, console, parse_size(memory))
        started.append(guest)
        return guest

    yield start
    for guest in started:
        alive = guest.process.poll() is None
        rss = guest.vmm_rss() if alive else 0
        if alive:
            guest.process.send_signal(signal.SIGTERM)
        try:
            guest.process.wait(30)
        except subprocess.TimeoutExpired:
            guest.process.kill()
            guest.process.wait()
        guest.process.communicate()
        assert rss <= VMM_MEMORY_LIMIT, f"kasou's own memory is {rss >> 20} MiB"
        slow = [(name, round(s, 2)) for name, s in guest.latencies if s > CONTROL_LATENCY_LIMIT]
        assert not slow, f"control requests slower than {CONTROL_LATENCY_LIMIT} s: {slow}"
        assert not guest.sock.exists(), "kasou left its control socket behind"


def pytest_report_header() -> str:
    return f"e2e host: KVM backend {_host.backend.value}, {os.cpu_count()} CPUs"
