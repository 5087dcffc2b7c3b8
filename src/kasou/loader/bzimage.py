"""bzImage kernels for the 64-bit boot protocol, and the vmlinux inside their payload.

This module owns reading a bzImage's setup header (Documentation/arch/x86/boot.rst, "The
Real-Mode Kernel Header" and "Details of Header Fields"), choosing where the protected-mode
kernel goes in guest memory, copying it there, and extracting the compressed vmlinux from the
payload. Header fields are untrusted and checked before use. It does not run or emulate the
real-mode setup code (the 64-bit entry skips it) and does not build ``boot_params``.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

from kasou.errors import ImageError
from kasou.loader.bootparams import (
    BOOT_FLAG,
    HDRS_MAGIC,
    HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
)
from kasou.loader.elf import BOOT_AREA_END, is_elf
from kasou.memory import GuestMemory

__all__ = [
    "ENTRY_OFFSET_64",
    "MIN_PROTOCOL",
    "BzImage",
    "extract_vmlinux",
    "is_bzimage",
    "load_address_candidates",
    "load_bzimage",
    "parse_bzimage",
]

# Protocol 2.12 added xloadflags, whose XLF_KERNEL_64 says the 64-bit entry exists.
MIN_PROTOCOL = 0x020C
# 64-bit Boot Protocol: "the kernel is started by jumping to the 64-bit kernel entry point,
# which is the start address of loaded 64-bit kernel plus 0x200".
ENTRY_OFFSET_64 = 0x200
_SECTOR = 512
_DEFAULT_SETUP_SECTS = 4  # setup_sects: "If this field is 0, the real value is 4."
_HEADER_END_MIN = 0x264  # a 2.12 header reaches at least through init_size (0x260..0x263)
_HEADER_END_MAX = 0x290  # the room boot_params has for the header
_MAX_ALIGNMENT = 1 << 30
_SETUP_HEADER_SIZE = ctypes.sizeof(SetupHeader)


class BzImage(NamedTuple):
    """The setup-header facts a 64-bit loader needs, validated."""

    header: bytes  # the setup header as in the file, from 0x1f1 to its declared end
    version: int  # boot protocol version, e.g. 0x020f
    kernel_offset: int  # file offset of the protected-mode kernel
    kernel_size: int  # its length in the file
    relocatable: bool
    kernel_alignment: int  # preferred alignment of the load address (bytes)
    min_alignment: int  # smallest alignment the kernel accepts (bytes)
    pref_address: int  # preferred load address
    init_size: int  # bytes from the load address the kernel needs before it is running
    cmdline_size: int  # longest command line, without the NUL
    initrd_addr_max: int  # highest byte address an initrd may occupy (inclusive)
    xloadflags: int
    payload_offset: int  # offset of the compressed vmlinux inside the protected-mode kernel
    payload_length: int

    @property
    def extent(self) -> int:
        """Bytes of RAM needed from the load address."""
        return max(self.init_size, self.kernel_size)


def is_bzimage(data: bytes | memoryview) -> bool:
    """Whether ``data`` has a Linux setup header ("HdrS" at 0x202); it may still be unusable."""
    return len(data) >= 0x206 and bytes(data[0x202:0x206]) == b"HdrS"


def parse_bzimage(data: bytes | memoryview, name: str = "kernel") -> BzImage:
    """Validate ``data`` as a bzImage with the 64-bit entry and return its header facts."""
    if not is_bzimage(data) or len(data) < _HEADER_END_MIN:
        raise ImageError(f"{name} is not a bzImage (no HdrS header): give a vmlinux or a bzImage")
    end = 0x202 + data[0x201]  # boot.rst: header end = 0x0202 + byte value at offset 0x0201
    header = bytes(data[HEADER_OFFSET : min(end, _HEADER_END_MAX)])
    hdr = SetupHeader.from_buffer_copy(header.ljust(_SETUP_HEADER_SIZE, b"\0")[:_SETUP_HEADER_SIZE])
    if hdr.boot_flag != BOOT_FLAG or hdr.header != HDRS_MAGIC:
        raise ImageError(f"{name} has a damaged setup header: the image is damaged")
    version = int(hdr.version)
    if version < MIN_PROTOCOL or not hdr.xloadflags & XLF_KERNEL_64:
        raise ImageError(
            f"{name} has no 64-bit entry point (boot protocol {version >> 8}.{version & 0xFF:02d}"
            ", needs 2.12 with XLF_KERNEL_64): give a 64-bit kernel or its vmlinux"
        )
    if end < _HEADER_END_MIN:
        raise ImageError(f"{name}: its setup header is too short for protocol 2.12: damaged")
    kernel_offset = ((hdr.setup_sects or _DEFAULT_SETUP_SECTS) + 1) * _SECTOR
    if kernel_offset >= len(data):
        raise ImageError(f"{name} is truncated (no protected-mode kernel): the file is damaged")
    kernel_alignment = int(hdr.kernel_alignment)
    min_alignment = 1 << min(int(hdr.min_alignment), 63)
    relocatable = bool(hdr.relocatable_kernel)
    if relocatable and not _is_alignment(kernel_alignment):
        raise ImageError(f"{name}: kernel_alignment {kernel_alignment:#x} is not a power of two")
    if relocatable and not _is_alignment(min_alignment):
        raise ImageError(f"{name}: min_alignment 2^{hdr.min_alignment} is not usable")
    return BzImage(
        header=header,
        version=version,
        kernel_offset=kernel_offset,
        kernel_size=len(data) - kernel_offset,
        relocatable=relocatable,
        kernel_alignment=kernel_alignment,
        min_alignment=min(min_alignment, kernel_alignment) if relocatable else min_alignment,
        pref_address=int(hdr.pref_address),
        init_size=int(hdr.init_size),
        cmdline_size=int(hdr.cmdline_size),
        initrd_addr_max=int(hdr.initrd_addr_max),
        xloadflags=int(hdr.xloadflags),
        payload_offset=int(hdr.payload_offset),
        payload_length=int(hdr.payload_length),
    )


def _is_alignment(value: int) -> bool:
    return 0 < value <= _MAX_ALIGNMENT and value & (value - 1) == 0


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def load_address_candidates(image: BzImage) -> list[int]:
    """Load addresses to try, best first.

    boot.rst: a relocating loader "should attempt to load at" ``pref_address``; otherwise any
    address aligned to ``kernel_alignment`` works, and one aligned only to ``min_alignment`` is
    accepted ("will be realigned during kernel initialization"). The range from the load
    address up to ``init_size`` must be RAM. A non-relocatable kernel moves itself to
    ``pref_address`` whatever the loader does, so only that address is offered.
    """
    preferred = image.pref_address if image.pref_address >= BOOT_AREA_END else BOOT_AREA_END
    if not image.relocatable:
        return [preferred]
    candidates = [preferred]
    for alignment in (image.kernel_alignment, image.min_alignment):
        address = _align_up(BOOT_AREA_END, alignment)
        if address not in candidates:
            candidates.append(address)
    return candidates


def load_bzimage(
    memory: GuestMemory, data: bytes | memoryview, image: BzImage, address: int
) -> None:
    """Copy the protected-mode kernel of ``image`` to ``address`` (the caller checked that
    ``[address, address + image.extent)`` is RAM)."""
    view = memoryview(data)
    memory.write(address, view[image.kernel_offset :])


def extract_vmlinux(bzimage: bytes | memoryview, name: str = "bzImage") -> bytes:
    """Decompress the payload of a bzImage and return the ELF vmlinux inside.

    The payload (``payload_offset``/``payload_length``, protocol 2.08+) is one compressed
    stream followed by the uncompressed size as a little-endian u32: the build appends it
    (scripts/Makefile.lib ``size_append``; gzip's own trailer ends with it) and
    arch/x86/boot/compressed/mkpiggy.c reads it as the output length. It is checked here.
    The vmlinux is returned as the payload holds it (stripped; relocation data may follow).
    """
    image = parse_bzimage(bzimage, name)
    start = image.kernel_offset + image.payload_offset
    if image.payload_length < 8 or image.payload_offset + image.payload_length > image.kernel_size:
        raise ImageError(f"{name}: its payload lies outside the image: the file is damaged")
    payload = memoryview(bzimage)[start : start + image.payload_length]
    # Imported here: the decompressors (zstandard, lz4, lzma, ...) cost start time that only
    # this path needs.
    from kasou.loader.decompress import decompress

    vmlinux = decompress(payload)
    expected = int.from_bytes(payload[-4:], "little")
    if len(vmlinux) & 0xFFFF_FFFF != expected:
        raise ImageError(
            f"{name}: the payload decompressed to {len(vmlinux)} bytes, the image says "
            f"{expected}: the file is damaged"
        )
    if not is_elf(vmlinux):
        raise ImageError(f"{name}: the payload is not an ELF vmlinux: the file is damaged")
    return vmlinux
