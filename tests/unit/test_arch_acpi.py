"""kasou's ACPI tables, found and read back the way an OS finds and reads them.

Each test starts where Linux starts: it scans the BIOS area for the RSDP (ACPI 6.5
§5.2.5.1), follows its pointers, checks every length and checksum, and decodes the tables
field by field (§5.2.5.3 to §5.2.12) and the DSDT's AML (chapter 20, resource data §6.4)
with a reader written here from the spec. Debian's acpica-tools are the outside oracle:
``iasl -d`` must disassemble every table without a complaint, its DSDT disassembly must
compile back to the same bytes, and ``acpiexec`` must load the set and evaluate the devices'
resources as the kernel's ACPICA would, including the VM generation ID device's ids and
address and the GPE method that notifies it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from acpica_tools import acpiexec, disassemble, iasl_compile, needs_acpica
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.arch.x86_64 import layout
from kasou.arch.x86_64.acpi import (
    MAX_VCPUS,
    AcpiConfig,
    build_acpi_tables,
    read_generation_id,
    write_acpi_tables,
    write_generation_id,
)
from kasou.errors import ConfigError
from kasou.memory import GuestMemory

START, END = layout.ACPI_START, layout.ACPI_START + layout.ACPI_SIZE
COM1, COM2 = (0x3F8, 4), (0x2F8, 3)


def virtio_slots(count: int) -> list[tuple[int, int, int]]:
    """The first ``count`` slots as the builder lays them out."""
    return [
        (layout.virtio_mmio_address(slot), layout.VIRTIO_MMIO_SIZE, layout.VIRTIO_IRQS[slot])
        for slot in range(count)
    ]


def typical(vcpus: int = 2, virtio: int = 3) -> AcpiConfig:
    return AcpiConfig(vcpus=vcpus, serial=[COM1, COM2], virtio=virtio_slots(virtio))


# --- Reading the tables back -------------------------------------------------------------


@dataclass
class Tables:
    rsdp: tuple[int, ...]  # revision, RSDT address, length, XSDT address
    xsdt: list[int]
    rsdt: list[int]
    by_signature: dict[bytes, tuple[int, bytes]]  # signature -> (address, table)
    facs: tuple[int, bytes]

    def table(self, signature: bytes) -> bytes:
        return self.by_signature[signature][1]


def read_table(memory: GuestMemory, address: int, signature: bytes | None = None) -> bytes:
    """The table at ``address``, after checking its header, length and checksum (§5.2.6)."""
    assert address >= START and address + 36 <= END
    header = memory.read(address, 36)
    if signature is not None:
        assert header[:4] == signature
    (length,) = struct.unpack_from("<I", header, 4)
    assert length >= 36 and address + length <= END
    table = memory.read(address, length)
    assert sum(table) % 256 == 0, f"{table[:4]!r} checksum"
    assert table[10:16] == b"KASOU " and table[16:24] == b"KASOU VM"
    return table


def find_tables(memory: GuestMemory) -> Tables:
    # Linux's acpi_find_root_pointer(): 16-byte boundaries of 0xe0000-0xfffff, a signature
    # and a valid ACPI 1.0 checksum.
    area = memory.read(0xE0000, 0x20000)
    found = [
        offset
        for offset in range(0, len(area), 16)
        if area[offset : offset + 8] == b"RSD PTR " and sum(area[offset : offset + 20]) % 256 == 0
    ]
    assert found == [START - 0xE0000]
    rsdp = memory.read(START, 36)
    assert sum(rsdp) % 256 == 0  # the extended checksum covers all 36 bytes
    assert rsdp[9:15] == b"KASOU " and bytes(rsdp[33:36]) == bytes(3)
    revision, rsdt_address, length, xsdt_address = struct.unpack_from("<BIIQ", rsdp, 15)
    assert (revision, length) == (2, 36)
    xsdt = read_table(memory, xsdt_address, b"XSDT")
    rsdt = read_table(memory, rsdt_address, b"RSDT")
    assert (xsdt[8], rsdt[8]) == (1, 1)
    xsdt_entries = list(struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36))
    rsdt_entries = list(struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36))
    assert (len(xsdt) - 36) % 8 == 0 and (len(rsdt) - 36) % 4 == 0
    by_signature: dict[bytes, tuple[int, bytes]] = {}
    for address in xsdt_entries:
        table = read_table(memory, address)
        assert table[:4] not in by_signature
        by_signature[table[:4]] = (address, table)
    fadt = by_signature[b"FACP"][1]
    facs_address, dsdt_address = struct.unpack_from("<II", fadt, 36)
    (x_dsdt,) = struct.unpack_from("<Q", fadt, 140)
    assert x_dsdt == dsdt_address
    by_signature[b"DSDT"] = (dsdt_address, read_table(memory, dsdt_address, b"DSDT"))
    # §5.2.10: 64 bytes or more, 64-byte aligned, no checksum.
    assert facs_address % 64 == 0 and facs_address >= START and facs_address + 64 <= END
    facs = memory.read(facs_address, 64)
    return Tables(
        rsdp=(revision, rsdt_address, length, xsdt_address),
        xsdt=xsdt_entries,
        rsdt=rsdt_entries,
        by_signature=by_signature,
        facs=(facs_address, facs),
    )


def load(config: AcpiConfig) -> Tables:
    memory = GuestMemory.create([(0, 1 << 20)])
    try:
        memory.fill(0xE0000, 0x20000, 0xA5)  # what the tables do not overwrite stays visible
        assert write_acpi_tables(memory, config) == START
        return find_tables(memory)
    finally:
        memory.close()


@dataclass
class Madt:
    lapic_address: int
    flags: int
    local_apics: list[tuple[int, int, int]] = field(default_factory=list)  # uid, id, flags
    ioapics: list[tuple[int, int, int]] = field(default_factory=list)  # id, address, GSI base
    overrides: list[tuple[int, int, int, int]] = field(default_factory=list)  # bus, irq, gsi, fl
    nmis: list[tuple[int, int, int]] = field(default_factory=list)  # uid, flags, LINT#


def parse_madt(table: bytes) -> Madt:
    assert table[8] == 6  # revision for ACPI 6.5
    madt = Madt(*struct.unpack_from("<II", table, 36))
    offset = 44
    while offset < len(table):
        kind, length = table[offset], table[offset + 1]
        entry = table[offset : offset + length]
        assert length >= 2 and offset + length <= len(table)
        if kind == 0:
            assert length == 8
            uid, apic_id, flags = struct.unpack_from("<BBI", entry, 2)
            madt.local_apics.append((uid, apic_id, flags))
        elif kind == 1:
            assert length == 12 and entry[3] == 0
            madt.ioapics.append(struct.unpack_from("<BxII", entry, 2))
        elif kind == 2:
            assert length == 10
            madt.overrides.append(struct.unpack_from("<BBIH", entry, 2))
        elif kind == 4:
            assert length == 6
            madt.nmis.append(struct.unpack_from("<BHB", entry, 2))
        else:
            raise AssertionError(f"unexpected MADT entry type {kind}")
        offset += length
    assert offset == len(table)
    return madt


# An AML reader for the subset a static DSDT uses (ACPI 6.5 §20.2).

DEVICE = "Device"
Value = int | str | bytes | list["Value"] | tuple[str, int, bytes]


def pkg_length(data: bytes, offset: int) -> tuple[int, int]:
    """(PkgLength value, offset after it)."""
    lead = data[offset]
    following = lead >> 6
    if not following:
        return lead & 0x3F, offset + 1
    value = lead & 0x0F
    for index in range(following):
        value |= data[offset + 1 + index] << (4 + 8 * index)
    return value, offset + 1 + following


def name_path(data: bytes, offset: int) -> tuple[str, int]:
    prefix = ""
    if data[offset] == 0x5C:
        prefix, offset = "\\", offset + 1
    while data[offset] == 0x5E:
        prefix, offset = prefix + "^", offset + 1
    if data[offset] == 0x00:
        count, offset = 0, offset + 1
    elif data[offset] == 0x2E:
        count, offset = 2, offset + 1
    elif data[offset] == 0x2F:
        count, offset = data[offset + 1], offset + 2
    else:
        count = 1
    segments = [data[offset + 4 * i : offset + 4 * i + 4].decode("ascii") for i in range(count)]
    return prefix + ".".join(segments), offset + 4 * count


def resolve(scope: str, path: str) -> str:
    if path.startswith("\\"):
        return path
    parts = scope.strip("\\").split(".") if scope != "\\" else []
    while path.startswith("^"):
        parts.pop()
        path = path[1:]
    return "\\" + ".".join([*parts, path])


def data_object(data: bytes, offset: int) -> tuple[Value, int]:
    op = data[offset]
    if op in (0x00, 0x01):
        return op, offset + 1
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    if op in sizes:
        end = offset + 1 + sizes[op]
        return int.from_bytes(data[offset + 1 : end], "little"), end
    if op == 0x0D:
        end = data.index(b"\x00", offset + 1)
        return data[offset + 1 : end].decode("ascii"), end + 1
    if op in (0x11, 0x12):
        length, inner = pkg_length(data, offset + 1)
        end = offset + 1 + length
        if op == 0x11:
            size, inner = data_object(data, inner)
            assert size == end - inner, "BufferSize matches the bytes that follow"
            return data[inner:end], end
        count, inner = data[inner], inner + 1
        elements: list[Value] = []
        while inner < end:
            element, inner = data_object(data, inner)
            elements.append(element)
        assert inner == end and len(elements) == count
        return elements, end
    raise AssertionError(f"unexpected data opcode {op:#x} at {offset}")


def term_list(data: bytes, offset: int, end: int, scope: str, out: dict[str, Value]) -> None:
    while offset < end:
        op = data[offset]
        if op == 0x10 or data[offset : offset + 2] == b"\x5b\x82":  # Scope, Device
            start = offset + (1 if op == 0x10 else 2)
            length, inner = pkg_length(data, start)
            path, inner = name_path(data, inner)
            full = resolve(scope, path)
            if op != 0x10:
                assert full not in out
                out[full] = DEVICE
            term_list(data, inner, start + length, full, out)
            offset = start + length
        elif op == 0x08:  # Name
            path, inner = name_path(data, offset + 1)
            full = resolve(scope, path)
            assert full not in out
            out[full], offset = data_object(data, inner)
        elif op == 0x14:  # Method: PkgLength, NameString, MethodFlags, TermList
            length, inner = pkg_length(data, offset + 1)
            path, inner = name_path(data, inner)
            full = resolve(scope, path)
            assert full not in out
            end_of_method = offset + 1 + length
            out[full] = ("Method", data[inner], data[inner + 1 : end_of_method])
            offset = end_of_method
        else:
            raise AssertionError(f"unexpected opcode {op:#x} at {offset}")
    assert offset == end


def namespace(dsdt: bytes) -> dict[str, Value]:
    assert dsdt[8] == 2  # 64-bit integers
    out: dict[str, Value] = {}
    term_list(dsdt, 36, len(dsdt), "\\", out)
    return out


def resources(template: Value) -> list[tuple[object, ...]]:
    """Decode a ResourceTemplate buffer (§6.4) up to its End Tag."""
    assert isinstance(template, bytes)
    items: list[tuple[object, ...]] = []
    offset = 0
    while True:
        tag = template[offset]
        if tag & 0x80:  # large item
            (length,) = struct.unpack_from("<H", template, offset + 1)
            body, offset = template[offset + 3 : offset + 3 + length], offset + 3 + length
            if tag == 0x86:
                writable, base, size = struct.unpack("<BII", body)
                items.append(("Memory32Fixed", writable, base, size))
            elif tag == 0x89:
                flags, count = body[0], body[1]
                assert length == 2 + 4 * count
                gsis = list(struct.unpack_from(f"<{count}I", body, 2))
                items.append(("Interrupt", flags, gsis))
            else:
                raise AssertionError(f"unexpected large item {tag:#x}")
        else:
            kind, length = tag >> 3, tag & 7
            body, offset = template[offset + 1 : offset + 1 + length], offset + 1 + length
            if kind == 0x0F:  # End Tag
                assert length == 1 and offset == len(template)
                return items
            if kind == 0x04:  # IRQ
                (mask,) = struct.unpack_from("<H", body)
                assert length == 2, "IRQNoFlags: edge, active high"
                items.append(("IRQ", [irq for irq in range(16) if mask >> irq & 1]))
            elif kind == 0x08:  # I/O port
                items.append(("IO", *struct.unpack("<BHHBB", body)))
            else:
                raise AssertionError(f"unexpected small item {kind:#x}")


def eisa(pnp_id: str) -> int:
    """EISAID compression, as the ASL reference describes it, written out independently."""
    letters = (ord(c) - ord("A") + 1 for c in pnp_id[:3])
    a, b, c = letters
    first = a << 2 | b >> 3
    second = (b & 7) << 5 | c
    return first | second << 8 | int(pnp_id[3:5], 16) << 16 | int(pnp_id[5:7], 16) << 24


# \\_SB.VGEN and \\_GPE._E00, spelled out from the spec (§20.2.5.2, §20.2.5.3): MethodFlags 0
# (no arguments, not serialized); NotifyOp 0x86, the root-anchored dual name \\_SB_.VGEN and
# the value 0x80 as a ByteConst.
NOTIFY_VGEN_0X80 = b"\x86" + b"\\" + b"\x2e" + b"_SB_VGEN" + b"\x0a\x80"


def expected_namespace(config: AcpiConfig) -> dict[str, object]:
    expected: dict[str, object] = {"\\_S5_": [0, 0, 0, 0]}
    for index, (port, irq) in enumerate(config.serial):
        com = f"\\_SB_.COM{index + 1}"
        expected[com] = DEVICE
        expected[f"{com}._HID"] = eisa("PNP0501")
        expected[f"{com}._UID"] = index + 1
        expected[f"{com}._CRS"] = [("IO", 1, port, port, 1, 8), ("IRQ", [irq])]
    if config.i8042:
        expected["\\_SB_.PS2K"] = DEVICE
        expected["\\_SB_.PS2K._HID"] = eisa("PNP0303")
        expected["\\_SB_.PS2K._CRS"] = [
            ("IO", 1, 0x60, 0x60, 1, 1),
            ("IO", 1, 0x64, 0x64, 1, 1),
            ("IRQ", [1]),
        ]
    if config.rtc:
        expected["\\_SB_.RTC_"] = DEVICE
        expected["\\_SB_.RTC_._HID"] = eisa("PNP0B00")
        expected["\\_SB_.RTC_._CRS"] = [("IO", 1, 0x70, 0x70, 1, 2)]
    for index, (base, size, gsi) in enumerate(config.virtio):
        device = f"\\_SB_.VR{index:02X}"
        expected[device] = DEVICE
        expected[f"{device}._HID"] = "LNRO0005"
        expected[f"{device}._UID"] = index
        # Interrupt flags: consumer (bit 0) and edge (bit 1); active high, exclusive.
        expected[f"{device}._CRS"] = [("Memory32Fixed", 1, base, size), ("Interrupt", 3, [gsi])]
    if config.vmgenid:
        expected["\\_SB_.VGEN"] = DEVICE
        expected["\\_SB_.VGEN._HID"] = "KASO0001"
        expected["\\_SB_.VGEN._CID"] = "VM_Gen_Counter"
        expected["\\_SB_.VGEN._DDN"] = "VM_Gen_Counter"
        expected["\\_SB_.VGEN.ADDR"] = [layout.VMGENID_ADDRESS & 0xFFFF_FFFF, 0]
        expected["\\_GPE._E00"] = ("Method", 0, NOTIFY_VGEN_0X80)
    return expected


def decoded_namespace(tables: Tables) -> dict[str, object]:
    space = namespace(tables.table(b"DSDT"))
    return {
        path: resources(value) if path.endswith("._CRS") else value for path, value in space.items()
    }


def check_consistent(config: AcpiConfig, tables: Tables) -> None:
    """Everything a config implies, read back from the tables."""
    assert tables.xsdt == tables.rsdt
    assert sorted(tables.by_signature) == [b"APIC", b"DSDT", b"FACP"]
    assert {tables.by_signature[s][0] for s in (b"FACP", b"APIC")} == set(tables.xsdt)
    madt = parse_madt(tables.table(b"APIC"))
    assert madt.local_apics == [(n, n, 1) for n in range(config.vcpus)]
    assert madt.ioapics == [(config.vcpus, layout.IOAPIC_ADDRESS, 0)]
    assert madt.overrides == [(0, config.sci_irq, config.sci_irq, 0b1101)]
    assert decoded_namespace(tables) == expected_namespace(config)


# --- The tables ---------------------------------------------------------------------------


def test_rsdp_points_at_an_xsdt_and_rsdt_listing_every_table_inside_the_area() -> None:
    config = typical()
    tables = load(config)
    check_consistent(config, tables)
    _, rsdt, _, xsdt = tables.rsdp
    addresses = [xsdt, rsdt, tables.facs[0]] + [a for a, _ in tables.by_signature.values()]
    assert all(START <= address < END for address in addresses)
    assert all(address % 16 == 0 for address in addresses)
    image = build_acpi_tables(config)
    assert len(image) <= layout.ACPI_SIZE
    # Built for another base, the pointers move with it.
    moved = build_acpi_tables(config, base=0x200000)
    assert len(moved) == len(image)
    assert struct.unpack_from("<Q", moved, 24) == (xsdt - START + 0x200000,)


def test_tables_do_not_spill_past_what_build_returns() -> None:
    memory = GuestMemory.create([(0, 1 << 20)])
    memory.fill(0xE0000, 0x20000, 0xA5)
    image = build_acpi_tables(typical())
    write_acpi_tables(memory, typical())
    assert memory.read(START, len(image)) == image
    assert memory.read(START + len(image), 0x100) == b"\xa5" * 0x100
    memory.close()


def test_fadt_describes_the_pm_registers_sci_and_flags() -> None:
    tables = load(typical())
    fadt = tables.table(b"FACP")
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5  # revision 6.5
    facs, dsdt = struct.unpack_from("<II", fadt, 36)
    assert facs == tables.facs[0] and dsdt == tables.by_signature[b"DSDT"][0]
    assert struct.unpack_from("<QQ", fadt, 132) == (0, dsdt)  # X_FIRMWARE_CTRL zero, X_DSDT
    preferred_profile, sci, smi_cmd = struct.unpack_from("<BHI", fadt, 45)
    assert (preferred_profile, sci, smi_cmd) == (0, 9, 0)
    assert fadt[52:56] == bytes(4)  # ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
    blocks = struct.unpack_from("<8I", fadt, 56)
    # PM1a_EVT, PM1b_EVT, PM1a_CNT, PM1b_CNT, PM2_CNT, PM_TMR, GPE0, GPE1
    assert blocks == (0x600, 0, 0x604, 0, 0, 0x608, 0x60C, 0)
    lengths = struct.unpack_from("<8B", fadt, 88)
    # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN, GPE0_BLK_LEN, GPE1_BLK_LEN,
    # GPE1_BASE, CST_CNT: GPE0 is one status and one enable byte (GPEs 0-7).
    assert lengths == (4, 2, 0, 4, 2, 0, 0, 0)
    p_lvl2, p_lvl3 = struct.unpack_from("<HH", fadt, 96)
    assert p_lvl2 > 100 and p_lvl3 > 1000  # no C2, no C3
    assert fadt[108] == 0x32  # CENTURY: the RTC's century byte
    (boot_arch,) = struct.unpack_from("<H", fadt, 109)
    assert boot_arch == 0b111  # legacy devices, 8042, VGA not present; CMOS RTC present
    (flags,) = struct.unpack_from("<I", fadt, 112)
    wbinvd, proc_c1, pwr_button, slp_button, tmr_val_ext = 0, 2, 4, 5, 8
    assert flags == 1 << wbinvd | 1 << proc_c1 | 1 << slp_button | 1 << tmr_val_ext
    assert not flags & 1 << pwr_button  # the fixed-feature power button
    assert fadt[116:131] == bytes(15)  # no reset register
    gas = {
        offset: struct.unpack_from("<BBBBQ", fadt, offset)
        for offset in range(148, 268, 12)  # X_PM1a_EVT_BLK .. SLEEP_STATUS_REG
    }
    assert gas.pop(148) == (1, 32, 0, 2, 0x600)  # system I/O, 32 bits, word access
    assert gas.pop(172) == (1, 16, 0, 2, 0x604)
    assert gas.pop(208) == (1, 32, 0, 3, 0x608)  # dword access
    assert gas.pop(220) == (1, 16, 0, 1, 0x60C)  # X_GPE0_BLK: 16 bits, byte access
    assert all(value == (0, 0, 0, 0, 0) for value in gas.values())
    assert fadt[268:276] == b"KASOU   "


def test_fadt_and_dsdt_follow_the_config() -> None:
    config = AcpiConfig(
        vcpus=1,
        serial=[],
        virtio=[],
        pm1a_event=0xB000,
        pm1a_control=0xB004,
        pm_timer=0xB008,
        gpe0_block=0xB010,
        sci_irq=10,
        i8042=False,
        rtc=False,
        vmgenid=False,
    )
    tables = load(config)
    check_consistent(config, tables)
    fadt = tables.table(b"FACP")
    assert struct.unpack_from("<H", fadt, 46) == (10,)
    assert struct.unpack_from("<8I", fadt, 56) == (0xB000, 0, 0xB004, 0, 0, 0xB008, 0xB010, 0)
    # The GPE0 block is hardware and stays; only the device and its GPE method go.
    assert struct.unpack_from("<BBBBQ", fadt, 220) == (1, 16, 0, 1, 0xB010)
    assert fadt[108] == 0  # no century byte
    assert struct.unpack_from("<H", fadt, 109) == (0b100101,)  # no 8042, CMOS RTC not present
    assert decoded_namespace(tables) == {"\\_S5_": [0, 0, 0, 0]}


def test_facs_is_64_bytes_and_64_byte_aligned() -> None:
    address, facs = load(typical()).facs
    assert address % 64 == 0
    assert facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4) == (64,)
    assert facs[32] == 2  # version
    assert facs[8:32] == bytes(24) and facs[33:] == bytes(31)  # no vectors, lock free, no flags


@pytest.mark.parametrize("vcpus", [1, 2, 64, MAX_VCPUS])
def test_madt_has_a_local_apic_per_vcpu_the_ioapic_and_the_sci_override(vcpus: int) -> None:
    madt = parse_madt(load(typical(vcpus=vcpus)).table(b"APIC"))
    assert madt.lapic_address == 0xFEE00000 and madt.flags == 1  # PCAT_COMPAT
    assert madt.local_apics == [(n, n, 1) for n in range(vcpus)]  # UID = APIC id, enabled
    assert madt.ioapics == [(vcpus, 0xFEC00000, 0)]
    # Bus 0 (ISA), IRQ 9 -> GSI 9, active high (01) and level-triggered (11 << 2). No
    # override for IRQ 0: the PIT is on pin 0 (mptable.py).
    assert madt.overrides == [(0, 9, 9, 0b1101)]
    assert madt.nmis == [(0xFF, 0, 1)]  # every processor, LINT1


def test_dsdt_describes_com_ports_legacy_devices_virtio_slots_and_s5() -> None:
    config = typical(virtio=16)
    space = decoded_namespace(load(config))
    assert space == expected_namespace(config)
    assert space["\\_SB_.COM1._CRS"] == [("IO", 1, 0x3F8, 0x3F8, 1, 8), ("IRQ", [4])]
    assert space["\\_SB_.VR0F._CRS"] == [
        ("Memory32Fixed", 1, 0xD000_F000, 0x1000),
        ("Interrupt", 3, [layout.VIRTIO_IRQS[15]]),
    ]


def test_layout_reserves_the_area_and_keeps_the_sci_off_virtio_lines() -> None:
    assert ("acpi tables", 0xE0000, 0x1F000) in layout.BOOT_AREAS
    assert (layout.ACPI_START, layout.ACPI_SIZE, layout.IRQ_SCI) == (0xE0000, 0x1F000, 9)
    assert layout.IRQ_SCI not in layout.VIRTIO_IRQS
    assert AcpiConfig(1, [], []).sci_irq == layout.IRQ_SCI
    # The whole area is e820-reserved in every guest, so the OS leaves the tables alone.
    reserved = [
        (start, size)
        for start, size, kind in layout.e820_map(layout.ram_layout(layout.MIN_MEMORY))
        if kind == layout.E820_RESERVED
    ]
    assert any(start <= START and start + size >= END for start, size in reserved)


# --- The VM generation ID ----------------------------------------------------------------


def generation_id_address(tables: Tables) -> int:
    """Where Linux's vmgenid_add looks: ADDR's low and high 32 bits."""
    package = namespace(tables.table(b"DSDT"))["\\_SB_.VGEN.ADDR"]
    assert isinstance(package, list) and len(package) == 2
    low, high = package
    assert isinstance(low, int) and isinstance(high, int)
    assert low <= 0xFFFF_FFFF and high <= 0xFFFF_FFFF
    return high << 32 | low


@pytest.mark.parametrize("memory", [layout.MIN_MEMORY, 5 << 30])
def test_the_generation_id_sits_in_reserved_memory_the_os_leaves_alone(memory: int) -> None:
    config = typical()
    address = generation_id_address(load(config))
    assert address == layout.VMGENID_ADDRESS
    # The paper's rules (QEMU's docs/specs/vmgenid.rst R1a-R1d): 8-byte aligned, in guest
    # RAM, apart from what the OS uses, covered by no e820 RAM (or ACPI) entry.
    assert address % 8 == 0
    e820 = layout.e820_map(layout.ram_layout(memory))
    covering = [kind for start, size, kind in e820 if start <= address < start + size]
    assert covering == [layout.E820_RESERVED]
    ram = layout.ram_layout(memory)
    assert any(start <= address and address + 16 <= start + size for start, size in ram)
    # Past every table kasou writes, on a page of its own among the boot areas.
    assert START + len(build_acpi_tables(config)) <= address
    assert ("vm generation id", address, 0x1000) in layout.BOOT_AREAS


def test_write_generation_id_puts_16_bytes_where_addr_points() -> None:
    memory = GuestMemory.create([(0, 1 << 20)])
    try:
        config = typical()
        write_acpi_tables(memory, config)
        tables = find_tables(memory)
        address = generation_id_address(tables)
        first, second = bytes(range(16)), bytes(range(0xF0, 0x100))
        write_generation_id(memory, first)
        assert memory.read(address, 16) == first == read_generation_id(memory)
        write_generation_id(memory, second)
        assert memory.read(address, 16) == second
        # The tables are untouched, byte for byte.
        image = build_acpi_tables(config)
        assert memory.read(START, len(image)) == image
        for size in (0, 15, 17, 32):
            with pytest.raises(ValueError, match="16 bytes"):
                write_generation_id(memory, bytes(size))
        assert read_generation_id(memory) == second
    finally:
        memory.close()


def test_without_the_generation_id_no_device_and_no_gpe_method() -> None:
    config = typical()._replace(vmgenid=False)
    space = decoded_namespace(load(config))
    assert space == expected_namespace(config)
    assert not any("VGEN" in path or "_GPE" in path for path in space)


# --- What cannot be described ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"vcpus": 0}, "vcpus", "1 to 254"),
        ({"vcpus": MAX_VCPUS + 1}, "vcpus", "1 to 254"),
        ({"serial": [COM1, COM2, (0x3E8, 5), (0x2E8, 7), (0x3E0, 11)]}, "serial", "COM1-COM4"),
        ({"serial": [(0x3F8, 16)]}, "serial", "ISA IRQ"),
        ({"serial": [(0xFFFC, 4)]}, "serial", "0xffff"),
        ({"serial": [COM1, (0x3FC, 3)]}, "acpi", "COM1 at 0x3f8+0x8 overlaps COM2"),
        ({"serial": [COM1, (0x2F8, 4)]}, "serial", "COM1 already uses"),
        ({"sci_irq": 0}, "acpi", "SCI on IRQ 0"),
        ({"sci_irq": 2}, "acpi", "SCI on IRQ 2"),
        ({"sci_irq": 16}, "acpi", "SCI on IRQ 16"),
        ({"sci_irq": 4}, "acpi", "COM1 already uses"),
        ({"sci_irq": 1}, "acpi", "the i8042 already uses"),
        ({"virtio": [(0xD000_0000, 0x1000, 9)]}, "virtio", "the ACPI SCI already uses"),
        ({"virtio": [(0xD000_0000, 0x1000, 4)]}, "virtio", "COM1 already uses"),
        ({"virtio": [(0xD000_0000, 0x1000, 8)]}, "virtio", "the RTC already uses"),
        ({"virtio": [(0xD000_0000, 0x1000, 0)]}, "virtio", "the PIT already uses"),
        ({"virtio": [(0xD000_0000, 0x1000, 24)]}, "virtio", "pins 0 to 23"),
        ({"virtio": [(0xFFFF_F000, 0x2000, 5)]}, "virtio", "below 4 GiB"),
        ({"virtio": [(0xD000_0000, 0, 5)]}, "virtio", "below 4 GiB"),
        ({"virtio": [(0xD000_0000, 0x1000, 5), (0xD000_0800, 0x1000, 6)]}, "virtio", "overlaps"),
        ({"virtio": [(0xD000_0000, 0x1000, 5), (0xD000_1000, 0x1000, 5)]}, "virtio", "uses"),
        ({"pm1a_event": 0}, "acpi", "PM1a_EVT_BLK"),
        ({"pm_timer": 0xFFFE}, "acpi", "PM_TMR_BLK"),
        ({"pm1a_control": 0x602}, "acpi", "overlaps"),
        ({"pm_timer": 0x3FC}, "acpi", "overlaps"),
        ({"pm1a_event": 0x62}, "acpi", "overlaps"),
        ({"gpe0_block": 0}, "acpi", "GPE0_BLK"),
        ({"gpe0_block": 0xFFFF}, "acpi", "GPE0_BLK"),
        ({"gpe0_block": 0x60B}, "acpi", "PM_TMR_BLK at 0x608+0x4 overlaps GPE0_BLK"),
    ],
)
def test_configs_the_tables_cannot_describe(
    change: dict[str, Any], field: str, message: str
) -> None:
    config = typical()._replace(**change)
    with pytest.raises(ConfigError) as error:
        build_acpi_tables(config)
    assert error.value.field == field
    assert message in str(error.value)


def test_devices_a_config_leaves_out_free_their_lines_and_ports() -> None:
    # Without the i8042 and RTC their IRQs and ports are free for others.
    config = AcpiConfig(
        vcpus=1, serial=[], virtio=[(0xD000_0000, 0x1000, 1)], pm1a_event=0x60, sci_irq=8
    )._replace(i8042=False, rtc=False, pm1a_control=0x70, pm_timer=0x74)
    check_consistent(config, load(config))


@pytest.mark.parametrize("base", [0xE0010, -64])
def test_base_must_be_64_byte_aligned(base: int) -> None:
    with pytest.raises(ValueError, match="aligned"):
        build_acpi_tables(typical(), base=base)


def test_tables_must_stay_below_4_gib() -> None:
    with pytest.raises(ValueError, match="4 GiB"):
        build_acpi_tables(typical(), base=(1 << 32) - 0x400)


# --- Any vCPU count, any set of virtio devices ---------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    vcpus=st.integers(1, MAX_VCPUS),
    slots=st.lists(st.integers(0, layout.VIRTIO_MMIO_SLOTS - 1), unique=True, max_size=16),
    irqs=st.permutations(layout.VIRTIO_IRQS),
    serial=st.sampled_from([[], [COM1], [COM1, COM2]]),
    legacy=st.booleans(),
    vmgenid=st.booleans(),
)
def test_any_config_reads_back_consistently_and_fits(
    vcpus: int,
    slots: list[int],
    irqs: list[int],
    serial: list[tuple[int, int]],
    legacy: bool,
    vmgenid: bool,
) -> None:
    virtio = [
        (layout.virtio_mmio_address(slot), layout.VIRTIO_MMIO_SIZE, irq)
        for slot, irq in zip(slots, irqs, strict=False)
    ]
    config = AcpiConfig(vcpus, serial, virtio, i8042=legacy, rtc=legacy, vmgenid=vmgenid)
    assert len(build_acpi_tables(config)) <= layout.ACPI_SIZE
    check_consistent(config, load(config))


# --- The ACPICA oracle ---------------------------------------------------------------------


def table_files(config: AcpiConfig) -> dict[str, bytes]:
    """Each table as its own file's bytes, found through the RSDP and the FADT."""
    tables = load(config)
    _, rsdt, _, xsdt = tables.rsdp
    image = build_acpi_tables(config)

    def at(address: int) -> bytes:
        offset = address - START
        (length,) = struct.unpack_from("<I", image, offset + 4)
        return image[offset : offset + length]

    return {
        "xsdt": at(xsdt),
        "rsdt": at(rsdt),
        "facp": tables.table(b"FACP"),
        "apic": tables.table(b"APIC"),
        "dsdt": tables.table(b"DSDT"),
        "facs": tables.facs[1],
    }


