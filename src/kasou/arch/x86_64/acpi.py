"""ACPI tables: how a stock kernel finds a kasou VM's CPUs, interrupts, PM registers and devices.

This module owns the ACPI 6.5 tables kasou writes into the e820-reserved area at
``layout.ACPI_START`` (chapter 5.2), laid out from there in this order, each table
16-byte aligned::

    RSDP  revision 2, at the start: the scan of 0xe0000-0xfffff finds it (§5.2.5.1), and
          boot_params.acpi_rsdp_addr points at it
    FACS  64 bytes, 64-byte aligned, unused (no S4BIOS, no waking vector, lock free)
    XSDT  64-bit pointers to the FADT and the MADT
    RSDT  the same pointers, 32-bit
    FADT  revision 6: the PM1a event and control blocks, the PM timer, the GPE0 block, the
          SCI; it points at the FACS and the DSDT
    MADT  a local APIC per vCPU, the IOAPIC, the SCI's override, NMIs on LINT1
    DSDT  AML (``aml.py``): COM ports, i8042, RTC, virtio-mmio slots and the VM generation
          ID device in \\_SB; \\_S5; \\_GPE._E00, which notifies the VM generation ID device

The hardware it describes: a PC without SMM, always in ACPI mode (no SMI_CMD), with a
PM1a event block (PM1_STS, PM1_EN), a PM1a control block (SLP_TYP/SLP_EN: power-off with
SLP_TYP 0), a 32-bit PM timer, a GPE0 block of one status and one enable byte (GPEs 0-7, of
which GPE 0 alone has a source), a fixed-feature power button and no sleep button, and the SCI
on ISA IRQ 9, level-triggered and active high. Interrupts are routed as ``mptable.py``
explains (ISA IRQ n on IOAPIC pin n; no override for IRQ 0), so the MADT overrides only the
SCI's trigger mode.

The VM generation ID (Microsoft's "Virtual Machine Generation ID" paper, 2012): 16 bytes at
``layout.VMGENID_ADDRESS`` that the host changes whenever the VM may have been duplicated (a
snapshot restored as a clone), then raising GPE 0. Linux's driver (drivers/virt/vmgenid.c)
reads the bytes when it binds, and again on the Notify(VGEN, 0x80) that ``\\_GPE._E00`` sends;
when they changed it reseeds its RNG ("crng reseeded due to virtual machine fork")::

    Device (\\_SB.VGEN) {
        Name (_HID, "KASO0001")         hypervisor-specific, as the paper asks
        Name (_CID, "VM_Gen_Counter")   what the paper's drivers (Windows, Linux, FreeBSD) match
        Name (_DDN, "VM_Gen_Counter")
        Name (ADDR, Package () { low 32 bits, high 32 bits of the address })
    }
    Scope (\\_GPE) { Method (_E00) { Notify (\\_SB.VGEN, 0x80) } }   GPE 0, edge-triggered

Linux 6.1 matches "VMGENCTR" and "VM_GEN_COUNTER" (``vmgenid_ids``; ACPI_ID_LEN is 16 since
5.18 for exactly this id). ACPICA upper-cases string _HIDs and _CIDs when it evaluates them
(``acpi_ns_repair_HID``, nsrepair2.c), so the paper's "VM_Gen_Counter" reaches the driver as
"VM_GEN_COUNTER", as it does under QEMU and Hyper-V. "VMGENCTR" is not used as the _HID: it is
no valid ACPI or PNP id (§6.1.5: a vendor prefix and four hex digits; iasl refuses it), and the
paper wants the _HID to name the hypervisor. "KASO" is the creator id of every kasou table; it
is not a registered ACPI vendor id, but no device of another vendor uses it either.

It does not model those registers (``devices/legacy/power.py`` does), choose the ports or
slots (the builder passes them in ``AcpiConfig``), decide when the generation changes (the
snapshot restore path does, with ``write_generation_id`` and the PM device's GPE), describe
PCI, processors in the namespace, sleep states other than S5, or a reset register (Linux
falls back to the i8042 reset).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from kasou.arch.x86_64 import aml
from kasou.arch.x86_64.layout import (
    ACPI_SIZE,
    ACPI_START,
    IOAPIC_ADDRESS,
    IOAPIC_PINS,
    IRQ_I8042,
    IRQ_PIT,
    IRQ_RTC,
    IRQ_SCI,
    LAPIC_ADDRESS,
    VMGENID_ADDRESS,
    VMGENID_SIZE,
)
from kasou.errors import ConfigError
from kasou.memory import GuestMemory

__all__ = [
    "MAX_SERIAL_PORTS",
    "MAX_VCPUS",
    "AcpiConfig",
    "build_acpi_tables",
    "read_generation_id",
    "write_acpi_tables",
    "write_generation_id",
]


class AcpiConfig(NamedTuple):
    """What the tables describe. Ports are I/O ports, ``gsi`` global system interrupts
    (IOAPIC pins, GSI base 0)."""

    vcpus: int
    serial: Sequence[tuple[int, int]]
    """``(port, isa irq)`` per COM port present, COM1 first."""
    virtio: Sequence[tuple[int, int, int]]
    """``(mmio base, size, gsi)`` per virtio-mmio slot."""
    pm1a_event: int = 0x600
    """Port of PM1a_EVT_BLK (4 bytes: PM1_STS, then PM1_EN)."""
    pm1a_control: int = 0x604
    """Port of PM1a_CNT_BLK (2 bytes)."""
    pm_timer: int = 0x608
    """Port of PM_TMR_BLK (4 bytes, 32-bit counter at 3.579545 MHz)."""
    gpe0_block: int = 0x60C
    """Port of GPE0_BLK (2 bytes: GPE0_STS for GPEs 0-7, then GPE0_EN)."""
    sci_irq: int = IRQ_SCI
    i8042: bool = True
    """Describe a PS/2 keyboard controller (PNP0303) at 0x60/0x64 with IRQ 1."""
    rtc: bool = True
    """Describe a CMOS RTC (PNP0B00) at 0x70 and its century byte."""
    vmgenid: bool = True
    """Describe the VM generation ID device (its 16 bytes at ``layout.VMGENID_ADDRESS``) and
    the GPE 0 method that notifies it."""


# Local APIC ids are 8 bits, 0xff is the broadcast id and the IOAPIC takes id ``vcpus``, as
# in the MP table; ACPI processor UID 0xff means "all processors" in a local APIC NMI entry.
MAX_VCPUS = 254
MAX_SERIAL_PORTS = 4  # COM1-COM4
_SERIAL_PORTS = 8  # an 8250 UART decodes 8 ports
_I8042_PORTS = ((0x60, 1), (0x64, 1))
_RTC_PORT, _RTC_PORTS = 0x70, 2
_IRQ_CASCADE = 2  # the 8259 cascade: Linux never hands ISA IRQ 2 to a device
_PM1_EVT_LEN, _PM1_CNT_LEN, _PM_TMR_LEN = 4, 2, 4
# GPE0_BLK_LEN (§5.2.9): a status register and an enable register of equal size (§4.8.4.1),
# one byte each here: GPEs 0-7.
_GPE0_BLK_LEN = 2
_RTC_CENTURY = 0x32  # CMOS index of the century byte (devices/legacy/rtc.py)

_OEM_ID = b"KASOU "
_OEM_TABLE_ID = b"KASOU VM"  # §5.2.9: the FADT's must match the RSDT's and the XSDT's
_OEM_REVISION = 1
_CREATOR_ID = b"KASO"
_CREATOR_REVISION = 1

# Root System Description Pointer (§5.2.5.3): signature, checksum of the first 20 bytes,
# OEM id, revision, RSDT address, length, XSDT address, extended checksum, reserved.
_RSDP = struct.Struct("<8sB6sBIIQB3s")
_RSDP_REVISION = 2  # ACPI 2.0 and later: XSDT address and extended checksum present
_RSDP_V1_LENGTH = 20
# System description table header (§5.2.6): signature, length, revision, checksum, OEM id,
# OEM table id, OEM revision, creator id, creator revision.
_HEADER = struct.Struct("<4sIBB6s8sI4sI")
_CHECKSUM_OFFSET = 9
# Firmware ACPI Control Structure (§5.2.10): signature, length, hardware signature, firmware
# waking vector, global lock, flags, X firmware waking vector, version, reserved, OSPM flags,
# reserved. No checksum.
_FACS = struct.Struct("<4sIIIIIQB3sI24s")
_FACS_VERSION = 2
_FACS_ALIGN = 64
# Generic Address Structure (§5.2.3.2): address space, bit width, bit offset, access size,
# address.
_GAS = struct.Struct("<BBBBQ")
_SYSTEM_IO = 1
_ACCESS_BYTE, _ACCESS_WORD, _ACCESS_DWORD = 1, 2, 3
# MADT (§5.2.12): local interrupt controller address and flags after the header, then
# interrupt controller structures.
_MADT = struct.Struct("<II")
_MADT_LOCAL_APIC = struct.Struct("<BBBBI")  # §5.2.12.2: type 0, length, UID, APIC id, flags
_MADT_IOAPIC = struct.Struct("<BBBBII")  # §5.2.12.3: type 1, length, id, 0, address, GSI base
_MADT_OVERRIDE = struct.Struct("<BBBBIH")  # §5.2.12.5: type 2, length, bus, source, GSI, flags
_MADT_LAPIC_NMI = struct.Struct("<BBBHB")  # §5.2.12.7: type 4, length, UID, flags, LINT#

assert _RSDP.size == 36 and _HEADER.size == 36 and _FACS.size == 64 and _GAS.size == 12
assert (_MADT_LOCAL_APIC.size, _MADT_IOAPIC.size) == (8, 12)
assert (_MADT_OVERRIDE.size, _MADT_LAPIC_NMI.size) == (10, 6)

_XSDT_REVISION = 1
_RSDT_REVISION = 1
_FADT_REVISION, _FADT_MINOR_REVISION = 6, 5  # ACPI 6.5
_FADT_LENGTH = 276
_MADT_REVISION = 6  # ACPI 6.5
_DSDT_REVISION = 2  # 2 and above: AML integers are 64 bits (§5.2.11.1)

_MADT_PCAT_COMPAT = 1 << 0  # dual 8259s present: the OS masks them when it uses the IOAPIC
_LAPIC_ENABLED = 1 << 0
_ISA_BUS = 0
# MPS INTI flags (§5.2.12.5): polarity in bits 1-0 (01 active high), trigger mode in bits
# 3-2 (11 level).
_ACTIVE_HIGH_LEVEL = 0b01 | 0b11 << 2
_CONFORMS_TO_BUS = 0
_ALL_PROCESSORS = 0xFF
_LINT1 = 1

# FADT fixed feature flags (§5.2.9, "Fixed ACPI Description Table Fixed Feature Flags").
_WBINVD = 1 << 0  # WBINVD flushes and invalidates caches: true of every x86-64 CPU
_PROC_C1 = 1 << 2  # C1 (hlt) on all processors
# PWR_BUTTON (bit 4) clear: the power button is the fixed-feature one, PWRBTN_STS/PWRBTN_EN
# in the PM1 event block.
_SLP_BUTTON = 1 << 5  # no fixed-feature sleep button, and no control-method one either
_TMR_VAL_EXT = 1 << 8  # the PM timer counts 32 bits, not 24
_FADT_FLAGS = _WBINVD | _PROC_C1 | _SLP_BUTTON | _TMR_VAL_EXT
# IA-PC boot architecture flags (§5.2.9.3).
_LEGACY_DEVICES = 1 << 0  # user-visible ISA devices: the COM ports
_HAS_8042 = 1 << 1
_VGA_NOT_PRESENT = 1 << 2
_CMOS_RTC_NOT_PRESENT = 1 << 5
_PM_PROFILE_UNSPECIFIED = 0
_C2_UNSUPPORTED = 101  # P_LVL2_LAT over 100 us: no C2
_C3_UNSUPPORTED = 1001  # P_LVL3_LAT over 1000 us: no C3
_HYPERVISOR_VENDOR = b"KASOU   "

# DSDT device ids: ACPI-compatible PNP ids (EISA-compressed) and the id Linux's virtio_mmio
# driver matches (drivers/virtio/virtio_mmio.c, "LNRO0005").
_PNP_COM = "PNP0501"  # 16550A-compatible COM port
_PNP_KEYBOARD = "PNP0303"  # IBM enhanced keyboard (101/102-key, PS/2 mouse support)
_PNP_RTC = "PNP0B00"  # AT real-time clock
_VIRTIO_MMIO_HID = "LNRO0005"
# The VM generation ID device: see the module docstring for why these strings.
_VMGENID_HID = "KASO0001"
_VMGENID_CID = "VM_Gen_Counter"
_VMGENID_DEVICE = "VGEN"
# Notification values 0x80 and up are device-specific (§5.6.6); the paper uses 0x80 for "the
# generation ID changed", and Linux's driver re-reads the ID on any notification.
_VMGENID_NOTIFY = 0x80
# The GPE that carries the notification: GPE 0, bit 0 of GPE0_STS/GPE0_EN, edge-triggered
# (_Exx, §5.6.4.1): ACPICA clears its status before running the method.
_VMGENID_GPE_METHOD = "_E00"
# \_S5 (§7.4.2, \_Sx): SLP_TYPa and SLP_TYPb for soft-off, then two reserved values.
_SLP_TYP_S5 = 0


def build_acpi_tables(config: AcpiConfig, base: int = ACPI_START) -> bytes:
    """All tables laid out from ``base`` (RSDP first); the bytes to copy there.

    Raises ``ConfigError`` for a configuration the tables cannot describe, ``ValueError`` for a
    ``base`` that is not 64-byte aligned or leaves the tables above 4 GiB.
    """
    _check(config)
    if base % _FACS_ALIGN or base < 0:
        raise ValueError(f"ACPI tables at {base:#x}: the base must be a 64-byte aligned address")
    dsdt = _table(b"DSDT", _DSDT_REVISION, _dsdt_body(config))
    madt = _table(b"APIC", _MADT_REVISION, _madt_body(config.vcpus, config.sci_irq))
    # Place every table first (their sizes do not depend on addresses), then fill in the
    # pointers.
    sizes = {
        "rsdp": _RSDP.size,
        "facs": _FACS.size,
        "xsdt": _HEADER.size + 2 * 8,
        "rsdt": _HEADER.size + 2 * 4,
        "fadt": _FADT_LENGTH,
        "madt": len(madt),
        "dsdt": len(dsdt),
    }
    offsets: dict[str, int] = {}
    end = 0
    for table, size in sizes.items():
        # 16 bytes keeps the RSDP where the scan looks; the FACS needs 64 (§5.2.10).
        align = _FACS_ALIGN if table == "facs" else 16
        offsets[table] = end = -(-end // align) * align
        end += size
    if end > ACPI_SIZE:
        raise ConfigError(
            "vcpus",
            f"the ACPI tables for {config.vcpus} vCPUs and {len(config.virtio)} virtio devices "
            f"take {end} bytes, more than the {ACPI_SIZE} reserved for them: use fewer",
        )
    if base + end > 1 << 32:
        raise ValueError(f"ACPI tables at {base:#x} would end above 4 GiB")
    address = {table: base + offset for table, offset in offsets.items()}
    pointed = (address["fadt"], address["madt"])
    tables = {
        "rsdp": _rsdp(address["rsdt"], address["xsdt"]),
        "facs": _facs(),
        "xsdt": _table(b"XSDT", _XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in pointed)),
        "rsdt": _table(b"RSDT", _RSDT_REVISION, b"".join(struct.pack("<I", a) for a in pointed)),
        "fadt": _fadt(config, facs=address["facs"], dsdt=address["dsdt"]),
        "madt": madt,
        "dsdt": dsdt,
    }
    image = bytearray(end)
    for table, data in tables.items():
        assert len(data) == sizes[table]
        image[offsets[table] : offsets[table] + len(data)] = data
    return bytes(image)


def write_acpi_tables(memory: GuestMemory, config: AcpiConfig) -> int:
    """Write them at layout.ACPI_START; return the RSDP's guest-physical address."""
    memory.write(ACPI_START, build_acpi_tables(config, ACPI_START))
    return ACPI_START


