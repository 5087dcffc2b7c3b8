"""Finding what to boot in a disk image: the root file system, its newest kernel and the
initrd that goes with it."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple

from kasou.bootdisk._errors import BootDiskError
from kasou.bootdisk._ext import ExtFs, Inode, is_dir, is_file, show
from kasou.bootdisk._probe import EXT_KINDS, probe
from kasou.bootdisk._region import Region
from kasou.bootdisk._table import Partition, read_table
from kasou.disk import Disk, DiskError, open_disk

__all__ = ["MAX_INITRD", "MAX_KERNEL", "BootFiles", "find_boot_files"]

_log = logging.getLogger(__name__)

MAX_KERNEL = 256 << 20
"""Bytes of a kernel read at most (a distribution's kernel is about 10 MiB)."""
MAX_INITRD = 1 << 30
"""Bytes of an initrd read at most."""

_KERNEL_PREFIX = b"vmlinuz-"
# Where an initrd for kernel VERSION is, by distribution: Debian and Ubuntu, Fedora, SUSE.
_INITRD_NAMES = (b"initrd.img-%s", b"initramfs-%s.img", b"initrd-%s")
# vmlinuz-VERSION names that are not a kernel to boot: leftovers and signatures.
_NOT_KERNELS = (b".old", b".bak", b".sig", b".hmac", b".dpkg-old", b".dpkg-new", b".dpkg-tmp")
# Partition types that never hold a root: not worth a word when no partition does.
_NOT_ROOTS = {"EFI system", "Linux swap"}


class BootFiles(NamedTuple):
    """What ``find_boot_files`` found in a disk image."""

    kernel: bytes
    kernel_path: str
    """Where the kernel is, as the booted system sees it: "/boot/vmlinuz-6.1.0-28-cloud-amd64"."""
    initrd: bytes | None
    initrd_path: str | None
    root_uuid: str
    """The root file system's UUID (from its superblock), as blkid prints it."""
    root_partition: int
    """The root's 1-based partition number; 0 for a file system on the whole disk."""
    cmdline: str
    """What to boot with: "root=UUID=... ro". Without an initrd nothing in the guest can find
    a file system by its UUID (the kernel knows only partitions): then "root=PARTUUID=...
    ro", or "root=/dev/vda ro" for a whole-disk file system (the image as the first virtio-blk
    disk). "gpt" is added when only the backup GPT is usable, so that the kernel reads it."""


class _Found(NamedTuple):
    kernel: tuple[Inode, bytes]
    initrd: tuple[Inode, bytes] | None


class _System(NamedTuple):
    partition: Partition
    fs: ExtFs


def find_boot_files(path: Path) -> BootFiles:
    """Read what to boot from the disk image at ``path`` (raw or qcow2, with its backing
    chain), without mounting it.

    The root is the ext2/3/4 file system with /boot/vmlinuz-* (or a /vmlinuz or
    /boot/vmlinuz symlink); or, with a separate /boot partition holding vmlinuz-* at its
    top, the ext2/3/4 file system with /etc/os-release or /sbin/init. The kernel is the one
    the /vmlinuz symlinks name, else the newest vmlinuz-VERSION (version order), with its
    initrd.img-VERSION. Raises ``BootDiskError`` (one line naming the image) for an image
    that cannot be read or holds nothing kasou can boot.
    """
    try:
        disk = open_disk(path, read_only=True)
    except DiskError as error:
        # One shape for every message: the image first ("cannot open disk image PATH: ..."
        # becomes "PATH: cannot open disk image: ...").
        text = str(error).removeprefix(f"{path}: ").replace(f" {path}:", ":")
        raise BootDiskError(f"{path}: {text}") from None
    try:
        return _find(disk)
    except BootDiskError as error:
        raise BootDiskError(f"{path}: {error}") from None
    finally:
        disk.close()


def _find(disk: Disk) -> BootFiles:
    whole = Region(disk, 0, disk.size, "the disk")
    table = read_table(whole)
    if table is None:
        kind = probe(whole)
        if kind is None:
            raise BootDiskError(
                "no partition table and no file system: give a disk image (raw or qcow2) "
                "with an ext2/3/4 root file system"
            )
        if kind not in EXT_KINDS:
            raise BootDiskError(f"the disk holds {kind}, no partitions: kasou reads only ext2/3/4")
        partitions: tuple[Partition, ...] = (Partition(0, 0, disk.size, "", ""),)
        problems: list[str] = []
    else:
        partitions, problems = table.partitions, list(table.problems)
        if table.backup_gpt:
            _log.warning("%s: the primary GPT is unusable: using the backup", disk.path)

    systems: list[_System] = []
    others: list[str] = []
    for partition in partitions:
        if partition.kind == "BIOS boot":
            continue  # a boot loader's code, no file system
        name = f"partition {partition.number}" if partition.number else "the disk"
        region = Region(disk, partition.offset, partition.size, name)
        kind = probe(region)
        if kind in EXT_KINDS:
            try:
                systems.append(_System(partition, ExtFs(region)))
            except BootDiskError as error:
                problems.append(str(error))
        elif partition.kind not in _NOT_ROOTS:
            others.append(f"{name} is {kind}" if kind else f"{name} holds no file system")

    if not systems:
        if problems:
            raise BootDiskError(problems[0])
        if others:
            raise BootDiskError(f"{', '.join(others)}: kasou reads only ext2/3/4")
        raise BootDiskError("no partition holds a file system: kasou boots ext2/3/4 roots")

    root, boot, found = _search(systems, problems)
    if root is None or boot is None or found is None:
        if problems:
            raise BootDiskError(problems[0])
        if boot is not None:
            raise BootDiskError(
                f"{boot.fs.label} holds kernels, as a /boot partition, but no ext2/3/4 "
                "partition holds a root file system (/etc/os-release or /sbin/init)"
                + (f"; {', '.join(others)}: kasou reads only ext2/3/4" if others else "")
            )
        names = ", ".join(system.fs.label for system in systems)
        raise BootDiskError(
            f"no kernel: {names} has no /boot/vmlinuz-* (nor a /vmlinuz link): install one "
            "in the image (Debian: linux-image-cloud-amd64)"
        )
    return _boot_files(root, boot, found, table is not None and table.backup_gpt)


def _search(
    systems: list[_System], problems: list[str]
) -> tuple[_System | None, _System | None, _Found | None]:
    """(root, where the kernel is, the kernel and initrd). A file system that fails to read
    adds its error to ``problems`` and the search goes on with the others."""
    for system in systems:  # a root with its own /boot
        try:
            found = _kernel_in(system.fs, b"/boot", (b"/", b"/boot/"))
        except BootDiskError as error:
            problems.append(str(error))
            continue
        if found is not None:
            return system, system, found
    for boot in systems:  # a /boot partition, the root elsewhere
        try:
            found = _kernel_in(boot.fs, b"/", (b"/",))
        except BootDiskError as error:
            problems.append(str(error))
            continue
        if found is None:
            continue
        for system in systems:
            if system is boot:
                continue
            try:
                if _is_root(system.fs):
                    return system, boot, found
            except BootDiskError as error:
                problems.append(str(error))
        return None, boot, found
    return None, None, None


def _kernel_in(fs: ExtFs, directory: bytes, link_folders: tuple[bytes, ...]) -> _Found | None:
    """The kernel to boot in ``fs``: the one a ``vmlinuz`` link in ``link_folders`` names
    (with the ``initrd.img`` link beside it) if it is in ``directory``, else the newest
    vmlinuz-VERSION in ``directory``. (A /boot partition's own /vmlinuz link is not a root's
    /boot/vmlinuz-*: the link must lead into ``directory``.)"""
    inside = directory.rstrip(b"/") + b"/"
    for folder in link_folders:
        kernel = fs.lookup(folder + b"vmlinuz")
        if kernel is None or not is_file(kernel[0]) or not kernel[1].startswith(inside):
            continue
        initrd = fs.lookup(folder + b"initrd.img")
        if initrd is None or not is_file(initrd[0]):
            initrd = _initrd_for(fs, kernel[1])
        return _Found(kernel, initrd)
    listing = fs.lookup(directory)
    if listing is None or not is_dir(listing[0]):
        return None
    names = [
        name
        for name in fs.entries(listing[0])
        if name.startswith(_KERNEL_PREFIX)
        and len(name) > len(_KERNEL_PREFIX)
        and not name.endswith(_NOT_KERNELS)
        and b"rescue" not in name
    ]
    for name in sorted(names, key=_version_key, reverse=True):
        kernel = fs.lookup(listing[1].rstrip(b"/") + b"/" + name)
        if kernel is not None and is_file(kernel[0]):
            return _Found(kernel, _initrd_for(fs, kernel[1]))
    return None


def _initrd_for(fs: ExtFs, kernel_path: bytes) -> tuple[Inode, bytes] | None:
    """The initrd beside the kernel at ``kernel_path`` with the same VERSION."""
    folder, _, name = kernel_path.rpartition(b"/")
    if not name.startswith(_KERNEL_PREFIX):
        return None
    version = name[len(_KERNEL_PREFIX) :]
    for pattern in _INITRD_NAMES:
        initrd = fs.lookup(folder + b"/" + pattern % version)
        if initrd is not None and is_file(initrd[0]):
            return initrd
    return None


def _is_root(fs: ExtFs) -> bool:
    """Whether ``fs`` looks like a root file system (links count: /etc/os-release is one on
    Debian, /sbin/init on most systems)."""
    return any(
        fs.lookup(path, follow=False) is not None for path in (b"/etc/os-release", b"/sbin/init")
    )


def _version_key(name: bytes) -> list[tuple[int, bytes]]:
    """Version order (as ``sort -V``, roughly): runs of digits compare as numbers, so that
    6.1.0-28 is newer than 6.1.0-9; other text compares as bytes, before numbers."""
    return [
        (int(part), b"") if part.isdigit() else (-1, part)
        for part in re.split(rb"(\d+)", name)
        if part
    ]


def _boot_files(root: _System, boot: _System, found: _Found, backup_gpt: bool) -> BootFiles:
    prefix = b"" if boot is root else b"/boot"
    kernel_inode, kernel_path = found.kernel
    kernel = boot.fs.read(kernel_inode, MAX_KERNEL, f"the kernel {show(kernel_path)}")
    if not kernel:
        raise BootDiskError(f"{boot.fs.label}: the kernel {show(kernel_path)} is empty")
    initrd = initrd_path = None
    if found.initrd is not None:
        initrd_inode, path = found.initrd
        initrd = boot.fs.read(initrd_inode, MAX_INITRD, f"the initrd {show(path)}")
        initrd_path = show(prefix + path)
    partition = root.partition
    if initrd is not None:
        root_word = f"root=UUID={root.fs.uuid}"
    elif partition.number:
        root_word = f"root=PARTUUID={partition.uuid}"
    else:
        root_word = "root=/dev/vda"
    return BootFiles(
        kernel=kernel,
        kernel_path=show(prefix + kernel_path),
        initrd=initrd,
        initrd_path=initrd_path,
        root_uuid=root.fs.uuid,
        root_partition=partition.number,
        cmdline=f"{root_word} ro" + (" gpt" if backup_gpt else ""),
    )