@needs_acpica
@pytest.mark.parametrize("vcpus", [1, 2, 64])
def test_iasl_disassembles_every_table_without_complaint(vcpus: int, tmp_path: Path) -> None:
    files = table_files(typical(vcpus=vcpus, virtio=4))
    listings = {name: disassemble(table, tmp_path, name) for name, table in files.items()}
    madt = listings["apic"]
    assert madt.count("Subtable Type : 00 [Processor Local APIC]") == vcpus
    assert f"I/O Apic ID : {vcpus:02X}" in madt
    assert "Address : FEC00000 Interrupt : 00000000" in madt
    assert "Source : 09 Interrupt : 00000009 Flags (decoded below) : 000D" in madt
    assert "Subtable Type : 04 [Local APIC NMI]" in madt
    fadt = listings["facp"]
    for expected in (
        "Revision : 06",
        "SCI Interrupt : 0009",
        "SMI Command Port : 00000000",
        "PM1A Event Block Address : 00000600",
        "PM1A Control Block Address : 00000604",
        "PM Timer Block Address : 00000608",
        "GPE0 Block Address : 0000060C",
        "GPE0 Block Length : 02",
        "GPE1 Block Address : 00000000",
        "GPE0 Block : [Generic Address Structure] Space ID : 01 [SystemIO] Bit Width : 10 "
        "Bit Offset : 00 Encoded Access Width : 01 [Byte Access:8] "
        "Address : 000000000000060C",
        "8042 Present on ports 60/64 (V2) : 1",
        "VGA Not Present (V4) : 1",
        "Control Method Power Button (V1) : 0",
        "Control Method Sleep Button (V1) : 1",
        "32-bit PM Timer (V1) : 1",
        "Hardware Reduced (V5) : 0",
        "FADT Minor Revision : 05",
    ):
        assert expected in fadt
    assert "Version : 02" in listings["facs"]
    for root in ("xsdt", "rsdt"):
        assert listings[root].count("ACPI Table Address") == 2


