"""A guest's KVM state saved from one VM and restored into a fresh one runs on where it was.

The source runs the guest kit's ``counter`` workload (ring 3 increments a 64-bit counter at
``COUNTER_GPA`` forever). It is paused, its vCPUs and in-kernel chips saved and its RAM
copied into a second VM built from the same configuration, which then starts from the saved
state instead of the kernel's entry point.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import pytest

from kasou.errors import SnapshotError
from kasou.guestkit import COUNTER_GPA, LOAD_ADDR
from kasou.kvm import bindings as b
from kasou.vmm import Vm, build_vm
from kasou.vmm.state import (
    MSR_IA32_APICBASE,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW,
    KvmVmState,
    VcpuState,
    restore_kvm_vm,
    save_kvm_vm,
    saved_msr_indices,
)

from .conftest import Booted, BootFactory, ConsoleCapture

MSR_IA32_TSC = 0x10
MSR_LSTAR = 0xC000_0082
# Polls of the restored counter that must all read at least the saved value.
POLLS = 20_000


def _counting(boot: BootFactory, vcpus: int) -> Booted:
    """A VM whose counter has run long enough that a restart from 0 would be seen."""
    source = boot("counter", vcpus=vcpus)
    source.console.wait_for("counter_addr=")
    while source.vm.memory.read_int(COUNTER_GPA, 8) < 1_000_000:
        pass
    return source


def _save(source: Booted) -> tuple[list[VcpuState], KvmVmState, int]:
    source.pause()
    vcpus = source.vm.save_vcpus()
    chips = save_kvm_vm(source.vm.vm_fd)
    return vcpus, chips, source.vm.memory.read_int(COUNTER_GPA, 8)


def _copy_ram(source: Vm, target: Vm) -> None:
    for gpa, size in source.memory.layout:
        target.memory.view(gpa, size)[:] = source.memory.view(gpa, size)


@contextlib.contextmanager
def _fresh(source: Vm, prepare: Callable[[Vm], None]) -> Iterator[Booted]:
    """A second VM built from ``source``'s configuration, ``prepare``d, then started; closed
    on the way out, so that its RAM is gone before the source's memory monitor looks."""
    console = ConsoleCapture()
    target = build_vm(source.config, console_output=console.write)
    try:
        prepare(target)
        target.start()
        yield Booted(target, console)
    finally:
        target.close()


def _restore(source: Vm, vcpus: list[VcpuState], chips: KvmVmState) -> Callable[[Vm], None]:
    """RAM, chips, then vCPUs, as a snapshot's restore does."""

    def restore(target: Vm) -> None:
        _copy_ram(source, target)
        restore_kvm_vm(target.vm_fd, chips)
        target.restore_vcpus(vcpus)

    return restore


def _runs_on_from(target: Booted, saved: int) -> int:
    """Poll the restored counter: it never reads below ``saved`` and moves past it."""

    def read() -> int:
        return target.vm.memory.read_int(COUNTER_GPA, 8)

    first = read()
    assert first >= saved, f"the counter went back from {saved} to {first}: the guest restarted"
    values = [read() for _ in range(POLLS)]
    assert min(values) >= saved, f"the counter dropped to {min(values)} below {saved}"
    while read() == saved:  # ring 3 counts natively: this ends at once once the vCPU runs
        pass
    later = read()
    assert later > saved
    # A guest started from its entry point would print its banner and counter_addr= again.
    assert target.console.text == "", f"the restored guest printed: {target.console.text!r}"
    return later


def test_a_restored_guest_counts_on_from_its_saved_value(boot: BootFactory) -> None:
    source = _counting(boot, vcpus=1)
    vcpus, chips, saved = _save(source)
    assert [state.index for state in vcpus] == [0]
    assert LOAD_ADDR <= b.KvmRegs.from_buffer_copy(vcpus[0].regs).rip < COUNTER_GPA
    with _fresh(source.vm, _restore(source.vm, vcpus, chips)) as target:
        _runs_on_from(target, saved)
    # The source, untouched by the save, resumes where it was too.
    source.resume()
    while source.vm.memory.read_int(COUNTER_GPA, 8) == saved:
        pass
    assert source.vm.memory.read_int(COUNTER_GPA, 8) > saved


def test_two_vcpus_restore_with_the_second_ones_mp_state(boot: BootFactory) -> None:
    source = _counting(boot, vcpus=2)
    vcpus, chips, saved = _save(source)
    assert [state.index for state in vcpus] == [0, 1]
    seen: dict[str, object] = {}

    def restore_and_read_back(target: Vm) -> None:
        _restore(source.vm, vcpus, chips)(target)
        # Before start no vCPU thread owns the fds: read them back here.
        seen["mp_states"] = [vcpu.fd.get_mp_state() for vcpu in target.vcpus]
        seen["regs"] = [bytes(vcpu.fd.get_regs()) for vcpu in target.vcpus]
        seen["tsc"] = target.vcpus[0].fd.get_msrs([MSR_IA32_TSC])[0][1]

    with _fresh(source.vm, restore_and_read_back) as target:
        _runs_on_from(target, saved)
    assert seen["mp_states"] == [state.mp_state for state in vcpus]
    assert seen["regs"] == [state.regs for state in vcpus]
    saved_tsc = dict(vcpus[0].msrs)[MSR_IA32_TSC]
    restored_tsc = seen["tsc"]
    assert isinstance(restored_tsc, int)
    # The TSC goes on from the saved value (the time between the restore and the read back
    # passed on it), not from the fresh VM's zero.
    assert saved_tsc <= restored_tsc < saved_tsc + (vcpus[0].tsc_khz or 10**7) * 1000 * 60


