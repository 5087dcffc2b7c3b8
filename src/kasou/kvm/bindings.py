"""Layouts and numbers from linux/kvm.h and asm/kvm.h (x86_64): the only place kasou spells them.

Each ``ctypes.Structure`` names the C struct it mirrors and asserts its size at import;
``tests/unit/test_kvm_bindings.py`` also compiles the kernel headers and compares every size and
ioctl number. Only the structs kasou uses are here.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    c_char,
    c_int32,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)

__all__ = [name for name in dir() if name.isupper() or name.startswith("Kvm")]

# --- ioctl number encoding, asm-generic/ioctl.h -------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | number


def _io(number: int) -> int:
    return _ioc(_IOC_NONE, number, 0)


def _ior(number: int, struct: type[ctypes.Structure] | int) -> int:
    return _ioc(_IOC_READ, number, _size(struct))


def _iow(number: int, struct: type[ctypes.Structure] | int) -> int:
    return _ioc(_IOC_WRITE, number, _size(struct))


def _iowr(number: int, struct: type[ctypes.Structure] | int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, number, _size(struct))


def _size(struct: type[ctypes.Structure] | int) -> int:
    return struct if isinstance(struct, int) else ctypes.sizeof(struct)


def _sized(struct: type[ctypes.Structure], size: int) -> None:
    if ctypes.sizeof(struct) != size:
        raise AssertionError(f"{struct.__name__} is {ctypes.sizeof(struct)} bytes, not {size}")


# --- structures -------------------------------------------------------------------------


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region, linux/kvm.h"""

    _fields_ = (
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    )


_sized(KvmUserspaceMemoryRegion, 32)


