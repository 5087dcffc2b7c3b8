"""Disk images for the bootdisk tests, made as a distribution's are, with Debian's own tools
and no root: ``mke2fs -d`` fills an ext2/3/4 file system from a folder, ``e2fsck -fD`` turns
its large directories into hashed ones, ``sfdisk`` writes GPT and MBR tables, ``qemu-img``
converts to qcow2. ``debugfs`` tells the tests what the tools made (extent depth, indirect
blocks, fast symlinks), so that each test knows it covers what it says."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

MIB = 1 << 20
ROOT_UUID = "6b617361-6f75-4b61-8000-626f6f746469"
LINUX = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"

needs_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("sfdisk", "mke2fs", "debugfs", "e2fsck")),
    reason="sfdisk and e2fsprogs are needed (apt-get install fdisk e2fsprogs)",
)


class Link(NamedTuple):
    """A symbolic link in a tree, to ``target``."""

    target: str


Tree = Mapping[str, "bytes | Link"]


def data(size: int, seed: int) -> bytes:
    """``size`` reproducible bytes that compress badly, as a kernel does."""
    return random.Random(seed).randbytes(size)


def run(*argv: str | Path, stdin: str | None = None) -> str:
    result = subprocess.run(
        [str(arg) for arg in argv], input=stdin, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def fill(folder: Path, tree: Tree) -> Path:
    """Make ``tree`` (path -> contents or Link) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, contents in tree.items():
        path = folder / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(contents, Link):
            os.symlink(contents.target, path)
        else:
            path.write_bytes(contents)
    return folder


def ext_fs(
    path: Path,
    tree: Tree,
    size: int = 16 * MIB,
    kind: str = "ext4",
    options: Sequence[str] = (),
    uuid: str = ROOT_UUID,
    hashed_dirs: bool = False,
) -> Path:
    """An ext2/3/4 file system image at ``path`` holding ``tree``; with ``hashed_dirs``
    e2fsck re-indexes its directories (those over a block become htree directories)."""
    with tempfile.TemporaryDirectory() as folder:
        source = fill(Path(folder) / "tree", tree)
        run("mke2fs", "-q", "-F", "-t", kind, "-U", uuid, *options, "-d", source, path,
            f"{size // 1024}k")  # fmt: skip
    if hashed_dirs:
        subprocess.run(["e2fsck", "-fyD", str(path)], capture_output=True, check=False)
    return path


def debugfs(fs: Path, request: str) -> str:
    return run("debugfs", "-R", request, fs)


def extent_depth(fs: Path, file: str) -> int:
    """The depth of ``file``'s extent tree, as ``debugfs ex`` shows it ("Level N/DEPTH")."""
    levels = re.findall(r"^\s*\d+/\s*(\d+)", debugfs(fs, f"ex {file}"), re.MULTILINE)
    return int(levels[0]) if levels else 0


def inode_offset(fs: Path, file: str, block_size: int) -> int:
    """Where ``file``'s inode is in ``fs`` (bytes), from ``debugfs imap``."""
    text = debugfs(fs, f"imap {file}")
    found = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", text)
    assert found, text
    return int(found[1]) * block_size + int(found[2], 16)


class Part(NamedTuple):
    """A partition: its contents (a file copied in, e.g. a file system image), its size (the
    contents' rounded up to MiB by default), sfdisk's type, and its GPT unique GUID."""

    content: Path | bytes | None
    size: int | None = None
    type: str = LINUX
    uuid: str | None = None