def write_generation_id(memory: GuestMemory, guid: bytes) -> None:
    """Store the VM generation ID, 16 bytes, where the DSDT's ``\\_SB.VGEN.ADDR`` points.

    At build time the builder stores a random one; when a snapshot is restored as a clone the
    restore path stores a new one and then raises GPE 0 (``AcpiPm.notify_generation_change``)
    so the guest re-reads it. Any 16 bytes will do (the paper treats them as an opaque
    128-bit value); they should be random, never reused. ``ValueError`` for another length.
    """
    if len(guid) != VMGENID_SIZE:
        raise ValueError(
            f"a VM generation ID is {VMGENID_SIZE} bytes, not {len(guid)}: use os.urandom(16)"
        )
    memory.write(VMGENID_ADDRESS, guid)


def read_generation_id(memory: GuestMemory) -> bytes:
    """The 16 bytes of the VM generation ID as the guest reads them now."""
    return memory.read(VMGENID_ADDRESS, VMGENID_SIZE)


def _check(config: AcpiConfig) -> None:
    """Raise ``ConfigError`` for anything the tables cannot describe or would describe wrong."""
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise ConfigError("vcpus", f"{config.vcpus} vCPUs: kasou supports 1 to {MAX_VCPUS}")
    if len(config.serial) > MAX_SERIAL_PORTS:
        raise ConfigError(
            "serial", f"{len(config.serial)} COM ports: at most {MAX_SERIAL_PORTS} (COM1-COM4)"
        )
    if not 0 < config.sci_irq < 16 or config.sci_irq in (IRQ_PIT, _IRQ_CASCADE):
        raise ConfigError(
            "acpi", f"SCI on IRQ {config.sci_irq}: use an ISA IRQ from 1 to 15 other than 2"
        )
    # ISA IRQs already taken, by what.
    taken: dict[int, str] = {IRQ_PIT: "the PIT", _IRQ_CASCADE: "the 8259 cascade"}
    if config.i8042:
        taken[IRQ_I8042] = "the i8042"
    if config.rtc:
        taken[IRQ_RTC] = "the RTC"
    for index, (port, irq) in enumerate(config.serial):
        com = f"COM{index + 1}"
        if not 0 <= port <= 0x10000 - _SERIAL_PORTS:
            raise ConfigError("serial", f"{com} at port {port:#x}: ports stop at 0xffff")
        if not 0 < irq < 16:
            raise ConfigError("serial", f"{com} on IRQ {irq}: use an ISA IRQ from 1 to 15")
        _claim(taken, irq, com, "serial")
    _claim(taken, config.sci_irq, "the ACPI SCI", "acpi")
    for index, (base, size, gsi) in enumerate(config.virtio):
        what = f"virtio-mmio device {index} at {base:#x}"
        if not 0 < size <= 0xFFFF_FFFF or not 0 <= base <= (1 << 32) - size:
            raise ConfigError("virtio", f"{what}+{size:#x}: the window must lie below 4 GiB")
        if not 0 <= gsi < IOAPIC_PINS:
            raise ConfigError(
                "virtio", f"{what} on GSI {gsi}: the IOAPIC has pins 0 to {IOAPIC_PINS - 1}"
            )
        _claim(taken, gsi, what, "virtio")
    _check_disjoint(
        (
            (f"virtio-mmio device {i}", base, size)
            for i, (base, size, _) in enumerate(config.virtio)
        ),
        "virtio",
    )
    ports = [
        ("PM1a_EVT_BLK", config.pm1a_event, _PM1_EVT_LEN),
        ("PM1a_CNT_BLK", config.pm1a_control, _PM1_CNT_LEN),
        ("PM_TMR_BLK", config.pm_timer, _PM_TMR_LEN),
        ("GPE0_BLK", config.gpe0_block, _GPE0_BLK_LEN),
    ]
    for what, port, length in ports:
        if not 0 < port <= 0x10000 - length:
            raise ConfigError("acpi", f"{what} at port {port:#x}: use a port from 1 to 0xffff")
    ports += [(f"COM{i + 1}", port, _SERIAL_PORTS) for i, (port, _) in enumerate(config.serial)]
    if config.i8042:
        ports += [("the i8042", port, length) for port, length in _I8042_PORTS]
    if config.rtc:
        ports.append(("the RTC", _RTC_PORT, _RTC_PORTS))
    _check_disjoint(ports, "acpi")


