"""ELF64 x86-64 kernels (a vmlinux): header validation and loading of PT_LOAD segments.

This module owns parsing an ELF executable's file and program headers (System V ABI, "ELF
Header" and "Program Header"; the x86-64 psABI for EM_X86_64) and copying its loadable
segments to their physical addresses (``p_paddr``) in guest memory. Every header field is
untrusted: offsets and sizes are checked against the file and against guest RAM before use.
It does not read section headers, symbols or notes, and does not build ``boot_params``.
"""

from __future__ import annotations

import itertools
import struct
from typing import NamedTuple

from kasou.errors import ImageError
from kasou.memory import GuestMemory

__all__ = ["BOOT_AREA_END", "ElfKernel", "ElfSegment", "is_elf", "load_elf", "parse_elf"]

# The VMM keeps its boot structures (zero page, command line, page tables, MP table) below
# 1 MiB; a kernel segment there would overwrite them or be overwritten.
BOOT_AREA_END = 0x100000

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_EV_CURRENT = 1
_ET_EXEC = 2
_EM_X86_64 = 62
_PT_LOAD = 1
_MAX_PHDRS = 0xFFFF - 1  # PN_XNUM (0xffff) means "more than that", which no kernel uses

# Elf64_Ehdr after e_ident (16 bytes): type, machine, version, entry, phoff, shoff, flags,
# ehsize, phentsize, phnum, shentsize, shnum, shstrndx.
_EHDR = struct.Struct("<HHIQQQIHHHHHH")
_EHDR_SIZE = 16 + _EHDR.size
# Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz, memsz, align.
_PHDR = struct.Struct("<IIQQQQQQ")

assert _EHDR_SIZE == 64 and _PHDR.size == 56


class ElfSegment(NamedTuple):
    """One PT_LOAD segment: ``filesz`` bytes from ``offset`` go to ``paddr``, then zeros up to
    ``memsz``."""

    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        """The first physical address after the segment."""
        return self.paddr + self.memsz


class ElfKernel(NamedTuple):
    """A validated ELF kernel: its physical entry point and loadable segments."""

    entry: int
    segments: tuple[ElfSegment, ...]

    @property
    def start(self) -> int:
        """The lowest physical address a segment occupies."""
        return min(segment.paddr for segment in self.segments)

    @property
    def end(self) -> int:
        """The first physical address after the highest segment (bss included)."""
        return max(segment.end for segment in self.segments)


def is_elf(data: bytes | memoryview) -> bool:
    """Whether ``data`` starts with the ELF magic (it may still be an unusable ELF)."""
    return bytes(data[:4]) == _ELF_MAGIC


def parse_elf(data: bytes | memoryview, name: str = "kernel") -> ElfKernel:
    """Validate ``data`` as an ELF64 little-endian x86-64 executable and list its PT_LOAD
    segments. ``name`` (the file) goes into error messages."""
    if len(data) < _EHDR_SIZE or not is_elf(data):
        raise ImageError(f"{name} is not an ELF file: give a vmlinux or a bzImage")
    ident = bytes(data[:16])
    (_type, machine, version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_) = (
        _EHDR.unpack_from(data, 16)
    )
    if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB or machine != _EM_X86_64:
        raise ImageError(
            f"{name} is an ELF file but not for x86-64: give a 64-bit x86 vmlinux or bzImage"
        )
    if ident[6] != _EV_CURRENT or version != _EV_CURRENT or _type != _ET_EXEC:
        raise ImageError(f"{name} is not an ELF executable: give a vmlinux, not an object file")
    if phentsize != _PHDR.size or not 0 < phnum <= _MAX_PHDRS:
        raise ImageError(f"{name} has no valid program headers: the image is damaged")
    if phoff + phnum * _PHDR.size > len(data):
        raise ImageError(f"{name} is truncated (program headers past its end): the file is damaged")

    segments: list[ElfSegment] = []
    for index in range(phnum):
        p_type, _pflags, offset, vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + index * _PHDR.size
        )
        if p_type != _PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise ImageError(f"{name}: segment {index} has more file bytes than memory bytes")
        if offset + filesz > len(data):
            raise ImageError(
                f"{name} is truncated (segment {index} past its end): the file is damaged"
            )
        if paddr + memsz > 1 << 52:  # beyond any x86-64 physical address
            raise ImageError(f"{name}: segment {index} lies outside the physical address space")
        if paddr < BOOT_AREA_END:
            raise ImageError(
                f"{name}: segment {index} loads at {paddr:#x}, below 1 MiB where the VMM keeps "
                "boot structures: link the kernel at 1 MiB or above"
            )
        segments.append(ElfSegment(offset, vaddr, paddr, filesz, memsz))
    if not segments:
        raise ImageError(f"{name} has nothing to load (no PT_LOAD segment): the image is damaged")
    ordered = sorted(segments, key=lambda segment: segment.paddr)
    for before, after in itertools.pairwise(ordered):
        if before.end > after.paddr:
            raise ImageError(f"{name}: segments overlap at {after.paddr:#x}: the image is damaged")
    return ElfKernel(entry=_physical_entry(entry, segments, name), segments=tuple(segments))


def _physical_entry(entry: int, segments: list[ElfSegment], name: str) -> int:
    # A vmlinux links ENTRY(phys_startup_64) (arch/x86/kernel/vmlinux.lds.S), so e_entry is
    # already physical; an ELF whose entry is virtual is translated through its segment.
    for segment in segments:
        if segment.paddr <= entry < segment.end:
            return entry
    for segment in segments:
        if segment.vaddr <= entry < segment.vaddr + segment.memsz:
            return segment.paddr + (entry - segment.vaddr)
    raise ImageError(f"{name}: the entry point {entry:#x} is outside every loaded segment")


def load_elf(memory: GuestMemory, data: bytes | memoryview, kernel: ElfKernel) -> None:
    """Copy ``kernel``'s segments from ``data`` into ``memory`` and zero their bss.

    The caller has checked that every segment lies in guest RAM (``memory.contains``).
    """
    view = memoryview(data)
    for segment in kernel.segments:
        memory.write(segment.paddr, view[segment.offset : segment.offset + segment.filesz])
        if segment.memsz > segment.filesz:
            memory.fill(segment.paddr + segment.filesz, segment.memsz - segment.filesz, 0)
