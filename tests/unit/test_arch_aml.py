"""The AML encoder, byte by byte against ACPI 6.5 chapter 20 and §6.4, and against ACPICA.

The oracles: the encodings the spec spells out, and Debian's acpica-tools (``iasl`` compiles
the disassembly of what kasou encodes back to the same bytes; ``acpiexec`` loads it into a
namespace as the kernel's ACPICA would).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from acpica_tools import acpiexec, definition_block, disassemble, iasl_compile, needs_acpica

from kasou.arch.x86_64 import aml


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of the PkgLength at the start of ``data`` (§20.2.4)."""
    lead = data[0]
    following = lead >> 6
    if following == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "bits 5-4 of a multi-byte lead byte are reserved"
    value = lead & 0x0F
    for index in range(following):
        value |= data[1 + index] << (4 + 8 * index)
    return value, 1 + following


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (63, b"\x3f"),
        (64, b"\x40\x04"),
        (65, b"\x41\x04"),
        (4095, b"\x4f\xff"),
        (4096, b"\x80\x00\x01"),
        (1048575, b"\x8f\xff\xff"),
        (1048576, b"\xc0\x00\x00\x01"),
        ((1 << 28) - 1, b"\xcf\xff\xff\xff"),
    ],
)
def test_pkg_length_uses_the_fewest_bytes_at_each_boundary(value: int, encoded: bytes) -> None:
    assert aml.pkg_length(value) == encoded
    assert decode_pkg_length(encoded) == (value, len(encoded))


@pytest.mark.parametrize("value", [-1, 1 << 28])
def test_pkg_length_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="package length"):
        aml.pkg_length(value)


