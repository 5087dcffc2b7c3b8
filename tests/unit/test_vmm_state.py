"""vCPU and KVM VM states as a snapshot carries them: encoding, validation, restore order.

No /dev/kvm here. Where a restore needs a vCPU, ``RecordingVcpu`` stands in for KVM: it
takes every ``set_*`` call, records it, and answers ``KVM_GET_MSRS`` the way KVM does
(stopping at the first MSR it cannot read). tests/kvm/test_vm_state.py restores real guests.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import re
from collections.abc import Sequence
from typing import Any, TypeVar, cast

import msgspec
import pytest

from kasou.errors import KvmError, SnapshotError
from kasou.kvm import Kvm, VcpuFd
from kasou.kvm import bindings as b
from kasou.persist import SnapshotFormatError, decode_state, encode_state
from kasou.vmm.state import (
    ESSENTIAL_MSRS,
    MAX_MSRS,
    MSR_IA32_APICBASE,
    MSR_IA32_TSC_DEADLINE,
    MSR_KVM_SYSTEM_TIME_NEW,
    KvmVmState,
    VcpuState,
    check_kvm_vm,
    check_vcpu,
    restore_vcpu,
    saved_msr_indices,
)

S = TypeVar("S", VcpuState, KvmVmState)

MSR_IA32_TSC = 0x10
MSR_LSTAR = 0xC000_0082
VCPU_FIELDS = ("regs", "sregs", "fpu", "xsave", "xcrs", "lapic", "events", "debugregs")
VM_FIELDS = ("pic_master", "pic_slave", "ioapic", "pit")


def replaced(state: S, field: str, value: object) -> S:
    """``state`` with one field, named at run time, set to ``value`` (of any type)."""
    changes: dict[str, Any] = {field: value}
    return dataclasses.replace(state, **changes)


def vcpu_state(index: int = 1) -> VcpuState:
    """A vCPU in long mode with a pending interrupt window, as KVM would report it."""
    regs = b.KvmRegs(rip=0x10_2345, rsp=0x7F_F000, rflags=0x202, rax=7)
    sregs = b.KvmSregs(cr0=0x8000_0011, cr3=0x9000, cr4=0x20, efer=0x500)
    sregs.apic_base = 0xFEE0_0000 | 1 << 11
    fpu = b.KvmFpu(fcw=0x37F, mxcsr=0x1F80)
    xcrs = b.KvmXcrs(nr_xcrs=1)
    xcrs.xcrs[0].value = 0x7
    lapic = b.KvmLapicState()
    ctypes.memmove(ctypes.addressof(lapic) + 0x20, (index << 24).to_bytes(4, "little"), 4)
    events = bytearray(ctypes.sizeof(b.KvmVcpuEvents))
    events[b.VCPU_EVENTS_FLAGS] = b.KVM_VCPUEVENT_VALID_SHADOW | b.KVM_VCPUEVENT_VALID_SMM
    return VcpuState(
        index=index,
        regs=bytes(regs),
        sregs=bytes(sregs),
        fpu=bytes(fpu),
        xsave=bytes(b.KvmXsave()),
        xcrs=bytes(xcrs),
        lapic=bytes(lapic),
        events=bytes(events),
        debugregs=bytes(b.KvmDebugregs(dr6=0xFFFF0FF0, dr7=0x400)),
        mp_state=b.KVM_MP_STATE_HALTED,
        msrs=(
            (MSR_IA32_TSC, 123_456_789),
            (MSR_LSTAR, 0xFFFF_FFFF_8100_0000),
            (MSR_IA32_TSC_DEADLINE, 123_999_999),
            (MSR_KVM_SYSTEM_TIME_NEW, 0x5000 | 1),
            (MSR_IA32_APICBASE, 0xFEE0_0000 | 1 << 11),
        ),
        tsc_khz=2_596_132,
    )


def vm_state() -> KvmVmState:
    master = b.KvmPicState(imr=0xFB, irq_base=0x20, elcr_mask=0xF8)
    ioapic = b.KvmIoapicState(base_address=0xFEC0_0000, id=2)
    ioapic.redirtbl[4] = 0x1_0030
    return KvmVmState(
        pic_master=bytes(master),
        pic_slave=bytes(b.KvmPicState(imr=0xFF, irq_base=0x28)),
        ioapic=bytes(ioapic),
        pit=bytes(b.KvmPitState2(flags=0)),
        clock_ns=98_765_432_100,
    )


# --- encoding -------------------------------------------------------------------------


def test_a_vcpu_state_round_trips_through_the_encoding() -> None:
    state = vcpu_state()
    again = decode_state(encode_state(state), VcpuState, what="vcpu1")
    assert again == state
    check_vcpu(again)


def test_a_kvm_vm_state_round_trips_through_the_encoding() -> None:
    state = vm_state()
    again = decode_state(encode_state(state), KvmVmState, what="kvm.vm")
    assert again == state
    check_kvm_vm(again)


def test_a_well_typed_but_truncated_field_is_caught_after_decoding() -> None:
    """The typed decoder checks types; only the state's own check knows struct sizes."""
    raw = msgspec.msgpack.decode(encode_state(vcpu_state()))
    raw["sregs"] = raw["sregs"][:-8]
    tampered = decode_state(msgspec.msgpack.encode(raw), VcpuState, what="vcpu1")
    with pytest.raises(SnapshotError, match=r"vCPU 1: .*\(sregs\) are 304 bytes, not the 312"):
        check_vcpu(tampered)


