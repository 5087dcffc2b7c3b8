"""Multiboot (v1) kernels: the header, the image, the modules and the boot information.

This module owns what the Multiboot Specification 0.6.96 asks of a boot loader: finding and
validating the Multiboot header (§3.1), loading the OS image either from the header's address
fields (flag 16, the "a.out kludge", §3.1.3) or from an ELF file's PT_LOAD segments at their
physical addresses, putting boot modules page aligned after the image, and writing the
Multiboot information structure (§3.3) that the kernel finds through EBX. Every field of the
file is untrusted: an image whose fields contradict each other or the file, that overlaps
itself, or that does not fit in guest RAM is refused with an ``ImageError`` saying what is
wrong. It does not set the machine state of §3.2 (32-bit protected mode, EAX, EBX: the VMM's
job, ``vmm/builder.py``), does not know where kasou keeps its boot structures (the caller
gives the information area and the e820 map), and never touches KVM.

Header flags (§3.1.2). Bits 0-15 are requirements a loader must meet or refuse the image:

- bit 0 (modules page aligned): always met, every module starts on a 4 KiB page;
- bit 1 (memory information): always met, the information carries ``mem_lower``,
  ``mem_upper`` and the memory map;
- bit 2 (video mode): ignored, with a log note. kasou has no framebuffer, so it reports no
  video mode (information flags 11 and 12 stay clear), as QEMU does;
- bits 3-15: refused, they name nothing kasou knows.

Bit 16 selects the address fields; without it the image must be an ELF file: ELF32 for i386,
or ELF64 for x86-64 whose segments lie below 4 GiB (the entry point is still entered in
32-bit protected mode). Nothing may load below 1 MiB, where the VMM keeps its boot
structures (GRUB Legacy refuses that too) or above 4 GiB, which 32-bit code cannot reach.

The information structure kasou writes (§3.3), in the area the caller gives::

    +0    the 88-byte structure: flags 0 (mem_*), 2 (cmdline), 3 (mods), 6 (mmap),
          9 (boot_loader_name); the rest zero
    +88   mmap: one 24-byte entry per e820 range (size 20, base_addr, length, type)
          mods: one 16-byte entry per module (mod_start, mod_end, string, 0)
          strings: each module's string, then "kasou", NUL-terminated

The command line is written by the caller (the kernel's path, a space, the user's command
line: what GRUB and QEMU pass) and only pointed to.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from kasou.errors import ImageError
from kasou.memory import GuestMemory

__all__ = [
    "BOOTLOADER_MAGIC",
    "HEADER_MAGIC",
    "INFO_HEADER_SIZE",
    "SEARCH_BYTES",
    "Module",
    "MultibootHeader",
    "MultibootKernel",
    "MultibootSegment",
    "find_header",
    "header_offsets",
    "is_multiboot",
    "load_modules",
    "load_multiboot",
    "parse_multiboot",
    "write_info",
]

log = logging.getLogger(__name__)

SEARCH_BYTES = 8192  # §3.1: the header lies, 32-bit aligned, in the first 8192 bytes
HEADER_MAGIC = 0x1BADB002  # §3.1.1, the header's magic field
BOOTLOADER_MAGIC = 0x2BADB002  # §3.2, EAX at the entry
LOAD_FLOOR = 0x100000  # nothing loads below 1 MiB: the VMM's boot structures live there
_ADDRESS_LIMIT = 1 << 32  # Multiboot addresses are 32 bits
_PAGE = 4096
_MIB = 1 << 20

# Header flags (§3.1.2).
_FLAG_PAGE_ALIGN = 1 << 0
_FLAG_MEMORY_INFO = 1 << 1
_FLAG_VIDEO_MODE = 1 << 2
_FLAG_ADDRESS_FIELDS = 1 << 16
_REQUIRED_FLAGS = 0xFFFF
_MET_FLAGS = _FLAG_PAGE_ALIGN | _FLAG_MEMORY_INFO | _FLAG_VIDEO_MODE

# The header (§3.1.1): magic, flags, checksum; with flag 16 the address fields header_addr,
# load_addr, load_end_addr, bss_end_addr, entry_addr; with flag 2 mode_type, width, height,
# depth (read only to check that they are in the file).
_HEADER = struct.Struct("<III")
_MAGIC_BYTES = HEADER_MAGIC.to_bytes(4, "little")
_ADDRESS_FIELDS = struct.Struct("<5I")
_VIDEO_FIELDS_END = 48

# Information flags (§3.3) and the structure's fields kasou fills.
_INFO_MEMORY = 1 << 0
_INFO_CMDLINE = 1 << 2
_INFO_MODS = 1 << 3
_INFO_MMAP = 1 << 6
_INFO_LOADER_NAME = 1 << 9
INFO_HEADER_SIZE = 88  # up to vbe_interface_len, the last field of 0.6.96's structure
_INFO_FIELDS = (  # (offset, name) of the u32 fields written
    (0, "flags"),
    (4, "mem_lower"),
    (8, "mem_upper"),
    (16, "cmdline"),
    (20, "mods_count"),
    (24, "mods_addr"),
    (44, "mmap_length"),
    (48, "mmap_addr"),
    (64, "boot_loader_name"),
)
_MMAP_ENTRY = struct.Struct("<IQQI")  # size, base_addr, length, type; size excludes itself
_MODULE_ENTRY = struct.Struct("<IIII")  # mod_start, mod_end, string, reserved
_LOADER_NAME = b"kasou\0"
_E820_RAM = 1
_LOWER_MEMORY_LIMIT = 640 << 10  # mem_lower: "maximum possible value ... is 640 kilobytes"

# ELF (System V ABI "ELF Header", "Program Header"): ELF32 for EM_386, ELF64 for EM_X86_64.
_ELF_MAGIC = b"\x7fELF"
_ELFCLASS32, _ELFCLASS64 = 1, 2
_ELFDATA2LSB = 1
_ET_EXEC = 2
_EM_386, _EM_X86_64 = 3, 62
_PT_LOAD = 1
# After e_ident: type, machine, version, entry, phoff, shoff, flags, ehsize, phentsize, phnum.
_EHDR32 = struct.Struct("<HHIIIIIHHH")
_EHDR64 = struct.Struct("<HHIQQQIHHH")
_PHDR32 = struct.Struct("<8I")  # type, offset, vaddr, paddr, filesz, memsz, flags, align
_PHDR64 = struct.Struct("<IIQQQQQQ")  # type, flags, offset, vaddr, paddr, filesz, memsz, align
assert _PHDR32.size == 32 and _PHDR64.size == 56


class MultibootHeader(NamedTuple):
    """A Multiboot header with a valid checksum. The address fields are 0 without flag 16."""

    offset: int  # file offset of the magic
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0

    @property
    def has_address_fields(self) -> bool:
        return bool(self.flags & _FLAG_ADDRESS_FIELDS)


class MultibootSegment(NamedTuple):
    """``filesz`` bytes from file ``offset`` go to ``address``, then zeros up to ``memsz``."""

    offset: int
    address: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.address + self.memsz


class MultibootKernel(NamedTuple):
    """A validated Multiboot image: where it goes and where it is entered (physical)."""

    header: MultibootHeader
    entry: int
    segments: tuple[MultibootSegment, ...]

    @property
    def start(self) -> int:
        return min(segment.address for segment in self.segments)

    @property
    def end(self) -> int:
        """The first address after the image, bss included."""
        return max(segment.end for segment in self.segments)


class Module(NamedTuple):
    """A boot module in guest memory: ``[start, end)`` and its string (§3.3, mods)."""

    start: int
    end: int
    string: str


def header_offsets(data: bytes | memoryview) -> tuple[int | None, int | None]:
    """The offsets of the first valid header and of the first magic (before it) with a bad
    checksum, each ``None`` when there is none."""
    valid = bad = None
    search = bytes(data[:SEARCH_BYTES])  # every Linux kernel is searched too: find, not a loop
    offset = search.find(_MAGIC_BYTES)
    while 0 <= offset <= len(search) - _HEADER.size:
        if offset % 4 == 0:
            magic, flags, checksum = _HEADER.unpack_from(search, offset)
            if (magic + flags + checksum) & 0xFFFF_FFFF == 0:
                valid = offset
                break
            if bad is None:
                bad = offset
        offset = search.find(_MAGIC_BYTES, offset + 1)
    return valid, bad


def find_header(data: bytes | memoryview) -> MultibootHeader | None:
    """The first Multiboot header with a valid checksum, or ``None``. Its address fields are
    read only when flag 16 is set and they lie in the file (``parse_multiboot`` checks)."""
    offset, _ = header_offsets(data)
    if offset is None:
        return None
    flags = _HEADER.unpack_from(data, offset)[1]
    fields = offset + _HEADER.size
    if flags & _FLAG_ADDRESS_FIELDS and fields + _ADDRESS_FIELDS.size <= len(data):
        return MultibootHeader(offset, flags, *_ADDRESS_FIELDS.unpack_from(data, fields))
    return MultibootHeader(offset, flags)


def is_multiboot(data: bytes | memoryview) -> bool:
    """Whether ``data`` holds a Multiboot header with a valid checksum (it may still be an
    unusable image)."""
    return header_offsets(data)[0] is not None


def parse_multiboot(data: bytes | memoryview, name: str = "kernel") -> MultibootKernel:
    """Validate ``data`` as a Multiboot image and say where its bytes go. ``name`` (the file)
    goes into error messages. Checks that need guest memory are ``load_multiboot``'s."""
    offset, bad = header_offsets(data)
    if offset is None:
        if bad is not None:
            raise ImageError(
                f"{name}: the Multiboot header at offset {bad:#x} has a bad checksum "
                "(magic + flags + checksum must be 0 modulo 2^32): the image is damaged"
            )
        raise ImageError(
            f"{name} has no Multiboot header (magic {HEADER_MAGIC:#x} in its first "
            f"{SEARCH_BYTES} bytes): give a Multiboot kernel"
        )
    flags = _HEADER.unpack_from(data, offset)[1]
    unknown = flags & _REQUIRED_FLAGS & ~_MET_FLAGS
    if unknown:
        bits = ", ".join(str(bit) for bit in range(16) if unknown >> bit & 1)
        raise ImageError(
            f"{name}: its Multiboot header requires feature bit(s) {bits}, which kasou does "
            "not provide (it meets bits 0 and 1 and ignores 2): the kernel cannot boot here"
        )
    needed = _VIDEO_FIELDS_END if flags & _FLAG_VIDEO_MODE else _HEADER.size
    if flags & _FLAG_ADDRESS_FIELDS:
        needed = max(needed, _HEADER.size + _ADDRESS_FIELDS.size)
    if offset + needed > len(data):
        raise ImageError(
            f"{name} ends inside its Multiboot header (at offset {offset:#x}): the file is "
            "truncated"
        )
    if flags & _FLAG_VIDEO_MODE:
        # §3.1.2 bit 2: a loader without the video mode must not claim one; the kernel sees
        # information flags 11 and 12 clear and keeps whatever it has (COM1 here).
        log.info("%s asks for a video mode; kasou has no framebuffer and reports none", name)
    if flags & _FLAG_ADDRESS_FIELDS:
        header = MultibootHeader(
            offset, flags, *_ADDRESS_FIELDS.unpack_from(data, offset + _HEADER.size)
        )
        kernel = _from_address_fields(data, header, name)
    else:
        kernel = _from_elf(data, MultibootHeader(offset, flags), name)
    for index, segment in enumerate(kernel.segments):
        _check_range(segment, index, name)
    return kernel