def _claim(taken: dict[int, str], irq: int, what: str, field: str) -> None:
    if irq in taken:
        raise ConfigError(field, f"{what} on IRQ {irq}, which {taken[irq]} already uses")
    taken[irq] = what


def _check_disjoint(ranges: Iterable[tuple[str, int, int]], field: str) -> None:
    ordered = sorted(ranges, key=lambda item: item[1])
    for (name, start, size), (other, next_start, _) in itertools.pairwise(ordered):
        if start + size > next_start:
            raise ConfigError(field, f"{name} at {start:#x}+{size:#x} overlaps {other}")


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the header (§5.2.6) over ``body``, checksummed."""
    header = _HEADER.pack(
        signature,
        _HEADER.size + len(body),
        revision,
        0,  # checksum, set below
        _OEM_ID,
        _OEM_TABLE_ID,
        _OEM_REVISION,
        _CREATOR_ID,
        _CREATOR_REVISION,
    )
    return _with_checksum(header + body, _CHECKSUM_OFFSET)


def _with_checksum(data: bytes, offset: int, length: int | None = None) -> bytes:
    """``data`` with byte ``offset`` set so its first ``length`` bytes sum to 0 mod 256."""
    covered = data[: len(data) if length is None else length]
    checksum = -(sum(covered) - covered[offset]) & 0xFF
    return data[:offset] + bytes([checksum]) + data[offset + 1 :]


def _rsdp(rsdt: int, xsdt: int) -> bytes:
    # §5.2.5.3: the checksum covers the ACPI 1.0 part (20 bytes), the extended checksum all.
    rsdp = _RSDP.pack(b"RSD PTR ", 0, _OEM_ID, _RSDP_REVISION, rsdt, _RSDP.size, xsdt, 0, bytes(3))
    rsdp = _with_checksum(rsdp, 8, _RSDP_V1_LENGTH)
    return _with_checksum(rsdp, 32)


def _facs() -> bytes:
    # Hardware signature 0 (the hardware never changes between boots), no waking vectors,
    # global lock free, no S4BIOS and no 64-bit wake support (flags 0).
    return _FACS.pack(b"FACS", _FACS.size, 0, 0, 0, 0, 0, _FACS_VERSION, bytes(3), 0, bytes(24))


def _gas_io(port: int, length: int, access: int) -> bytes:
    return _GAS.pack(_SYSTEM_IO, 8 * length, 0, access, port)


def _fadt(config: AcpiConfig, *, facs: int, dsdt: int) -> bytes:
    """The FADT (§5.2.9), revision 6, offsets as in the spec's table."""
    body = bytearray(_FADT_LENGTH)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into("<" + fmt, body, offset, *values)

    # FIRMWARE_CTRL holds the FACS (below 4 GiB); X_FIRMWARE_CTRL must then stay zero.
    put(36, "I", facs)
    put(40, "I", dsdt)  # DSDT; X_DSDT below says the same
    put(45, "B", _PM_PROFILE_UNSPECIFIED)
    put(46, "H", config.sci_irq)  # SCI_INT, an ISA IRQ: the MADT override maps it to a GSI
    # SMI_CMD (48), ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT: zero. SMI_CMD is zero on
    # a system without SMM (§5.2.9), which is then always in ACPI mode: the OS does not try to
    # switch modes, and PM1_CNT reads SCI_EN set.
    put(56, "I", config.pm1a_event)  # PM1a_EVT_BLK
    put(64, "I", config.pm1a_control)  # PM1a_CNT_BLK
    put(76, "I", config.pm_timer)  # PM_TMR_BLK; PM1b and PM2 absent
    put(80, "I", config.gpe0_block)  # GPE0_BLK; GPE1_BLK (84) absent
    put(88, "BBBB", _PM1_EVT_LEN, _PM1_CNT_LEN, 0, _PM_TMR_LEN)  # PM1_EVT..PM_TMR_LEN
    put(92, "B", _GPE0_BLK_LEN)  # GPE0_BLK_LEN; GPE1_BLK_LEN and GPE1_BASE zero
    put(96, "HH", _C2_UNSUPPORTED, _C3_UNSUPPORTED)  # P_LVL2_LAT, P_LVL3_LAT
    # FLUSH_SIZE, FLUSH_STRIDE (WBINVD is set), DUTY_*, DAY_ALRM, MON_ALRM: zero.
    put(108, "B", _RTC_CENTURY if config.rtc else 0)  # CENTURY
    boot_arch = _LEGACY_DEVICES | _VGA_NOT_PRESENT
    boot_arch |= _HAS_8042 if config.i8042 else 0
    boot_arch |= 0 if config.rtc else _CMOS_RTC_NOT_PRESENT
    put(109, "H", boot_arch)  # IAPC_BOOT_ARCH
    put(112, "I", _FADT_FLAGS)
    # RESET_REG (116), RESET_VALUE, ARM_BOOT_ARCH: zero (RESET_REG_SUP is clear).
    put(131, "B", _FADT_MINOR_REVISION)
    put(140, "Q", dsdt)  # X_DSDT
    put(148, "12s", _gas_io(config.pm1a_event, _PM1_EVT_LEN, _ACCESS_WORD))  # X_PM1a_EVT_BLK
    put(172, "12s", _gas_io(config.pm1a_control, _PM1_CNT_LEN, _ACCESS_WORD))  # X_PM1a_CNT_BLK
    put(208, "12s", _gas_io(config.pm_timer, _PM_TMR_LEN, _ACCESS_DWORD))  # X_PM_TMR_BLK
    # GPE registers are accessed a byte at a time (§4.8.4.1); ACPICA takes the block's size
    # from GPE0_BLK_LEN and ignores the bit width, which says the same.
    put(220, "12s", _gas_io(config.gpe0_block, _GPE0_BLK_LEN, _ACCESS_BYTE))  # X_GPE0_BLK
    # SLEEP_CONTROL_REG and SLEEP_STATUS_REG (244, 256) are for hardware-reduced ACPI: zero.
    put(268, "8s", _HYPERVISOR_VENDOR)
    return _table(b"FACP", _FADT_REVISION, bytes(body[_HEADER.size :]))


