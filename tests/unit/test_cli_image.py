"""``kasou run --image``: the VM kasou sets up for a disk image (its kernel, initrd and root
found in the image, the image as /dev/vda behind a throw-away overlay), and a one-line error
with exit status 2 for an image it cannot boot, leaving nothing behind.

Booting the image needs a KVM that runs Linux: that is tests/e2e/test_image.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from bootdisk_images import (
    INITRD,
    KERNEL,
    ROOT_UUID,
    Part,
    debian_tree,
    disk,
    ext_fs,
    needs_tools,
    qcow2,
)

from kasou.cli.fastrun import _config, parser
from kasou.vmm.config import DEFAULT_CMDLINE, VsockConfig

pytestmark = [
    needs_tools,
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is needed"),
]

KASOU = str(Path(sys.executable).with_name("kasou"))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Debian-shaped raw image: GPT, partition 1 an ext4 root with /boot and the links."""
    folder = tmp_path_factory.mktemp("image")
    root = ext_fs(folder / "root.ext4", debian_tree())
    return disk(folder / "debian.raw", [Part(root)])


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """kasou's temporary folder for this test, so that what it leaves there can be seen."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def configure(*args: str) -> tuple[Any, list[Path]]:
    """The VmConfig ``kasou run ARGS`` would boot, and the scratch folders it made."""
    made: list[Path] = []
    return _config(vars(parser().parse_args(list(args))), made), made


def backing_of(overlay: Path) -> tuple[str, str]:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return info["backing-filename"], info["backing-filename-format"]


def test_an_image_boots_its_kernel_initrd_and_root_behind_an_overlay(
    image: Path, scratch: Path, tmp_path: Path
) -> None:
    sock = tmp_path / "vm.sock"
    config, made = configure("--image", str(image), "--api-sock", str(sock))

    assert config.kernel.read_bytes() == KERNEL
    assert config.initrd is not None and config.initrd.read_bytes() == INITRD
    assert config.cmdline == f"{DEFAULT_CMDLINE} quiet root=UUID={ROOT_UUID} ro"
    root = config.disks[0]
    assert root.path.parent in made and root.path.parent.parent == scratch
    assert backing_of(root.path) == (os.path.abspath(image), "raw")
    assert config.vsock == VsockConfig(cid=3, uds=Path(f"{sock}.vsock"))  # kasou exec works
    assert config.rng
    for folder in made:  # what kasou run removes when it ends
        shutil.rmtree(folder)
    assert not any(scratch.iterdir())


def test_a_qcow2_image_is_the_overlays_qcow2_backing(
    image: Path, scratch: Path, tmp_path: Path
) -> None:
    image_qcow2 = qcow2(image, tmp_path / "debian.qcow2")
    config, _ = configure("--image", str(image_qcow2), "--disk", str(image))
    assert config.kernel.read_bytes() == KERNEL
    assert backing_of(config.disks[0].path) == (str(image_qcow2), "qcow2")
    assert config.disks[1].path == image  # --disk ones come after: /dev/vdb


def test_image_writable_gives_the_image_itself(image: Path, scratch: Path) -> None:
    config, _ = configure("--image", str(image), "--image-writable")
    assert config.disks[0].path == image and not config.disks[0].read_only


def test_kernel_initrd_and_cmdline_given_replace_the_images(
    image: Path, scratch: Path, tmp_path: Path
) -> None:
    kernel, initrd = tmp_path / "my-vmlinuz", tmp_path / "my-initrd"
    kernel.write_bytes(b"my kernel")
    initrd.write_bytes(b"my initrd")
    config, _ = configure(
        "--image", str(image), "--kernel", str(kernel), "--initrd", str(initrd),
        "--cmdline", "console=ttyS0 quiet",
    )  # fmt: skip
    assert (config.kernel, config.initrd) == (kernel, initrd)
    assert config.cmdline == f"console=ttyS0 quiet root=UUID={ROOT_UUID}"  # its root= added

    config, _ = configure("--image", str(image), "--cmdline", "root=/dev/vda1 rw")
    assert config.cmdline == "root=/dev/vda1 rw"  # a root= of its own: left as given
    assert config.kernel.read_bytes() == KERNEL  # the image's, as --kernel was not given


def run_kasou(scratch: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TMPDIR=str(scratch))
    return subprocess.run(
        [KASOU, "run", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )


def _no_kernel(folder: Path) -> Path:
    root = ext_fs(folder / "root.ext4", {"/etc/os-release": b"ID=debian\n"})
    return disk(folder / "no-kernel.raw", [Part(root)])


def _xfs(folder: Path) -> Path:
    return disk(folder / "xfs.raw", [Part(b"XFSB" + bytes(4 << 20))])


def _corrupt_qcow2(folder: Path) -> Path:
    root = ext_fs(folder / "root.ext4", debian_tree())
    image = qcow2(disk(folder / "debian.raw", [Part(root)]), folder / "bad.qcow2")
    raw = bytearray(image.read_bytes())
    raw[40:48] = (1 << 40).to_bytes(8, "big")  # l1_table_offset: far outside the file
    image.write_bytes(raw)
    return image


def _text(folder: Path) -> Path:
    notes = folder / "notes.txt"
    notes.write_text("not a disk\n" * 200)
    return notes


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (_no_kernel, "no kernel: partition 1 (ext4) has no /boot/vmlinuz-*"),
        (_xfs, "partition 1 is xfs: kasou reads only ext2/3/4"),
        (_corrupt_qcow2, "unusable qcow2 image"),
        (_text, "no partition table and no file system"),
        (lambda folder: folder / "missing.qcow2", "cannot open disk image"),
    ],
    ids=["no kernel", "xfs", "corrupt qcow2", "not an image", "missing"],
)
def test_an_image_kasou_cannot_boot_is_one_line_and_leaves_nothing(
    tmp_path: Path, make: Any, says: str
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    bad = make(tmp_path)
    sock = tmp_path / "vm.sock"

    result = run_kasou(scratch, "--image", str(bad), "--api-sock", str(sock), "--rng")

    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kasou: error: {bad}") and says in line, line
    assert not any(scratch.iterdir())  # no overlay, no extracted kernel
    assert not sock.exists() and not Path(f"{sock}.vsock").exists()


def test_image_writable_without_an_image(tmp_path: Path) -> None:
    result = run_kasou(tmp_path, "--image-writable")
    assert result.returncode == 2
    assert result.stderr == (
        "kasou: error: image-writable: give the image too: --image DISK --image-writable\n"
    )
