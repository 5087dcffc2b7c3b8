"""The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs.

This module owns writing the MP floating pointer structure and the MP configuration table
(MP spec 1.4, chapter 4) into the EBDA at ``layout.MPTABLE``, where Linux's mpparse.c looks
for it: one processor entry per vCPU (local APIC id = vCPU index, vCPU 0 the bootstrap
processor), one ISA bus, the IOAPIC, the I/O interrupt assignments and the local APIC's LINT
pins. It does not write ACPI tables.

Interrupt routing. KVM's in-kernel irqchip starts with a default GSI routing
(arch/x86/kvm/irq_comm.c, ``kvm_setup_default_irq_routing``) in which GSI n drives IOAPIC pin
n (and, below 16, PIC pin n % 8), and the in-kernel PIT raises GSI 0. So the table declares
ISA IRQ n on IOAPIC pin n for every pin, IRQ 0 included: no PC-style "IRQ 0 on pin 2"
override. The VMM must keep that default routing, and raise device interrupts on GSI n to
reach pin n (``layout.VIRTIO_IRQS``).
"""

from __future__ import annotations

import struct

from kasou.arch.x86_64.layout import (
    IOAPIC_ADDRESS,
    IOAPIC_PINS,
    LAPIC_ADDRESS,
    MPTABLE,
    MPTABLE_SIZE,
)
from kasou.errors import ConfigError
from kasou.memory import GuestMemory

__all__ = [
    "APIC_VERSION",
    "DEFAULT_CPU_FEATURES",
    "DEFAULT_CPU_SIGNATURE",
    "IOAPIC_VERSION",
    "MAX_VCPUS",
    "mptable_size",
    "write_mptable",
]

# MP floating pointer structure (MP spec 1.4, table 4-1): signature, physical address of the
# configuration table, length in 16-byte units, spec revision, checksum, feature bytes 1-5.
_FLOATING = struct.Struct("<4sIBBBBB3s")
# Configuration table header (table 4-2): signature, base table length, spec revision,
# checksum, OEM id, product id, OEM table pointer and size, entry count, local APIC address,
# extended table length and checksum, reserved.
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
# Base table entries (tables 4-4, 4-8, 4-10, 4-12, 4-14).
_PROCESSOR = struct.Struct("<BBBBII8x")  # type 0, APIC id, APIC version, flags, signature, features
_BUS = struct.Struct("<BB6s")  # type 1, bus id, bus type string
_IOAPIC = struct.Struct("<BBBBI")  # type 2, IOAPIC id, version, flags, address
_INTERRUPT = struct.Struct("<BBHBBBB")  # type 3/4, kind, flags, bus, bus IRQ, dest id, dest pin

assert _FLOATING.size == 16 and _HEADER.size == 44 and _PROCESSOR.size == 20
assert _BUS.size == _IOAPIC.size == _INTERRUPT.size == 8

_SPEC_REVISION = 4  # MP spec 1.4
_PROCESSOR_ENTRY, _BUS_ENTRY, _IOAPIC_ENTRY, _IO_INTERRUPT_ENTRY, _LOCAL_INTERRUPT_ENTRY = range(5)
_CPU_ENABLED = 1 << 0
_CPU_BOOTSTRAP = 1 << 1
_IOAPIC_ENABLED = 1 << 0
_INT, _NMI, _SMI, _EXTINT = range(4)  # interrupt types (table 4-13)
_CONFORMS_TO_BUS = 0  # polarity and trigger "conform to the specifications of the bus"
_ISA_BUS_ID = 0
_ALL_LOCAL_APICS = 0xFF
_LINT0, _LINT1 = 0, 1

APIC_VERSION = 0x14  # the version KVM's in-kernel local APIC reports (integrated xAPIC)
IOAPIC_VERSION = 0x11  # the version KVM's in-kernel IOAPIC reports
# CPU signature in CPUID leaf 1 EAX form (stepping 3:0, model 7:4, family 11:8): family 6.
DEFAULT_CPU_SIGNATURE = 0x600
DEFAULT_CPU_FEATURES = (1 << 0) | (1 << 9)  # CPUID leaf 1 EDX: FPU, APIC

