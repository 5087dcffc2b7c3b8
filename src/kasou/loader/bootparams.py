"""The Linux x86 "zero page": ``struct boot_params`` and the setup header inside it.

This module owns the byte layout of ``struct boot_params``, ``struct setup_header`` and
``struct boot_e820_entry`` (arch/x86/include/uapi/asm/bootparam.h) and fills in the fields a
boot loader must set for the 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit
Boot Protocol" and "Details of Header Fields"; Documentation/arch/x86/zero-page.rst). It also
writes the kernel command line. It does not decide where anything lives in guest memory: the
caller passes the addresses (``arch/x86_64/layout.py`` has the map).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from kasou.errors import ConfigError
from kasou.memory import GuestMemory

__all__ = [
    "BOOT_FLAG",
    "BOOT_PARAMS_SIZE",
    "CAN_USE_HEAP",
    "E820_MAX_ENTRIES",
    "E820_RAM",
    "E820_RESERVED",
    "ELF_CMDLINE_MAX",
    "HDRS_MAGIC",
    "HEADER_OFFSET",
    "LOADED_HIGH",
    "LOADER_TYPE_UNDEFINED",
    "XLF_CAN_BE_LOADED_ABOVE_4G",
    "XLF_KERNEL_64",
    "BootParams",
    "E820Entry",
    "SetupHeader",
    "build_boot_params",
    "write_cmdline",
]

BOOT_PARAMS_SIZE = 4096
HEADER_OFFSET = 0x1F1  # struct setup_header starts here, in the image and in boot_params
BOOT_FLAG = 0xAA55  # setup_header.boot_flag
HDRS_MAGIC = 0x53726448  # setup_header.header: "HdrS" read as a little-endian u32

# setup_header.loadflags (bootparam.h)
LOADED_HIGH = 1 << 0  # the protected-mode kernel is loaded at 0x100000 or above
CAN_USE_HEAP = 1 << 7  # heap_end_ptr is valid

# setup_header.xloadflags (bootparam.h, boot protocol 2.12+)
XLF_KERNEL_64 = 1 << 0  # has the 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1  # kernel, boot_params, cmdline and initrd may be above 4 GiB

LOADER_TYPE_UNDEFINED = 0xFF  # type_of_loader: "undefined" boot loader (boot.rst)
VID_MODE_NORMAL = 0xFFFF  # vid_mode: "normal" text mode, do not ask (boot.rst)
# heap_end_ptr is an offset from the real-mode setup code, minus 0x200; 0xfe00 is the
# conventional end of a 64 KiB setup segment (boot.rst, "Sample Boot Configuration").
HEAP_END_PTR = 0xFE00

E820_RAM = 1  # usable RAM (asm/e820/types.h, ACPI address range type 1)
E820_RESERVED = 2  # reserved, not to be used by the OS (ACPI type 2)
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE

# COMMAND_LINE_SIZE on x86 is 2048 including the terminating NUL; a vmlinux has no setup
# header to say otherwise.
ELF_CMDLINE_MAX = 2047

# The minimal header written for a kernel without one (an ELF vmlinux entered directly):
# protocol 2.15 is what the 6.x kernels declare; 16 MiB is CONFIG_PHYSICAL_ALIGN's default.
_ELF_PROTOCOL_VERSION = 0x020F
_ELF_KERNEL_ALIGNMENT = 0x1000000


class SetupHeader(ctypes.Structure):
    """``struct setup_header`` (arch/x86/include/uapi/asm/bootparam.h), packed.

    Offsets in comments are from the start of the image / of ``boot_params``.
    """

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),  # 0x1f1
        ("root_flags", ctypes.c_uint16),  # 0x1f2
        ("syssize", ctypes.c_uint32),  # 0x1f4
        ("ram_size", ctypes.c_uint16),  # 0x1f8
        ("vid_mode", ctypes.c_uint16),  # 0x1fa
        ("root_dev", ctypes.c_uint16),  # 0x1fc
        ("boot_flag", ctypes.c_uint16),  # 0x1fe
        ("jump", ctypes.c_uint16),  # 0x200
        ("header", ctypes.c_uint32),  # 0x202
        ("version", ctypes.c_uint16),  # 0x206
        ("realmode_swtch", ctypes.c_uint32),  # 0x208
        ("start_sys_seg", ctypes.c_uint16),  # 0x20c
        ("kernel_version", ctypes.c_uint16),  # 0x20e
        ("type_of_loader", ctypes.c_uint8),  # 0x210
        ("loadflags", ctypes.c_uint8),  # 0x211
        ("setup_move_size", ctypes.c_uint16),  # 0x212
        ("code32_start", ctypes.c_uint32),  # 0x214
        ("ramdisk_image", ctypes.c_uint32),  # 0x218
        ("ramdisk_size", ctypes.c_uint32),  # 0x21c
        ("bootsect_kludge", ctypes.c_uint32),  # 0x220
        ("heap_end_ptr", ctypes.c_uint16),  # 0x224
        ("ext_loader_ver", ctypes.c_uint8),  # 0x226
        ("ext_loader_type", ctypes.c_uint8),  # 0x227
        ("cmd_line_ptr", ctypes.c_uint32),  # 0x228
        ("initrd_addr_max", ctypes.c_uint32),  # 0x22c
        ("kernel_alignment", ctypes.c_uint32),  # 0x230
        ("relocatable_kernel", ctypes.c_uint8),  # 0x234
        ("min_alignment", ctypes.c_uint8),  # 0x235
        ("xloadflags", ctypes.c_uint16),  # 0x236
        ("cmdline_size", ctypes.c_uint32),  # 0x238
        ("hardware_subarch", ctypes.c_uint32),  # 0x23c
        ("hardware_subarch_data", ctypes.c_uint64),  # 0x240
        ("payload_offset", ctypes.c_uint32),  # 0x248
        ("payload_length", ctypes.c_uint32),  # 0x24c
        ("setup_data", ctypes.c_uint64),  # 0x250
        ("pref_address", ctypes.c_uint64),  # 0x258
        ("init_size", ctypes.c_uint32),  # 0x260
        ("handover_offset", ctypes.c_uint32),  # 0x264
        ("kernel_info_offset", ctypes.c_uint32),  # 0x268
    ]


assert ctypes.sizeof(SetupHeader) == 0x26C - HEADER_OFFSET


class E820Entry(ctypes.Structure):
    """``struct boot_e820_entry`` (bootparam.h), packed: one range of the memory map."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