@needs_acpica
def test_iasl_round_trips_the_dsdt(tmp_path: Path) -> None:
    config = typical(virtio=16)
    dsdt = table_files(config)["dsdt"]
    source = disassemble(dsdt, tmp_path, "dsdt")
    for index, (port, irq) in enumerate(config.serial):
        assert (
            f'Device (COM{index + 1}) {{ Name (_HID, EisaId ("PNP0501")) '
            f"Name (_UID, {'One' if index == 0 else f'0x{index + 1:02X}'}) "
            f"Name (_CRS, ResourceTemplate () {{ IO (Decode16, 0x{port:04X}, 0x{port:04X}, "
            f"0x01, 0x08, ) IRQNoFlags () {{{irq}}} }}) }}"
        ) in source
    assert 'Name (_HID, EisaId ("PNP0303"))' in source
    assert "IO (Decode16, 0x0060, 0x0060, 0x01, 0x01, )" in source
    assert "IO (Decode16, 0x0064, 0x0064, 0x01, 0x01, ) IRQNoFlags () {1}" in source
    assert (
        'Device (RTC) { Name (_HID, EisaId ("PNP0B00")) Name (_CRS, ResourceTemplate () '
        "{ IO (Decode16, 0x0070, 0x0070, 0x01, 0x02, ) }) }"
    ) in source
    for index, (base, size, gsi) in enumerate(config.virtio):
        assert (
            f'Device (VR{index:02X}) {{ Name (_HID, "LNRO0005") '
            f"Name (_CRS, ResourceTemplate () {{ Memory32Fixed (ReadWrite, 0x{base:08X}, "
            f"0x{size:08X}, ) Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) "
            f"{{ 0x{gsi:08X}, }} }}) }}"
        ) in source.replace(f"Name (_UID, {_asl_integer(index)}) ", "")
    assert "Name (\\_S5, Package (0x04) { Zero, Zero, Zero, Zero })" in source
    assert (
        'Device (VGEN) { Name (_HID, "KASO0001") Name (_CID, "VM_Gen_Counter") '
        'Name (_DDN, "VM_Gen_Counter") Name (ADDR, Package (0x02) { 0x000FF000, Zero }) }'
    ) in source
    assert (
        "Scope (\\_GPE) { Method (_E00, 0, NotSerialized) { Notify (\\_SB.VGEN, 0x80) } }"
    ) in source
    # iasl checks _HID strings: a vendor prefix and four hex digits (ACPI 6.5 §6.1.5).
    assert iasl_compile(tmp_path, "dsdt.dsl", "recompiled")[36:] == dsdt[36:]


