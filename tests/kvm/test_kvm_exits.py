"""KVM's own exit counters (binary statistics, kasou/kvm/stats.py) as a user sees them: in a
VM's status, in kasoud's /metrics, in ``kasou status`` and ``kasou top --json``, for guests
whose port I/O and halts are known."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kasou.kvm.host import Backend, backend
from kasou.vmm import Vm

from ._kasoud import Kasoud, guest_spec, running_kasoud
from .conftest import KASOU, BootFactory

pytestmark = pytest.mark.kvm

PORT_WRITES = 3000
WAIT_TIMEOUT = 30.0


def _until(check: Callable[[], Any], what: str) -> Any:
    """Poll ``check`` until it returns something true (KVM counts a halt once the vCPU got
    there; nothing signals it); fail naming ``what`` after ``WAIT_TIMEOUT`` seconds."""
    deadline = time.monotonic() + WAIT_TIMEOUT
    pause = threading.Event()
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} within {WAIT_TIMEOUT} s"
        pause.wait(0.02)


def _port_io(counts: dict[str, int]) -> int:
    """KVM's count of the guest's port I/O: its ``io`` exits, except on PVM, which emulates
    ring-0 ``out`` instead of taking an I/O exit and counts it as an emulated instruction."""
    return counts["emulation"] if backend() is Backend.PVM else counts["io"]


def test_status_counts_every_port_write_and_exit(boot: BootFactory) -> None:
    vm = boot("pio", count=PORT_WRITES, port=0x80)
    vm.wait()  # it writes, prints "done" and resets the machine
    assert f"count={PORT_WRITES}" in vm.console.text
    status = vm.status()
    kvm_exits = status["kvm_exits"]
    assert _port_io(kvm_exits) >= PORT_WRITES
    # KVM counts every exit, those that reach kasou too.
    assert kvm_exits["all"] >= status["exits"] >= PORT_WRITES
    assert status["kvm_exits_by_vcpu"] == [kvm_exits]  # one vCPU: its counts are the sum


def test_status_counts_a_halt(boot: BootFactory) -> None:
    vm = boot("wait", vcpus=2)  # the boot vCPU prints "ready" and halts; the other never runs
    vm.console.wait_for("ready")
    status = _until(lambda: (s := vm.status())["kvm_exits"].get("halt", 0) >= 1 and s, "a halt")
    boot_vcpu, other = status["kvm_exits_by_vcpu"]
    assert boot_vcpu["halt"] >= 1 and boot_vcpu["all"] > 0
    assert status["kvm_exits"]["all"] == boot_vcpu["all"] + other["all"]


def test_a_kernel_without_binary_stats_leaves_the_keys_out(boot: BootFactory) -> None:
    def as_if_absent(built: Vm) -> None:
        for vcpu in built.vcpus:
            vcpu.kvm_stats = None  # what the builder leaves when KVM_GET_STATS_FD is unknown

    vm = boot("wait", before_start=as_if_absent)
    vm.console.wait_for("ready")
    status = vm.status()
    assert "kvm_exits" not in status and "kvm_exits_by_vcpu" not in status
    assert status["exits_by_reason"]["io"] > 0  # kasou's own count is still there


@pytest.fixture
def kasoud() -> Iterator[Kasoud]:
    with running_kasoud() as daemon:
        yield daemon


def _kvm_exits(kasoud: Kasoud, vm: str) -> dict[str, float]:
    """KVM's exit counters of ``vm`` in kasoud's /metrics, by reason."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(kasoud.api.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "kasou_vm_kvm_exits_total" and sample.labels["vm"] == vm:
                counts[sample.labels["reason"]] = sample.value
    return counts


def _cli(kasoud: Kasoud, *args: str) -> Any:
    result = subprocess.run(
        [KASOU, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KASOU_HOST": str(kasoud.sock)},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (args, result.stderr)
    return json.loads(result.stdout)


def test_kasoud_exports_kvm_exits_and_the_cli_shows_them(kasoud: Kasoud) -> None:
    created = kasoud.api.post("/v1/vms", json=guest_spec("h"))
    assert created.status_code == 201, created.text
    assert kasoud.api.post("/v1/vms/h/start").status_code == 200
    kasoud.wait_log("h", "ready")  # its boot line and "ready": port writes to COM1
    counts = _until(lambda: (c := _kvm_exits(kasoud, "h")).get("halt", 0) >= 1 and c, "a halt")
    text = kasoud.api.get("/metrics").text
    assert "# HELP kasou_vm_kvm_exits_total VM exits as KVM counts them" in text
    assert "# TYPE kasou_vm_kvm_exits_total counter" in text
    printed = len("kasou-guest: boot=linux test=wait\nready\n")  # a port write a byte at least
    assert _port_io({k: int(v) for k, v in counts.items()}) >= printed
    assert counts["all"] >= printed

    status = _cli(kasoud, "status", "h")  # the VM's own answer, through kasoud
    assert status["kvm_exits"]["halt"] >= 1
    assert status["kvm_exits"]["all"] >= status["exits"]
    figures = _cli(kasoud, "top", "--json")["h"]
    assert figures["kvm_exits"]["halt"] >= 1
    assert figures["kvm_exits"]["all"] >= counts["all"]  # a counter: later reads only grow
    assert "kasou_vm_kvm_exits_total" not in figures  # overlapping reasons are not summed
