"""Pause, resume and stop, seen through guest memory and the lifecycle table."""

from __future__ import annotations

import pytest

from kasou.errors import LifecycleError
from kasou.guestkit import COUNTER_GPA, LOAD_ADDR
from kasou.vmm import ExitKind, VmState

from .conftest import BootFactory


def test_pause_freezes_the_guest_and_resume_continues_it(boot: BootFactory) -> None:
    vm = boot("counter", vcpus=2)
    vm.console.wait_for("counter_addr=")
    read = lambda: vm.vm.memory.read_int(COUNTER_GPA, 8)  # noqa: E731
    first = read()
    while read() == first:  # the guest counts natively in ring 3: this returns at once
        pass
    vm.pause()
    assert vm.vm.state is VmState.PAUSED
    frozen = read()
    status = vm.status()
    assert status["exits"] > 0  # the lines it printed were PIO exits
    assert status["exits_by_reason"]["io"] > 0
    assert sum(status["exits_by_reason"].values()) == status["exits"]
    assert read() == frozen, "the counter moved while the VM was paused"
    # A paused vCPU still serves calls on its thread: its RIP is in the guest's code.
    rip = vm.vm.vcpus[0].call(lambda fd: fd.get_regs().rip).wait(5)
    assert LOAD_ADDR <= rip < COUNTER_GPA
    assert read() == frozen
    vm.resume()
    assert vm.vm.state is VmState.RUNNING
    while read() == frozen:
        pass
    assert read() > frozen


def test_actions_in_the_wrong_state_name_both_states(boot: BootFactory) -> None:
    vm = boot("counter")
    vm.console.wait_for("counter_addr=")
    with pytest.raises(LifecycleError, match="the VM is running, it must be paused"):
        vm.resume()
    vm.pause()
    with pytest.raises(LifecycleError, match="the VM is paused, it must be running"):
        vm.pause()
    vm.stop()
    ending = vm.wait()
    assert ending.kind is ExitKind.STOPPED
    assert vm.vm.state is VmState.STOPPED
    with pytest.raises(LifecycleError, match="the VM is stopped"):
        vm.resume()


def test_stop_ends_a_running_guest_and_every_vcpu_thread(boot: BootFactory) -> None:
    vm = boot("counter", vcpus=2)
    vm.console.wait_for("counter_addr=")
    vm.stop()
    assert vm.wait().kind is ExitKind.STOPPED
    assert not any(vcpu.alive for vcpu in vm.vm.vcpus)