assert ctypes.sizeof(E820Entry) == 20


class BootParams(ctypes.Structure):
    """``struct boot_params``, the "zero page" (bootparam.h), packed, 4096 bytes.

    Firmware-provided blocks kasou never fills (screen_info, apm_bios_info, ist_info, edid_info,
    efi_info, edd tables) are kept as opaque byte arrays of their sizes.
    """

    _pack_ = 1
    _fields_ = [
        ("screen_info", ctypes.c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", ctypes.c_uint8 * 0x14),  # 0x040
        ("_pad2", ctypes.c_uint8 * 4),  # 0x054
        ("tboot_addr", ctypes.c_uint64),  # 0x058
        ("ist_info", ctypes.c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),  # 0x070
        ("_pad3", ctypes.c_uint8 * 8),  # 0x078
        ("hd0_info", ctypes.c_uint8 * 16),  # 0x080
        ("hd1_info", ctypes.c_uint8 * 16),  # 0x090
        ("sys_desc_table", ctypes.c_uint8 * 16),  # 0x0a0
        ("olpc_ofw_header", ctypes.c_uint8 * 16),  # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),  # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),  # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),  # 0x0c8
        ("_pad4", ctypes.c_uint8 * 112),  # 0x0cc
        ("cc_blob_address", ctypes.c_uint32),  # 0x13c
        ("edid_info", ctypes.c_uint8 * 0x80),  # 0x140
        ("efi_info", ctypes.c_uint8 * 0x20),  # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),  # 0x1e0
        ("scratch", ctypes.c_uint32),  # 0x1e4
        ("e820_entries", ctypes.c_uint8),  # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),  # 0x1ea
        ("kbd_status", ctypes.c_uint8),  # 0x1eb
        ("secure_boot", ctypes.c_uint8),  # 0x1ec
        ("_pad5", ctypes.c_uint8 * 2),  # 0x1ed
        ("sentinel", ctypes.c_uint8),  # 0x1ef
        ("_pad6", ctypes.c_uint8 * 1),  # 0x1f0
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad7", ctypes.c_uint8 * (0x290 - 0x26C)),  # 0x26c
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),  # 0x290
        ("e820_table", E820Entry * E820_MAX_ENTRIES),  # 0x2d0
        ("_pad8", ctypes.c_uint8 * 48),  # 0xcd0
        ("eddbuf", ctypes.c_uint8 * (6 * 82)),  # 0xd00: struct edd_info[EDDMAXNR]
        ("_pad9", ctypes.c_uint8 * 276),  # 0xeec
    ]


assert ctypes.sizeof(BootParams) == BOOT_PARAMS_SIZE

# The setup header as it may sit in boot_params: up to edd_mbr_sig_buffer. Newer kernels may
# declare a longer header than this mirror knows; its bytes are still copied.
_HEADER_ROOM = 0x290 - HEADER_OFFSET


