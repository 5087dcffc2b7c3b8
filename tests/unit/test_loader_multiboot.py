"""Multiboot (v1) kernels: the header, both ways of loading the image, the modules and the
information structure read back as a kernel reads it; every malformed image refused with a
one-line ImageError, and random header fields never raising anything else."""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasou.arch.x86_64 import layout
from kasou.errors import ImageError
from kasou.loader import kernel_format, load_kernel
from kasou.loader.multiboot import (
    Module,
    find_header,
    load_modules,
    load_multiboot,
    parse_multiboot,
    write_info,
)
from kasou.memory import GuestMemory

MiB = 1 << 20
MAGIC = 0x1BADB002
PAGE_ALIGN, MEMORY_INFO, VIDEO, ADDRESS_FIELDS = 1, 2, 4, 1 << 16

# --- images (layouts from Multiboot 0.6.96 §3.1 and the System V ABI) ---------------------


def header(flags: int, *fields: int, checksum: int | None = None) -> bytes:
    """A Multiboot header: magic, flags, checksum, then ``fields`` (the address fields)."""
    if checksum is None:
        checksum = -(MAGIC + flags) & 0xFFFFFFFF
    return struct.pack("<III", MAGIC, flags, checksum) + b"".join(
        struct.pack("<I", field) for field in fields
    )


def aout_image(
    *,
    load: int = 0x100000,
    code: bytes = b"\x90" * 64,
    header_offset: int = 0,
    bss: int = 0x1000,
    flags: int = PAGE_ALIGN | MEMORY_INFO,
    **overrides: int,
) -> bytes:
    """A flat image whose header (at ``header_offset``) has consistent address fields for
    ``code`` loaded at ``load``; ``overrides`` replace any field by name."""
    prefix = bytes(header_offset)
    size = header_offset + 32 + len(code)
    fields = {
        "header_addr": load + header_offset,
        "load_addr": load,
        "load_end_addr": load + size,
        "bss_end_addr": load + size + bss,
        "entry_addr": load + header_offset + 32,
    }
    fields.update(overrides)
    return prefix + header(flags | ADDRESS_FIELDS, *fields.values()) + code


def elf_image(
    segments: list[tuple[int, bytes, int]],
    *,
    entry: int | None = None,
    elf64: bool = False,
    machine: int | None = None,
    flags: int = PAGE_ALIGN | MEMORY_INFO,
    vaddr_offset: int = 0,
) -> bytes:
    """An ELF32 (or ELF64) executable with one PT_LOAD per ``(paddr, bytes, memsz)`` and a
    Multiboot header without address fields at the start of its first segment's bytes."""
    mb = header(flags)
    ehsize, phsize = (64, 56) if elf64 else (52, 32)
    data_offset = ehsize + phsize * len(segments)
    phdrs = body = b""
    for index, (paddr, content, memsz) in enumerate(segments):
        prefix = mb if index == 0 else b""  # the header, in the first segment's bytes
        loaded, size = prefix + content, memsz + len(prefix)
        offset = data_offset + len(body)
        vaddr = paddr + vaddr_offset
        if elf64:
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, offset, vaddr, paddr, len(loaded), size, 0x1000)
        else:
            phdrs += struct.pack("<8I", 1, offset, vaddr, paddr, len(loaded), size, 7, 0x1000)
        body += loaded
    start = segments[0][0] + len(mb) if entry is None else entry
    ident = b"\x7fELF" + bytes([2 if elf64 else 1, 1, 1]) + bytes(9)
    if elf64:
        ehdr = struct.pack(
            "<HHIQQQIHHHHHH", 2, machine or 62, 1, start, ehsize, 0, 0, ehsize, 56,
            len(segments), 64, 0, 0,
        )  # fmt: skip
    else:
        ehdr = struct.pack(
            "<HHIIIIIHHHHHH", 2, machine or 3, 1, start, ehsize, 0, 0, ehsize, 32,
            len(segments), 40, 0, 0,
        )  # fmt: skip
    return ident + ehdr + phdrs + body


@pytest.fixture
def ram() -> Iterator[GuestMemory]:
    memory = GuestMemory.create([(0, 64 * MiB)])
    yield memory
    memory.close()


def load(memory: GuestMemory, data: bytes) -> int:
    kernel = parse_multiboot(data, "k")
    load_multiboot(memory, data, kernel, "k")
    return kernel.entry