def test_a_wrongly_typed_field_is_refused_by_the_typed_decoding() -> None:
    raw = msgspec.msgpack.decode(encode_state(vcpu_state()))
    raw["msrs"] = [[0x10, "1"]]
    with pytest.raises(SnapshotFormatError, match="vcpu1"):
        decode_state(msgspec.msgpack.encode(raw), VcpuState, what="vcpu1")


# --- checking a vCPU ------------------------------------------------------------------


@pytest.mark.parametrize("field", VCPU_FIELDS)
@pytest.mark.parametrize("change", [-1, 1])
def test_each_raw_vcpu_field_must_be_its_structs_size(field: str, change: int) -> None:
    state = vcpu_state()
    value: bytes = getattr(state, field)
    wrong = value[:change] if change < 0 else value + b"\0"
    with pytest.raises(SnapshotError, match=rf"^vCPU 1: .*\({field}\) are {len(wrong)} bytes"):
        check_vcpu(replaced(state, field, wrong))


@pytest.mark.parametrize("field", VCPU_FIELDS)
def test_a_raw_vcpu_field_must_be_bytes(field: str) -> None:
    state = vcpu_state()
    text = "x" * len(getattr(state, field))
    with pytest.raises(SnapshotError, match=rf"\({field}\) are str, not bytes"):
        check_vcpu(replaced(state, field, text))


@pytest.mark.parametrize("mp_state", [0, 1, 2, 3, 4, 9])
def test_the_x86_mp_states_are_accepted(mp_state: int) -> None:
    check_vcpu(dataclasses.replace(vcpu_state(), mp_state=mp_state))


@pytest.mark.parametrize("mp_state", [-1, 5, 8, 10, 2**32, True])
def test_other_mp_states_are_refused(mp_state: int) -> None:
    with pytest.raises(SnapshotError, match=r"vCPU 1: .*\(mp_state\)"):
        check_vcpu(dataclasses.replace(vcpu_state(), mp_state=mp_state))


@pytest.mark.parametrize("index", [-1, 2**32, True, "0"])
def test_the_index_must_be_a_vcpu_number(index: Any) -> None:
    with pytest.raises(SnapshotError, match=r"index .* is not a vCPU number"):
        check_vcpu(dataclasses.replace(vcpu_state(), index=index))


@pytest.mark.parametrize("khz", [-1, 2**31, 2.5e6])
def test_the_tsc_frequency_must_be_a_khz_count(khz: Any) -> None:
    with pytest.raises(SnapshotError, match=r"\(tsc_khz\)"):
        check_vcpu(dataclasses.replace(vcpu_state(), tsc_khz=khz))


