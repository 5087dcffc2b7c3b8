"""The MP table, parsed back as Linux's mpparse.c would (MP spec 1.4, chapter 4)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest

from kasou.arch.x86_64 import layout
from kasou.arch.x86_64.mptable import MAX_VCPUS, write_mptable
from kasou.errors import ConfigError
from kasou.memory import GuestMemory


@dataclass
class Parsed:
    processors: list[tuple[int, int, int]] = field(default_factory=list)  # id, version, flags
    buses: list[tuple[int, bytes]] = field(default_factory=list)
    ioapics: list[tuple[int, int, int, int]] = field(default_factory=list)
    io_interrupts: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    local_interrupts: list[tuple[int, int, int, int, int, int]] = field(default_factory=list)
    lapic_address: int = 0


def find_and_parse(memory: GuestMemory) -> Parsed:
    # Scan the last KiB below 640 KiB on 16-byte boundaries, like smp_scan_config().
    base = 639 * 1024
    area = memory.read(base, 1024)
    offsets = [o for o in range(0, 1024, 16) if area[o : o + 4] == b"_MP_"]
    assert len(offsets) == 1
    floating = area[offsets[0] : offsets[0] + 16]
    assert sum(floating) % 256 == 0
    physptr, length, revision = struct.unpack_from("<IBB", floating, 4)
    assert (length, revision, floating[11]) == (1, 4, 0)  # feature byte 1: table present
    header = memory.read(physptr, 44)
    assert header[:4] == b"PCMP"
    table_length, spec, _, _, _, _, _, count, lapic, ext_length = struct.unpack_from(
        "<HBB8s12sIHHIH", header, 4
    )
    assert spec == 4 and ext_length == 0
    table = memory.read(physptr, table_length)
    assert sum(table) % 256 == 0
    parsed = Parsed(lapic_address=lapic)
    offset = 44
    for _ in range(count):
        kind = table[offset]
        if kind == 0:
            _, apic_id, version, flags = struct.unpack_from("<BBBB", table, offset)
            parsed.processors.append((apic_id, version, flags))
            offset += 20
        elif kind == 1:
            parsed.buses.append((table[offset + 1], table[offset + 2 : offset + 8]))
            offset += 8
        elif kind == 2:
            _, ident, version, flags, address = struct.unpack_from("<BBBBI", table, offset)
            parsed.ioapics.append((ident, version, flags, address))
            offset += 8
        else:
            entry = struct.unpack_from("<BBHBBBB", table, offset)
            target = parsed.io_interrupts if kind == 3 else parsed.local_interrupts
            assert kind in (3, 4)
            target.append(entry[1:])
            offset += 8
    assert offset == table_length
    return parsed


@pytest.mark.parametrize("vcpus", [1, 4, MAX_VCPUS])
def test_table_describes_every_vcpu_and_the_ioapic(vcpus: int) -> None:
    memory = GuestMemory.create([(0, 1 << 20)])
    memory.fill(0x9F000, 0x1000, 0xCC)
    address, size = write_mptable(memory, vcpus)
    assert address == layout.MPTABLE and address + size <= layout.MPTABLE + layout.MPTABLE_SIZE
    parsed = find_and_parse(memory)
    assert [p[0] for p in parsed.processors] == list(range(vcpus))
    assert [p[2] for p in parsed.processors] == [0b11] + [0b01] * (vcpus - 1)  # BSP, enabled
    assert all(p[1] == 0x14 for p in parsed.processors)
    assert parsed.lapic_address == 0xFEE00000
    assert parsed.buses == [(0, b"ISA   ")]
    assert parsed.ioapics == [(vcpus, 0x11, 1, 0xFEC00000)]
    # ISA IRQ n -> IOAPIC pin n for all 24 pins, as KVM's default GSI routing has it.
    assert parsed.io_interrupts == [(0, 0, 0, irq, vcpus, irq) for irq in range(24)]
    assert parsed.local_interrupts == [(3, 0, 0, 0, 0xFF, 0), (1, 0, 0, 0, 0xFF, 1)]
    assert memory.read(0x9F000, 0xC00) == b"\xcc" * 0xC00  # nothing written below the EBDA
    memory.close()


@pytest.mark.parametrize("vcpus", [0, MAX_VCPUS + 1])
def test_vcpu_counts_the_table_cannot_describe(vcpus: int) -> None:
    memory = GuestMemory.create([(0, 1 << 20)])
    with pytest.raises(ConfigError) as error:
        write_mptable(memory, vcpus)
    assert error.value.field == "vcpus"
    memory.close()


def test_max_vcpus_is_what_8_bit_apic_ids_allow() -> None:
    assert MAX_VCPUS == 254
