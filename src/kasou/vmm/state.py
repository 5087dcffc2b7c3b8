"""What KVM itself holds of a VM: each vCPU's registers and the VM's interrupt chips and clock.

This module owns ``VcpuState`` and ``KvmVmState``, the kernel-side half of a snapshot, and the
order in which they go back into a fresh VM. Each ``bytes`` field is one raw kvm struct as
``KVM_GET_*`` returned it (layouts in ``kasou.kvm.bindings``); the integers are the few
values that are not structs. It does not pause the VM (``vm.py``), encode states
(``kasou.persist``), save devices, guest RAM or CPUID: the builder sets CPUID from the same
``VmConfig`` before a restore, so ``KVM_SET_CPUID2`` has run before anything here.

A saved state is untrusted input (a snapshot file may be damaged or edited): ``check_vcpu``
and ``check_kvm_vm`` check every field's type, range and length before any struct is built
or any ioctl issued, and a set that KVM refuses (``EINVAL``) becomes a ``SnapshotError``
naming the vCPU and the piece.

Restore order for a vCPU (``restore_vcpu``), each step with the reason it must come where it
is (ioctls as in Documentation/virt/kvm/api.rst):

1. TSC frequency (``KVM_SET_TSC_KHZ``, only when it differs from this vCPU's): before the
   ``IA32_TSC`` write, whose value is counted at that rate.
2. ``KVM_SET_SREGS``: CR0/CR4/EFER and the APIC base. ``KVM_SET_LAPIC`` reads the APIC ID
   register in the format of the APIC mode that ``IA32_APIC_BASE`` selects (api.rst,
   ``KVM_CAP_X2APIC_API``), so the base goes in first. The saved ``interrupt_bitmap`` may
   queue an interrupt here; step 10 restates the same event.
3. ``KVM_SET_REGS``: general registers, RIP, RFLAGS. KVM drops a pending exception on this
   call (arch/x86/kvm/x86.c, ``__set_regs``), which is why events come last.
4. ``KVM_SET_FPU``, then ``KVM_SET_XSAVE`` (a superset of the FPU state, so the more complete
   one wins), then ``KVM_SET_XCRS``.
5. ``KVM_SET_MSRS`` for every saved MSR except ``IA32_TSC_DEADLINE``: ``IA32_TSC`` restores
   the guest's TSC value (host-initiated writes of close values on all vCPUs are matched up
   by KVM to keep them synchronised), then the kvm-clock, SYSCALL/SYSENTER, PAT, MTRR and
   the other MSRs in the order KVM listed them (``KVM_GET_MSR_INDEX_LIST``). The
   ``IA32_APIC_BASE`` MSR repeats the value step 2 set.
6. ``KVM_SET_DEBUGREGS``.
7. ``KVM_SET_LAPIC``: registers and the timer's current count, in the mode set in step 2.
8. ``IA32_TSC_DEADLINE``: writes are ignored while the LVT timer is not in TSC-deadline mode
   (Intel SDM vol. 3A, "TSC-Deadline Mode"), so it follows the LAPIC that sets that mode.
9. ``KVM_SET_MP_STATE``: runnable, halted, or an AP still waiting for INIT/SIPI.
10. ``KVM_SET_VCPU_EVENTS`` last, so that the pending exception, interrupt, NMI and SIPI it
    carries are not reset by an earlier step. ``KVM_VCPUEVENT_VALID_NMI_PENDING`` and
    ``KVM_VCPUEVENT_VALID_SIPI_VECTOR`` are added to the saved flags: without them KVM keeps
    its own ``nmi.pending`` and ``sipi_vector`` (api.rst, ``KVM_SET_VCPU_EVENTS``).

``restore_kvm_vm`` is meant to run before the vCPUs are restored: ``KVM_SET_LAPIC`` rebuilds
the IOAPIC's RTC end-of-interrupt tracking from the IOAPIC's state (arch/x86/kvm/ioapic.c),
so the IOAPIC should already hold the saved one. It sets the two 8259s and the IOAPIC
(``KVM_SET_IRQCHIP``, chip ids 0, 1, 2), the PIT (``KVM_SET_PIT2``) and kvm-clock
(``KVM_SET_CLOCK`` with flags 0: the clock reads ``clock_ns`` from then on).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kasou.arch.x86_64 import msrs as arch_msrs
from kasou.errors import HostError, KvmError, SnapshotError
from kasou.kvm import Kvm, VcpuFd, VmFd
from kasou.kvm import bindings as b

__all__ = [
    "ESSENTIAL_MSRS",
    "MAX_MSRS",
    "MSR_IA32_APICBASE",
    "MSR_IA32_CR_PAT",
    "MSR_IA32_TSC_ADJUST",
    "MSR_IA32_TSC_DEADLINE",
    "MSR_KVM_SYSTEM_TIME",
    "MSR_KVM_SYSTEM_TIME_NEW",
    "MSR_KVM_WALL_CLOCK",
    "MSR_KVM_WALL_CLOCK_NEW",
    "MSR_TSC_AUX",
    "KvmVmState",
    "VcpuState",
    "check_kvm_vm",
    "check_vcpu",
    "restore_kvm_vm",
    "restore_vcpu",
    "save_kvm_vm",
    "save_vcpu",
    "saved_msr_indices",
]

MAX_MSRS = 512
"""The most MSRs a saved vCPU may carry (KVM lists about 40 to 100)."""

# KVM refuses a KVM_GET_MSRS/KVM_SET_MSRS of MAX_IO_MSRS (256) entries or more with E2BIG
# (arch/x86/kvm/x86.c, msr_io), so longer lists go in batches.
_MSR_BATCH = 255

# MSR numbers: Intel SDM vol. 4; the kvm-clock ones from Documentation/virt/kvm/x86/msr.rst.
MSR_KVM_WALL_CLOCK = 0x11
MSR_KVM_SYSTEM_TIME = 0x12
MSR_IA32_APICBASE = 0x1B
MSR_IA32_TSC_ADJUST = 0x3B
MSR_MTRR_PHYS_BASE0 = 0x200  # 8 variable ranges: base, mask pairs up to 0x20f
MSR_MTRR_FIX64K_00000 = 0x250
MSR_MTRR_FIX16K_80000 = 0x258
MSR_MTRR_FIX16K_A0000 = 0x259
MSR_MTRR_FIX4K_C0000 = 0x268  # eight 4K ranges up to 0x26f
MSR_IA32_CR_PAT = 0x277
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_TSC_AUX = 0xC000_0103
MSR_KVM_WALL_CLOCK_NEW = 0x4B56_4D00
MSR_KVM_SYSTEM_TIME_NEW = 0x4B56_4D01

ESSENTIAL_MSRS: tuple[int, ...] = (
    arch_msrs.MSR_IA32_TSC,
    MSR_IA32_TSC_ADJUST,
    MSR_IA32_TSC_DEADLINE,
    MSR_IA32_APICBASE,
    MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW,
    MSR_KVM_SYSTEM_TIME,
    MSR_KVM_WALL_CLOCK,
    arch_msrs.MSR_STAR,
    arch_msrs.MSR_LSTAR,
    arch_msrs.MSR_CSTAR,
    arch_msrs.MSR_SYSCALL_MASK,
    arch_msrs.MSR_KERNEL_GS_BASE,
    arch_msrs.MSR_IA32_SYSENTER_CS,
    arch_msrs.MSR_IA32_SYSENTER_ESP,
    arch_msrs.MSR_IA32_SYSENTER_EIP,
    MSR_TSC_AUX,
    arch_msrs.MSR_IA32_MISC_ENABLE,
    MSR_IA32_CR_PAT,
    arch_msrs.MSR_MTRR_DEF_TYPE,
    MSR_MTRR_FIX64K_00000,
    MSR_MTRR_FIX16K_80000,
    MSR_MTRR_FIX16K_A0000,
    *range(MSR_MTRR_FIX4K_C0000, MSR_MTRR_FIX4K_C0000 + 8),
    *range(MSR_MTRR_PHYS_BASE0, MSR_MTRR_PHYS_BASE0 + 16),
)
"""MSRs saved whenever this host's KVM can read them, listed by KVM_GET_MSR_INDEX_LIST or not:
the guest's TSC and its deadline, kvm-clock (new and old numbers), the APIC base, the
SYSCALL/SYSENTER entry points, PAT and the MTRRs that a guest kernel programs once at boot."""

# The x86 values KVM_SET_MP_STATE accepts (linux/kvm.h; arch/x86/kvm/x86.c).
_MP_STATES = frozenset(
    {
        b.KVM_MP_STATE_RUNNABLE,
        b.KVM_MP_STATE_UNINITIALIZED,
        b.KVM_MP_STATE_INIT_RECEIVED,
        b.KVM_MP_STATE_HALTED,
        b.KVM_MP_STATE_SIPI_RECEIVED,
        b.KVM_MP_STATE_AP_RESET_HOLD,
    }
)

_U32 = 0xFFFF_FFFF
_U64 = 0xFFFF_FFFF_FFFF_FFFF
# KVM_SET_TSC_KHZ takes the frequency as the ioctl's int argument.
_MAX_TSC_KHZ = 0x7FFF_FFFF

# Each raw field: its struct, the C struct's name and how messages name the piece.
_VCPU_STRUCTS: tuple[tuple[str, type[ctypes.Structure], str, str], ...] = (
    ("regs", b.KvmRegs, "struct kvm_regs", "general registers"),
    ("sregs", b.KvmSregs, "struct kvm_sregs", "special registers"),
    ("fpu", b.KvmFpu, "struct kvm_fpu", "FPU state"),
    ("xsave", b.KvmXsave, "struct kvm_xsave", "XSAVE area"),
    ("xcrs", b.KvmXcrs, "struct kvm_xcrs", "extended control registers"),
    ("lapic", b.KvmLapicState, "struct kvm_lapic_state", "local APIC"),
    ("events", b.KvmVcpuEvents, "struct kvm_vcpu_events", "pending events"),
    ("debugregs", b.KvmDebugregs, "struct kvm_debugregs", "debug registers"),
)
_VM_STRUCTS: tuple[tuple[str, type[ctypes.Structure], str, str], ...] = (
    ("pic_master", b.KvmPicState, "struct kvm_pic_state", "master 8259 PIC"),
    ("pic_slave", b.KvmPicState, "struct kvm_pic_state", "slave 8259 PIC"),
    ("ioapic", b.KvmIoapicState, "struct kvm_ioapic_state", "IOAPIC"),
    ("pit", b.KvmPitState2, "struct kvm_pit_state2", "8254 PIT"),
)
_CHIP_IDS = {
    "pic_master": b.KVM_IRQCHIP_PIC_MASTER,
    "pic_slave": b.KVM_IRQCHIP_PIC_SLAVE,
    "ioapic": b.KVM_IRQCHIP_IOAPIC,
}
_CHIP_OFFSET = b.KvmIrqchip.chip.offset  # where the union sits in struct kvm_irqchip


@dataclass(frozen=True)
class VcpuState:
    """One vCPU as KVM holds it. Field names are a snapshot format contract.

    The ``bytes`` fields are raw kvm structs (struct kvm_regs, kvm_sregs, kvm_fpu,
    kvm_xsave, kvm_xcrs, kvm_lapic_state, kvm_vcpu_events, kvm_debugregs); ``mp_state`` a
    ``KVM_MP_STATE_*`` value; ``msrs`` ``(index, value)`` pairs in restore order;
    ``tsc_khz`` the guest TSC's frequency (0: unknown)."""

    index: int
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    lapic: bytes
    events: bytes
    debugregs: bytes
    mp_state: int
    msrs: tuple[tuple[int, int], ...]
    tsc_khz: int