# Local APIC ids are 8 bits and 0xff is the broadcast id; the IOAPIC takes id ``vcpus``.
_APIC_ID_LIMIT = 0xFF
_FIXED_SIZE = (
    _FLOATING.size + _HEADER.size + _BUS.size + _IOAPIC.size + (IOAPIC_PINS + 2) * _INTERRUPT.size
)
MAX_VCPUS = min(_APIC_ID_LIMIT - 1, (MPTABLE_SIZE - _FIXED_SIZE) // _PROCESSOR.size)


def mptable_size(vcpus: int) -> int:
    """Bytes the floating pointer and configuration table take for ``vcpus`` vCPUs."""
    return _FIXED_SIZE + vcpus * _PROCESSOR.size


def write_mptable(
    memory: GuestMemory,
    vcpus: int,
    *,
    cpu_signature: int = DEFAULT_CPU_SIGNATURE,
    cpu_features: int = DEFAULT_CPU_FEATURES,
) -> tuple[int, int]:
    """Write the MP floating pointer and configuration table at ``layout.MPTABLE``; return
    ``(address, size)``. Raises ``ConfigError("vcpus", ...)`` for a count it cannot describe.
    """
    if not 1 <= vcpus <= MAX_VCPUS:
        raise ConfigError("vcpus", f"{vcpus} vCPUs: kasou supports 1 to {MAX_VCPUS}")
    ioapic_id = vcpus
    entries: list[bytes] = []
    for apic_id in range(vcpus):
        flags = _CPU_ENABLED | (_CPU_BOOTSTRAP if apic_id == 0 else 0)
        entries.append(
            _PROCESSOR.pack(
                _PROCESSOR_ENTRY, apic_id, APIC_VERSION, flags, cpu_signature, cpu_features
            )
        )
    entries.append(_BUS.pack(_BUS_ENTRY, _ISA_BUS_ID, b"ISA   "))
    entries.append(
        _IOAPIC.pack(_IOAPIC_ENTRY, ioapic_id, IOAPIC_VERSION, _IOAPIC_ENABLED, IOAPIC_ADDRESS)
    )
    for irq in range(IOAPIC_PINS):
        entries.append(
            _INTERRUPT.pack(
                _IO_INTERRUPT_ENTRY, _INT, _CONFORMS_TO_BUS, _ISA_BUS_ID, irq, ioapic_id, irq
            )
        )
    # Virtual wire mode (MP spec 1.4, 3.6.2.2): the 8259 PIC reaches the CPUs through LINT0
    # as ExtINT; NMIs come in on LINT1.
    for kind, pin in ((_EXTINT, _LINT0), (_NMI, _LINT1)):
        entries.append(
            _INTERRUPT.pack(
                _LOCAL_INTERRUPT_ENTRY,
                kind,
                _CONFORMS_TO_BUS,
                _ISA_BUS_ID,
                0,
                _ALL_LOCAL_APICS,
                pin,
            )
        )
    body = b"".join(entries)
    table_address = MPTABLE + _FLOATING.size
    header = _HEADER.pack(
        b"PCMP",
        _HEADER.size + len(body),
        _SPEC_REVISION,
        0,  # checksum, filled in below
        b"KASOU   ",
        b"KASOU VM    ",
        0,  # no OEM table
        0,
        len(entries),
        LAPIC_ADDRESS,
        0,  # no extended table
        0,
        0,
    )
    table = _with_checksum(header + body, checksum_offset=7)
    # Feature byte 1 = 0: a configuration table is present (no default configuration);
    # feature byte 2 bit 7 (IMCRP) = 0: virtual wire mode, no IMCR.
    floating = _FLOATING.pack(b"_MP_", table_address, 1, _SPEC_REVISION, 0, 0, 0, bytes(3))
    floating = _with_checksum(floating, checksum_offset=10)
    data = floating + table
    assert len(data) == mptable_size(vcpus) <= MPTABLE_SIZE
    memory.write(MPTABLE, data)
    return MPTABLE, len(data)


def _with_checksum(data: bytes, checksum_offset: int) -> bytes:
    """``data`` with the byte at ``checksum_offset`` set so all bytes sum to 0 mod 256."""
    checksum = -sum(data) & 0xFF
    return data[:checksum_offset] + bytes([checksum]) + data[checksum_offset + 1 :]
