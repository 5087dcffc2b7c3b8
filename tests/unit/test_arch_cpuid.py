"""Per-vCPU CPUID tables made from a KVM_GET_SUPPORTED_CPUID-like list, and boot MSRs."""

from __future__ import annotations

import pytest

from kasou.arch.x86_64.cpuid import CpuidEntry, guest_cpuid
from kasou.arch.x86_64.msrs import (
    MSR_IA32_MISC_ENABLE,
    MSR_LSTAR,
    MSR_MTRR_DEF_TYPE,
    boot_msrs,
)


def vendor_entry(vendor: bytes, max_leaf: int) -> CpuidEntry:
    ebx, edx, ecx = (int.from_bytes(vendor[i : i + 4], "little") for i in (0, 4, 8))
    return CpuidEntry(0, 0, 0, max_leaf, ebx, ecx, edx)


def intel_supported() -> list[CpuidEntry]:
    caches = [  # leaf 4: type in 4:0, level in 7:5, host topology in 31:14 to be replaced
        CpuidEntry(4, 0, 1, 0xFC00_4121, 0x01C0_003F, 0x3F, 0),  # L1 data
        CpuidEntry(4, 1, 1, 0xFC00_4122, 0x01C0_003F, 0x3F, 0),  # L1 instruction
        CpuidEntry(4, 2, 1, 0xFC00_4143, 0x03C0_003F, 0x3FF, 0),  # L2
        CpuidEntry(4, 3, 1, 0xFC0F_C163, 0x0380_003F, 0x7FFF, 6),  # L3
        CpuidEntry(4, 4, 1, 0, 0, 0, 0),  # no more caches
    ]
    return [
        vendor_entry(b"GenuineIntel", 0x1F),
        CpuidEntry(1, 0, 0, 0x000806F8, 0xAB_10_08_00, 0x7FFAFBFF, 0x0FABFBFF),
        *caches,
        CpuidEntry(7, 0, 1, 0, 0xF1BF07AB, 0x1B415F6E, 0xAC18C010),
        CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 0x55),  # host topology, to be replaced
        CpuidEntry(0xB, 1, 1, 7, 112, 0x201, 0x55),
        CpuidEntry(0x1F, 0, 1, 1, 2, 0x100, 0x55),
        CpuidEntry(0x4000_0000, 0, 0, 0x4000_0001, 0x4B4D564B, 0x564B4D56, 0x4D),
        CpuidEntry(0x4000_0001, 0, 0, 0x01007AFB, 0, 0, 1),
        CpuidEntry(0x8000_0008, 0, 0, 0x3030, 0, 0, 0),
    ]