def test_the_essential_msrs_are_saved(boot: BootFactory) -> None:
    vm = boot("counter").vm
    indices = vm.vcpus[0].call(lambda fd: saved_msr_indices(vm.kvm, fd)).wait(5)
    listed = set(vm.kvm.get_msr_index_list())
    for index in (MSR_IA32_TSC, MSR_IA32_APICBASE, MSR_LSTAR):
        assert index in indices, f"MSR {index:#x} is not saved"
    for index in (MSR_KVM_SYSTEM_TIME_NEW, MSR_KVM_WALL_CLOCK_NEW, MSR_IA32_TSC_DEADLINE):
        assert index in indices or index not in listed, f"MSR {index:#x} is not saved"
    assert len(indices) == len(set(indices))


def test_a_bad_sregs_length_is_refused_before_any_ioctl(boot: BootFactory) -> None:
    source = _counting(boot, vcpus=1)
    vcpus, _, _ = _save(source)
    moved = b.KvmRegs.from_buffer_copy(vcpus[0].regs)
    moved.rip += 1
    bad = dataclasses.replace(vcpus[0], regs=bytes(moved), sregs=vcpus[0].sregs[:-1])
    outcome: dict[str, object] = {}

    def restore(target: Vm) -> None:
        before = bytes(target.vcpus[0].fd.get_regs())
        with pytest.raises(SnapshotError, match=r"vCPU 0: .*special registers \(sregs\)"):
            target.restore_vcpus([bad])
        outcome["unchanged"] = bytes(target.vcpus[0].fd.get_regs()) == before
        with pytest.raises(SnapshotError, match="the snapshot has 2 vCPUs and this VM 1"):
            target.restore_vcpus([vcpus[0], vcpus[0]])

    with _fresh(source.vm, restore) as target:
        assert outcome["unchanged"], "the registers changed although the state was refused"
        target.console.wait_for("counter_addr=")  # untouched, it boots as usual


def test_kvm_refusing_a_piece_names_the_vcpu_and_the_piece(boot: BootFactory) -> None:
    source = _counting(boot, vcpus=1)
    vcpus, chips, saved = _save(source)
    unknown_msr = dataclasses.replace(vcpus[0], msrs=(*vcpus[0].msrs, (0x4000_FFF0, 1)))
    sregs = b.KvmSregs.from_buffer_copy(vcpus[0].sregs)
    sregs.cr0 = (sregs.cr0 | 1 << 31) & ~1  # paging without protected mode: invalid
    bad_cr0 = dataclasses.replace(vcpus[0], sregs=bytes(sregs))
    messages: list[str] = []

    def restore(target: Vm) -> None:
        _copy_ram(source.vm, target)
        restore_kvm_vm(target.vm_fd, chips)
        for state in (unknown_msr, bad_cr0):
            with pytest.raises(SnapshotError) as refused:
                target.restore_vcpus([state])
            messages.append(str(refused.value))
        target.restore_vcpus(vcpus)  # a refused state spoils nothing a good one cannot mend

    with _fresh(source.vm, restore) as target:
        _runs_on_from(target, saved)
    assert messages[0].startswith("vCPU 0: KVM refused the saved MSRs (msrs): ")
    assert "0x4000fff0" in messages[0]
    assert messages[1].startswith("vCPU 0: KVM refused the saved special registers (sregs): ")


def test_the_interrupt_chips_and_kvm_clock_go_into_a_fresh_vm(boot: BootFactory) -> None:
    source = _counting(boot, vcpus=1)
    _, chips, _ = _save(source)
    # An hour ahead of anything a fresh VM's clock could read by itself.
    ahead = dataclasses.replace(chips, clock_ns=chips.clock_ns + 3600 * 10**9)
    read_back: list[KvmVmState] = []

    def restore(target: Vm) -> None:
        restore_kvm_vm(target.vm_fd, ahead)
        read_back.append(save_kvm_vm(target.vm_fd))

    with _fresh(source.vm, restore):
        pass
    (again,) = read_back
    assert (again.pic_master, again.pic_slave, again.ioapic) == (
        chips.pic_master,
        chips.pic_slave,
        chips.ioapic,
    )
    assert ahead.clock_ns <= again.clock_ns < ahead.clock_ns + 60 * 10**9