def refused(data: bytes, memory: GuestMemory | None = None) -> str:
    """The one-line message an image is refused with."""
    with pytest.raises(ImageError) as caught:
        kernel = parse_multiboot(data, "k")
        if memory is not None:
            load_multiboot(memory, data, kernel, "k")
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the header -----------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 4, 0x1000, 8192 - 12])
def test_the_header_is_found_at_any_aligned_offset_in_the_first_8_kib(offset: int) -> None:
    data = bytes(offset) + header(PAGE_ALIGN) + bytes(64)
    found = find_header(data)
    assert found is not None
    assert (found.offset, found.flags) == (offset, PAGE_ALIGN)


@pytest.mark.parametrize("offset", [2, 8192 - 8, 8192])
def test_a_header_unaligned_or_past_8_kib_is_not_found(offset: int) -> None:
    assert find_header(bytes(offset) + header(PAGE_ALIGN) + bytes(64)) is None


def test_a_bad_checksum_is_refused_as_such() -> None:
    data = header(PAGE_ALIGN, checksum=0x12345678) + bytes(64)
    assert find_header(data) is None
    assert "bad checksum" in refused(data)


def test_a_file_without_the_magic_is_refused() -> None:
    assert "no Multiboot header" in refused(b"\x90" * 9000)


@pytest.mark.parametrize("bit", [3, 8, 15])
def test_a_required_feature_kasou_lacks_is_refused(bit: int) -> None:
    message = refused(aout_image(flags=PAGE_ALIGN | 1 << bit))
    assert f"feature bit(s) {bit}" in message


def test_the_video_mode_request_is_ignored(ram: GuestMemory) -> None:
    image = aout_image(flags=VIDEO | MEMORY_INFO, code=bytes(16) + b"\x90" * 64)
    assert load(ram, image) == 0x100000 + 32


def test_a_header_cut_off_by_the_end_of_the_file_is_refused() -> None:
    data = aout_image()[:20]
    assert "ends inside its Multiboot header" in refused(data)


# --- the address fields (§3.1.3) -----------------------------------------------------------


def test_the_address_fields_load_the_file_and_zero_the_bss(ram: GuestMemory) -> None:
    ram.fill(0x100000, 0x3000, 0xAA)
    code = bytes(range(200))
    data = aout_image(header_offset=0x40, code=code, bss=0x1000)
    entry = load(ram, data)
    assert entry == 0x100000 + 0x40 + 32
    assert ram.read(0x100000, len(data)) == data
    assert ram.read(0x100000 + len(data), 0x1000) == bytes(0x1000)
    assert ram.read(0x100000 + len(data) + 0x1000, 16) == b"\xaa" * 16


def test_the_image_may_start_before_the_header_in_the_file(ram: GuestMemory) -> None:
    # A file with a 0x200-byte preamble that is not loaded: load_addr maps to offset 0x200.
    body = aout_image(load=0x200000)
    data = b"\xee" * 0x200 + body
    load(ram, data)
    assert ram.read(0x200000, len(body)) == body


def test_load_end_0_loads_to_the_end_of_the_file_and_bss_end_0_means_no_bss() -> None:
    data = aout_image(load_end_addr=0, bss_end_addr=0, code=b"\x90" * 100)
    kernel = parse_multiboot(data, "k")
    (segment,) = kernel.segments
    assert (segment.address, segment.filesz, segment.memsz) == (0x100000, len(data), len(data))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"load_addr": 0x100010}, "load_addr 0x100010 is above header_addr"),
        ({"header_addr": 0x100100}, "header is only 0x0 bytes into the file"),
        ({"load_end_addr": 0x0FFFF0}, "load_end_addr 0xffff0 is not above load_addr"),
        ({"load_end_addr": 0x100000}, "is not above load_addr"),
        ({"bss_end_addr": 0x100010}, "bss_end_addr 0x100010 is below load_end_addr"),
        ({"entry_addr": 0x100000 + 96}, "entry_addr 0x100060 is outside the loaded image"),
        ({"entry_addr": 0x0FFFFF}, "outside the loaded image"),
        ({"load_end_addr": 0x100000 + 4096}, "shorter than its Multiboot header says"),
    ],
)
def test_address_fields_that_contradict_each_other_or_the_file_are_refused(
    overrides: dict[str, Any], expected: str
) -> None:
    assert expected in refused(aout_image(**overrides))


def test_an_image_below_1_mib_is_refused() -> None:
    assert "below 1 MiB" in refused(aout_image(load=0x10000))


def test_an_image_past_4_gib_is_refused() -> None:
    # load_end_addr 0: the image runs to the end of the file, here past 4 GiB.
    image = aout_image(load=0xFFFFFF00, code=bytes(300), load_end_addr=0, bss_end_addr=0)
    assert "above 4 GiB" in refused(image)