def _from_address_fields(
    data: bytes | memoryview, header: MultibootHeader, name: str
) -> MultibootKernel:
    """§3.1.3: the image is the file from the offset that maps to ``load_addr``."""
    load, end, bss = header.load_addr, header.load_end_addr, header.bss_end_addr
    if load > header.header_addr:
        raise ImageError(
            f"{name}: Multiboot load_addr {load:#x} is above header_addr "
            f"{header.header_addr:#x} (the header must lie at or after the load address): "
            "the address fields are wrong"
        )
    # The file offset that load_addr maps to: the header's offset, less how far into the
    # image the header says it lies.
    file_offset = header.offset - (header.header_addr - load)
    if file_offset < 0:
        raise ImageError(
            f"{name}: Multiboot header_addr {header.header_addr:#x} lies "
            f"{header.header_addr - load:#x} bytes after load_addr, but the header is only "
            f"{header.offset:#x} bytes into the file: the address fields are wrong"
        )
    if end == 0:  # §3.1.3: "the text and data segments occupy the whole OS image file"
        end = load + len(data) - file_offset
    elif end <= load:
        raise ImageError(
            f"{name}: Multiboot load_end_addr {end:#x} is not above load_addr {load:#x}: "
            "the address fields are wrong"
        )
    if file_offset + (end - load) > len(data):
        raise ImageError(
            f"{name} is {len(data)} bytes, shorter than its Multiboot header says (it loads "
            f"{end - load} bytes from offset {file_offset:#x}): the file is truncated"
        )
    if bss == 0:  # §3.1.3: "no bss segment"
        bss = end
    elif bss < end:
        raise ImageError(
            f"{name}: Multiboot bss_end_addr {bss:#x} is below load_end_addr {end:#x}: "
            "the address fields are wrong"
        )
    if not load <= header.entry_addr < end:
        raise ImageError(
            f"{name}: Multiboot entry_addr {header.entry_addr:#x} is outside the loaded image "
            f"[{load:#x}, {end:#x}): the address fields are wrong"
        )
    segment = MultibootSegment(file_offset, load, end - load, bss - load)
    return MultibootKernel(header, header.entry_addr, (segment,))