def test_at_most_max_msrs_are_accepted() -> None:
    most = tuple((index, index) for index in range(MAX_MSRS))
    check_vcpu(dataclasses.replace(vcpu_state(), msrs=most))
    too_many = (*most, (MAX_MSRS, 0))
    with pytest.raises(SnapshotError, match=rf"{MAX_MSRS + 1} saved MSRs .* than the {MAX_MSRS}"):
        check_vcpu(dataclasses.replace(vcpu_state(), msrs=too_many))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ((2**32, 0), "index 0x100000000, beyond 32 bits"),
        ((-1, 0), "index -0x1, beyond 32 bits"),
        ((0x10, 2**64), "MSR 0x10 .* value 0x10000000000000000, beyond 64 bits"),
        ((0x10, -5), "MSR 0x10 .* value -0x5, beyond 64 bits"),
        ((0x10, 1, 2), "not an \\(index, value\\) pair"),
        ((0x10, "1"), "not an \\(index, value\\) pair"),
        ((0x10, True), "not an \\(index, value\\) pair"),
        ((MSR_LSTAR, 0), "MSR 0xc0000082 is saved twice"),
    ],
)
def test_each_msr_is_a_u32_index_and_a_u64_value(entry: Any, message: str) -> None:
    state = vcpu_state()
    with pytest.raises(SnapshotError, match=message):
        check_vcpu(dataclasses.replace(state, msrs=(*state.msrs, entry)))


# --- checking the VM ------------------------------------------------------------------


@pytest.mark.parametrize("field", VM_FIELDS)
def test_each_raw_vm_field_must_be_its_structs_size(field: str) -> None:
    state = vm_state()
    short = getattr(state, field)[:-1]
    with pytest.raises(SnapshotError, match=rf"^KVM VM state: .*\({field}\) are"):
        check_kvm_vm(replaced(state, field, short))


def test_the_irqchip_fields_are_the_chip_structs_not_the_union() -> None:
    state = vm_state()
    with pytest.raises(SnapshotError, match="not the 16 of struct kvm_pic_state"):
        check_kvm_vm(dataclasses.replace(state, pic_master=state.pic_master.ljust(512, b"\0")))
    with pytest.raises(SnapshotError, match="not the 216 of struct kvm_ioapic_state"):
        check_kvm_vm(dataclasses.replace(state, ioapic=bytes(512)))


@pytest.mark.parametrize("clock", [-1, 2**64, 1.5])
def test_the_clock_must_be_a_u64(clock: Any) -> None:
    with pytest.raises(SnapshotError, match=r"\(clock_ns\)"):
        check_kvm_vm(dataclasses.replace(vm_state(), clock_ns=clock))


# --- KVM as the restore sees it -------------------------------------------------------