def test_an_image_past_the_end_of_ram_asks_for_more_memory(ram: GuestMemory) -> None:
    message = refused(aout_image(load=63 * MiB, bss=2 * MiB), ram)
    assert "raise --memory" in message


def test_an_image_in_the_mmio_hole_is_refused_as_such() -> None:
    memory = GuestMemory.create([(0, 16 * MiB), (1 << 32, 16 * MiB)])
    try:
        message = refused(aout_image(load=20 * MiB), memory)
    finally:
        memory.close()
    assert "MMIO hole" in message


# --- ELF images ----------------------------------------------------------------------------


def test_an_elf32_loads_its_segments_at_their_physical_addresses(ram: GuestMemory) -> None:
    ram.fill(0x100000, 0x400000, 0xAA)
    text, data = b"\x90" * 100, b"\x11" * 50
    image = elf_image([(0x100000, text, 100), (0x300000, data, 0x1000)], vaddr_offset=0xC0000000)
    entry = load(ram, image)
    assert entry == 0x10000C  # past the Multiboot header that starts the first segment
    assert ram.read(0x10000C, 100) == text
    assert ram.read(0x300000, 50) == data
    assert ram.read(0x300000 + 50, 0x1000 - 50) == bytes(0x1000 - 50)


def test_a_virtual_elf_entry_is_translated_through_its_segment(ram: GuestMemory) -> None:
    image = elf_image([(0x100000, b"\x90" * 64, 64)], entry=0xC0100010, vaddr_offset=0xC0000000)
    assert load(ram, image) == 0x100010


def test_an_elf64_with_segments_below_4_gib_is_a_multiboot_image(ram: GuestMemory) -> None:
    image = elf_image([(0x100000, b"\x90" * 64, 64)], elf64=True)
    assert load(ram, image) == 0x10000C


def test_an_elf64_above_4_gib_is_refused() -> None:
    image = elf_image([(0x1_0000_0000, b"\x90" * 64, 64)], elf64=True)
    assert "above 4 GiB" in refused(image)


def with_phnum(elf32: bytes, count: int) -> bytes:
    """``elf32`` claiming ``count`` program headers (e_phnum at offset 44)."""
    return elf32[:44] + struct.pack("<H", count) + elf32[46:]


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (elf_image([(0x100000, b"\x90" * 64, 0x2000), (0x101000, b"x", 1)]), "overlap"),
        (elf_image([(0x80000, b"\x90" * 64, 64)]), "below 1 MiB"),
        (elf_image([(0x100000, b"\x90" * 64, 64)], machine=40), "not x86"),
        (elf_image([(0x100000, b"\x90" * 64, 64)], entry=0x500000), "outside every loaded"),
        (elf_image([(0x100000, b"\x90" * 64, 64)])[:-10], "shorter than ELF segment 0"),
        (with_phnum(elf_image([(0x100000, b"\x90" * 64, 64)]), 200), "ends inside its ELF"),
        (header(PAGE_ALIGN) + b"\x90" * 64, "not an ELF image"),
    ],
)
def test_malformed_elf_images_are_refused(image: bytes, expected: str) -> None:
    assert expected in refused(image)


# --- which protocol a kernel file gets ----------------------------------------------------


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def linux_elf64(entry: int, mb: bytes) -> bytes:
    """An x86-64 executable with a Multiboot header in its bytes, entered at ``entry``."""
    content = mb + b"\x90" * 64
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 120, 0x100000, 0x100000, len(content), 4096, 0x1000)
    ehdr = struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    return b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + ehdr + phdr + content


def test_kernel_format_tells_multiboot_images_apart(tmp_path: Path) -> None:
    aout = aout_image()
    assert kernel_format(write(tmp_path, "aout", aout)) == "multiboot"
    elf32 = elf_image([(0x100000, b"\x90" * 64, 64)])
    assert kernel_format(write(tmp_path, "elf32", elf32)) == "multiboot"
    # An x86-64 ELF whose Multiboot entry is its e_entry has 32-bit code there.
    plain = linux_elf64(0x10000C, header(PAGE_ALIGN))
    assert kernel_format(write(tmp_path, "mb64", plain)) == "multiboot"
    # One whose address fields name another entry has both (kasou's guest kit): 64-bit.
    fields = (0x100000, 0x100000, 0x100000 + 32 + 64, 0x101000, 0x100020)
    both = linux_elf64(0x100040, header(PAGE_ALIGN | ADDRESS_FIELDS, *fields))
    assert kernel_format(write(tmp_path, "both", both)) == "elf"


