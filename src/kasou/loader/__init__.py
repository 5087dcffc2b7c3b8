"""Kernel images for the Linux x86 64-bit boot protocol: vmlinux, bzImage, initrd, boot_params.

This package owns reading kernel and initrd files, validating them as untrusted input,
copying them into guest memory and describing the result (``LoadedKernel``), extracting the
vmlinux from a bzImage's compressed payload, and building the ``boot_params`` zero page. It
does not set up CPU state, page tables or the memory map (``arch/x86_64``) and never touches
KVM.

The 64-bit boot protocol (Documentation/arch/x86/boot.rst): the kernel is entered in 64-bit
mode with paging on at ``LoadedKernel.entry``, with RSI holding the address of
``boot_params``; the kernel image (up to ``LoadedKernel.end``), ``boot_params``, the command
line and the initrd must be identity mapped.

Multiboot (v1) kernels (``multiboot.py``) are loaded here too, and their modules and boot
information written by ``multiboot.py`` for the VMM, which enters them in 32-bit protected
mode. Which protocol a file gets: a bzImage ("HdrS") is a bzImage; a file with a valid
Multiboot header is a Multiboot kernel, except an x86-64 ELF executable whose header's
address fields name an entry other than its ``e_entry``: that file has a 64-bit entry as
well (kasou's guest kit is built so) and boots through it. A Linux vmlinux has no Multiboot
header; an x86-64 ELF whose Multiboot entry is its ``e_entry`` has 32-bit code there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NamedTuple

from kasou.errors import ImageError
from kasou.loader.bootparams import (
    E820_RAM,
    E820_RESERVED,
    ELF_CMDLINE_MAX,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    BootParams,
    E820Entry,
    SetupHeader,
    build_boot_params,
    write_cmdline,
)
from kasou.loader.bzimage import (
    ENTRY_OFFSET_64,
    extract_vmlinux,
    is_bzimage,
    load_address_candidates,
    load_bzimage,
    parse_bzimage,
)
from kasou.loader.elf import ElfKernel, is_elf, load_elf, parse_elf
from kasou.loader.initrd import IDENTITY_MAP_END, load_initrd, read_error
from kasou.loader.multiboot import (
    find_header,
    header_offsets,
    load_multiboot,
    parse_multiboot,
)
from kasou.memory import GuestMemory

__all__ = [
    "E820_RAM",
    "E820_RESERVED",
    "BootParams",
    "E820Entry",
    "KernelKind",
    "LoadedKernel",
    "SetupHeader",
    "build_boot_params",
    "extract_vmlinux",
    "kernel_format",
    "load_initrd",
    "load_kernel",
    "read_ahead",
    "write_cmdline",
]

KernelKind = Literal["elf", "bzimage", "multiboot"]
_MIB = 1 << 20
# A Multiboot kernel's command line has no limit of its own (Multiboot 0.6.96, 3.3); the
# VMM bounds it by the room it has.
_MULTIBOOT_CMDLINE_MAX = 1 << 20


class LoadedKernel(NamedTuple):
    """A kernel copied into guest memory, and what the rest of the boot needs to know."""

    kind: KernelKind
    entry: int  # guest-physical entry point: 64-bit; a Multiboot kernel's is 32-bit
    start: int  # lowest guest-physical byte of the kernel image
    end: int  # first byte after the image, including bss (ELF) or init_size (bzImage)
    setup_header: bytes | None  # bzImage: its setup header, for boot_params; ELF: None
    cmdline_max: int  # longest command line it accepts, without the NUL
    initrd_addr_max: int  # an initrd must end at or below this address


def kernel_format(path: Path) -> KernelKind:
    """Tell a usable vmlinux, bzImage or Multiboot kernel apart; ``ImageError`` for anything
    else."""
    data = _read(path)
    name = f"kernel {path}"
    kind = _kind(data)
    if kind == "multiboot":
        parse_multiboot(data, name)
    elif kind == "elf":
        parse_elf(data, name)
    else:
        parse_bzimage(data, name)
    return kind


def load_kernel(memory: GuestMemory, path: Path, *, extract: bool = False) -> LoadedKernel:
    """Load the vmlinux, bzImage or Multiboot kernel at ``path`` into ``memory``.

    With ``extract``, a bzImage is not loaded as such: the vmlinux in its payload is, and
    booted like any vmlinux (for hosts where the bzImage's decompressor cannot run). A
    Multiboot kernel's modules and information are the caller's (``multiboot.py``).
    """
    ahead = _take_ahead(path, extract)
    data = _read(path) if ahead is None else ahead[0]
    name = f"kernel {path}"
    kind = _kind(data)
    if kind == "multiboot":
        return _load_multiboot(memory, data, name)
    if kind == "elf":
        return _load_elf(memory, data, name)
    if extract:
        vmlinux = ahead[1] if ahead is not None and ahead[1] is not None else None
        return _load_elf(memory, vmlinux or extract_vmlinux(data, name), name)
    return _load_bzimage(memory, data, name)


# What ``read_ahead`` read: the file's identity, whether it was for an ``extract`` load, its
# bytes and (a bzImage for an ``extract`` load) the vmlinux in it.
_ahead: tuple[tuple[int, int, int, int], bool, bytes, bytes | None] | None = None


def read_ahead(path: Path, *, extract: bool = False) -> None:
    """Read the kernel at ``path`` now (and, with ``extract``, take the vmlinux out of a
    bzImage), for this process's next ``load_kernel`` of it with the same ``extract``, which
    uses it if the file has not changed since (device, inode, size, mtime) and reads it
    otherwise: for a VMM started ahead of its VM (``kasou.cli.template``). What is wrong
    with the file is left for that load to report."""
    global _ahead
    _ahead = None
    try:
        identity = _identity(path)
        data = _read(path)
        vmlinux = None
        if extract and _kind(data) == "bzimage":
            vmlinux = extract_vmlinux(data, f"kernel {path}")
    except (OSError, ImageError):
        return
    _ahead = (identity, extract, data, vmlinux)


def _take_ahead(path: Path, extract: bool) -> tuple[bytes, bytes | None] | None:
    """What ``read_ahead`` read, once, if it is this unchanged file's."""
    global _ahead
    ahead, _ahead = _ahead, None
    if ahead is None or ahead[1] != extract:
        return None
    try:
        if _identity(path) != ahead[0]:
            return None
    except OSError:
        return None
    return ahead[2], ahead[3]


def _identity(path: Path) -> tuple[int, int, int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _kind(data: bytes) -> KernelKind:
    """The protocol ``data`` boots with (the rule in the module docstring); ``_read`` has
    checked that it looks like one of them."""
    if _is_multiboot(data):
        return "multiboot"
    if is_elf(data):
        return "elf"
    if is_bzimage(data):
        return "bzimage"
    return "multiboot"  # only a Multiboot magic: parse_multiboot says what is wrong with it


def _load_elf(memory: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    kernel: ElfKernel = parse_elf(data, name)
    if kernel.end > IDENTITY_MAP_END:
        raise ImageError(f"{name} loads above 4 GiB, which kasou cannot enter: link it lower")
    for segment in kernel.segments:
        if not memory.contains(segment.paddr, segment.memsz):
            raise _needs_memory(name, kernel.end, memory)
    load_elf(memory, data, kernel)
    return LoadedKernel(
        kind="elf",
        entry=kernel.entry,
        start=kernel.start,
        end=kernel.end,
        setup_header=None,
        cmdline_max=ELF_CMDLINE_MAX,
        # A vmlinux builds its own page tables over all RAM before it reads the initrd; the
        # only limit is what kasou identity maps for the entry.
        initrd_addr_max=IDENTITY_MAP_END,
    )


def _load_bzimage(memory: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    image = parse_bzimage(data, name)
    candidates = load_address_candidates(image)
    for address in candidates:
        if memory.contains(address, image.extent):
            break
    else:
        lowest_end = min(address + image.extent for address in candidates)
        raise _needs_memory(name, lowest_end, memory)
    load_bzimage(memory, data, image, address)
    if image.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
        initrd_addr_max = IDENTITY_MAP_END
    else:
        # initrd_addr_max is "the address of the highest safe byte" (boot.rst).
        initrd_addr_max = min(image.initrd_addr_max + 1, IDENTITY_MAP_END)
    return LoadedKernel(
        kind="bzimage",
        entry=address + ENTRY_OFFSET_64,
        start=address,
        end=address + image.extent,
        setup_header=image.header,
        cmdline_max=image.cmdline_size,
        initrd_addr_max=initrd_addr_max,
    )


def _is_multiboot(data: bytes) -> bool:
    """Whether ``data`` boots as a Multiboot kernel (the rule in the module docstring)."""
    header = find_header(data)
    if header is None or is_bzimage(data):
        return False
    if not header.has_address_fields or not is_elf(data):
        return True
    try:
        elf = parse_elf(data)
    except ImageError:
        return True  # not an x86-64 executable kasou can enter in 64-bit mode
    return header.entry_addr == elf.entry


def _load_multiboot(memory: GuestMemory, data: bytes, name: str) -> LoadedKernel:
    kernel = parse_multiboot(data, name)
    load_multiboot(memory, data, kernel, name)
    return LoadedKernel(
        kind="multiboot",
        entry=kernel.entry,
        start=kernel.start,
        end=kernel.end,
        setup_header=None,
        cmdline_max=_MULTIBOOT_CMDLINE_MAX,
        initrd_addr_max=IDENTITY_MAP_END,  # modules: multiboot.load_modules places them
    )


def _needs_memory(name: str, end: int, memory: GuestMemory) -> ImageError:
    return ImageError(
        f"{name} needs {(end + _MIB - 1) // _MIB} MiB of guest memory, the VM has "
        f"{memory.size // _MIB} MiB: raise --memory"
    )


def _read(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise read_error("kernel", path, error) from error
    if not is_elf(data) and not is_bzimage(data) and not _has_multiboot_magic(data):
        raise ImageError(
            f"kernel {path} is not a kernel (neither an ELF vmlinux, a bzImage nor a "
            "Multiboot kernel): give a vmlinux, a bzImage or a Multiboot kernel"
        )
    return data


def _has_multiboot_magic(data: bytes) -> bool:
    """Whether a Multiboot magic sits where a header may, checksum aside: such a file is
    taken as a Multiboot kernel, so that a bad checksum is reported as such."""
    return any(offset is not None for offset in header_offsets(data))
