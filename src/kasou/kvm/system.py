"""One class per KVM file-descriptor level, one method per ioctl, named after it.

``Kvm`` wraps /dev/kvm, ``VmFd`` a VM, ``VcpuFd`` a virtual CPU with its shared ``kvm_run``
page. Methods raise ``KvmError`` naming the ioctl. ``VcpuFd.run`` is the exception: it returns
``-errno`` so that a kick (``EINTR``) is an ordinary result on the vCPU loop's hot path.

See Documentation/virt/kvm/api.rst for each ioctl.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Iterable, Sequence

from kasou._sys import ioctl, ioctl_noretry
from kasou.errors import HostError, KvmError
from kasou.kvm import bindings as b

log = logging.getLogger(__name__)

__all__ = ["CAPABILITIES", "REQUIRED", "Kvm", "VcpuFd", "VmFd"]

# The capabilities kasou relies on, with the name a user can look up.
CAPABILITIES = {
    "KVM_CAP_IRQCHIP": b.KVM_CAP_IRQCHIP,
    "KVM_CAP_PIT2": b.KVM_CAP_PIT2,
    "KVM_CAP_IRQFD": b.KVM_CAP_IRQFD,
    "KVM_CAP_IOEVENTFD": b.KVM_CAP_IOEVENTFD,
    "KVM_CAP_IMMEDIATE_EXIT": b.KVM_CAP_IMMEDIATE_EXIT,
    "KVM_CAP_USER_MEMORY": b.KVM_CAP_USER_MEMORY,
    "KVM_CAP_EXT_CPUID": b.KVM_CAP_EXT_CPUID,
    "KVM_CAP_MP_STATE": b.KVM_CAP_MP_STATE,
    "KVM_CAP_VCPU_EVENTS": b.KVM_CAP_VCPU_EVENTS,
    "KVM_CAP_XSAVE": b.KVM_CAP_XSAVE,
    "KVM_CAP_XCRS": b.KVM_CAP_XCRS,
    "KVM_CAP_ADJUST_CLOCK": b.KVM_CAP_ADJUST_CLOCK,
    "KVM_CAP_GET_TSC_KHZ": b.KVM_CAP_GET_TSC_KHZ,
    "KVM_CAP_TSC_CONTROL": b.KVM_CAP_TSC_CONTROL,
}
REQUIRED = (
    "KVM_CAP_IRQCHIP",
    "KVM_CAP_PIT2",
    "KVM_CAP_IRQFD",
    "KVM_CAP_IOEVENTFD",
    "KVM_CAP_IMMEDIATE_EXIT",
    "KVM_CAP_USER_MEMORY",
    "KVM_CAP_EXT_CPUID",
)


def _call(name: str, fd: int, request: int, arg: object = None) -> int:
    try:
        return ioctl(fd, request, arg)
    except OSError as error:
        raise KvmError(name, error.errno or 0) from error


class _Fd:
    """An owned file descriptor, closed once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _Fd:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Kvm(_Fd):
    """/dev/kvm: the system-level ioctls."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as error:
            raise HostError(
                f"{path} is missing: load kvm_intel or kvm_amd (and enable VT-x/AMD-V), "
                "or run the command inside `kasou nested`"
            ) from error
        except PermissionError as error:
            raise HostError(
                f"no permission to open {path}: add yourself to its group "
                f"(ls -l {path}) or run as root"
            ) from error
        except OSError as error:
            raise HostError(f"cannot open {path}: {error.strerror}") from error
        super().__init__(fd)
        try:
            version = self.get_api_version()
            if version != b.KVM_API_VERSION:
                raise HostError(f"KVM API version {version} is not {b.KVM_API_VERSION}")
        except BaseException:
            self.close()
            raise

    def get_api_version(self) -> int:
        return _call("KVM_GET_API_VERSION", self.fd, b.KVM_GET_API_VERSION)

    def check_extension(self, capability: int) -> int:
        return _call("KVM_CHECK_EXTENSION", self.fd, b.KVM_CHECK_EXTENSION, capability)

    def require(self, capability: int, name: str) -> int:
        """``check_extension`` that raises a ``HostError`` naming the missing capability."""
        value = self.check_extension(capability)
        if value <= 0:
            raise HostError(f"this host's KVM lacks {name}, which kasou needs")
        return value

    def require_all(self) -> None:
        """Raise ``HostError`` naming the first capability in ``REQUIRED`` this KVM lacks."""
        for name in REQUIRED:
            self.require(CAPABILITIES[name], name)

    def get_vcpu_mmap_size(self) -> int:
        return _call("KVM_GET_VCPU_MMAP_SIZE", self.fd, b.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = 256) -> list[b.KvmCpuidEntry2]:
        cpuid = b.kvm_cpuid2(max_entries)()
        cpuid.nent = max_entries
        _call("KVM_GET_SUPPORTED_CPUID", self.fd, b.KVM_GET_SUPPORTED_CPUID, cpuid)
        return [b.KvmCpuidEntry2.from_buffer_copy(entry) for entry in cpuid.entries[: cpuid.nent]]

    def get_msr_index_list(self, max_entries: int = 1024) -> list[int]:
        msr_list = b.kvm_msr_list(max_entries)()
        msr_list.nmsrs = max_entries
        _call("KVM_GET_MSR_INDEX_LIST", self.fd, b.KVM_GET_MSR_INDEX_LIST, msr_list)
        return list(msr_list.indices[: msr_list.nmsrs])

    def max_vcpus(self) -> int:
        """The most vCPUs one VM may have (KVM_CAP_MAX_VCPUS, else KVM_CAP_NR_VCPUS, else 4)."""
        return (
            self.check_extension(b.KVM_CAP_MAX_VCPUS)
            or self.check_extension(b.KVM_CAP_NR_VCPUS)
            or 4
        )

    def create_vm(self) -> VmFd:
        return VmFd(_call("KVM_CREATE_VM", self.fd, b.KVM_CREATE_VM, 0), self)


class VmFd(_Fd):
    """A VM: memory slots, the in-kernel irqchip and PIT, irqfds and ioeventfds, vCPUs."""

    def __init__(self, fd: int, kvm: Kvm) -> None:
        super().__init__(fd)
        self.kvm = kvm

    def check_extension(self, capability: int) -> int:
        return _call("KVM_CHECK_EXTENSION", self.fd, b.KVM_CHECK_EXTENSION, capability)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        region = b.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        _call("KVM_SET_USER_MEMORY_REGION", self.fd, b.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, address: int) -> None:
        _call("KVM_SET_TSS_ADDR", self.fd, b.KVM_SET_TSS_ADDR, address)

    def set_identity_map_addr(self, address: int) -> None:
        _call(
            "KVM_SET_IDENTITY_MAP_ADDR",
            self.fd,
            b.KVM_SET_IDENTITY_MAP_ADDR,
            ctypes.c_uint64(address),
        )

    def create_irqchip(self) -> None:
        _call("KVM_CREATE_IRQCHIP", self.fd, b.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = b.KVM_PIT_SPEAKER_DUMMY) -> None:
        _call("KVM_CREATE_PIT2", self.fd, b.KVM_CREATE_PIT2, b.KvmPitConfig(flags=flags))

    def irq_line(self, irq: int, level: int) -> None:
        _call("KVM_IRQ_LINE", self.fd, b.KVM_IRQ_LINE, b.KvmIrqLevel(irq=irq, level=level))

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        flags = b.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _call("KVM_IRQFD", self.fd, b.KVM_IRQFD, b.KvmIrqfd(fd=fd, gsi=gsi, flags=flags))

    def ioeventfd(
        self,
        fd: int,
        address: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        flags = (b.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            b.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= b.KVM_IOEVENTFD_FLAG_DATAMATCH
        request = b.KvmIoeventfd(
            datamatch=datamatch or 0, addr=address, len=length, fd=fd, flags=flags
        )
        _call("KVM_IOEVENTFD", self.fd, b.KVM_IOEVENTFD, request)

    def get_irqchip(self, chip_id: int) -> b.KvmIrqchip:
        chip = b.KvmIrqchip(chip_id=chip_id)
        _call("KVM_GET_IRQCHIP", self.fd, b.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: b.KvmIrqchip) -> None:
        _call("KVM_SET_IRQCHIP", self.fd, b.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> b.KvmPitState2:
        state = b.KvmPitState2()
        _call("KVM_GET_PIT2", self.fd, b.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: b.KvmPitState2) -> None:
        _call("KVM_SET_PIT2", self.fd, b.KVM_SET_PIT2, state)

    def get_clock(self) -> b.KvmClockData:
        clock = b.KvmClockData()
        _call("KVM_GET_CLOCK", self.fd, b.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock: b.KvmClockData) -> None:
        _call("KVM_SET_CLOCK", self.fd, b.KVM_SET_CLOCK, clock)

    def get_dirty_log(self, slot: int, bitmap: ctypes.Array[ctypes.c_uint64]) -> None:
        log = b.KvmDirtyLog(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        _call("KVM_GET_DIRTY_LOG", self.fd, b.KVM_GET_DIRTY_LOG, log)

    def get_stats_fd(self) -> int:
        """A new fd of the VM's binary statistics (``kasou.kvm.stats`` reads it)."""
        return _call("KVM_GET_STATS_FD", self.fd, b.KVM_GET_STATS_FD)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        fd = _call("KVM_CREATE_VCPU", self.fd, b.KVM_CREATE_VCPU, vcpu_id)
        try:
            return VcpuFd(fd, vcpu_id, self.kvm.get_vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise


class VcpuFd(_Fd):
    """A virtual CPU and its ``kvm_run`` page (mapped shared with the kernel)."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.vcpu_id = vcpu_id
        try:
            self.run_page = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED)
        except OSError as error:
            raise KvmError("mmap of kvm_run", error.errno or 0) from error

    def close(self) -> None:
        if not self.run_page.closed:
            try:
                self.run_page.close()
            except BufferError:
                # A view of the page is still alive somewhere (a vCPU thread that has not
                # quite finished): leave the mapping to the process's end rather than fail
                # the VM's teardown; the fd below is closed all the same.
                log.warning("vCPU %d: its kvm_run page is still in use; left mapped", self.vcpu_id)
        super().close()

    def run(self) -> int:
        """KVM_RUN once: 0 on an exit to user space, else ``-errno`` (``-EINTR``: a kick)."""
        return ioctl_noretry(self.fd, b.KVM_RUN)

    @property
    def exit_reason(self) -> int:
        return int.from_bytes(self.run_page[b.RUN_EXIT_REASON : b.RUN_EXIT_REASON + 4], "little")

    def set_immediate_exit(self, value: bool) -> None:
        self.run_page[b.RUN_IMMEDIATE_EXIT] = int(value)

    def get_regs(self) -> b.KvmRegs:
        regs = b.KvmRegs()
        _call("KVM_GET_REGS", self.fd, b.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: b.KvmRegs) -> None:
        _call("KVM_SET_REGS", self.fd, b.KVM_SET_REGS, regs)

    def get_sregs(self) -> b.KvmSregs:
        sregs = b.KvmSregs()
        _call("KVM_GET_SREGS", self.fd, b.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: b.KvmSregs) -> None:
        _call("KVM_SET_SREGS", self.fd, b.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> b.KvmFpu:
        fpu = b.KvmFpu()
        _call("KVM_GET_FPU", self.fd, b.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: b.KvmFpu) -> None:
        _call("KVM_SET_FPU", self.fd, b.KVM_SET_FPU, fpu)

    def set_cpuid2(self, entries: Sequence[b.KvmCpuidEntry2]) -> None:
        cpuid = b.kvm_cpuid2(len(entries))()
        cpuid.nent = len(entries)
        for slot, entry in enumerate(entries):
            cpuid.entries[slot] = entry
        _call("KVM_SET_CPUID2", self.fd, b.KVM_SET_CPUID2, cpuid)

    def get_msrs(self, indices: Sequence[int]) -> list[tuple[int, int]]:
        msrs = b.kvm_msrs(len(indices))()
        msrs.nmsrs = len(indices)
        for slot, index in enumerate(indices):
            msrs.entries[slot].index = index
        count = _call("KVM_GET_MSRS", self.fd, b.KVM_GET_MSRS, msrs)
        return [(msrs.entries[slot].index, msrs.entries[slot].data) for slot in range(count)]

    def set_msrs(self, values: Iterable[tuple[int, int]]) -> None:
        pairs = list(values)
        msrs = b.kvm_msrs(len(pairs))()
        msrs.nmsrs = len(pairs)
        for slot, (index, data) in enumerate(pairs):
            msrs.entries[slot].index = index
            msrs.entries[slot].data = data
        written = _call("KVM_SET_MSRS", self.fd, b.KVM_SET_MSRS, msrs)
        if written != len(pairs):
            index = pairs[written][0]
            raise KvmError("KVM_SET_MSRS", 22, f"MSR {index:#x} was refused")

    def get_lapic(self) -> b.KvmLapicState:
        lapic = b.KvmLapicState()
        _call("KVM_GET_LAPIC", self.fd, b.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: b.KvmLapicState) -> None:
        _call("KVM_SET_LAPIC", self.fd, b.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        state = b.KvmMpState()
        _call("KVM_GET_MP_STATE", self.fd, b.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        _call("KVM_SET_MP_STATE", self.fd, b.KVM_SET_MP_STATE, b.KvmMpState(mp_state=mp_state))

    def get_vcpu_events(self) -> b.KvmVcpuEvents:
        events = b.KvmVcpuEvents()
        _call("KVM_GET_VCPU_EVENTS", self.fd, b.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: b.KvmVcpuEvents) -> None:
        _call("KVM_SET_VCPU_EVENTS", self.fd, b.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self) -> b.KvmDebugregs:
        regs = b.KvmDebugregs()
        _call("KVM_GET_DEBUGREGS", self.fd, b.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: b.KvmDebugregs) -> None:
        _call("KVM_SET_DEBUGREGS", self.fd, b.KVM_SET_DEBUGREGS, regs)

    def get_xsave(self) -> b.KvmXsave:
        xsave = b.KvmXsave()
        _call("KVM_GET_XSAVE", self.fd, b.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: b.KvmXsave) -> None:
        _call("KVM_SET_XSAVE", self.fd, b.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> b.KvmXcrs:
        xcrs = b.KvmXcrs()
        _call("KVM_GET_XCRS", self.fd, b.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: b.KvmXcrs) -> None:
        _call("KVM_SET_XCRS", self.fd, b.KVM_SET_XCRS, xcrs)

    def get_tsc_khz(self) -> int:
        return _call("KVM_GET_TSC_KHZ", self.fd, b.KVM_GET_TSC_KHZ)

    def get_stats_fd(self) -> int:
        """A new fd of this vCPU's binary statistics (``kasou.kvm.stats`` reads it). Like
        every vCPU ioctl it waits while the vCPU is in KVM_RUN: call it before the vCPU runs."""
        return _call("KVM_GET_STATS_FD", self.fd, b.KVM_GET_STATS_FD)

    def set_tsc_khz(self, khz: int) -> None:
        _call("KVM_SET_TSC_KHZ", self.fd, b.KVM_SET_TSC_KHZ, khz)
