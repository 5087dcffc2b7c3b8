"""Kernel and initrd loading on self-made images: hand-built and gcc-built ELF kernels, and
synthetic bzImages (a real setup header layout around a payload in every compression)."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import lz4.block
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasou.errors import ImageError
from kasou.loader import LoadedKernel, extract_vmlinux, kernel_format, load_initrd, load_kernel
from kasou.loader.bzimage import load_address_candidates, parse_bzimage
from kasou.loader.decompress import decompress, detect_format
from kasou.loader.elf import parse_elf
from kasou.memory import GuestMemory

MiB = 1 << 20

# --- image builders (layouts from the System V ABI and Documentation/arch/x86/boot.rst) ---


def make_elf(
    segments: list[tuple[int, bytes, int]],
    *,
    entry: int | None = None,
    machine: int = 62,
    elf_class: int = 2,
    elf_type: int = 2,
    vaddr_offset: int = 0,
) -> bytes:
    """An ELF64 with one PT_LOAD per ``(paddr, file bytes, memsz)``."""
    phoff = 64
    data_offset = phoff + 56 * len(segments)
    headers = b""
    body = b""
    for paddr, content, memsz in segments:
        offset = data_offset + len(body)
        headers += struct.pack(
            "<IIQQQQQQ", 1, 7, offset, paddr + vaddr_offset, paddr, len(content), memsz, 0x1000
        )
        body += content
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        elf_type,
        machine,
        1,
        segments[0][0] if entry is None else entry,
        phoff,
        0,
        0,
        64,
        56,
        len(segments),
        64,
        0,
        0,
    )
    return ehdr + headers + body


def compress(kind: str, data: bytes) -> bytes:
    """A bzImage payload: ``data`` compressed as the kernel build does (scripts/Makefile.lib),
    the uncompressed size appended (gzip carries it in its own trailer)."""
    trailer = struct.pack("<I", len(data) & 0xFFFFFFFF)
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2}]
        body = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters)
    elif kind == "lzma":
        body = lzma.compress(data, format=lzma.FORMAT_ALONE)
    elif kind == "bzip2":
        body = bz2.compress(data)
    elif kind == "zstd":
        body = zstandard.ZstdCompressor(level=19).compress(data)
    elif kind == "lz4":
        block = 8 * MiB
        body = struct.pack("<I", 0x184C2102)
        for start in range(0, len(data), block):
            chunk = lz4.block.compress(data[start : start + block], store_size=False)
            body += struct.pack("<I", len(chunk)) + chunk
    else:
        raise AssertionError(kind)
    return body + trailer


def make_bzimage(
    payload: bytes,
    *,
    setup_sects: int = 2,
    version: int = 0x020F,
    xloadflags: int = 0b11,  # XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
    relocatable: int = 1,
    kernel_alignment: int = 0x1000000,
    min_alignment: int = 21,
    pref_address: int = 0x1000000,
    init_size: int = 4 * MiB,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
    boot_flag: int = 0xAA55,
    stub: bytes = b"\xf4" * 0x300,
) -> bytes:
    """A bzImage: boot sector + setup sectors, then the protected-mode kernel (a stub standing
    in for the decompressor, followed by the payload). Fields at boot.rst's offsets."""
    setup = bytearray(512 * (setup_sects + 1))
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB  # jmp short: the header ends at 0x202 + this byte
    setup[0x201] = 0x26C - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = 0x01  # LOADED_HIGH
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = min_alignment
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<II", setup, 0x248, len(stub), len(payload))
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    kernel = stub + payload
    struct.pack_into("<I", setup, 0x1F4, (len(kernel) + 15) // 16)  # syssize
    return bytes(setup) + kernel


def patched(image: bytes, offset: int, value: int) -> bytes:
    """``image`` with the u16 at ``offset`` set to ``value``."""
    data = bytearray(image)
    struct.pack_into("<H", data, offset, value)
    return bytes(data)


def small_vmlinux() -> bytes:
    text = bytes(range(256)) * 16
    return make_elf([(0x1000000, text, len(text) + 0x3000), (0x1100000, b"data" * 64, 0x2000)])


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    ram = GuestMemory.create([(0, 64 * MiB)])
    yield ram
    ram.close()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- ELF ---


def test_elf_segments_land_at_their_physical_addresses_with_bss_zeroed(
    memory: GuestMemory, tmp_path: Path
) -> None:
    text = bytes(range(256)) * 4
    image = make_elf(
        [(0x200000, text, len(text) + 0x1000), (0x300000, b"rw-data", 0x10)],
        entry=0x200010,
        vaddr_offset=0xFFFFFFFF80000000,
    )
    memory.fill(0x200000, 0x200000, 0xAA)  # garbage where the bss will be
    kernel = load_kernel(memory, write(tmp_path, "vmlinux", image))
    assert kernel == LoadedKernel(
        kind="elf",
        entry=0x200010,
        start=0x200000,
        end=0x300010,
        setup_header=None,
        cmdline_max=2047,
        initrd_addr_max=1 << 32,
    )
    assert memory.read(0x200000, len(text)) == text
    assert memory.read(0x200000 + len(text), 0x1000) == bytes(0x1000)
    assert memory.read(0x300000, 0x10) == b"rw-data" + bytes(9)


def test_elf_virtual_entry_point_is_translated_to_physical(tmp_path: Path) -> None:
    virtual = 0xFFFFFFFF81000000
    image = make_elf(
        [(0x1000000, b"\x90" * 64, 64)], entry=virtual + 0x20, vaddr_offset=virtual - 0x1000000
    )
    assert parse_elf(image).entry == 0x1000020


def test_gcc_built_kernel_loads_like_pyelftools_reads_it(
    memory: GuestMemory, tmp_path: Path
) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    source = tmp_path / "kernel.c"
    source.write_text(
        "char data[4096] = {1, 2, 3};\n"
        "char bss[65536];\n"
        'void _start(void) { bss[1] = data[0]; for (;;) __asm__ volatile("hlt"); }\n'
    )
    binary = tmp_path / "kernel.elf"
    subprocess.run(
        [
            "gcc", "-O2", "-ffreestanding", "-nostdlib", "-static", "-no-pie", "-fno-pic",
            "-Wl,-Ttext-segment=0x200000", "-Wl,--build-id=none", "-o", str(binary), str(source),
        ],
        check=True,
    )  # fmt: skip
    from elftools.elf.elffile import ELFFile

    memory.fill(0x200000, 0x100000, 0xAA)
    kernel = load_kernel(memory, binary)
    with binary.open("rb") as file:
        elf = ELFFile(file)
        assert kernel.entry == elf.header.e_entry
        loads = [segment for segment in elf.iter_segments() if segment["p_type"] == "PT_LOAD"]
        for segment in loads:
            data = segment.data()
            assert memory.read(segment["p_paddr"], len(data)) == data
            bss = segment["p_memsz"] - segment["p_filesz"]
            assert memory.read(segment["p_paddr"] + len(data), bss) == bytes(bss)
        assert kernel.end == max(s["p_paddr"] + s["p_memsz"] for s in loads)
    assert kernel_format(binary) == "elf"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (make_elf([(0x200000, b"x", 1)], machine=183), "not for x86-64"),
        (make_elf([(0x200000, b"x", 1)], elf_class=1), "not for x86-64"),
        (make_elf([(0x200000, b"x", 1)], elf_type=1), "not an ELF executable"),
        (make_elf([(0x200000, b"x", 1)], elf_type=3), "not an ELF executable"),
        (make_elf([(0x200000, b"x", 1)])[:100], "truncated"),
        (make_elf([(0x200000, b"x" * 64, 64)])[:-10], "truncated"),
        (make_elf([(0x200000, b"x" * 64, 16)]), "more file bytes"),
        (make_elf([(0x200000, b"x", 1)], entry=0x400000), "entry point"),
        (make_elf([(0x200000, b"x", 0x2000), (0x201000, b"y", 1)]), "overlap"),
        (patched(make_elf([(0x200000, b"x", 1)]), 0x36, 32), "program headers"),  # e_phentsize
        (patched(make_elf([(0x200000, b"x", 1)]), 0x38, 0), "program headers"),  # e_phnum
        (make_elf([(0x9F000, b"x", 1)]), "below 1 MiB"),
    ],
)
def test_invalid_elf_kernels_are_refused(tmp_path: Path, image: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_kernel(GuestMemory.create([(0, 16 * MiB)]), write(tmp_path, "bad", image))


def test_elf_without_load_segments_is_refused() -> None:
    image = bytearray(make_elf([(0x200000, b"x", 1)]))
    struct.pack_into("<I", image, 64, 4)  # PT_NOTE instead of PT_LOAD
    with pytest.raises(ImageError, match="no PT_LOAD"):
        parse_elf(bytes(image))


def test_kernel_larger_than_memory_says_how_much_is_needed(tmp_path: Path) -> None:
    image = make_elf([(0x1000000, b"x" * 16, 40 * MiB + 1)])
    ram = GuestMemory.create([(0, 32 * MiB)])
    with pytest.raises(ImageError, match=r"needs 57 MiB of guest memory, the VM has 32 MiB: raise"):
        load_kernel(ram, write(tmp_path, "vmlinux", image))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.integers(0, 64 + 2 * 56 - 1), st.integers(0, 255)), max_size=6))