def partition(path: Path, size: int, script: str) -> dict[int, tuple[int, int]]:
    """A new image of ``size`` bytes partitioned by the sfdisk ``script``: partition number
    -> (offset, size) in bytes."""
    path.unlink(missing_ok=True)
    with path.open("wb") as image:
        image.truncate(size)
    run("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path, stdin=script)
    table = json.loads(run("sfdisk", "--json", path))["partitiontable"]
    return {
        int(re.findall(r"\d+$", entry["node"])[0]): (entry["start"] * 512, entry["size"] * 512)
        for entry in table.get("partitions", ())
    }


def place(image: Path, offset: int, content: Path | bytes) -> None:
    """Write ``content`` (a file's bytes, or bytes) into ``image`` at ``offset``."""
    payload = content.read_bytes() if isinstance(content, Path) else content
    with image.open("r+b") as file:
        file.seek(offset)
        file.write(payload)


def disk(path: Path, parts: Sequence[Part], label: str = "gpt", header: str = "") -> Path:
    """A disk image with ``parts`` in order from 1 MiB (partition 1, 2, ...), each holding
    its content."""
    sizes = []
    for part in parts:
        length = part.size
        if length is None:
            content = part.content
            length = content.stat().st_size if isinstance(content, Path) else len(content or b"")
        sizes.append(-(-max(length, 1) // MIB) * MIB)
    lines = [f"label: {label}", header]
    for number, (part, length) in enumerate(zip(parts, sizes, strict=True), 1):
        start = "start=2048, " if number == 1 else ""  # 1 MiB, however small the disk
        uuid = f", uuid={part.uuid}" if part.uuid else ""
        lines.append(f"{start}size={length // 512}, type={part.type}{uuid}")
    layout = partition(path, sum(sizes) + 2 * MIB, "\n".join(lines) + "\n")
    for number, part in enumerate(parts, 1):
        if part.content is not None:
            place(path, layout[number][0], part.content)
    return path


def qcow2(raw: Path, path: Path | None = None) -> Path:
    """``raw`` converted to qcow2 (compressed clusters are not used)."""
    target = path or raw.with_suffix(".qcow2")
    run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, target)
    return target


DEBIAN_VERSION = "6.1.0-28-cloud-amd64"
KERNEL = data(300_000, 1)
INITRD = data(700_000, 2)


def debian_tree() -> dict[str, bytes | Link]:
    """A root file system shaped like Debian's cloud image: /boot with two kernels, and the
    /vmlinuz and /initrd.img links to the newest, made by the kernel package."""
    return {
        f"/boot/vmlinuz-{DEBIAN_VERSION}": KERNEL,
        f"/boot/initrd.img-{DEBIAN_VERSION}": INITRD,
        f"/boot/config-{DEBIAN_VERSION}": b"CONFIG_ACPI=y\n",
        "/boot/vmlinuz-6.1.0-9-cloud-amd64": data(1000, 3),
        "/boot/initrd.img-6.1.0-9-cloud-amd64": data(1000, 4),
        "/etc/os-release": b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n',
        "/sbin/init": b"#!/bin/sh\n",
        "/vmlinuz": Link(f"boot/vmlinuz-{DEBIAN_VERSION}"),
        "/initrd.img": Link(f"boot/initrd.img-{DEBIAN_VERSION}"),
        "/vmlinuz.old": Link("boot/vmlinuz-6.1.0-9-cloud-amd64"),
    }


def metadata_areas(fs: Path, paths: Sequence[str], block_size: int) -> list[tuple[int, int]]:
    """Where in ``fs`` the metadata that reaching ``paths`` reads lies, as (offset, length):
    the superblock, the first descriptor block, each path's inode, the blocks of the
    directories among them, and their extent index and indirect blocks."""
    areas = [(1024, 1024), (((1 if block_size == 1024 else 0) + 1) * block_size, block_size)]
    inode_size = int(re.findall(r"Inode size:\s+(\d+)", run("dumpe2fs", "-h", fs))[0])
    for path in paths:
        areas.append((inode_offset(fs, path, block_size), inode_size))
        stat = debugfs(fs, f"stat {path}")
        if "Type: directory" in stat and "Size of inline data" not in stat:
            for block in debugfs(fs, f"blocks {path}").split():
                areas.append((int(block) * block_size, block_size))
        for block in re.findall(r"\((?:IND|DIND|TIND)\):(\d+)", stat):
            areas.append((int(block) * block_size, block_size))
        for level, depth, block in re.findall(
            r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+\d+\s*-\s*\d+\s+(\d+)", debugfs(fs, f"ex {path}"),
            re.MULTILINE,
        ):  # fmt: skip
            if int(level) < int(depth):  # an index node: the block it points at
                areas.append((int(block) * block_size, block_size))
    return areas
