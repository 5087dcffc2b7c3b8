"""The guest kit compiles with the machine's gcc into one ELF that is also a Multiboot image.

These tests build the real guest (about half a second) and read the result back with
pyelftools, independently of build.py's own checks. Booting it is tests/guestkit_qemu's job.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from kasou.errors import ConfigError, KasouError
from kasou.guestkit import (
    COUNTER_GPA,
    LOAD_ADDR,
    GuestKitError,
    build_guest,
    cmdline,
    default_cache_dir,
    inspect_guest,
    refused_instructions,
)
from kasou.guestkit.build import SOURCE_DIR

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or shutil.which("objdump") is None,
    reason="gcc and objdump (apt-get install gcc binutils) build the guest",
)


@pytest.fixture(scope="module")
def elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_guest(tmp_path_factory.mktemp("cache"))


def _symbols(path: Path) -> dict[str, int]:
    with path.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        return {symbol.name: symbol["st_value"] for symbol in symtab.iter_symbols()}


def _image_bytes(path: Path) -> bytes:
    with path.open("rb") as f:
        segment = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD")
        return bytes(segment.data())


def test_guest_is_an_x86_64_executable_with_one_segment_at_1_mib(elf: Path) -> None:
    with elf.open("rb") as f:
        image = ELFFile(f)
        loads = [s for s in image.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert image.elfclass == 64
        assert image["e_machine"] == "EM_X86_64"
        assert image["e_type"] == "ET_EXEC"
        assert len(loads) == 1
        assert loads[0]["p_paddr"] == loads[0]["p_vaddr"] == LOAD_ADDR
        assert loads[0]["p_paddr"] + loads[0]["p_memsz"] <= COUNTER_GPA
        assert image["e_entry"] == _symbols(elf)["linux64_entry"]


def test_multiboot_loading_gives_the_same_bytes_as_elf_loading(elf: Path) -> None:
    data = elf.read_bytes()
    offsets = [
        offset
        for offset in range(0, 8192, 4)
        if struct.unpack_from("<I", data, offset)[0] == 0x1BADB002
    ]
    assert len(offsets) == 1
    header = offsets[0]
    magic, flags, checksum, header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from(
        "<8I", data, header
    )
    assert (magic + flags + checksum) % 2**32 == 0
    assert flags & (1 << 16)
    assert entry == _symbols(elf)["mb_entry32"]
    # What a Multiboot loader copies (Multiboot 0.6.96, 3.1.3) ...
    start = header - (header_addr - load_addr)
    multiboot_bytes = data[start : start + load_end - load_addr]
    # ... and what an ELF loader copies.
    with elf.open("rb") as f:
        segment = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD")
        assert load_addr == segment["p_paddr"]
        assert bss_end == segment["p_paddr"] + segment["p_memsz"]
        assert multiboot_bytes == segment.data()


def test_inspect_guest_reports_the_entries(elf: Path) -> None:
    image = inspect_guest(elf)
    symbols = _symbols(elf)
    assert image.entry64 == symbols["linux64_entry"]
    assert image.entry32 == symbols["mb_entry32"]
    assert image.load_addr == LOAD_ADDR
    assert image.multiboot_offset < 8192


def test_inspect_guest_rejects_a_multiboot_header_that_disagrees_with_the_elf(
    elf: Path, tmp_path: Path
) -> None:
    data = bytearray(elf.read_bytes())
    header = inspect_guest(elf).multiboot_offset
    load_end = struct.unpack_from("<I", data, header + 20)[0]
    struct.pack_into("<I", data, header + 20, load_end + 4)
    broken = tmp_path / "broken.elf"
    broken.write_bytes(bytes(data))
    with pytest.raises(GuestKitError, match="load_end_addr"):
        inspect_guest(broken)


def test_guest_holds_no_instruction_pvm_refuses(elf: Path) -> None:
    assert refused_instructions(elf) == []


def test_refused_instructions_are_found_in_each_mode(tmp_path: Path) -> None:
    source = tmp_path / "bad.S"
    source.write_text(
        "\t.text\n\t.code64\n"
        "\tnop\n\tint3\n\tpopcnt %rax, %rbx\n\tpxor %xmm0, %xmm0\n\txsave (%rax)\n"
        "\tcmpxchg16b (%rdi)\n\tlock xadd %eax, (%rdi)\n\tvmcall\n\tmov %rax, %rbx\n"
        '\t.section .text32, "ax"\n\t.code32\n\tmov %cr0, %eax\n\trdtscp\n'
        '\t.section .text16, "ax"\n\t.code16\n\tmov %cr0, %eax\n\tstac\n'
    )
    obj = tmp_path / "bad.o"
    subprocess.run(["gcc", "-c", str(source), "-o", str(obj)], check=True)
    found = refused_instructions(obj)
    assert [line.split(":", 1)[1].split()[0] for line in found] == [
        "int3",
        "popcnt",
        "pxor",
        "xsave",
        "cmpxchg16b",
        "vmcall",
        "rdtscp",
        "stac",
    ]
    assert [line.split()[0] for line in found][-2:] == [".text32", ".text16"]


def test_a_second_build_comes_from_the_cache(tmp_path: Path, elf: Path) -> None:
    cache = elf.parent.parent
    again = build_guest(cache)
    assert again == elf
    assert again.stat().st_ino == elf.stat().st_ino
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]


def test_changed_sources_build_a_new_entry(tmp_path: Path, elf: Path) -> None:
    sources = tmp_path / "src"
    shutil.copytree(SOURCE_DIR, sources)
    with (sources / "lib.c").open("a") as f:
        f.write("/* changed */\n")
    cache = elf.parent.parent
    changed = build_guest(cache, source_dir=sources)
    assert changed.parent.parent == cache
    assert changed != elf
    assert _image_bytes(changed) == _image_bytes(elf)  # a comment changes no code


def test_concurrent_builds_end_with_one_complete_entry(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_guest(tmp_path))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results[0] == results[1]
    assert [p.name for p in tmp_path.iterdir()] == [results[0].parent.name]
    inspect_guest(results[0])


def test_a_compile_error_raises_with_gccs_message(tmp_path: Path) -> None:
    sources = tmp_path / "src"
    shutil.copytree(SOURCE_DIR, sources)
    with (sources / "user.c").open("a") as f:
        f.write("int broken(void) { return undeclared_thing; }\n")
    cache = tmp_path / "cache"
    with pytest.raises(GuestKitError, match="undeclared_thing") as raised:
        build_guest(cache, source_dir=sources)
    assert isinstance(raised.value, KasouError)
    assert "user.c" in str(raised.value)
    assert list(cache.iterdir()) == []


def test_default_cache_follows_xdg_cache_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "kasou" / "guestkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "kasou" / "guestkit"


def test_cmdline_names_the_workload_and_its_arguments() -> None:
    assert cmdline("hello") == "kasou.test=hello"
    assert cmdline("pio", count=1000, port=0x80) == "kasou.test=pio count=1000 port=0x80"
    with pytest.raises(ConfigError, match="unknown workload 'nosuch'"):
        cmdline("nosuch")
    with pytest.raises(ConfigError, match="negative"):
        cmdline("echo", n=-1)


def test_cmdline_passes_text_arguments_as_one_printable_word() -> None:
    assert cmdline("vnet", payload="ping-1", irq=1) == "kasou.test=vnet payload=ping-1 irq=1"
    for bad in ("two words", "", "tab\there", "é"):
        with pytest.raises(ConfigError, match="printable ASCII"):
            cmdline("vnet", payload=bad)