def test_corrupted_elf_headers_fail_only_with_image_error(
    patches: list[tuple[int, int]],
) -> None:
    image = bytearray(make_elf([(0x200000, b"a" * 32, 0x100), (0x300000, b"b" * 32, 0x40)]))
    for offset, value in patches:
        image[offset] = value
    try:
        kernel = parse_elf(bytes(image))
    except ImageError:
        return
    assert all(s.paddr >= 0x100000 and s.offset + s.filesz <= len(image) for s in kernel.segments)


# --- files ---


def test_missing_file_and_directory_and_non_kernel(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        load_kernel(memory, tmp_path / "nope")
    with pytest.raises(ImageError, match="is a directory"):
        load_kernel(memory, tmp_path)
    with pytest.raises(ImageError, match="is not a kernel"):
        load_kernel(memory, write(tmp_path, "text", b"#!/bin/sh\necho hi\n" * 100))
    with pytest.raises(ImageError, match="is not a kernel"):
        kernel_format(write(tmp_path, "empty", b""))


# --- bzImage ---

COMPRESSIONS = ["gzip", "xz", "lzma", "bzip2", "zstd", "lz4"]


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_extract_vmlinux_for_every_compression(kind: str) -> None:
    vmlinux = small_vmlinux()
    payload = compress(kind, vmlinux)
    assert detect_format(payload) == kind
    assert extract_vmlinux(make_bzimage(payload)) == vmlinux


@pytest.mark.parametrize("kind", COMPRESSIONS)
def test_load_kernel_extracts_and_loads_the_vmlinux_on_request(
    kind: str, memory: GuestMemory, tmp_path: Path
) -> None:
    path = write(tmp_path, "bzImage", make_bzimage(compress(kind, small_vmlinux())))
    kernel = load_kernel(memory, path, extract=True)
    assert (kernel.kind, kernel.entry, kernel.setup_header) == ("elf", 0x1000000, None)
    assert memory.read(0x1000000, 256) == bytes(range(256))
    assert memory.read(0x1100000, 8) == b"datadata"


def test_lz4_payload_of_several_blocks() -> None:
    big = make_elf([(0x1000000, bytes(range(251)) * (40 * 1024), 10 * MiB)])
    assert len(big) > 8 * MiB
    assert extract_vmlinux(make_bzimage(compress("lz4", big))) == big


def test_bzimage_loads_at_its_preferred_address(memory: GuestMemory, tmp_path: Path) -> None:
    image = make_bzimage(compress("gzip", small_vmlinux()), init_size=8 * MiB)
    kernel = load_kernel(memory, write(tmp_path, "bzImage", image))
    kernel_offset = 3 * 512
    assert kernel.kind == "bzimage"
    assert (kernel.start, kernel.entry, kernel.end) == (0x1000000, 0x1000200, 0x1800000)
    assert kernel.setup_header == image[0x1F1:0x26C]
    assert (kernel.cmdline_max, kernel.initrd_addr_max) == (2047, 1 << 32)
    assert memory.read(0x1000000, len(image) - kernel_offset) == image[kernel_offset:]
    assert kernel_format(write(tmp_path, "bzImage", image)) == "bzimage"


def test_relocatable_bzimage_moves_down_when_memory_is_short(tmp_path: Path) -> None:
    image = make_bzimage(compress("gzip", small_vmlinux()), init_size=20 * MiB)
    ram = GuestMemory.create([(0, 32 * MiB)])
    kernel = load_kernel(ram, write(tmp_path, "bzImage", image))
    assert (kernel.start, kernel.end) == (2 * MiB, 22 * MiB)  # 2^min_alignment above 1 MiB


def test_non_relocatable_bzimage_needs_its_preferred_address(tmp_path: Path) -> None:
    image = make_bzimage(compress("gzip", small_vmlinux()), init_size=20 * MiB, relocatable=0)
    ram = GuestMemory.create([(0, 32 * MiB)])
    with pytest.raises(ImageError, match="needs 36 MiB of guest memory, the VM has 32 MiB"):
        load_kernel(ram, write(tmp_path, "bzImage", image))


def test_bzimage_without_above_4g_flag_keeps_initrd_below_its_limit(
    memory: GuestMemory, tmp_path: Path
) -> None:
    image = make_bzimage(
        compress("gzip", small_vmlinux()), xloadflags=1, initrd_addr_max=0x37FFFFFF
    )
    kernel = load_kernel(memory, write(tmp_path, "bzImage", image))
    assert kernel.initrd_addr_max == 0x38000000


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (make_bzimage(b"", version=0x020B), "no 64-bit entry point"),
        (make_bzimage(b"", xloadflags=0), "no 64-bit entry point"),
        (make_bzimage(b"", boot_flag=0x1234), "damaged setup header"),
        (make_bzimage(b"", kernel_alignment=0x300000), "not a power of two"),
        (make_bzimage(b"", stub=b"", setup_sects=3)[: 4 * 512], "truncated"),
        (make_bzimage(b"")[:0x230], "not a bzImage"),
    ],
)
def test_invalid_bzimages_are_refused(
    memory: GuestMemory, tmp_path: Path, image: bytes, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        load_kernel(memory, write(tmp_path, "bzImage", image))


def test_damaged_payloads_are_refused() -> None:
    vmlinux = small_vmlinux()
    payload = bytearray(compress("xz", vmlinux))
    payload[40] ^= 0xFF
    with pytest.raises(ImageError, match="corrupt"):
        extract_vmlinux(make_bzimage(bytes(payload)))
    for kind in ("gzip", "zstd", "lz4", "bzip2"):
        whole = compress(kind, vmlinux)
        with pytest.raises(ImageError, match=r"truncated|corrupt|decompressed to"):
            extract_vmlinux(make_bzimage(whole[: len(whole) // 2] + whole[-4:]))
    wrong_size = compress("zstd", vmlinux)[:-4] + struct.pack("<I", 12345)
    with pytest.raises(ImageError, match="the image says 12345"):
        extract_vmlinux(make_bzimage(wrong_size))
    with pytest.raises(ImageError, match="not an ELF"):
        extract_vmlinux(make_bzimage(compress("gzip", b"not an elf" * 10)))
    with pytest.raises(ImageError, match="LZO"):
        extract_vmlinux(make_bzimage(b"\x89LZO\x00\r\n\x1a\n" + bytes(32)))
    with pytest.raises(ImageError, match="unknown compression"):
        extract_vmlinux(make_bzimage(b"PK\x03\x04" + bytes(32)))
    image = bytearray(make_bzimage(compress("gzip", vmlinux)))
    struct.pack_into("<I", image, 0x24C, 1 << 30)  # payload_length past the end
    with pytest.raises(ImageError, match="outside the image"):
        extract_vmlinux(bytes(image))


def test_decompression_output_is_bounded() -> None:
    bomb = compress("gzip", bytes(4 * MiB))
    with pytest.raises(ImageError, match="more than 1 MiB"):
        decompress(bomb, limit=1 * MiB)
    assert len(decompress(bomb, limit=4 * MiB)) == 4 * MiB


# --- initrd ---


def elf_kernel(end: int, initrd_addr_max: int = 1 << 32) -> LoadedKernel:
    return LoadedKernel("elf", 0x1000000, 0x1000000, end, None, 2047, initrd_addr_max)


def test_initrd_goes_page_aligned_as_high_as_possible(memory: GuestMemory, tmp_path: Path) -> None:
    content = bytes(range(256)) * 4100  # not a whole number of pages
    path = write(tmp_path, "initrd", content)
    address, size = load_initrd(memory, path, elf_kernel(20 * MiB), ram_top=64 * MiB)
    assert size == len(content)
    assert address % 4096 == 0
    assert address + size <= 64 * MiB < address + size + 4096
    assert memory.read(address, size) == content


def test_initrd_respects_the_kernels_limit(memory: GuestMemory, tmp_path: Path) -> None:
    path = write(tmp_path, "initrd", b"x" * 5000)
    kernel = elf_kernel(20 * MiB, initrd_addr_max=48 * MiB)
    address, _ = load_initrd(memory, path, kernel, ram_top=64 * MiB)
    assert address == 48 * MiB - 8192


def test_initrd_that_does_not_fit(memory: GuestMemory, tmp_path: Path) -> None:
    path = write(tmp_path, "initrd", b"x" * (30 * MiB))
    with pytest.raises(ImageError, match=r"needs 70 MiB of guest memory .* has 64 MiB: raise"):
        load_initrd(memory, path, elf_kernel(40 * MiB), ram_top=64 * MiB)
    with pytest.raises(ImageError, match="use a smaller initrd"):
        load_initrd(memory, path, elf_kernel(20 * MiB, 40 * MiB), ram_top=64 * MiB)


def test_empty_or_missing_initrd(memory: GuestMemory, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is empty"):
        load_initrd(memory, write(tmp_path, "e", b""), elf_kernel(20 * MiB), ram_top=64 * MiB)
    with pytest.raises(ImageError, match="does not exist"):
        load_initrd(memory, tmp_path / "missing", elf_kernel(20 * MiB), ram_top=64 * MiB)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)), max_size=6))
def test_corrupted_setup_headers_fail_only_with_image_error(
    patches: list[tuple[int, int]],
) -> None:
    image = bytearray(make_bzimage(compress("gzip", small_vmlinux())))
    for offset, value in patches:
        image[offset] = value
    try:
        parsed = parse_bzimage(bytes(image))
    except ImageError:
        return
    assert parsed.kernel_offset < len(image)
    assert all(address >= 0x100000 for address in load_address_candidates(parsed))


@settings(max_examples=100, deadline=None)
@given(
    st.sampled_from([b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x5d\x00\x00", b"BZh", b"\x28\xb5\x2f\xfd"]),
    st.binary(max_size=64),
)
def test_garbage_after_a_magic_fails_only_with_image_error(magic: bytes, tail: bytes) -> None:
    with pytest.raises(ImageError):
        decompress(magic + tail)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_lz4_frames_fail_only_with_image_error(tail: bytes) -> None:
    try:
        out = decompress(b"\x02\x21\x4c\x18" + tail, limit=64 * MiB)
    except ImageError:
        return
    assert len(out) <= 64 * MiB