@dataclass(frozen=True)
class KvmVmState:
    """The in-kernel interrupt chips, PIT and clock. Field names are a snapshot format
    contract.

    ``pic_master`` and ``pic_slave`` are struct kvm_pic_state, ``ioapic`` struct
    kvm_ioapic_state (each the ``chip`` of a struct kvm_irqchip), ``pit`` struct
    kvm_pit_state2, ``clock_ns`` the kvm-clock reading in nanoseconds."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock_ns: int


# --- saving ---------------------------------------------------------------------------


def saved_msr_indices(kvm: Kvm, fd: VcpuFd) -> list[int]:
    """The MSRs to save on this host: those ``KVM_GET_MSR_INDEX_LIST`` names, then the
    ``ESSENTIAL_MSRS`` it leaves out, less any that ``KVM_GET_MSRS`` cannot read on ``fd``
    (api.rst: the list "varies by kvm version and host processor"), in that order."""
    candidates = list(dict.fromkeys([*kvm.get_msr_index_list(), *ESSENTIAL_MSRS]))
    return [index for index, _ in _read_msrs(fd, candidates)]


def save_vcpu(fd: VcpuFd, msr_indices: Sequence[int]) -> VcpuState:
    """Read every piece of ``fd``'s state. Call it on the vCPU's own thread while the VM is
    paused; ``msr_indices`` come from ``saved_msr_indices``."""
    try:
        tsc_khz = fd.get_tsc_khz()
    except HostError:
        tsc_khz = 0  # no KVM_CAP_GET_TSC_KHZ: the restore leaves the rate alone
    return VcpuState(
        index=fd.vcpu_id,
        regs=bytes(fd.get_regs()),
        sregs=bytes(fd.get_sregs()),
        fpu=bytes(fd.get_fpu()),
        xsave=bytes(fd.get_xsave()),
        xcrs=bytes(fd.get_xcrs()),
        lapic=bytes(fd.get_lapic()),
        events=bytes(fd.get_vcpu_events()),
        debugregs=bytes(fd.get_debugregs()),
        mp_state=fd.get_mp_state(),
        msrs=tuple(_read_msrs(fd, msr_indices)),
        tsc_khz=tsc_khz,
    )


def save_kvm_vm(vm_fd: VmFd) -> KvmVmState:
    """Read the in-kernel PICs, IOAPIC, PIT and kvm-clock while the VM is paused."""
    chips = {}
    for name, struct, _, _ in _VM_STRUCTS[:3]:
        raw = bytes(vm_fd.get_irqchip(_CHIP_IDS[name]))
        chips[name] = raw[_CHIP_OFFSET : _CHIP_OFFSET + ctypes.sizeof(struct)]
    return KvmVmState(
        pic_master=chips["pic_master"],
        pic_slave=chips["pic_slave"],
        ioapic=chips["ioapic"],
        pit=bytes(vm_fd.get_pit2()),
        clock_ns=int(vm_fd.get_clock().clock),
    )


def _read_msrs(fd: VcpuFd, indices: Sequence[int]) -> list[tuple[int, int]]:
    """``(index, value)`` of each of ``indices`` that KVM can read on ``fd``, in order.

    KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read, so one
    call reads a whole batch when all are readable and each failure costs one more call."""
    values: list[tuple[int, int]] = []
    start = 0
    while start < len(indices):
        batch = indices[start : start + _MSR_BATCH]
        read = fd.get_msrs(batch)
        values += read
        start += len(read) if len(read) == len(batch) else len(read) + 1  # skip the unreadable
    return values


# --- checking -------------------------------------------------------------------------


def check_vcpu(state: VcpuState) -> None:
    """Raise ``SnapshotError`` unless every field of ``state`` has the type, range and length
    KVM's structs need. Issues no ioctl."""
    index = state.index
    if type(index) is not int or not 0 <= index <= _U32:
        raise SnapshotError(f"vCPU state: index {index!r} is not a vCPU number{_DAMAGED}")
    where = f"vCPU {index}"
    for name, struct, c_name, what in _VCPU_STRUCTS:
        _check_struct(where, name, what, getattr(state, name), struct, c_name)
    if type(state.mp_state) is not int or state.mp_state not in _MP_STATES:
        raise SnapshotError(
            f"{where}: the saved multiprocessing state (mp_state) {state.mp_state!r} is not "
            f"one of KVM's x86 KVM_MP_STATE_* values {sorted(_MP_STATES)}{_DAMAGED}"
        )
    _check_msrs(where, state.msrs)
    if type(state.tsc_khz) is not int or not 0 <= state.tsc_khz <= _MAX_TSC_KHZ:
        raise SnapshotError(
            f"{where}: the saved TSC frequency (tsc_khz) {state.tsc_khz!r} is not a frequency "
            f"in kHz from 0 to {_MAX_TSC_KHZ}{_DAMAGED}"
        )