def build_boot_params(
    *,
    setup_header: bytes | None,
    cmdline_addr: int,
    cmdline_size: int,
    initrd: tuple[int, int] | None,
    e820: Sequence[tuple[int, int, int]],
    acpi_rsdp_addr: int = 0,
) -> bytes:
    """Return the 4096-byte ``boot_params`` for the 64-bit entry.

    ``setup_header`` is the header copied from a bzImage (bytes from 0x1f1), or None for an
    ELF vmlinux, which gets a minimal header. ``cmdline_size`` is the length of the command
    line written at ``cmdline_addr`` without its NUL; ``initrd`` is ``(address, size)``;
    ``e820`` is the memory map as ``(address, size, type)``; ``acpi_rsdp_addr`` is where the
    ACPI RSDP is, 0 for a machine without ACPI tables.
    """
    params = BootParams()
    hdr = params.hdr
    if setup_header is None:
        # No setup header in a vmlinux: write the fields the kernel reads back from its own
        # header when it has one (boot.rst, "The Real-Mode Kernel Header").
        hdr.boot_flag = BOOT_FLAG
        hdr.header = HDRS_MAGIC
        hdr.version = _ELF_PROTOCOL_VERSION
        hdr.kernel_alignment = _ELF_KERNEL_ALIGNMENT
        hdr.cmdline_size = ELF_CMDLINE_MAX
        cmdline_max = ELF_CMDLINE_MAX
    else:
        # 64-bit Boot Protocol: "the setup header at offset 0x01f1 of kernel image on should
        # be loaded into struct boot_params"; the rest of boot_params stays zero.
        header = setup_header[:_HEADER_ROOM]
        ctypes.memmove(ctypes.addressof(params) + HEADER_OFFSET, header, len(header))
        if hdr.header != HDRS_MAGIC:
            raise ValueError("setup_header does not start at 0x1f1 of a bzImage")
        cmdline_max = int(hdr.cmdline_size)

    if not 0 <= cmdline_size <= cmdline_max:
        raise ConfigError(
            "cmdline",
            f"the command line is {cmdline_size} bytes, the kernel accepts at most "
            f"{cmdline_max}: shorten it",
        )
    # vid_mode (write, obligatory): 0xffff asks for the normal text mode, no prompt.
    hdr.vid_mode = VID_MODE_NORMAL
    # type_of_loader (write, obligatory): 0xff, a boot loader without an assigned id.
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    # loadflags (modify, obligatory): LOADED_HIGH, the kernel sits at or above 1 MiB;
    # CAN_USE_HEAP, heap_end_ptr below is valid.
    hdr.loadflags = (int(hdr.loadflags) | LOADED_HIGH | CAN_USE_HEAP) & 0xFF
    # heap_end_ptr (write, obligatory): only the real-mode setup code, which the 64-bit entry
    # skips, reads it; set the conventional value.
    hdr.heap_end_ptr = HEAP_END_PTR
    # cmd_line_ptr (write, obligatory) and ext_cmd_line_ptr (zero-page.rst): the low and high
    # 32 bits of the command line's address.
    hdr.cmd_line_ptr = cmdline_addr & 0xFFFF_FFFF
    params.ext_cmd_line_ptr = cmdline_addr >> 32
    # ramdisk_image / ramdisk_size (write, obligatory) and their ext_ halves: zero means none.
    if initrd is not None:
        address, size = initrd
        hdr.ramdisk_image = address & 0xFFFF_FFFF
        params.ext_ramdisk_image = address >> 32
        hdr.ramdisk_size = size & 0xFFFF_FFFF
        params.ext_ramdisk_size = size >> 32
    # e820_entries / e820_table (zero-page.rst): the memory map, in the caller's order.
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries, the zero page holds {E820_MAX_ENTRIES}")
    for index, (address, size, kind) in enumerate(e820):
        params.e820_table[index] = E820Entry(address, size, kind)
    params.e820_entries = len(e820)
    # acpi_rsdp_addr (zero-page.rst, boot protocol 2.14): the RSDP's physical address, so the
    # kernel need not scan the BIOS area for it; 0 leaves the kernel to search.
    if not 0 <= acpi_rsdp_addr < 1 << 64:
        raise ValueError(f"acpi_rsdp_addr {acpi_rsdp_addr:#x} is not a 64-bit address")
    params.acpi_rsdp_addr = acpi_rsdp_addr
    return bytes(params)


def write_cmdline(memory: GuestMemory, address: int, cmdline: str, limit: int) -> int:
    """Write ``cmdline`` NUL-terminated at ``address``; return its length without the NUL.

    ``limit`` is the longest command line the kernel accepts (``LoadedKernel.cmdline_max``).
    """
    data = cmdline.encode()
    if b"\0" in data:
        raise ConfigError("cmdline", "the command line contains a NUL byte: remove it")
    if len(data) > limit:
        raise ConfigError(
            "cmdline",
            f"the command line is {len(data)} bytes, the kernel accepts at most {limit}: "
            "shorten it",
        )
    memory.write(address, data + b"\0")
    return len(data)