def _asl_integer(value: int) -> str:
    return {0: "Zero", 1: "One"}.get(value, f"0x{value:02X}")


@needs_acpica
def test_acpica_loads_the_tables_and_reads_the_devices_resources(tmp_path: Path) -> None:
    config = typical(vcpus=4, virtio=2)
    files = table_files(config)
    commands = "; ".join(
        ["evaluate \\_S5", "resources \\_SB.COM1", "resources \\_SB.VR01", "namespace"]
    )
    lines = acpiexec(tmp_path, [(n, files[n]) for n in ("facp", "dsdt", "apic")], commands)
    text = " ".join(" ".join(lines).split())
    assert "ACPI: FACP" in text and "ACPI: APIC" in text and "ACPI: DSDT" in text
    assert "[Package] Contains 4 Elements: " + "[Integer] = 0000000000000000 " * 4 in text
    assert (
        "Address Minimum : 03F8 Address Maximum : 03F8 Alignment : 01 Address Length : 08" in text
    )
    assert "Interrupt Count : 01 Interrupt List : 4" in text
    assert "Address : D0001000 Address Length : 00001000" in text
    assert "Triggering : Edge Polarity : ActiveHigh Sharing : Exclusive" in text
    assert f"Dword00 : {layout.VIRTIO_IRQS[1]:08X}" in text
    for device in ("COM1", "COM2", "PS2K", "RTC_", "VR00", "VR01", "VGEN"):
        assert any(f" {device} Device " in line for line in lines)
    # The FADT's GPE0 block: eight GPEs on the SCI.
    assert "Initialized GPE 00 to 07 [_GPE] 1 regs on interrupt 0x9 (SCI)" in text


