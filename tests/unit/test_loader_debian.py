"""The loader on Debian's stock kernels (xz payload) and cloud kernels (lz4 legacy payload).

The kernels are found under $KASOU_DEBIAN_KERNELS, else ~/.cache/kasou/debian-kernels: any
``*/boot/vmlinuz-*`` there (``apt-get download linux-image-6.1.0-<N>-amd64
linux-image-6.1.0-<N>-cloud-amd64`` and ``dpkg-deb -x`` each into its own folder). The tests
skip when none is there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from kasou.loader import build_boot_params, extract_vmlinux, kernel_format, load_kernel
from kasou.loader.bzimage import parse_bzimage
from kasou.loader.decompress import detect_format
from kasou.memory import GuestMemory

MiB = 1 << 20
ROOT = Path(
    os.environ.get("KASOU_DEBIAN_KERNELS", Path.home() / ".cache" / "kasou" / "debian-kernels")
)
KERNELS = sorted(ROOT.glob("*/boot/vmlinuz-*"))

pytestmark = pytest.mark.skipif(
    not KERNELS, reason=f"no Debian kernel under {ROOT} (set KASOU_DEBIAN_KERNELS)"
)


@pytest.fixture(scope="module", params=KERNELS, ids=[path.name for path in KERNELS])
def kernel(request: pytest.FixtureRequest) -> tuple[Path, bytes]:
    """A kernel file and the vmlinux extracted from it (extracted once per module)."""
    path: Path = request.param
    return path, extract_vmlinux(path.read_bytes())


def test_header_and_payload_format(kernel: tuple[Path, bytes]) -> None:
    path, _ = kernel
    data = path.read_bytes()
    image = parse_bzimage(data)
    assert kernel_format(path) == "bzimage"
    assert image.version >= 0x020C and image.relocatable
    payload = data[image.kernel_offset + image.payload_offset :][:8]
    expected = "lz4" if "cloud" in path.name else "xz"
    assert detect_format(payload) == expected


def test_bzimage_loads_with_its_header(kernel: tuple[Path, bytes]) -> None:
    path, _ = kernel
    memory = GuestMemory.create([(0, 256 * MiB)])
    loaded = load_kernel(memory, path)
    data = path.read_bytes()
    image = parse_bzimage(data)
    assert (loaded.start, loaded.entry) == (0x1000000, 0x1000200)
    assert loaded.end == 0x1000000 + image.init_size
    assert memory.read(0x1000000, 4096) == data[image.kernel_offset :][:4096]
    page = build_boot_params(
        setup_header=loaded.setup_header,
        cmdline_addr=0x20000,
        cmdline_size=20,
        initrd=None,
        e820=[(0, 256 * MiB, 1)],
    )
    assert page[0x1F1:0x210] == data[0x1F1:0x210]  # untouched part of the kernel's header
    memory.close()


def test_extracted_vmlinux_is_the_kernel_elf(kernel: tuple[Path, bytes], tmp_path: Path) -> None:
    _path, vmlinux = kernel
    vmlinux_path = tmp_path / "vmlinux"
    vmlinux_path.write_bytes(vmlinux)
    with vmlinux_path.open("rb") as file:
        elf = ELFFile(file)
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_entry"] == 0x1000000  # ENTRY(phys_startup_64) at CONFIG_PHYSICAL_START
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        first = loads[0]
        memory = GuestMemory.create([(0, 256 * MiB)])
        loaded = load_kernel(memory, vmlinux_path)
        assert loaded.kind == "elf" and loaded.entry == 0x1000000
        assert loaded.end == max(s["p_paddr"] + s["p_memsz"] for s in loads)
        assert memory.read(first["p_paddr"], 4096) == first.data()[:4096]
        memory.close()
    assert kernel_format(vmlinux_path) == "elf"