def test_a_file_whose_only_claim_is_a_bad_multiboot_header_says_so(tmp_path: Path) -> None:
    path = write(tmp_path, "bad", header(PAGE_ALIGN, checksum=1) + bytes(100))
    with pytest.raises(ImageError, match="bad checksum"):
        kernel_format(path)


def test_load_kernel_loads_a_multiboot_image(tmp_path: Path, ram: GuestMemory) -> None:
    data = aout_image(bss=0x3000)
    kernel = load_kernel(ram, write(tmp_path, "k", data))
    assert (kernel.kind, kernel.entry, kernel.start) == ("multiboot", 0x100020, 0x100000)
    assert kernel.end == 0x100000 + len(data) + 0x3000
    assert ram.read(0x100000, len(data)) == data


# --- modules and the information structure, read back as a kernel reads them (§3.3) ------


class Info(NamedTuple):
    flags: int
    mem_lower: int
    mem_upper: int
    cmdline: int
    modules: list[tuple[int, int, str]]
    mmap: list[tuple[int, int, int]]
    loader: str


def c_string(memory: GuestMemory, address: int) -> str:
    data = memory.read(address, 4096)
    return data[: data.index(b"\0")].decode()


def read_info(memory: GuestMemory, address: int) -> Info:
    flags, mem_lower, mem_upper, _boot_device, cmdline, mods_count, mods_addr = struct.unpack(
        "<7I", memory.read(address, 28)
    )
    mmap_length, mmap_addr = struct.unpack("<II", memory.read(address + 44, 8))
    loader = struct.unpack("<I", memory.read(address + 64, 4))[0]
    modules = []
    for index in range(mods_count):
        start, end, string, reserved = struct.unpack("<4I", memory.read(mods_addr + 16 * index, 16))
        assert reserved == 0
        modules.append((start, end, c_string(memory, string)))
    mmap = []
    cursor = mmap_addr
    while cursor < mmap_addr + mmap_length:  # §3.3: "size" excludes the size field itself
        size, base, length, kind = struct.unpack("<IQQI", memory.read(cursor, 24))
        mmap.append((base, length, kind))
        cursor += size + 4
    return Info(flags, mem_lower, mem_upper, cmdline, modules, mmap, c_string(memory, loader))


def test_the_information_reads_back_as_a_kernel_reads_it(tmp_path: Path) -> None:
    memory = GuestMemory.create(layout.ram_layout(256 * MiB))
    try:
        contents = [b"first module\n", b"", bytes(range(256)) * 40, b"x"]
        paths = [write(tmp_path, f"m{index}", data) for index, data in enumerate(contents)]
        kernel_end = 0x100000 + 0x1234
        modules = load_modules(memory, paths, kernel_end)
        memory.write(layout.CMDLINE, b"/boot/k exit=3\0")
        e820 = layout.e820_map([(region.gpa, region.size) for region in memory.regions])
        address = write_info(
            memory,
            layout.MULTIBOOT_INFO,
            layout.MULTIBOOT_INFO_SIZE,
            cmdline=layout.CMDLINE,
            modules=modules,
            e820=e820,
        )
        info = read_info(memory, address)
        assert info.flags == 1 << 0 | 1 << 2 | 1 << 3 | 1 << 6 | 1 << 9
        assert c_string(memory, info.cmdline) == "/boot/k exit=3"
        assert info.loader == "kasou"
        assert info.mmap == e820
        assert info.mem_lower == layout.EBDA_START >> 10  # 639 KiB
        assert info.mem_upper == (256 * MiB - MiB) >> 10
        assert [string for _, _, string in info.modules] == [str(path) for path in paths]
        previous_end = kernel_end
        for (start, end, _), data in zip(info.modules, contents, strict=True):
            assert start % 4096 == 0
            assert start >= previous_end
            assert end - start == len(data)
            assert memory.read(start, len(data)) == data
            previous_end = end
    finally:
        memory.close()


def test_modules_that_do_not_fit_ask_for_more_memory(tmp_path: Path, ram: GuestMemory) -> None:
    big = write(tmp_path, "big", bytes(8 * MiB))
    with pytest.raises(ImageError, match="raise --memory"):
        load_modules(ram, [big, big, big, big, big, big, big, big], 0x100000)


def test_a_missing_module_is_refused_with_its_path(tmp_path: Path, ram: GuestMemory) -> None:
    with pytest.raises(ImageError, match=r"module .*nothere does not exist"):
        load_modules(ram, [tmp_path / "nothere"], 0x100000)