def _madt_body(vcpus: int, sci_irq: int) -> bytes:
    """The MADT (§5.2.12) after its header."""
    ioapic_id = vcpus  # after the local APICs, as in the MP table
    parts = [_MADT.pack(LAPIC_ADDRESS, _MADT_PCAT_COMPAT)]
    # §5.2.12.1: the boot processor's entry first; vCPU n has APIC id n and UID n.
    for index in range(vcpus):
        parts.append(_MADT_LOCAL_APIC.pack(0, _MADT_LOCAL_APIC.size, index, index, _LAPIC_ENABLED))
    parts.append(_MADT_IOAPIC.pack(1, _MADT_IOAPIC.size, ioapic_id, 0, IOAPIC_ADDRESS, 0))
    # The SCI stays on its own pin but is level-triggered, active high (§5.2.12.5); without
    # an override the OS would assume the ISA default, edge.
    parts.append(
        _MADT_OVERRIDE.pack(2, _MADT_OVERRIDE.size, _ISA_BUS, sci_irq, sci_irq, _ACTIVE_HIGH_LEVEL)
    )
    # NMIs come in on LINT1 of every processor (§5.2.12.7).
    parts.append(
        _MADT_LAPIC_NMI.pack(4, _MADT_LAPIC_NMI.size, _ALL_PROCESSORS, _CONFORMS_TO_BUS, _LINT1)
    )
    return b"".join(parts)


