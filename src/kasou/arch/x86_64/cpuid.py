"""One vCPU's CPUID table, made from what KVM supports.

This module owns turning the entries of ``KVM_GET_SUPPORTED_CPUID`` into the table one vCPU
is given with ``KVM_SET_CPUID2``: its own APIC id and the package topology (every vCPU a core
of one package, one thread per core), the hypervisor bit, KVM's paravirtual leaves, and the
TSC-frequency leaf. Features are passed through as KVM reports them; this module adds none.
It does not issue ioctls: ``CpuidEntry`` mirrors ``struct kvm_cpuid_entry2`` as plain data.

References: Intel SDM vol. 2A, CPUID (leaves 01H, 04H, 0BH, 1FH); AMD APM vol. 3, appendix E
(leaves 8000_0008h, 8000_001Eh); Documentation/virt/kvm/x86/cpuid.rst (KVM leaves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

__all__ = [
    "APIC_BUS_KHZ",
    "CPUID_FLAG_SIGNIFICANT_INDEX",
    "HYPERVISOR_BIT",
    "KVM_CPUID_FEATURES",
    "KVM_CPUID_SIGNATURE",
    "KVM_CPUID_TIMING",
    "KVM_SIGNATURE",
    "CpuidEntry",
    "guest_cpuid",
]

CPUID_FLAG_SIGNIFICANT_INDEX = 1 << 0  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX (asm/kvm.h)

KVM_CPUID_SIGNATURE = 0x4000_0000  # eax: highest hypervisor leaf; ebx, ecx, edx: signature
KVM_CPUID_FEATURES = 0x4000_0001  # eax: KVM_FEATURE_* (kvm-clock, ...); edx: hints
# The timing-information leaf hypervisors use to publish frequencies (eax: TSC kHz, ebx: local
# APIC bus kHz), after VMware's convention; Linux and QEMU (vmware-cpuid-freq) know it.
KVM_CPUID_TIMING = 0x4000_0010
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
# KVM's local APIC timer counts at 1 GHz (arch/x86/kvm/lapic.h, APIC_BUS_CYCLE_NS = 1).
APIC_BUS_KHZ = 1_000_000

HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX: "running on a hypervisor"
_HTT_BIT = 1 << 28  # leaf 1 EDX: EBX[23:16] (logical processor count) is valid
_LEVEL_SMT = 1  # leaf 0BH/1FH ECX[15:8] level types
_LEVEL_CORE = 2
_AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf result: the fields of ``struct kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def guest_cpuid(
    supported: Sequence[CpuidEntry], *, vcpu_id: int, vcpus: int, tsc_khz: int | None
) -> list[CpuidEntry]:
    """The CPUID table of vCPU ``vcpu_id`` (its local APIC id) out of ``vcpus``.

    ``supported`` is what ``KVM_GET_SUPPORTED_CPUID`` returned; ``tsc_khz`` the guest's TSC
    frequency, published in the timing leaf when given. Leaves are returned sorted.
    """
    if not 0 <= vcpu_id < vcpus:
        raise ValueError(f"vcpu_id {vcpu_id} out of range for {vcpus} vCPUs")
    # APIC ids are 0..vcpus-1, so the core part of an id is this many bits wide.
    core_bits = (vcpus - 1).bit_length()
    topology = _Topology(vcpu_id, vcpus, core_bits, _is_amd(supported))
    table: list[CpuidEntry] = []
    for entry in supported:
        if entry.function in (0xB, 0x1F):
            continue  # rebuilt below, when KVM has the leaf at all
        if entry.function & 0xFFFF_FF00 == KVM_CPUID_SIGNATURE:
            continue  # the hypervisor range is rebuilt below
        table.append(topology.adjust(entry))
    for function in (0xB, 0x1F):
        if any(entry.function == function for entry in supported):
            table.extend(topology.extended_topology(function))
    table.extend(_kvm_leaves(supported, tsc_khz))
    return sorted(table, key=lambda entry: (entry.function, entry.index))


def _is_amd(supported: Sequence[CpuidEntry]) -> bool:
    for entry in supported:
        if entry.function == 0:
            vendor = b"".join(
                value.to_bytes(4, "little") for value in (entry.ebx, entry.edx, entry.ecx)
            )
            return vendor in _AMD_VENDORS
    return False


class _Topology(NamedTuple):
    vcpu_id: int
    vcpus: int
    core_bits: int
    amd: bool

    def adjust(self, entry: CpuidEntry) -> CpuidEntry:
        if entry.function == 1:
            return self._leaf1(entry)
        if entry.function == 4:
            return self._leaf4(entry)
        if self.amd and entry.function == 0x8000_0008:
            # ECX[7:0] NC: cores in the package - 1; ECX[15:12] ApicIdSize: core id bits.
            ecx = entry.ecx & ~0xF0FF | (self.vcpus - 1) & 0xFF | (self.core_bits & 0xF) << 12
            return replace(entry, ecx=ecx)
        if self.amd and entry.function == 0x8000_001E:
            # EAX extended APIC id; EBX[15:8] threads per core - 1 (0), EBX[7:0] core id;
            # ECX: node 0, one node per package.
            return replace(entry, eax=self.vcpu_id, ebx=self.vcpu_id & 0xFF, ecx=0)
        return entry

    def _leaf1(self, entry: CpuidEntry) -> CpuidEntry:
        # EBX[31:24] initial APIC id; EBX[23:16] addressable logical processor ids in the
        # package; EBX[15:0] (CLFLUSH size, brand index) kept as KVM reports them.
        logical = min(1 << self.core_bits, 0xFF)
        ebx = (entry.ebx & 0xFFFF) | logical << 16 | (self.vcpu_id & 0xFF) << 24
        edx = entry.edx | _HTT_BIT if self.vcpus > 1 else entry.edx & ~_HTT_BIT
        return replace(entry, ebx=ebx, ecx=entry.ecx | HYPERVISOR_BIT, edx=edx)

    def _leaf4(self, entry: CpuidEntry) -> CpuidEntry:
        if entry.eax & 0x1F == 0:  # cache type 0: no more caches
            return entry
        # EAX[31:26] addressable core ids in the package - 1; EAX[25:14] addressable ids of
        # logical processors sharing this cache - 1: one thread per core, so the per-core
        # caches (L1, L2) are shared by 1 and the last level (L3) by the whole package.
        level = entry.eax >> 5 & 0x7
        cores = min(1 << self.core_bits, 64)
        sharing = (1 << self.core_bits) if level >= 3 else 1
        eax = entry.eax & 0x3FFF | (min(sharing, 0x1000) - 1) << 14 | (cores - 1) << 26
        return replace(entry, eax=eax)

    def extended_topology(self, function: int) -> list[CpuidEntry]:
        """Leaf 0BH / 1FH: an SMT level of one thread, a core level of ``vcpus`` cores, then
        the invalid level that ends the list. EDX is the x2APIC id at every subleaf."""
        flags = CPUID_FLAG_SIGNIFICANT_INDEX
        x2apic_id = self.vcpu_id
        return [
            CpuidEntry(function, 0, flags, 0, 1, _LEVEL_SMT << 8 | 0, x2apic_id),
            CpuidEntry(
                function, 1, flags, self.core_bits, self.vcpus, _LEVEL_CORE << 8 | 1, x2apic_id
            ),
            CpuidEntry(function, 2, flags, 0, 0, 2, x2apic_id),
        ]


def _kvm_leaves(supported: Sequence[CpuidEntry], tsc_khz: int | None) -> list[CpuidEntry]:
    ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8))
    highest = KVM_CPUID_TIMING if tsc_khz else KVM_CPUID_FEATURES
    leaves = [CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, highest, ebx, ecx, edx)]
    features = next(
        (entry for entry in supported if entry.function == KVM_CPUID_FEATURES),
        CpuidEntry(KVM_CPUID_FEATURES, 0, 0, 0, 0, 0, 0),
    )
    leaves.append(features)
    if tsc_khz:
        leaves.append(CpuidEntry(KVM_CPUID_TIMING, 0, 0, tsc_khz, APIC_BUS_KHZ, 0, 0))
    return leaves