def test_information_that_does_not_fit_its_area_is_refused(ram: GuestMemory) -> None:
    modules = [Module(0x200000, 0x200001, "m" * 1000)] * 20
    with pytest.raises(ImageError, match="use fewer modules or shorter paths"):
        write_info(ram, 0x10000, 0x4000, cmdline=0x20000, modules=modules, e820=[(0, MiB, 1)])


# --- the test kernel, built by binutils ----------------------------------------------------


@pytest.mark.skipif(shutil.which("as") is None, reason="binutils is not installed")
def test_the_test_kernels_address_fields_agree_with_its_elf_headers(
    tmp_path: Path, ram: GuestMemory
) -> None:
    from kasou.guestkit.multiboot import build_multiboot_hello

    plain = build_multiboot_hello(tmp_path)
    kludge = build_multiboot_hello(tmp_path, address_fields=True)
    assert kernel_format(plain) == kernel_format(kludge) == "multiboot"
    plain_header, kludge_header = find_header(plain.read_bytes()), find_header(kludge.read_bytes())
    assert plain_header is not None and not plain_header.has_address_fields
    assert kludge_header is not None and kludge_header.has_address_fields
    # What the address fields load is what the file's one PT_LOAD says.
    data = kludge.read_bytes()
    e_entry, e_phoff = struct.unpack_from("<II", data, 24)
    p_type, p_offset, _, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", data, e_phoff)
    kernel = load_kernel(ram, kludge)
    assert (p_type, kernel.start, kernel.end, kernel.entry) == (
        1,
        p_paddr,
        p_paddr + p_memsz,
        e_entry,
    )
    assert ram.read(p_paddr, p_filesz) == data[p_offset : p_offset + p_filesz]


# --- untrusted header fields ---------------------------------------------------------------

address = st.one_of(
    st.integers(0, 0xFFFFFFFF),
    st.integers(0x100000 - 0x100, 0x100000 + 0x3000),
    st.integers(64 * MiB - 0x2000, 64 * MiB + 0x2000),
)
# Mostly the bits kasou knows (so that the address fields get looked at), sometimes any.
known_flags = st.sets(st.sampled_from([PAGE_ALIGN, MEMORY_INFO, VIDEO, ADDRESS_FIELDS, 1 << 20]))
flags_strategy = st.one_of(
    st.just(PAGE_ALIGN | MEMORY_INFO | ADDRESS_FIELDS),
    known_flags.map(lambda bits: sum(bits) | ADDRESS_FIELDS),
    known_flags.map(sum),
    st.integers(0, 0xFFFFFFFF),
)


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """A header at some offset whose five fields are mostly consistent with the file and
    one load address, sometimes just off (by a little, or anywhere; 0 for load_end_addr
    and bss_end_addr means "to the end of the file" and "no bss")."""
    offset = draw(st.integers(0, 2047)) * 4
    size = offset + 32 + draw(st.integers(0, 0x2000))
    base = draw(st.one_of(st.integers(0x100000, 0x3000000), address))

    def field(low: int, high: int) -> int:
        choice = draw(st.integers(0, 9))
        if choice < 7:  # consistent
            return (base + draw(st.integers(low, high))) & 0xFFFFFFFF
        if choice == 7:  # just off
            return (base + draw(st.sampled_from([low - 1, high + 1]))) & 0xFFFFFFFF
        return draw(st.one_of(st.just(0), address))

    skip = draw(st.integers(0, offset))  # file bytes before the image
    image = size - skip  # the bytes from the image's start to the end of the file
    fields = [
        field(offset - skip, offset - skip),  # header_addr
        base,  # load_addr
        field(1, image),  # load_end_addr
        field(image, image + 0x4000),  # bss_end_addr
        field(0, image - 1),  # entry_addr
    ]
    flags = draw(flags_strategy)
    filler = (bytes(range(256)) * (size // 256 + 1))[: size - offset - 32]
    return bytes(offset) + header(flags, *fields) + filler


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=images())
def test_any_header_fields_give_an_image_error_or_a_consistent_load(
    ram: GuestMemory, data: bytes
) -> None:
    try:
        kernel = parse_multiboot(data, "k")
        load_multiboot(ram, data, kernel, "k")
    except ImageError as error:
        assert "\n" not in str(error)
        return
    assert any(s.address <= kernel.entry < s.end for s in kernel.segments)
    for segment in kernel.segments:
        assert segment.address >= 0x100000 and segment.end <= 64 * MiB
        assert segment.offset >= 0 and segment.offset + segment.filesz <= len(data)
        loaded = ram.read(segment.address, segment.memsz)
        assert loaded[: segment.filesz] == data[segment.offset : segment.offset + segment.filesz]
        assert loaded[segment.filesz :] == bytes(segment.memsz - segment.filesz)