def check_kvm_vm(state: KvmVmState) -> None:
    """Raise ``SnapshotError`` unless every field of ``state`` has the type, range and length
    KVM's structs need. Issues no ioctl."""
    for name, struct, c_name, what in _VM_STRUCTS:
        _check_struct("KVM VM state", name, what, getattr(state, name), struct, c_name)
    if type(state.clock_ns) is not int or not 0 <= state.clock_ns <= _U64:
        raise SnapshotError(
            f"KVM VM state: the saved kvm-clock (clock_ns) {state.clock_ns!r} is not a u64 "
            f"count of nanoseconds{_DAMAGED}"
        )


_DAMAGED = ": the snapshot is damaged or was not written by kasou"


def _check_struct(
    where: str, name: str, what: str, value: object, struct: type[ctypes.Structure], c_name: str
) -> None:
    size = ctypes.sizeof(struct)
    if type(value) is not bytes:
        raise SnapshotError(
            f"{where}: the saved {what} ({name}) are {type(value).__name__}, not bytes{_DAMAGED}"
        )
    if len(value) != size:
        raise SnapshotError(
            f"{where}: the saved {what} ({name}) are {len(value)} bytes, not the {size} of "
            f"{c_name}{_DAMAGED}"
        )


def _check_msrs(where: str, msrs: object) -> None:
    if not isinstance(msrs, tuple | list):
        raise SnapshotError(f"{where}: the saved MSRs (msrs) are not a list{_DAMAGED}")
    if len(msrs) > MAX_MSRS:
        raise SnapshotError(
            f"{where}: {len(msrs)} saved MSRs (msrs) are more than the {MAX_MSRS} kasou "
            f"restores{_DAMAGED}"
        )
    seen: set[int] = set()
    for position, entry in enumerate(msrs):
        if (
            not isinstance(entry, tuple | list)
            or len(entry) != 2
            or any(type(item) is not int for item in entry)
        ):
            raise SnapshotError(
                f"{where}: saved MSR {position} (msrs) {entry!r} is not an (index, value) pair "
                f"of integers{_DAMAGED}"
            )
        index, value = entry
        if not 0 <= index <= _U32:
            raise SnapshotError(
                f"{where}: saved MSR {position} (msrs) has index {index:#x}, beyond 32 bits"
                f"{_DAMAGED}"
            )
        if not 0 <= value <= _U64:
            raise SnapshotError(
                f"{where}: saved MSR {index:#x} (msrs) has value {value:#x}, beyond 64 bits"
                f"{_DAMAGED}"
            )
        if index in seen:
            raise SnapshotError(f"{where}: MSR {index:#x} is saved twice (msrs){_DAMAGED}")
        seen.add(index)