@needs_acpica
def test_acpica_finds_the_generation_id_device_as_linux_matches_it(tmp_path: Path) -> None:
    files = table_files(typical())
    commands = "; ".join(
        [
            "evaluate \\_SB.VGEN._HID",
            "evaluate \\_SB.VGEN._CID",
            "evaluate \\_SB.VGEN.ADDR",
            "evaluate \\_GPE._E00",
        ]
    )
    lines = acpiexec(tmp_path, [(n, files[n]) for n in ("facp", "dsdt", "apic")], commands)
    text = " ".join(" ".join(lines).split())
    assert '[String] Length 08 = "KASO0001"' in text
    # ACPICA upper-cases string _CIDs as it returns them (nsrepair2.c): the driver sees one
    # of the ids of Linux 6.1's drivers/virt/vmgenid.c ("VMGENCTR", "VM_GEN_COUNTER").
    assert '[String] Length 0E = "VM_GEN_COUNTER"' in text
    address = f"{layout.VMGENID_ADDRESS:016X}"
    assert f"[Package] Contains 2 Elements: [Integer] = {address} [Integer] = {0:016X}" in text
    # GPE 0's method notifies the device with 0x80, which the driver's notify handler gets.
    assert "Received a Device Notify on [VGEN]" in text and "Value 0x80" in text
