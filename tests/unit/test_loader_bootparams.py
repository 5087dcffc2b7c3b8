"""boot_params: the zero page's layout against bootparam.h's documented offsets, and the fields
a 64-bit boot loader sets (Documentation/arch/x86/boot.rst, zero-page.rst)."""

from __future__ import annotations

import struct

import pytest

from kasou.errors import ConfigError
from kasou.loader import BootParams, E820Entry, SetupHeader, build_boot_params, write_cmdline
from kasou.memory import GuestMemory

MiB = 1 << 20
E820 = [(0, 0x9FC00, 1), (0x9FC00, 0x60400, 2), (0x100000, 127 * MiB, 1)]


def u8(data: bytes, offset: int) -> int:
    return data[offset]


def u16(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def u64(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


@pytest.mark.parametrize(
    ("field", "offset"),
    [
        ("acpi_rsdp_addr", 0x070),
        ("ext_ramdisk_image", 0x0C0),
        ("ext_ramdisk_size", 0x0C4),
        ("ext_cmd_line_ptr", 0x0C8),
        ("cc_blob_address", 0x13C),
        ("e820_entries", 0x1E8),
        ("sentinel", 0x1EF),
        ("hdr", 0x1F1),
        ("edd_mbr_sig_buffer", 0x290),
        ("e820_table", 0x2D0),
        ("eddbuf", 0xD00),
    ],
)
def test_boot_params_fields_sit_at_bootparam_h_offsets(field: str, offset: int) -> None:
    assert getattr(BootParams, field).offset == offset


@pytest.mark.parametrize(
    ("field", "offset"),
    [
        ("setup_sects", 0x1F1),
        ("vid_mode", 0x1FA),
        ("boot_flag", 0x1FE),
        ("header", 0x202),
        ("version", 0x206),
        ("type_of_loader", 0x210),
        ("loadflags", 0x211),
        ("ramdisk_image", 0x218),
        ("ramdisk_size", 0x21C),
        ("heap_end_ptr", 0x224),
        ("cmd_line_ptr", 0x228),
        ("initrd_addr_max", 0x22C),
        ("kernel_alignment", 0x230),
        ("xloadflags", 0x236),
        ("cmdline_size", 0x238),
        ("payload_offset", 0x248),
        ("pref_address", 0x258),
        ("init_size", 0x260),
        ("kernel_info_offset", 0x268),
    ],
)
def test_setup_header_fields_sit_at_boot_rst_offsets(field: str, offset: int) -> None:
    assert getattr(SetupHeader, field).offset + 0x1F1 == offset


def test_sizes() -> None:
    assert (len(bytes(BootParams())), len(bytes(E820Entry())), len(bytes(SetupHeader()))) == (
        4096,
        20,
        0x26C - 0x1F1,
    )


def test_vmlinux_gets_a_minimal_header_and_the_loader_fields() -> None:
    page = build_boot_params(
        setup_header=None,
        cmdline_addr=0x20000,
        cmdline_size=42,
        initrd=(0x7F00000, 0x123456),
        e820=E820,
    )
    assert len(page) == 4096
    assert u16(page, 0x1FE) == 0xAA55  # boot_flag
    assert page[0x202:0x206] == b"HdrS"
    assert u16(page, 0x206) == 0x020F  # version
    assert u32(page, 0x230) == 0x1000000  # kernel_alignment
    assert u8(page, 0x210) == 0xFF  # type_of_loader: undefined
    assert u8(page, 0x211) & 0x81 == 0x81  # loadflags: LOADED_HIGH | CAN_USE_HEAP
    assert u16(page, 0x224) == 0xFE00  # heap_end_ptr
    assert u16(page, 0x1FA) == 0xFFFF  # vid_mode: normal
    assert u32(page, 0x228) == 0x20000  # cmd_line_ptr
    assert (u32(page, 0x218), u32(page, 0x21C)) == (0x7F00000, 0x123456)  # ramdisk
    assert (u32(page, 0xC0), u32(page, 0xC4), u32(page, 0xC8)) == (0, 0, 0)
    assert u8(page, 0x1E8) == 3  # e820_entries
    table = [struct.unpack_from("<QQI", page, 0x2D0 + 20 * i) for i in range(4)]
    assert table == [*E820, (0, 0, 0)]
    assert u8(page, 0x1EF) == 0  # sentinel: nothing but the header was copied


def test_the_acpi_rsdp_address_goes_at_0x070_and_defaults_to_none() -> None:
    page = build_boot_params(
        setup_header=None, cmdline_addr=0x20000, cmdline_size=0, initrd=None, e820=E820
    )
    assert u64(page, 0x070) == 0  # no ACPI tables: the kernel searches (and finds none)
    page = build_boot_params(
        setup_header=None,
        cmdline_addr=0x20000,
        cmdline_size=0,
        initrd=None,
        e820=E820,
        acpi_rsdp_addr=0xE0000,
    )
    assert u64(page, 0x070) == 0xE0000
    assert u64(page, 0x078) == 0  # nothing spills into the padding after it


def test_addresses_above_4g_use_the_ext_fields() -> None:
    page = build_boot_params(
        setup_header=None,
        cmdline_addr=0x1_2345_6000,
        cmdline_size=1,
        initrd=(0x2_0000_1000, 0x1_0000_0002),
        e820=E820,
    )
    assert (u32(page, 0x228), u32(page, 0xC8)) == (0x2345_6000, 1)
    assert (u32(page, 0x218), u32(page, 0xC0)) == (0x1000, 2)
    assert (u32(page, 0x21C), u32(page, 0xC4)) == (2, 1)


def test_bzimage_header_is_copied_and_the_loader_fields_overlaid() -> None:
    header = bytearray(0x26C - 0x1F1)
    struct.pack_into("<H", header, 0x1FE - 0x1F1, 0xAA55)
    header[0x202 - 0x1F1 : 0x206 - 0x1F1] = b"HdrS"
    struct.pack_into("<H", header, 0x206 - 0x1F1, 0x020F)
    header[0x211 - 0x1F1] = 0x01
    struct.pack_into("<I", header, 0x238 - 0x1F1, 1000)  # cmdline_size
    struct.pack_into("<Q", header, 0x258 - 0x1F1, 0x1000000)  # pref_address
    struct.pack_into("<I", header, 0x260 - 0x1F1, 0x3F98000)  # init_size
    page = build_boot_params(
        setup_header=bytes(header), cmdline_addr=0x20000, cmdline_size=999, initrd=None, e820=E820
    )
    assert u64(page, 0x258) == 0x1000000
    assert u32(page, 0x260) == 0x3F98000
    assert u8(page, 0x211) == 0x81
    assert (u32(page, 0x218), u32(page, 0x21C)) == (0, 0)  # no initrd
    with pytest.raises(ConfigError, match="at most 1000"):
        build_boot_params(
            setup_header=bytes(header),
            cmdline_addr=0x20000,
            cmdline_size=1001,
            initrd=None,
            e820=E820,
        )


def test_e820_table_holds_at_most_128_entries() -> None:
    many = [(i * 0x1000, 0x1000, 1) for i in range(129)]
    with pytest.raises(ValueError, match="129 e820 entries"):
        build_boot_params(
            setup_header=None, cmdline_addr=0x20000, cmdline_size=0, initrd=None, e820=many
        )
    page = build_boot_params(
        setup_header=None, cmdline_addr=0x20000, cmdline_size=0, initrd=None, e820=many[:128]
    )
    assert u8(page, 0x1E8) == 128
    assert struct.unpack_from("<QQI", page, 0x2D0 + 20 * 127) == (127 * 0x1000, 0x1000, 1)


def test_write_cmdline() -> None:
    memory = GuestMemory.create([(0, 1 * MiB)])
    assert write_cmdline(memory, 0x20000, "console=ttyS0 panic=-1", 2047) == 22
    assert memory.read(0x20000, 23) == b"console=ttyS0 panic=-1\0"
    with pytest.raises(ConfigError, match="at most 10"):
        write_cmdline(memory, 0x20000, "x" * 11, 10)
    with pytest.raises(ConfigError, match="NUL"):
        write_cmdline(memory, 0x20000, "a\0b", 10)
    memory.close()