# --- restoring ------------------------------------------------------------------------


def restore_vcpu(fd: VcpuFd, state: VcpuState) -> None:
    """Put ``fd`` in ``state``, in the order of the module docstring. Call it before the
    vCPU first runs, after its CPUID is set and guest memory holds the saved contents
    (kvm-clock and other MSRs name guest-physical addresses)."""
    check_vcpu(state)
    where = f"vCPU {fd.vcpu_id}"
    if state.index != fd.vcpu_id:
        raise SnapshotError(
            f"{where}: the state given is vCPU {state.index}'s: restore each vCPU from its own"
        )
    # Every struct is built before the first ioctl: a state that cannot be applied whole
    # leaves the vCPU as it was.
    regs = b.KvmRegs.from_buffer_copy(state.regs)
    sregs = b.KvmSregs.from_buffer_copy(state.sregs)
    fpu = b.KvmFpu.from_buffer_copy(state.fpu)
    xsave = b.KvmXsave.from_buffer_copy(state.xsave)
    xcrs = b.KvmXcrs.from_buffer_copy(state.xcrs)
    lapic = b.KvmLapicState.from_buffer_copy(state.lapic)
    debugregs = b.KvmDebugregs.from_buffer_copy(state.debugregs)
    raw_events = bytearray(state.events)
    flags = int.from_bytes(raw_events[b.VCPU_EVENTS_FLAGS : b.VCPU_EVENTS_FLAGS + 4], "little")
    flags |= b.KVM_VCPUEVENT_VALID_NMI_PENDING | b.KVM_VCPUEVENT_VALID_SIPI_VECTOR
    raw_events[b.VCPU_EVENTS_FLAGS : b.VCPU_EVENTS_FLAGS + 4] = flags.to_bytes(4, "little")
    events = b.KvmVcpuEvents.from_buffer_copy(raw_events)
    msrs = [(index, value) for index, value in state.msrs if index != MSR_IA32_TSC_DEADLINE]
    deadline = [(index, value) for index, value in state.msrs if index == MSR_IA32_TSC_DEADLINE]

    _restore_tsc_khz(fd, state.tsc_khz)
    with _refused(where, "special registers (sregs)"):
        fd.set_sregs(sregs)
    with _refused(where, "general registers (regs)"):
        fd.set_regs(regs)
    with _refused(where, "FPU state (fpu)"):
        fd.set_fpu(fpu)
    with _refused(where, "XSAVE area (xsave)"):
        fd.set_xsave(xsave)
    if xcrs.nr_xcrs:
        # A host without XSAVE saves none (KVM_GET_XCRS reports nr_xcrs 0) and refuses any
        # KVM_SET_XCRS with EINVAL, even an empty one (arch/x86/kvm/x86.c).
        with _refused(where, "extended control registers (xcrs)"):
            fd.set_xcrs(xcrs)
    with _refused(where, "MSRs (msrs)"):
        _write_msrs(fd, msrs)
    with _refused(where, "debug registers (debugregs)"):
        fd.set_debugregs(debugregs)
    with _refused(where, "local APIC (lapic)"):
        fd.set_lapic(lapic)
    with _refused(where, "TSC deadline (msrs)"):
        _write_msrs(fd, deadline)
    with _refused(where, "multiprocessing state (mp_state)"):
        fd.set_mp_state(state.mp_state)
    with _refused(where, "pending events (events)"):
        fd.set_vcpu_events(events)