def _dsdt_body(config: AcpiConfig) -> bytes:
    """The DSDT's AML (§5.2.11.1): the devices in \\_SB, then \\_S5."""
    devices: list[bytes] = []
    for index, (port, irq) in enumerate(config.serial):
        devices.append(
            aml.device(
                f"COM{index + 1}",
                _hid(_PNP_COM),
                aml.name("_UID", aml.integer(index + 1)),
                _crs(aml.io_port(port, _SERIAL_PORTS), aml.irq_no_flags(irq)),
            )
        )
    if config.i8042:
        devices.append(
            aml.device(
                "PS2K",
                _hid(_PNP_KEYBOARD),
                _crs(*(aml.io_port(p, n) for p, n in _I8042_PORTS), aml.irq_no_flags(IRQ_I8042)),
            )
        )
    if config.rtc:
        # No IRQ: kasou's RTC raises none (Linux's rtc-cmos assumes IRQ 8 when it is absent).
        devices.append(aml.device("RTC", _hid(_PNP_RTC), _crs(aml.io_port(_RTC_PORT, _RTC_PORTS))))
    for index, (base, size, gsi) in enumerate(config.virtio):
        # Edge-triggered, active high: kasou raises virtio interrupts as pulses (irqfd).
        devices.append(
            aml.device(
                f"VR{index:02X}",
                aml.name("_HID", aml.string(_VIRTIO_MMIO_HID)),
                aml.name("_UID", aml.integer(index)),
                _crs(aml.memory32_fixed(base, size), aml.extended_interrupt(gsi)),
            )
        )
    gpe_methods: list[bytes] = []
    if config.vmgenid:
        devices.append(_vmgenid_device())
        gpe_methods.append(
            aml.method(
                _VMGENID_GPE_METHOD,
                aml.notify(f"\\_SB.{_VMGENID_DEVICE}", _VMGENID_NOTIFY),
            )
        )
    s5 = aml.package(*(aml.integer(value) for value in (_SLP_TYP_S5, _SLP_TYP_S5, 0, 0)))
    body = aml.scope("\\_SB", *devices) + aml.name("\\_S5", s5)
    if gpe_methods:
        body += aml.scope("\\_GPE", *gpe_methods)
    return body


def _vmgenid_device() -> bytes:
    """\\_SB.VGEN: the ids of the module docstring and ADDR, the Package of two Integers
    (low and high 32 bits of the address of the 16 bytes) that the paper and Linux's
    ``vmgenid_add`` evaluate."""
    address = aml.package(
        aml.integer(VMGENID_ADDRESS & 0xFFFF_FFFF), aml.integer(VMGENID_ADDRESS >> 32)
    )
    return aml.device(
        _VMGENID_DEVICE,
        aml.name("_HID", aml.string(_VMGENID_HID)),
        aml.name("_CID", aml.string(_VMGENID_CID)),
        aml.name("_DDN", aml.string(_VMGENID_CID)),
        aml.name("ADDR", address),
    )


def _hid(pnp_id: str) -> bytes:
    return aml.name("_HID", aml.integer(aml.eisa_id(pnp_id)))


def _crs(*descriptors: bytes) -> bytes:
    return aml.name("_CRS", aml.resource_template(*descriptors))
