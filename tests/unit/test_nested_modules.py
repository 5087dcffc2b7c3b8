"""Choosing and ordering the outer VM's kernel modules by their depends= strings.

The modules are real ELF objects with a .modinfo section, compiled by gcc the way modpost
lays out the strings, so the reader is tested against the same bytes a kernel module holds.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from kasou.nested._modules import Module, ModuleError, modinfo, module_bytes, resolve_modules

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def make_module(path: Path, name: str, depends: str) -> None:
    source = path.with_suffix(".c")
    lines = [
        f'__attribute__((section(".modinfo"), used, aligned(1))) '
        f'static const char info{index}[] = "{text}";'
        for index, text in enumerate([f"name={name}", f"depends={depends}", "license=GPL"])
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    source.write_text("\n".join(lines) + "\n")
    subprocess.run(["gcc", "-c", "-o", str(path), str(source)], check=True)
    source.unlink()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A lib/modules/<release> shaped like Debian's: kvm-amd needs kvm and ccp, kvm needs
    irqbypass, ccp is xz-compressed, and virtio is built in."""
    root = tmp_path / "6.1.0-test"
    kernel = root / "kernel"
    make_module(kernel / "arch/x86/kvm/kvm-amd.ko", "kvm_amd", "kvm,ccp")
    make_module(kernel / "arch/x86/kvm/kvm.ko", "kvm", "irqbypass")
    make_module(kernel / "virt/lib/irqbypass.ko", "irqbypass", "")
    make_module(kernel / "drivers/crypto/ccp/ccp.ko", "ccp", "")
    plain = kernel / "drivers/crypto/ccp/ccp.ko"
    plain.with_name("ccp.ko.xz").write_bytes(lzma.compress(plain.read_bytes()))
    plain.unlink()
    make_module(kernel / "drivers/char/virtio_console.ko", "virtio_console", "virtio")
    make_module(kernel / "fs/loop/loopy.ko", "loopy", "loopy2")
    make_module(kernel / "fs/loop/loopy2.ko", "loopy2", "loopy")
    make_module(kernel / "fs/lonely.ko", "lonely", "missing_one")
    (root / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n")
    return root


def names(modules: list[Module]) -> list[str]:
    return [module.name for module in modules]


def test_dependencies_come_first(tree: Path) -> None:
    order = resolve_modules(tree, ["kvm_amd"])
    assert names(order) == ["irqbypass", "kvm", "ccp", "kvm_amd"]
    assert order[-1].path.name == "kvm-amd.ko"  # '-' and '_' name the same module


def test_each_module_is_listed_once(tree: Path) -> None:
    assert names(resolve_modules(tree, ["kvm", "kvm-amd", "irqbypass"])) == [
        "irqbypass",
        "kvm",
        "ccp",
        "kvm_amd",
    ]


def test_built_in_dependencies_are_left_out(tree: Path) -> None:
    assert names(resolve_modules(tree, ["virtio_console"])) == ["virtio_console"]


def test_compressed_modules_are_read_uncompressed(tree: Path) -> None:
    (ccp,) = resolve_modules(tree, ["ccp"])
    assert ccp.path.name == "ccp.ko.xz"
    image = module_bytes(ccp.path)
    assert image.startswith(b"\x7fELF")
    assert modinfo(image)["name"] == "ccp"


def test_a_missing_dependency_is_named(tree: Path) -> None:
    with pytest.raises(ModuleError, match=r"missing_one \(needed by lonely\)"):
        resolve_modules(tree, ["lonely"])


def test_a_cycle_is_reported(tree: Path) -> None:
    with pytest.raises(ModuleError, match="cycle"):
        resolve_modules(tree, ["loopy"])


def test_a_file_that_is_not_a_module_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModuleError):
        modinfo(b"not an ELF file")