def _from_elf(data: bytes | memoryview, header: MultibootHeader, name: str) -> MultibootKernel:
    """An ELF image without address fields: its PT_LOAD segments, at their physical
    addresses."""
    ident = bytes(data[:16])
    if len(data) < 16 or ident[:4] != _ELF_MAGIC:
        raise ImageError(
            f"{name}: its Multiboot header has no address fields (flag 16) and the file is "
            "not an ELF image: a Multiboot kernel needs one or the other"
        )
    elf_class = ident[4]
    ehdr, phdr, machine_wanted = {
        _ELFCLASS32: (_EHDR32, _PHDR32, _EM_386),
        _ELFCLASS64: (_EHDR64, _PHDR64, _EM_X86_64),
    }.get(elf_class, (None, None, None))
    if ehdr is None or phdr is None or ident[5] != _ELFDATA2LSB:
        raise ImageError(f"{name} is not a little-endian ELF32 or ELF64 file: give an x86 kernel")
    if len(data) < 16 + ehdr.size:
        raise ImageError(f"{name} ends inside its ELF header: the file is truncated")
    e_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = (
        ehdr.unpack_from(data, 16)
    )
    if machine != machine_wanted:
        raise ImageError(
            f"{name} is an ELF{32 if elf_class == _ELFCLASS32 else 64} file for machine "
            f"{machine}, not x86: give an i386 or x86-64 kernel"
        )
    if e_type != _ET_EXEC:
        raise ImageError(f"{name} is not an ELF executable (type {e_type}): link it")
    if phentsize != phdr.size or not 0 < phnum < 0xFFFF:
        raise ImageError(f"{name} has no valid ELF program headers: the image is damaged")
    if phoff + phnum * phdr.size > len(data):
        raise ImageError(f"{name} ends inside its ELF program headers: the file is truncated")
    segments: list[MultibootSegment] = []
    vaddrs: list[int] = []
    for index in range(phnum):
        fields = phdr.unpack_from(data, phoff + index * phdr.size)
        if elf_class == _ELFCLASS32:
            p_type, offset, vaddr, paddr, filesz, memsz, _pflags, _align = fields
        else:
            p_type, _pflags, offset, vaddr, paddr, filesz, memsz, _align = fields
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise ImageError(f"{name}: ELF segment {index} has more file bytes than memory bytes")
        if offset + filesz > len(data):
            raise ImageError(
                f"{name} is {len(data)} bytes, shorter than ELF segment {index} says (it "
                f"loads {filesz} bytes from offset {offset:#x}): the file is truncated"
            )
        segments.append(MultibootSegment(offset, paddr, filesz, memsz))
        vaddrs.append(vaddr)
    if not segments:
        raise ImageError(f"{name} has nothing to load (no PT_LOAD segment): the image is damaged")
    ordered = sorted(segments, key=lambda segment: segment.address)
    for before, after in itertools.pairwise(ordered):
        if before.end > after.address:
            raise ImageError(
                f"{name}: ELF segments overlap at {after.address:#x}: the image is damaged"
            )
    return MultibootKernel(header, _physical_entry(entry, segments, vaddrs, name), tuple(segments))


