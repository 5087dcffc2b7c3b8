"""The kvm tier's VM framework: guest-kit guests booted in this process on /dev/kvm.

Fixtures build on each other: ``guest_elf`` (the compiled guest kit), then ``boot``, which
creates, configures and starts a VM running one workload and hands back a ``Booted`` with its
console. Every VM carries two monitors that fail the test when crossed:

- the VMM's own memory: the process's resident memory outside guest RAM may not grow by
  more than ``VMM_MEMORY_LIMIT`` while the VM lives;
- control latency: every control request (pause, resume, stop, status) must be answered
  within ``CONTROL_LATENCY_LIMIT`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from kasou._sys.proc import resident_bytes
from kasou.guestkit import build_guest, cmdline
from kasou.kvm.host import probe_host
from kasou.memory import GuestMemory
from kasou.vmm import ExtraDevice, GuestExit, Vm, VmConfig, build_vm
from kasou.vmm.config import ConsoleConfig

VMM_MEMORY_LIMIT = 24 << 20
CONTROL_LATENCY_LIMIT = 2.0
BOOT_TIMEOUT = 60.0

_host = probe_host()
if _host.problem is not None:
    pytest.skip(f"the kvm tier needs /dev/kvm: {_host.problem}", allow_module_level=True)


class ConsoleCapture:
    """COM1's output, with waits on what the guest prints (no sleeps)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._changed = threading.Condition()

    def write(self, data: bytes) -> None:
        with self._changed:
            self._data += data
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return self._data.decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = BOOT_TIMEOUT) -> str:
        """Block until ``needle`` has been printed; return the whole output."""
        with self._changed:
            if not self._changed.wait_for(lambda: needle.encode() in self._data, timeout):
                raise AssertionError(
                    f"{needle!r} not printed within {timeout} s; console:\n"
                    + self._data.decode(errors="replace")
                )
            return self._data.decode(errors="replace")


def _rss_outside(memory: GuestMemory) -> int:
    """Resident bytes of this process outside guest RAM."""
    guest = [(region.host_address, region.host_address + region.size) for region in memory.regions]
    return resident_bytes(skip=lambda low, high: any(a <= low < b for a, b in guest))


class Booted:
    """A started VM with its console and monitored control calls."""

    def __init__(self, vm: Vm, console: ConsoleCapture) -> None:
        self.vm = vm
        self.console = console
        self.latencies: list[tuple[str, float]] = []

    def control(self, name: str, action: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            return action()
        finally:
            self.latencies.append((name, time.monotonic() - start))

    def pause(self) -> None:
        self.control("pause", self.vm.pause)

    def resume(self) -> None:
        self.control("resume", self.vm.resume)

    def stop(self) -> None:
        self.control("stop", self.vm.stop)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("status", self.vm.status)
        return result

    def wait(self, timeout: float = BOOT_TIMEOUT) -> GuestExit:
        ending = self.vm.wait(timeout)
        if ending is None:
            raise AssertionError(f"the VM did not end within {timeout} s:\n{self.console.text}")
        return ending


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    return build_guest()


BootFactory = Callable[..., Booted]


@pytest.fixture
def boot(guest_elf: Path) -> Iterator[BootFactory]:
    """``boot(workload, vcpus=1, memory=64M, extra=(), settings={}, before_start=None,
    **args)`` starts a VM running it. ``settings`` are more ``VmConfig`` fields (disks,
    nets, vsock, rng, ...); ``before_start`` gets the built VM before its vCPUs run."""
    booted: list[tuple[Booted, int]] = []

    def factory(
        workload: str,
        *,
        vcpus: int = 1,
        memory: int = 64 << 20,
        extra: Sequence[ExtraDevice] = (),
        settings: Mapping[str, Any] | None = None,
        before_start: Callable[[Vm], None] | None = None,
        **args: int | str,
    ) -> Booted:
        console = ConsoleCapture()
        config = VmConfig(
            kernel=guest_elf,
            cmdline=cmdline(workload, **args),
            vcpus=vcpus,
            memory=memory,
            console=ConsoleConfig("none"),
            # No virtio device unless asked: slot 0 would sit on TEST_MMIO_BASE.
            **{"rng": False, **(settings or {})},
        )
        vm = build_vm(config, console_output=console.write, extra_devices=extra)
        baseline = _rss_outside(vm.memory)
        result = Booted(vm, console)
        booted.append((result, baseline))
        if before_start is not None:
            before_start(vm)
        vm.start()
        return result

    yield factory
    for result, baseline in booted:
        growth = _rss_outside(result.vm.memory) - baseline
        result.control("stop", result.vm.stop)
        result.vm.close()
        assert growth <= VMM_MEMORY_LIMIT, (
            f"the VMM's memory outside guest RAM grew by {growth >> 20} MiB"
        )
        slow = [
            (name, seconds) for name, seconds in result.latencies if seconds > CONTROL_LATENCY_LIMIT
        ]
        assert not slow, f"control requests slower than {CONTROL_LATENCY_LIMIT} s: {slow}"


KASOU = str(Path(sys.executable).with_name("kasou"))


@contextlib.contextmanager
def kasou_with_socket(command: list[str], sock: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` (a ``kasou run`` with ``--api-sock sock``) in the background, yielded once
    its control socket exists; killed if the test leaves it running."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():  # another process's start-up, with a deadline
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the control socket did not appear"
            time.sleep(0.01)
        yield process
    finally:
        process.kill()
        process.communicate()


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Block until process ``pid`` (not a child of this one) has ended: its pidfd turns
    readable."""
    with contextlib.suppress(ProcessLookupError):
        fd = os.pidfd_open(pid)
        try:
            assert select.select([fd], [], [], timeout)[0], f"process {pid} still runs"
        finally:
            os.close(fd)
