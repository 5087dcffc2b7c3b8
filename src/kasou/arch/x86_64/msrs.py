"""Model-specific registers a vCPU starts with for a Linux guest.

This module owns the MSR numbers kasou sets at boot and their values: the SYSENTER and SYSCALL
registers cleared (the kernel programs them itself), a zero TSC, fast string operations on,
and the MTRRs defaulting to write-back so the guest sees all memory as cacheable. Numbers and
bits are from the Intel SDM vol. 4 (model-specific registers) and vol. 3, 12.11 (MTRRs). It
does not issue ``KVM_SET_MSRS``.
"""

from __future__ import annotations

__all__ = [
    "MISC_ENABLE_FAST_STRING",
    "MSR_CSTAR",
    "MSR_IA32_MISC_ENABLE",
    "MSR_IA32_SYSENTER_CS",
    "MSR_IA32_SYSENTER_EIP",
    "MSR_IA32_SYSENTER_ESP",
    "MSR_IA32_TSC",
    "MSR_KERNEL_GS_BASE",
    "MSR_LSTAR",
    "MSR_MTRR_DEF_TYPE",
    "MSR_STAR",
    "MSR_SYSCALL_MASK",
    "MTRR_DEF_TYPE_ENABLE",
    "MTRR_TYPE_WRITE_BACK",
    "boot_msrs",
]

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF  # IA32_MTRR_DEF_TYPE
MSR_STAR = 0xC000_0081  # SYSCALL target segments
MSR_LSTAR = 0xC000_0082  # 64-bit SYSCALL target
MSR_CSTAR = 0xC000_0083  # compatibility-mode SYSCALL target
MSR_SYSCALL_MASK = 0xC000_0084  # IA32_FMASK: RFLAGS bits cleared on SYSCALL
MSR_KERNEL_GS_BASE = 0xC000_0102  # swapped with GS.base by SWAPGS

MISC_ENABLE_FAST_STRING = 1 << 0  # IA32_MISC_ENABLE bit 0: fast-strings enable
MTRR_TYPE_WRITE_BACK = 6  # memory type encoding (SDM vol. 3, table 12-8)
MTRR_DEF_TYPE_ENABLE = 1 << 11  # IA32_MTRR_DEF_TYPE.E: MTRRs enabled


def boot_msrs() -> list[tuple[int, int]]:
    """``(index, value)`` pairs to write to every vCPU before it first runs."""
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        # All vCPUs write 0 at about the same time; KVM matches such writes up to keep the
        # vCPUs' TSCs synchronised (arch/x86/kvm/x86.c, kvm_synchronize_tsc).
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        # No variable or fixed ranges are set: every address gets the default type.
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