class KvmRegs(ctypes.Structure):
    """struct kvm_regs, asm/kvm.h"""

    _fields_ = tuple(
        (name, c_uint64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    )


_sized(KvmRegs, 144)


class KvmSegment(ctypes.Structure):
    """struct kvm_segment, asm/kvm.h"""

    _fields_ = (
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    )


_sized(KvmSegment, 24)


class KvmDtable(ctypes.Structure):
    """struct kvm_dtable, asm/kvm.h"""

    _fields_ = (("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3))


_sized(KvmDtable, 16)


class KvmSregs(ctypes.Structure):
    """struct kvm_sregs, asm/kvm.h"""

    _fields_ = (
        ("cs", KvmSegment),
        ("ds", KvmSegment),
        ("es", KvmSegment),
        ("fs", KvmSegment),
        ("gs", KvmSegment),
        ("ss", KvmSegment),
        ("tr", KvmSegment),
        ("ldt", KvmSegment),
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    )


_sized(KvmSregs, 312)


class KvmFpu(ctypes.Structure):
    """struct kvm_fpu, asm/kvm.h"""

    _fields_ = (
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    )


_sized(KvmFpu, 416)


class KvmMsrEntry(ctypes.Structure):
    """struct kvm_msr_entry, asm/kvm.h"""

    _fields_ = (("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64))


_sized(KvmMsrEntry, 16)


class KvmMsrsHeader(ctypes.Structure):
    """struct kvm_msrs without its flexible array of kvm_msr_entry, asm/kvm.h"""

    _fields_ = (("nmsrs", c_uint32), ("pad", c_uint32))


_sized(KvmMsrsHeader, 8)


def kvm_msrs(count: int) -> type[ctypes.Structure]:
    """struct kvm_msrs with room for ``count`` entries."""

    class KvmMsrs(ctypes.Structure):
        _fields_ = (("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * count))

    return KvmMsrs


class KvmMsrListHeader(ctypes.Structure):
    """struct kvm_msr_list without its flexible array, linux/kvm.h"""

    _fields_ = (("nmsrs", c_uint32),)


_sized(KvmMsrListHeader, 4)


def kvm_msr_list(count: int) -> type[ctypes.Structure]:
    """struct kvm_msr_list with room for ``count`` indices."""

    class KvmMsrList(ctypes.Structure):
        _fields_ = (("nmsrs", c_uint32), ("indices", c_uint32 * count))

    return KvmMsrList


class KvmCpuidEntry2(ctypes.Structure):
    """struct kvm_cpuid_entry2, asm/kvm.h"""

    _fields_ = (
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    )


_sized(KvmCpuidEntry2, 40)


class KvmCpuid2Header(ctypes.Structure):
    """struct kvm_cpuid2 without its flexible array, asm/kvm.h"""

    _fields_ = (("nent", c_uint32), ("padding", c_uint32))


_sized(KvmCpuid2Header, 8)


def kvm_cpuid2(count: int) -> type[ctypes.Structure]:
    """struct kvm_cpuid2 with room for ``count`` entries."""

    class KvmCpuid2(ctypes.Structure):
        _fields_ = (("nent", c_uint32), ("padding", c_uint32), ("entries", KvmCpuidEntry2 * count))

    return KvmCpuid2


class KvmIrqfd(ctypes.Structure):
    """struct kvm_irqfd, linux/kvm.h"""

    _fields_ = (
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    )


_sized(KvmIrqfd, 32)


class KvmIoeventfd(ctypes.Structure):
    """struct kvm_ioeventfd, linux/kvm.h"""

    _fields_ = (
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    )


_sized(KvmIoeventfd, 64)


class KvmPitConfig(ctypes.Structure):
    """struct kvm_pit_config, linux/kvm.h"""

    _fields_ = (("flags", c_uint32), ("pad", c_uint32 * 15))


_sized(KvmPitConfig, 64)


class KvmIrqLevel(ctypes.Structure):
    """struct kvm_irq_level, linux/kvm.h"""

    _fields_ = (("irq", c_uint32), ("level", c_uint32))


_sized(KvmIrqLevel, 8)


class KvmMpState(ctypes.Structure):
    """struct kvm_mp_state, linux/kvm.h"""

    _fields_ = (("mp_state", c_uint32),)


_sized(KvmMpState, 4)


class KvmLapicState(ctypes.Structure):
    """struct kvm_lapic_state, asm/kvm.h"""

    _fields_ = (("regs", c_char * 1024),)


_sized(KvmLapicState, 1024)


class KvmIrqchip(ctypes.Structure):
    """struct kvm_irqchip, linux/kvm.h (the union kept as raw bytes)"""

    _fields_ = (("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_char * 512))


_sized(KvmIrqchip, 520)


class KvmPicState(ctypes.Structure):
    """struct kvm_pic_state, asm/kvm.h: one 8259's registers (kvm_irqchip.chip.pic)"""

    _fields_ = tuple(
        (name, c_uint8)
        for name in (
            "last_irr",
            "irr",
            "imr",
            "isr",
            "priority_add",
            "irq_base",
            "read_reg_select",
            "poll",
            "special_mask",
            "init_state",
            "auto_eoi",
            "rotate_on_auto_eoi",
            "special_fully_nested_mode",
            "init4",
            "elcr",
            "elcr_mask",
        )
    )


_sized(KvmPicState, 16)


class KvmIoapicState(ctypes.Structure):
    """struct kvm_ioapic_state, asm/kvm.h (kvm_irqchip.chip.ioapic; the redirection table's
    24 entries kept as raw u64s)"""

    _fields_ = (
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", c_uint64 * 24),
    )


_sized(KvmIoapicState, 216)


class KvmPitState2(ctypes.Structure):
    """struct kvm_pit_state2, asm/kvm.h (channels kept as raw bytes)"""

    _fields_ = (("channels", c_char * 72), ("flags", c_uint32), ("reserved", c_uint32 * 9))


_sized(KvmPitState2, 112)


class KvmClockData(ctypes.Structure):
    """struct kvm_clock_data, linux/kvm.h"""

    _fields_ = (
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    )


_sized(KvmClockData, 48)


class KvmVcpuEvents(ctypes.Structure):
    """struct kvm_vcpu_events, asm/kvm.h (kept as raw bytes: saved and restored whole)"""

    _fields_ = (("raw", c_char * 64),)


_sized(KvmVcpuEvents, 64)
# offsetof(struct kvm_vcpu_events, flags): after exception (8), interrupt (4), nmi (4) and
# sipi_vector (4); a u32 of KVM_VCPUEVENT_VALID_* bits.
VCPU_EVENTS_FLAGS = 20


class KvmDebugregs(ctypes.Structure):
    """struct kvm_debugregs, asm/kvm.h"""

    _fields_ = (
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    )


_sized(KvmDebugregs, 128)


class KvmXsave(ctypes.Structure):
    """struct kvm_xsave, asm/kvm.h (the 4 KiB legacy size)"""

    _fields_ = (("region", c_uint32 * 1024),)


_sized(KvmXsave, 4096)


class KvmXcr(ctypes.Structure):
    """struct kvm_xcr, asm/kvm.h"""

    _fields_ = (("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64))


class KvmXcrs(ctypes.Structure):
    """struct kvm_xcrs, asm/kvm.h"""

    _fields_ = (
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", KvmXcr * 16),
        ("padding", c_uint64 * 16),
    )


_sized(KvmXcrs, 392)


class KvmDirtyLog(ctypes.Structure):
    """struct kvm_dirty_log, linux/kvm.h (the bitmap pointer as a u64)"""

    _fields_ = (("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64))


_sized(KvmDirtyLog, 16)


class KvmEnableCap(ctypes.Structure):
    """struct kvm_enable_cap, linux/kvm.h"""

    _fields_ = (
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    )


_sized(KvmEnableCap, 104)


class KvmStatsHeader(ctypes.Structure):
    """struct kvm_stats_header, linux/kvm.h: the start of a binary statistics fd"""

    _fields_ = (
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    )


_sized(KvmStatsHeader, 24)


class KvmStatsDesc(ctypes.Structure):
    """struct kvm_stats_desc, linux/kvm.h, without its name (``name_size`` bytes follow)"""

    _fields_ = (
        ("flags", c_uint32),
        ("exponent", ctypes.c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    )


_sized(KvmStatsDesc, 16)


# --- ioctls -----------------------------------------------------------------------------

# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, KvmMsrListHeader)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, KvmCpuid2Header)
# VM fd
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, KvmDirtyLog)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, KvmUserspaceMemoryRegion)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, 8)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, KvmIrqLevel)
KVM_GET_IRQCHIP = _iowr(0x62, KvmIrqchip)
KVM_SET_IRQCHIP = _ior(0x63, KvmIrqchip)
KVM_IRQFD = _iow(0x76, KvmIrqfd)
KVM_CREATE_PIT2 = _iow(0x77, KvmPitConfig)
KVM_IOEVENTFD = _iow(0x79, KvmIoeventfd)
KVM_SET_CLOCK = _iow(0x7B, KvmClockData)
KVM_GET_CLOCK = _ior(0x7C, KvmClockData)
KVM_GET_PIT2 = _ior(0x9F, KvmPitState2)
KVM_SET_PIT2 = _iow(0xA0, KvmPitState2)
KVM_ENABLE_CAP = _iow(0xA3, KvmEnableCap)
# vCPU fd
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, KvmRegs)
KVM_SET_REGS = _iow(0x82, KvmRegs)
KVM_GET_SREGS = _ior(0x83, KvmSregs)
KVM_SET_SREGS = _iow(0x84, KvmSregs)
KVM_GET_MSRS = _iowr(0x88, KvmMsrsHeader)
KVM_SET_MSRS = _iow(0x89, KvmMsrsHeader)
KVM_GET_FPU = _ior(0x8C, KvmFpu)
KVM_SET_FPU = _iow(0x8D, KvmFpu)
KVM_GET_LAPIC = _ior(0x8E, KvmLapicState)
KVM_SET_LAPIC = _iow(0x8F, KvmLapicState)
KVM_SET_CPUID2 = _iow(0x90, KvmCpuid2Header)
KVM_GET_CPUID2 = _iowr(0x91, KvmCpuid2Header)
KVM_GET_MP_STATE = _ior(0x98, KvmMpState)
KVM_SET_MP_STATE = _iow(0x99, KvmMpState)
KVM_GET_VCPU_EVENTS = _ior(0x9F, KvmVcpuEvents)
KVM_SET_VCPU_EVENTS = _iow(0xA0, KvmVcpuEvents)
KVM_GET_DEBUGREGS = _ior(0xA1, KvmDebugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, KvmDebugregs)
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, KvmXsave)
KVM_SET_XSAVE = _iow(0xA5, KvmXsave)
KVM_GET_XCRS = _ior(0xA6, KvmXcrs)
KVM_SET_XCRS = _iow(0xA7, KvmXcrs)
KVM_KVMCLOCK_CTRL = _io(0xAD)
# VM or vCPU fd
KVM_GET_STATS_FD = _io(0xCE)

# --- constants --------------------------------------------------------------------------

KVM_API_VERSION = 12

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_IOEVENTFD = 36
KVM_CAP_PIT2 = 33
KVM_CAP_IRQFD = 32
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_BINARY_STATS_FD = 203

# kvm_run exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# struct kvm_run offsets (linux/kvm.h): the header, then the exit union at 32.
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IF_FLAG = 13
RUN_UNION = 32
RUN_IO_DIRECTION = RUN_UNION  # u8 direction, u8 size, u16 port, u32 count, u64 data_offset
RUN_MMIO = RUN_UNION  # u64 phys_addr, u8 data[8], u32 len, u8 is_write
RUN_MMIO_DATA = RUN_UNION + 8

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_PIT_SPEAKER_DUMMY = 1
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4
KVM_MP_STATE_AP_RESET_HOLD = 9
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2

# struct kvm_stats_desc flags: type, unit and base, four bits each
KVM_STATS_TYPE_MASK = 0xF
KVM_STATS_TYPE_CUMULATIVE = 0x0
KVM_STATS_TYPE_INSTANT = 0x1
KVM_STATS_TYPE_PEAK = 0x2
KVM_STATS_TYPE_LINEAR_HIST = 0x3
KVM_STATS_TYPE_LOG_HIST = 0x4
KVM_STATS_UNIT_SHIFT = 4
KVM_STATS_UNIT_MASK = 0xF << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_NONE = 0x0 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BYTES = 0x1 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_SECONDS = 0x2 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_CYCLES = 0x3 << KVM_STATS_UNIT_SHIFT
KVM_STATS_UNIT_BOOLEAN = 0x4 << KVM_STATS_UNIT_SHIFT
KVM_STATS_BASE_SHIFT = 8
KVM_STATS_BASE_MASK = 0xF << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW10 = 0x0 << KVM_STATS_BASE_SHIFT
KVM_STATS_BASE_POW2 = 0x1 << KVM_STATS_BASE_SHIFT

__all__ = sorted(  # noqa: PLE0605 - every struct and constant defined above
    name
    for name in dir()
    if (name.isupper() and not name.startswith("_")) or name.startswith(("Kvm", "kvm_"))
)