class RecordingVcpu:
    """A vCPU fd that records every call in order and reads MSRs the way KVM_GET_MSRS does:
    up to the first unreadable one, refusing batches of 256 or more with E2BIG."""

    def __init__(
        self,
        vcpu_id: int = 1,
        unreadable: frozenset[int] = frozenset(),
        refuse: str | None = None,
        tsc_khz: int = 2_596_132,
    ) -> None:
        self.vcpu_id = vcpu_id
        self.calls: list[tuple[str, Any]] = []
        self.unreadable = unreadable
        self.refuse = refuse
        self.tsc_khz = tsc_khz

    def get_msrs(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        self.calls.append(("get_msrs", list(indices)))
        if len(indices) >= 256:
            raise KvmError("KVM_GET_MSRS", errno.E2BIG)
        read = []
        for index in indices:
            if index in self.unreadable:
                break
            read.append((index, index * 3))
        return read

    def get_tsc_khz(self) -> int:
        return self.tsc_khz

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("set_"):
            raise AttributeError(name)

        def record(argument: Any) -> None:
            if name == self.refuse:
                raise KvmError(f"KVM_{name.upper()}", errno.EINVAL)
            if isinstance(argument, ctypes.Structure):
                argument = bytes(argument)
            elif not isinstance(argument, int):
                argument = list(argument)
            self.calls.append((name, argument))

        return record


class ListingKvm:
    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def get_msr_index_list(self) -> list[int]:
        return self.indices


def test_restore_follows_the_documented_order() -> None:
    state = vcpu_state()
    fd = RecordingVcpu()
    restore_vcpu(cast(VcpuFd, fd), state)
    assert [name for name, _ in fd.calls] == [
        "set_sregs",
        "set_regs",
        "set_fpu",
        "set_xsave",
        "set_xcrs",
        "set_msrs",
        "set_debugregs",
        "set_lapic",
        "set_msrs",
        "set_mp_state",
        "set_vcpu_events",
    ]
    calls = dict(fd.calls[:5])
    assert (calls["set_sregs"], calls["set_regs"]) == (state.sregs, state.regs)
    # The TSC deadline is written after the LAPIC that puts its timer in deadline mode.
    assert fd.calls[5][1] == [entry for entry in state.msrs if entry[0] != MSR_IA32_TSC_DEADLINE]
    assert fd.calls[8][1] == [(MSR_IA32_TSC_DEADLINE, 123_999_999)]
    assert fd.calls[9][1] == b.KVM_MP_STATE_HALTED
    # The pending NMI and SIPI vector are restored too; the rest of the events as saved.
    events = bytearray(fd.calls[10][1])
    flags = int.from_bytes(events[b.VCPU_EVENTS_FLAGS : b.VCPU_EVENTS_FLAGS + 4], "little")
    assert flags == (
        b.KVM_VCPUEVENT_VALID_SHADOW
        | b.KVM_VCPUEVENT_VALID_SMM
        | b.KVM_VCPUEVENT_VALID_NMI_PENDING
        | b.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    )
    events[b.VCPU_EVENTS_FLAGS : b.VCPU_EVENTS_FLAGS + 4] = state.events[20:24]
    assert bytes(events) == state.events


def test_a_bad_state_is_refused_before_any_ioctl() -> None:
    fd = RecordingVcpu()
    bad = dataclasses.replace(vcpu_state(), sregs=vcpu_state().sregs[:-1])
    with pytest.raises(SnapshotError, match=r"^vCPU 1: the saved special registers \(sregs\)"):
        restore_vcpu(cast(VcpuFd, fd), bad)
    assert fd.calls == []


def test_a_state_for_another_vcpu_is_refused_before_any_ioctl() -> None:
    fd = RecordingVcpu(vcpu_id=0)
    with pytest.raises(SnapshotError, match="vCPU 0: the state given is vCPU 1's"):
        restore_vcpu(cast(VcpuFd, fd), vcpu_state(index=1))
    assert fd.calls == []


@pytest.mark.parametrize(
    ("call", "piece"),
    [
        ("set_sregs", "special registers (sregs)"),
        ("set_lapic", "local APIC (lapic)"),
        ("set_vcpu_events", "pending events (events)"),
        ("set_mp_state", "multiprocessing state (mp_state)"),
    ],
)
def test_kvm_refusing_a_piece_names_the_vcpu_and_the_piece(call: str, piece: str) -> None:
    fd = RecordingVcpu(refuse=call)
    with pytest.raises(
        SnapshotError, match=rf"^vCPU 1: KVM refused the saved {re.escape(piece)}: KVM_.*errno 22"
    ):
        restore_vcpu(cast(VcpuFd, fd), vcpu_state())


def test_a_tsc_rate_this_host_cannot_run_is_refused() -> None:
    fd = RecordingVcpu(refuse="set_tsc_khz", tsc_khz=3_000_000)
    with pytest.raises(SnapshotError, match=r"ran at 2596132 kHz .* runs at 3000000 kHz"):
        restore_vcpu(cast(VcpuFd, fd), vcpu_state())
    assert fd.calls == []


def test_long_msr_lists_go_to_kvm_in_batches_below_its_limit() -> None:
    msrs = tuple((index, index) for index in range(MAX_MSRS))
    fd = RecordingVcpu()
    restore_vcpu(cast(VcpuFd, fd), dataclasses.replace(vcpu_state(), msrs=msrs))
    batches = [argument for name, argument in fd.calls if name == "set_msrs" and argument]
    assert [len(batch) for batch in batches] == [255, 255, 2]
    assert [entry for batch in batches for entry in batch] == list(msrs)


def test_saved_msrs_are_those_kvm_lists_and_reads_plus_the_essential_ones() -> None:
    listed = [0x174, 0x10, 0x4B56_4D01, 0xDEAD, *range(0x4000_0000, 0x4000_0000 + 300)]
    fd = RecordingVcpu(unreadable=frozenset({0xDEAD, 0x4000_0007, MSR_IA32_APICBASE}))
    indices = saved_msr_indices(cast(Kvm, ListingKvm(listed)), cast(VcpuFd, fd))
    unread = {0xDEAD, 0x4000_0007, MSR_IA32_APICBASE}
    expected = [index for index in dict.fromkeys([*listed, *ESSENTIAL_MSRS]) if index not in unread]
    assert indices == expected
    assert all(len(indices) < 256 for name, indices in fd.calls)