def _physical_entry(
    entry: int, segments: list[MultibootSegment], vaddrs: list[int], name: str
) -> int:
    # e_entry is physical when the image is linked at its load address; a higher-half kernel
    # has a virtual one, translated through the segment that holds it (as GRUB does).
    for segment in segments:
        if segment.address <= entry < segment.end:
            return entry
    for segment, vaddr in zip(segments, vaddrs, strict=True):
        if vaddr <= entry < vaddr + segment.memsz:
            return segment.address + (entry - vaddr)
    raise ImageError(f"{name}: the ELF entry point {entry:#x} is outside every loaded segment")


def _check_range(segment: MultibootSegment, index: int, name: str) -> None:
    what = f"{name}: {'the image' if index == 0 else f'segment {index}'}"
    if segment.end > _ADDRESS_LIMIT:
        raise ImageError(
            f"{what} ends at {segment.end:#x}, above 4 GiB, which a Multiboot kernel cannot "
            "reach: link it lower"
        )
    if segment.address < LOAD_FLOOR:
        raise ImageError(
            f"{what} loads at {segment.address:#x}, below 1 MiB where kasou keeps its boot "
            "structures: link the kernel at 1 MiB or above"
        )


def load_multiboot(
    memory: GuestMemory, data: bytes | memoryview, kernel: MultibootKernel, name: str = "kernel"
) -> None:
    """Copy ``kernel``'s bytes from ``data`` into guest RAM and zero its bss, after checking
    that every byte lands in RAM (not past its end, not in the MMIO hole)."""
    for segment in kernel.segments:
        if not memory.contains(segment.address, segment.memsz):
            raise _outside_ram(memory, name, segment.address, segment.end)
    view = memoryview(data)
    for segment in kernel.segments:
        memory.write(segment.address, view[segment.offset : segment.offset + segment.filesz])
        if segment.memsz > segment.filesz:
            memory.fill(segment.address + segment.filesz, segment.memsz - segment.filesz, 0)