def restore_kvm_vm(vm_fd: VmFd, state: KvmVmState) -> None:
    """Put the in-kernel PICs, IOAPIC, PIT and kvm-clock of a freshly built VM in ``state``,
    before its vCPUs are restored and run."""
    check_kvm_vm(state)
    chips = []
    for name, _, _, what in _VM_STRUCTS[:3]:
        chip = b.KvmIrqchip(chip_id=_CHIP_IDS[name])
        data: bytes = getattr(state, name)
        ctypes.memmove(ctypes.addressof(chip) + _CHIP_OFFSET, data, len(data))
        chips.append((chip, f"{what} ({name})"))
    pit = b.KvmPitState2.from_buffer_copy(state.pit)
    clock = b.KvmClockData(clock=state.clock_ns, flags=0)
    for chip, what in chips:
        with _refused("KVM VM state", what):
            vm_fd.set_irqchip(chip)
    with _refused("KVM VM state", "8254 PIT (pit)"):
        vm_fd.set_pit2(pit)
    with _refused("KVM VM state", "kvm-clock (clock_ns)"):
        vm_fd.set_clock(clock)


def _restore_tsc_khz(fd: VcpuFd, khz: int) -> None:
    """Run the guest's TSC at the saved rate when this vCPU's differs. KVM itself treats
    rates within 250 ppm as equal; beyond that it needs TSC scaling (KVM_CAP_TSC_CONTROL)
    to go slower than the host (arch/x86/kvm/x86.c, kvm_set_tsc_khz)."""
    if not khz:
        return
    try:
        current = fd.get_tsc_khz()
    except HostError:
        return  # no KVM_CAP_GET_TSC_KHZ: nothing to compare with or to set
    if current == khz:
        return
    try:
        fd.set_tsc_khz(khz)
    except KvmError as error:
        raise SnapshotError(
            f"vCPU {fd.vcpu_id}: the guest's TSC ran at {khz} kHz and this host's runs at "
            f"{current} kHz, which its KVM cannot change ({error}): restore the snapshot on "
            "a host with the same TSC frequency or with TSC scaling"
        ) from error


def _write_msrs(fd: VcpuFd, values: Sequence[tuple[int, int]]) -> None:
    for start in range(0, len(values), _MSR_BATCH):
        fd.set_msrs(values[start : start + _MSR_BATCH])


@contextmanager
def _refused(where: str, what: str) -> Iterator[None]:
    """Turn KVM's EINVAL for a saved piece into a ``SnapshotError`` naming it; other errors
    are the host's and stay ``KvmError``."""
    try:
        yield
    except KvmError as error:
        if error.errno != errno.EINVAL:
            raise
        raise SnapshotError(
            f"{where}: KVM refused the saved {what}: {error}; the snapshot is damaged or was "
            "taken on a host whose KVM offers what this one lacks"
        ) from error