def leaf(table: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry:
    matches = [e for e in table if (e.function, e.index) == (function, index)]
    assert len(matches) == 1, (hex(function), index)
    return matches[0]


def test_leaf_1_apic_id_count_and_hypervisor_bit() -> None:
    table = guest_cpuid(intel_supported(), vcpu_id=5, vcpus=6, tsc_khz=None)
    entry = leaf(table, 1)
    assert entry.ebx >> 24 == 5  # initial APIC id
    assert entry.ebx >> 16 & 0xFF == 8  # addressable ids: next power of two above 6
    assert entry.ebx & 0xFFFF == 0x0800  # CLFLUSH size kept
    assert entry.ecx >> 31 == 1  # hypervisor
    assert entry.ecx & 0x7FFFFFFF == 0x7FFAFBFF
    assert entry.edx >> 28 & 1 == 1  # HTT: the count above is valid
    alone = leaf(guest_cpuid(intel_supported(), vcpu_id=0, vcpus=1, tsc_khz=None), 1)
    assert alone.edx >> 28 & 1 == 0 and alone.ebx >> 24 == 0


def test_extended_topology_is_one_thread_per_core() -> None:
    table = guest_cpuid(intel_supported(), vcpu_id=3, vcpus=6, tsc_khz=None)
    for function in (0xB, 0x1F):
        levels = [e for e in table if e.function == function]
        assert [(e.index, e.eax, e.ebx, e.ecx, e.edx, e.flags) for e in levels] == [
            (0, 0, 1, 0x100, 3, 1),  # SMT: shift 0, 1 thread, x2APIC id 3
            (1, 3, 6, 0x201, 3, 1),  # core: shift 3 bits, 6 cores
            (2, 0, 0, 2, 3, 1),  # invalid level: end
        ]


def test_leaf_4_core_and_sharing_counts() -> None:
    table = guest_cpuid(intel_supported(), vcpu_id=0, vcpus=6, tsc_khz=None)
    for index in (0, 1, 2):
        eax = leaf(table, 4, index).eax
        assert (eax >> 26, eax >> 14 & 0xFFF) == (7, 0)  # 8 core ids; cache per core
        assert eax & 0x3FFF == intel_supported()[2 + index].eax & 0x3FFF
    l3 = leaf(table, 4, 3).eax
    assert (l3 >> 26, l3 >> 14 & 0xFFF) == (7, 7)  # shared by the package
    assert leaf(table, 4, 4).eax == 0


def test_kvm_leaves_with_and_without_tsc_frequency() -> None:
    table = guest_cpuid(intel_supported(), vcpu_id=0, vcpus=2, tsc_khz=2_500_000)
    signature = leaf(table, 0x4000_0000)
    assert signature.eax == 0x4000_0010
    text = b"".join(v.to_bytes(4, "little") for v in (signature.ebx, signature.ecx, signature.edx))
    assert text == b"KVMKVMKVM\0\0\0"
    assert leaf(table, 0x4000_0001).eax == 0x01007AFB  # KVM's features passed through
    timing = leaf(table, 0x4000_0010)
    assert (timing.eax, timing.ebx) == (2_500_000, 1_000_000)
    without = guest_cpuid(intel_supported(), vcpu_id=0, vcpus=2, tsc_khz=None)
    assert leaf(without, 0x4000_0000).eax == 0x4000_0001
    assert not [e for e in without if e.function == 0x4000_0010]


def test_other_leaves_pass_through_and_table_is_sorted() -> None:
    supported = intel_supported()
    table = guest_cpuid(supported, vcpu_id=1, vcpus=2, tsc_khz=None)
    assert leaf(table, 7) == leaf(supported, 7)
    assert leaf(table, 0) == leaf(supported, 0)
    assert leaf(table, 0x8000_0008) == leaf(supported, 0x8000_0008)  # Intel: left alone
    keys = [(e.function, e.index) for e in table]
    assert keys == sorted(keys) and len(keys) == len(set(keys))


def test_amd_core_count_and_extended_apic_id() -> None:
    supported = [
        vendor_entry(b"AuthenticAMD", 0x10),
        CpuidEntry(1, 0, 0, 0x00A50F00, 0x00_02_08_00, 0x7ED8320B, 0x178BFBFF),
        CpuidEntry(0x8000_0008, 0, 0, 0x3030, 0, 0x0000_7003, 0),
        CpuidEntry(0x8000_001E, 0, 0, 0, 0, 0, 0),
    ]
    table = guest_cpuid(supported, vcpu_id=2, vcpus=3, tsc_khz=None)
    ecx = leaf(table, 0x8000_0008).ecx
    assert (ecx & 0xFF, ecx >> 12 & 0xF) == (2, 2)  # 3 cores, 2 bits of core id
    topo = leaf(table, 0x8000_001E)
    assert (topo.eax, topo.ebx & 0xFF, topo.ebx >> 8 & 0xFF, topo.ecx) == (2, 2, 0, 0)
    assert not [e for e in table if e.function == 0xB]  # KVM did not offer it


def test_vcpu_id_must_be_one_of_the_vcpus() -> None:
    with pytest.raises(ValueError, match="out of range"):
        guest_cpuid(intel_supported(), vcpu_id=2, vcpus=2, tsc_khz=None)


def test_boot_msrs() -> None:
    msrs = dict(boot_msrs())
    assert len(msrs) == len(boot_msrs())  # no MSR twice
    assert msrs[MSR_LSTAR] == 0
    assert msrs[MSR_IA32_MISC_ENABLE] & 1  # fast strings
    assert msrs[MSR_MTRR_DEF_TYPE] == 0x806  # MTRRs on, default write-back
    assert {0x174, 0x175, 0x176, 0xC0000081, 0xC0000083, 0xC0000084, 0xC0000102, 0x10} <= set(msrs)