@pytest.mark.parametrize(
    ("body", "total", "size"),
    [
        (62, 63, 1),  # 62 + 1 byte of PkgLength fits one byte
        (63, 65, 2),  # 63 + 1 = 64 does not: two bytes, 65 in all
        (4093, 4095, 2),
        (4094, 4097, 3),
        (1048572, 1048575, 3),
        (1048573, 1048577, 4),
    ],
)
def test_with_pkg_length_counts_itself(body: int, total: int, size: int) -> None:
    encoded = aml.with_pkg_length(bytes(body))
    assert decode_pkg_length(encoded) == (total, size)
    assert len(encoded) == total


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("_S5", b"_S5_"),
        ("COM1", b"COM1"),
        ("\\_SB", b"\\_SB_"),
        ("\\", b"\\\x00"),
        ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),
        ("^^FOO.BAR", b"^^\x2eFOO_BAR_"),
        ("\\_SB.PCI0.ISA", b"\\\x2f\x03_SB_PCI0ISA_"),
        ("A.B.C.D", b"\x2f\x04A___B___C___D___"),
    ],
)
def test_name_strings(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "1ABC", "ABCDE", "_sb", "\\_SB..X", "A-B", "\\^X"])
def test_names_that_are_not_acpi_names(path: str) -> None:
    with pytest.raises(ValueError):
        aml.name_string(path)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0xFFFF, b"\x0b\xff\xff"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (0xFFFF_FFFF, b"\x0c\xff\xff\xff\xff"),
        (1 << 32, b"\x0e\x00\x00\x00\x00\x01\x00\x00\x00"),
        ((1 << 64) - 1, b"\x0e" + b"\xff" * 8),
    ],
)
def test_integers_take_the_shortest_prefix(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integers_outside_64_bits(value: int) -> None:
    with pytest.raises(ValueError, match="64"):
        aml.integer(value)


def test_strings_are_nul_terminated_ascii() -> None:
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    assert aml.string("") == b"\x0d\x00"
    with pytest.raises(ValueError, match="NUL"):
        aml.string("a\x00b")
    with pytest.raises(UnicodeEncodeError):
        aml.string("é")


@pytest.mark.parametrize(
    ("pnp_id", "value"),
    # The values ASL's EisaId() gives (and Linux's PNP layer decodes back).
    [("PNP0501", 0x0105D041), ("PNP0303", 0x0303D041), ("PNP0B00", 0x000BD041)],
)
def test_eisa_ids(pnp_id: str, value: int) -> None:
    assert aml.eisa_id(pnp_id) == value


@pytest.mark.parametrize("pnp_id", ["PNP050", "pnp0501", "PNP050G", "1NP0501"])
def test_strings_that_are_not_eisa_ids(pnp_id: str) -> None:
    with pytest.raises(ValueError, match="EISA"):
        aml.eisa_id(pnp_id)


def test_buffer_package_name_scope_device() -> None:
    assert aml.buffer(b"\xaa\xbb") == b"\x11\x05\x0a\x02\xaa\xbb"
    assert aml.buffer(b"") == b"\x11\x02\x00"
    assert aml.package(aml.integer(0), aml.integer(5)) == b"\x12\x05\x02\x00\x0a\x05"
    assert aml.name("_UID", aml.integer(1)) == b"\x08_UID\x01"
    assert aml.scope("\\_SB") == b"\x10\x06\\_SB_"
    assert aml.device("VR00", b"\x08_UID\x00") == b"\x5b\x82\x0b" + b"VR00" + b"\x08_UID\x00"
    with pytest.raises(ValueError, match="255"):
        aml.package(*[aml.integer(0)] * 256)


def test_method_and_notify() -> None:
    # §20.2.5.2: MethodOp 0x14, PkgLength, NameString, MethodFlags (ArgCount bits 2-0,
    # SerializeFlag bit 3, SyncLevel bits 7-4), TermList.
    assert aml.method("_E00") == b"\x14\x06_E00\x00"
    assert aml.method("MTH1", b"\xaa", args=7, serialized=True, sync_level=15) == (
        b"\x14\x07MTH1\xff\xaa"
    )
    # §20.2.5.3: NotifyOp 0x86, the SuperName, the value as a TermArg.
    assert aml.notify("\\_SB.VGEN", 0x80) == b"\x86\\\x2e_SB_VGEN\x0a\x80"
    assert aml.notify("DEV0", 1) == b"\x86DEV0\x01"


@pytest.mark.parametrize(
    "make",
    [
        lambda: aml.method("M", args=8),
        lambda: aml.method("M", serialized=True, sync_level=16),
        lambda: aml.method("M", sync_level=1),
        lambda: aml.notify("DEV0", 0x100),
        lambda: aml.notify("DEV0", -1),
    ],
)
def test_methods_and_notifications_aml_cannot_hold(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def test_resource_descriptors() -> None:
    # §6.4.2.5: tag 0x47, Decode16, min, max, alignment, length.
    assert aml.io_port(0x3F8, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    # §6.4.2.1: tag 0x22, a 16-bit mask of IRQs.
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.irq_no_flags(3, 15) == b"\x22\x08\x80"
    # §6.4.3.4: tag 0x86, length 9, read/write, base, length.
    assert aml.memory32_fixed(0xD000_0000, 0x1000) == (
        b"\x86\x09\x00\x01\x00\x00\x00\xd0\x00\x10\x00\x00"
    )
    # §6.4.3.6: tag 0x89, length 6, flags (consumer, edge), one interrupt.
    assert aml.extended_interrupt(5) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.extended_interrupt(9, edge=False, active_low=True, shared=True)[3] == 0b1101
    assert aml.resource_template(aml.irq_no_flags(1)) == b"\x11\x08\x0a\x05\x22\x02\x00\x79\x00"


@pytest.mark.parametrize(
    "make",
    [
        lambda: aml.io_port(0xFFFF, 2),
        lambda: aml.io_port(0x60, 0),
        lambda: aml.irq_no_flags(16),
        aml.irq_no_flags,
        lambda: aml.memory32_fixed(0xFFFF_F000, 0x2000),
        lambda: aml.memory32_fixed(1 << 32, 0x1000),
        lambda: aml.extended_interrupt(1 << 32),
    ],
)
def test_resources_a_descriptor_cannot_hold(make: object) -> None:
    assert callable(make)
    with pytest.raises(ValueError):
        make()


def every_term() -> bytes:
    """One of each term the encoder makes, nested the way a DSDT nests them."""
    return aml.scope(
        "\\_SB",
        aml.device(
            "DEV0",
            aml.name("_HID", aml.integer(aml.eisa_id("PNP0501"))),
            aml.name("_DDN", aml.string("kasou")),
            aml.name("_UID", aml.integer(0xFFFF_FFFF_FFFF)),
            aml.name(
                "_CRS",
                aml.resource_template(
                    aml.io_port(0x2F8, 8),
                    aml.irq_no_flags(3),
                    aml.memory32_fixed(0xFEC0_0000, 0x1000, writable=False),
                    aml.extended_interrupt(23, edge=False, active_low=True, shared=True),
                ),
            ),
        ),
        aml.device(
            "\\_SB.DEV0.SUB",
            aml.name("_ADR", aml.integer(0)),
            aml.name("^^TOP", aml.package(aml.string(""))),
        ),
    ) + aml.name("\\_S5", aml.package(*(aml.integer(v) for v in (0, 1, 0x100, 1 << 40))))


@needs_acpica
def test_iasl_compiles_the_disassembly_back_to_the_same_bytes(tmp_path: Path) -> None:
    table = definition_block(every_term())
    source = disassemble(table, tmp_path, "dsdt")
    for expected in (
        'Scope (\\_SB) { Device (DEV0) { Name (_HID, EisaId ("PNP0501"))',
        'Name (_DDN, "kasou")',
        "Name (_UID, 0x0000FFFFFFFFFFFF)",
        "IO (Decode16, 0x02F8, 0x02F8, 0x01, 0x08, )",
        "IRQNoFlags () {3}",
        "Memory32Fixed (ReadOnly, 0xFEC00000, 0x00001000, )",
        "Interrupt (ResourceConsumer, Level, ActiveLow, Shared, ,, ) { 0x00000017, }",
        'Device (\\_SB.DEV0.SUB) { Name (_ADR, Zero) Name (^^TOP, Package (0x01) { "" }) }',
        "Name (\\_S5, Package (0x04) { Zero, One, 0x0100, 0x0000010000000000 })",
    ):
        assert expected in source
    # The header differs only in the compiler's id and the checksum.
    assert iasl_compile(tmp_path, "dsdt.dsl", "recompiled")[36:] == table[36:]


@needs_acpica
def test_iasl_round_trips_gpe_methods_and_acpica_runs_them(tmp_path: Path) -> None:
    body = aml.scope("\\_SB", aml.device("DEV0", aml.name("_HID", aml.string("KASO0001"))))
    body += aml.scope(
        "\\_GPE",
        aml.method("_E00", aml.notify("\\_SB.DEV0", 0x80)),
        aml.method("_L01", aml.notify("\\_SB.DEV0", 0x81), serialized=True, sync_level=2),
        aml.method("MTH2", args=3),
    )
    table = definition_block(body)
    source = disassemble(table, tmp_path, "dsdt")
    for expected in (
        "Method (_E00, 0, NotSerialized) { Notify (\\_SB.DEV0, 0x80) }",
        "Method (_L01, 0, Serialized, 2) { Notify (\\_SB.DEV0, 0x81) }",
        "Method (MTH2, 3, NotSerialized) { }",
    ):
        assert expected in source
    assert iasl_compile(tmp_path, "dsdt.dsl", "recompiled")[36:] == table[36:]
    lines = acpiexec(tmp_path, [("dsdt", table)], "evaluate \\_GPE._E00")
    assert any("Device Notify on [DEV0]" in line and "Value 0x80" in line for line in lines)


@needs_acpica
def test_acpica_parses_package_lengths_across_each_boundary(tmp_path: Path) -> None:
    # Buffers whose PkgLength is the largest of each size, and the smallest of the next
    # size; a name after each shows the parser found its end exactly.
    sizes = []
    for limit in (63, 4095, 1048575):
        data = limit - 8  # below the limit whatever the BufferSize prefix
        while decode_pkg_length(aml.buffer(bytes(data + 1))[1:])[0] <= limit:
            data += 1
        assert decode_pkg_length(aml.buffer(bytes(data))[1:])[0] == limit
        assert decode_pkg_length(aml.buffer(bytes(data + 1))[1:])[0] == limit + 2
        sizes += [data, data + 1]
    body = b"".join(
        aml.name(f"B{index:03}", aml.buffer(bytes([index]) * size))
        + aml.name(f"N{index:03}", aml.integer(index + 0x100))
        for index, size in enumerate(sizes)
    )
    lines = acpiexec(tmp_path, [("dsdt", definition_block(body))], "namespace")
    for index, size in enumerate(sizes):
        assert any(f"B{index:03} Buffer" in line and f"Len {size:X} " in line for line in lines)
        assert any(
            f"N{index:03} Integer" in line and line.endswith(f"= {index + 0x100:016X}")
            for line in lines
        )