def _low_ram_end(memory: GuestMemory) -> int:
    """The end of the RAM that starts at 0 (below the MMIO hole)."""
    return next((region.end for region in memory.regions if region.gpa == 0), 0)


def _outside_ram(memory: GuestMemory, what: str, start: int, end: int) -> ImageError:
    low_end = _low_ram_end(memory)
    if memory.size > low_end and end > low_end:
        # RAM continues above 4 GiB: the range lies in the hole between.
        return ImageError(
            f"{what} needs [{start:#x}, {end:#x}), which reaches the MMIO hole (from "
            f"{low_end:#x} to 4 GiB, devices and no RAM): link the kernel lower or use "
            "smaller modules"
        )
    return ImageError(
        f"{what} needs guest RAM up to {end:#x} ({(end + _MIB - 1) // _MIB} MiB), the VM has "
        f"{memory.size // _MIB} MiB: raise --memory"
    )


def load_modules(memory: GuestMemory, modules: Sequence[Path], after: int) -> list[Module]:
    """Read each file in ``modules`` into guest RAM, page aligned, one after the other from
    the first page at or after ``after`` (the kernel's end); each module's string is its
    path. Raises ``ImageError`` for a file that cannot be read or does not fit in RAM below
    the MMIO hole."""
    loaded: list[Module] = []
    address = _align_up(after)
    for path in modules:
        what = f"module {path}"
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if not memory.contains(address, max(size, 1)) or address + size > _ADDRESS_LIMIT:
                    raise _outside_ram(memory, what, address, address + size)
                read = file.readinto(memory.view(address, size)) if size else 0
        except OSError as error:
            raise _read_error(what, path, error) from error
        if read != size:
            raise ImageError(f"{what} changed while it was read: try again")
        loaded.append(Module(address, address + size, str(path)))
        address = _align_up(address + size)
    return loaded


def _read_error(what: str, path: Path, error: OSError) -> ImageError:
    if isinstance(error, FileNotFoundError):
        return ImageError(f"{what} does not exist: check the path")
    if isinstance(error, IsADirectoryError):
        return ImageError(f"{what} is a directory: give the path of a file")
    return ImageError(f"cannot read {what}: {error.strerror or error}: check the file")


def write_info(
    memory: GuestMemory,
    address: int,
    size: int,
    *,
    cmdline: int,
    modules: Sequence[Module],
    e820: Sequence[tuple[int, int, int]],
) -> int:
    """Write the Multiboot information structure (§3.3) in the ``size`` bytes at ``address``
    and return its address (EBX at the entry).

    ``cmdline`` is the guest address of the NUL-terminated command line; ``e820`` the memory
    map as ``(address, size, type)`` with the e820 type numbers, which the Multiboot memory
    map shares (1 available, 2 reserved); ``mem_lower`` and ``mem_upper`` are derived from
    its RAM at 0 and at 1 MiB. Raises ``ImageError`` when the modules' strings do not fit.
    """
    mmap = b"".join(
        _MMAP_ENTRY.pack(_MMAP_ENTRY.size - 4, base, length, kind) for base, length, kind in e820
    )
    strings = bytearray()
    string_base = address + INFO_HEADER_SIZE + len(mmap) + _MODULE_ENTRY.size * len(modules)
    mods = bytearray()
    for module in modules:
        mods += _MODULE_ENTRY.pack(module.start, module.end, string_base + len(strings), 0)
        strings += module.string.encode(errors="surrogateescape") + b"\0"
    loader_name = string_base + len(strings)
    strings += _LOADER_NAME
    body = bytes(mods) + bytes(strings)
    total = INFO_HEADER_SIZE + len(mmap) + len(body)
    if total > size:
        raise ImageError(
            f"the Multiboot information for {len(modules)} modules takes {total} bytes, kasou "
            f"has room for {size}: use fewer modules or shorter paths"
        )
    lower, upper = _memory_sizes(e820)
    values = {
        "flags": _INFO_MEMORY | _INFO_CMDLINE | _INFO_MODS | _INFO_MMAP | _INFO_LOADER_NAME,
        "mem_lower": lower,
        "mem_upper": upper,
        "cmdline": cmdline,
        "mods_count": len(modules),
        "mods_addr": address + INFO_HEADER_SIZE + len(mmap),
        "mmap_length": len(mmap),
        "mmap_addr": address + INFO_HEADER_SIZE,
        "boot_loader_name": loader_name,
    }
    info = bytearray(INFO_HEADER_SIZE)
    for offset, field in _INFO_FIELDS:
        struct.pack_into("<I", info, offset, values[field])
    memory.write(address, bytes(info) + mmap + body)
    return address


def _memory_sizes(e820: Sequence[tuple[int, int, int]]) -> tuple[int, int]:
    """``mem_lower`` and ``mem_upper`` in KiB (§3.3): RAM from 0, at most 640 KiB, and RAM
    from 1 MiB up to the first hole."""
    lower = upper = 0
    for base, length, kind in e820:
        if kind != _E820_RAM:
            continue
        if base == 0:
            lower = min(length, _LOWER_MEMORY_LIMIT) >> 10
        elif base == LOAD_FLOOR:
            upper = min(length, _ADDRESS_LIMIT - LOAD_FLOOR) >> 10
    return lower, upper


def _align_up(value: int) -> int:
    return (value + _PAGE - 1) & ~(_PAGE - 1)
