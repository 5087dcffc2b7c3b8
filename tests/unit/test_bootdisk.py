"""Reading what to boot from disk images (kasou.bootdisk).

The images are made as distributions make theirs (sfdisk, mke2fs -d, e2fsck -D, qemu-img;
see bootdisk_images.py), debugfs confirms each one has the structure its test is about, and
the bytes kasou reads are compared with the files that went in. Damaged images must give one
``BootDiskError`` line, never another exception and never a hang.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import NamedTuple

import pytest
from bootdisk_images import (
    BIOS_BOOT,
    DEBIAN_VERSION,
    ESP,
    INITRD,
    KERNEL,
    MIB,
    ROOT_UUID,
    XBOOTLDR,
    Link,
    Part,
    data,
    debian_tree,
    debugfs,
    disk,
    ext_fs,
    extent_depth,
    inode_offset,
    metadata_areas,
    needs_tools,
    partition,
    place,
    qcow2,
    run,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kasou.bootdisk import BootDiskError, BootFiles, find_boot_files
from kasou.disk import create_overlay

pytestmark = needs_tools

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is needed (apt-get install qemu-utils)"
)
needs_mkfs_vfat = pytest.mark.skipif(
    shutil.which("mkfs.vfat") is None, reason="mkfs.vfat is needed (apt-get install dosfstools)"
)

PART_UUID = "6b617361-6f75-4b61-8000-706172743031"
SUPERBLOCK = MIB + 1024  # in the images made here: partition 1 starts at 1 MiB


def error_of(image: Path) -> str:
    """The one-line error kasou gives for ``image``."""
    with pytest.raises(BootDiskError) as caught:
        find_boot_files(image)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(image)), message
    return message


def root_image(tmp_path: Path, tree: dict[str, bytes | Link] | None = None, **fs: object) -> Path:
    """A GPT disk whose partition 1 holds an ext file system made from ``tree``."""
    root = ext_fs(tmp_path / "root.ext4", tree or debian_tree(), **fs)  # type: ignore[arg-type]
    return disk(tmp_path / "disk.raw", [Part(root, uuid=PART_UUID)])


# -- what is found ------------------------------------------------------------------------


@needs_mkfs_vfat
def test_a_debian_shaped_image_boots_the_kernel_its_links_name(tmp_path: Path) -> None:
    root = ext_fs(tmp_path / "root.ext4", debian_tree())
    esp = tmp_path / "esp.vfat"
    run("mkfs.vfat", "-C", esp, "8192")
    image = disk(
        tmp_path / "debian.raw",
        [Part(None, MIB, BIOS_BOOT), Part(esp, type=ESP), Part(root, uuid=PART_UUID)],
    )

    boot = find_boot_files(image)

    assert boot == BootFiles(
        kernel=KERNEL,
        kernel_path=f"/boot/vmlinuz-{DEBIAN_VERSION}",
        initrd=INITRD,
        initrd_path=f"/boot/initrd.img-{DEBIAN_VERSION}",
        root_uuid=ROOT_UUID,
        root_partition=3,
        cmdline=f"root=UUID={ROOT_UUID} ro",
    )


@needs_qemu_img
def test_qcow2_images_and_backing_chains_read_the_same(tmp_path: Path) -> None:
    raw = root_image(tmp_path)
    image = qcow2(raw)
    overlay = tmp_path / "overlay.qcow2"
    create_overlay(overlay, image)

    expected = find_boot_files(raw)
    assert find_boot_files(image) == expected
    assert find_boot_files(overlay) == expected
    assert expected.kernel == KERNEL


def test_the_newest_kernel_wins_in_version_order(tmp_path: Path) -> None:
    kernels = {
        "5.10.0-30-amd64": data(500, 10),
        "6.1.0-9-amd64": data(500, 11),
        "6.1.0-28-amd64": data(500, 12),  # newer than -9: numbers compare as numbers
        "6.1.0-27-amd64": data(500, 13),
    }
    tree: dict[str, bytes | Link] = {f"/boot/vmlinuz-{v}": k for v, k in kernels.items()}
    tree |= {f"/boot/initrd.img-{v}": data(100, 20 + i) for i, v in enumerate(kernels)}
    tree["/boot/vmlinuz-6.1.0-99-amd64.old"] = data(10, 30)  # leftovers are not kernels
    tree["/boot/vmlinuz-6.1.0-28-amd64.dpkg-new"] = data(10, 31)

    boot = find_boot_files(root_image(tmp_path, tree))

    assert boot.kernel_path == "/boot/vmlinuz-6.1.0-28-amd64"
    assert boot.kernel == kernels["6.1.0-28-amd64"]
    assert boot.initrd_path == "/boot/initrd.img-6.1.0-28-amd64"
    assert boot.initrd == tree["/boot/initrd.img-6.1.0-28-amd64"]


def test_without_an_initrd_the_kernel_finds_its_root_by_partition_uuid(tmp_path: Path) -> None:
    # Only an initramfs can find a file system by its UUID; the kernel knows partitions.
    boot = find_boot_files(root_image(tmp_path, {"/boot/vmlinuz-6.1.0-kasou": KERNEL}))
    assert boot.initrd is None and boot.initrd_path is None
    assert boot.cmdline == f"root=PARTUUID={PART_UUID} ro"
    assert boot.root_uuid == ROOT_UUID


def test_an_ubuntu_shaped_boot_link_is_followed(tmp_path: Path) -> None:
    tree: dict[str, bytes | Link] = {
        "/boot/vmlinuz-6.8.0-50-generic": KERNEL,
        "/boot/initrd.img-6.8.0-50-generic": INITRD,
        "/boot/vmlinuz-6.8.0-51-generic": data(100, 5),  # newer, but the link says -50
        "/boot/vmlinuz": Link("vmlinuz-6.8.0-50-generic"),
        "/boot/initrd.img": Link("initrd.img-6.8.0-50-generic"),
    }
    boot = find_boot_files(root_image(tmp_path, tree))
    assert (boot.kernel, boot.initrd) == (KERNEL, INITRD)
    assert boot.kernel_path == "/boot/vmlinuz-6.8.0-50-generic"


def test_a_separate_boot_partition_and_the_root_beside_it(tmp_path: Path) -> None:
    root_uuid = "6b617361-6f75-4b61-8000-726f6f742d32"
    root = ext_fs(
        tmp_path / "root.ext4",
        {"/etc/os-release": b"ID=ubuntu\n", "/boot/.keep": b""},
        uuid=root_uuid,
    )
    boot_fs = ext_fs(
        tmp_path / "boot.ext4",
        {
            "/vmlinuz-6.8.0-50-generic": KERNEL,
            "/initrd.img-6.8.0-50-generic": INITRD,
            "/vmlinuz": Link("vmlinuz-6.8.0-50-generic"),
        },
    )
    image = disk(tmp_path / "disk.raw", [Part(root), Part(boot_fs, type=XBOOTLDR)])

    boot = find_boot_files(image)

    assert boot.kernel == KERNEL and boot.initrd == INITRD
    assert boot.kernel_path == "/boot/vmlinuz-6.8.0-50-generic"
    assert boot.initrd_path == "/boot/initrd.img-6.8.0-50-generic"
    assert (boot.root_partition, boot.root_uuid) == (1, root_uuid)
    assert boot.cmdline == f"root=UUID={root_uuid} ro"


def test_a_whole_disk_file_system_without_a_table(tmp_path: Path) -> None:
    image = ext_fs(tmp_path / "whole.ext4", debian_tree())
    boot = find_boot_files(image)
    assert boot.root_partition == 0 and boot.kernel == KERNEL
    assert boot.cmdline == f"root=UUID={ROOT_UUID} ro"

    bare = ext_fs(tmp_path / "bare.ext4", {"/boot/vmlinuz-1": KERNEL})
    assert find_boot_files(bare).cmdline == "root=/dev/vda ro"


def test_mbr_primary_and_logical_partitions_are_numbered_as_linux_does(tmp_path: Path) -> None:
    image = tmp_path / "mbr.raw"
    layout = partition(
        image,
        40 * MIB,
        "label: dos\nlabel-id: 0x4b415355\n"
        "size=4MiB, type=83\n"
        "size=30MiB, type=5\n"
        f"{image}5 : size=4MiB, type=82\n"
        f"{image}6 : size=16MiB, type=83\n",
    )
    assert sorted(layout) == [1, 2, 5, 6]
    data_fs = ext_fs(tmp_path / "data.ext4", {"/srv/notes": b"no kernel here"}, size=4 * MIB)
    root = ext_fs(tmp_path / "root.ext4", {"/boot/vmlinuz-6.1.0-kasou": KERNEL}, size=16 * MIB)
    place(image, layout[1][0], data_fs)
    place(image, layout[6][0], root)

    boot = find_boot_files(image)

    assert boot.root_partition == 6 and boot.kernel == KERNEL
    assert boot.cmdline == "root=PARTUUID=4b415355-06 ro"  # no initrd: the kernel's PARTUUID


# -- the ext2/3/4 reader ------------------------------------------------------------------

BIG_KERNEL = data(6 * MIB, 40)


@pytest.mark.parametrize(
    ("kind", "options", "what"),
    [
        ("ext4", (), "extents, 4 KiB blocks"),
        ("ext4", ("-b", "1024", "-g", "1024", "-O", "^flex_bg"), "an extent tree of depth 1+"),
        ("ext4", ("-O", "^64bit"), "32-byte group descriptors"),
        ("ext4", ("-O", "^metadata_csum,uninit_bg"), "uninit_bg, no metadata_csum"),
        ("ext4", ("-I", "128"), "128-byte inodes"),
        ("ext4", ("-I", "1024", "-b", "2048"), "1024-byte inodes, 2 KiB blocks"),
        ("ext4", ("-O", "meta_bg,^resize_inode", "-b", "1024"), "meta_bg descriptors"),
        ("ext4", ("-O", "^extent,^64bit"), "block maps on ext4"),
        ("ext4", ("-O", "bigalloc", "-C", "16384"), "bigalloc clusters"),
        ("ext3", ("-b", "1024"), "ext3 with a journal and block maps"),
        ("ext2", ("-b", "1024"), "ext2, double-indirect blocks"),
        ("ext2", ("-b", "4096", "-r", "0"), "ext2 revision 0"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_each_ext_layout_reads_back_the_bytes_written(
    tmp_path: Path, kind: str, options: tuple[str, ...], what: str
) -> None:
    tree = debian_tree() | {f"/boot/vmlinuz-{DEBIAN_VERSION}": BIG_KERNEL}
    root = ext_fs(tmp_path / "root.ext4", tree, size=32 * MIB, kind=kind, options=options)
    kernel = f"/boot/vmlinuz-{DEBIAN_VERSION}"
    if "depth" in what:
        assert extent_depth(root, kernel) >= 1
    if "double-indirect" in what:
        assert "(DIND)" in debugfs(root, f"stat {kernel}")
    image = disk(tmp_path / "disk.raw", [Part(root)])

    boot = find_boot_files(image)

    assert boot.kernel == BIG_KERNEL
    assert boot.initrd == INITRD
    assert boot.root_uuid == ROOT_UUID


def test_meta_bg_descriptors_past_the_first_meta_group(tmp_path: Path) -> None:
    # 1 KiB blocks hold 16 descriptors of 64 bytes: with meta_bg, group 16's descriptor is in
    # group 16 itself. 16 inodes a group and 300 files before the kernel put it past there.
    tree: dict[str, bytes | Link] = {f"/boot/filler-{index}": b"" for index in range(300)}
    options = ("-b", "1024", "-g", "1024", "-N", "512", "-O", "meta_bg,^resize_inode")
    root = ext_fs(tmp_path / "root.ext4", tree, size=32 * MIB, options=options)
    (tmp_path / "kernel").write_bytes(KERNEL)
    run("debugfs", "-w", "-R", f"write {tmp_path / 'kernel'} /boot/vmlinuz-1", root)
    number = int(re.findall(r"Inode: (\d+)", debugfs(root, "stat /boot/vmlinuz-1"))[0])
    per_group = int(re.findall(r"Inodes per group:\s+(\d+)", run("dumpe2fs", "-h", root))[0])
    assert (number - 1) // per_group >= 16

    boot = find_boot_files(disk(tmp_path / "disk.raw", [Part(root)]))

    assert boot.kernel == KERNEL


def test_a_journal_that_needs_recovery_is_read_as_it_is(tmp_path: Path) -> None:
    root = ext_fs(tmp_path / "root.ext4", debian_tree())
    run("debugfs", "-w", "-R", "feature needs_recovery", root)
    assert "needs_recovery" in run("dumpe2fs", "-h", root)
    boot = find_boot_files(disk(tmp_path / "disk.raw", [Part(root)]))
    assert boot.kernel == KERNEL


def test_an_encrypted_kernel_is_refused(tmp_path: Path) -> None:
    root = ext_fs(tmp_path / "root.ext4", debian_tree(), options=("-O", "encrypt"))
    kernel = f"/boot/vmlinuz-{DEBIAN_VERSION}"
    run("debugfs", "-w", "-R", f"set_inode_field {kernel} flags 0x80800", root)  # ENCRYPT_FL
    message = error_of(disk(tmp_path / "disk.raw", [Part(root)]))
    assert f"the kernel {kernel} is encrypted: kasou cannot read it" in message


def test_triple_indirect_blocks_and_holes(tmp_path: Path) -> None:
    # 1 KiB blocks: past 12 + 256 + 65536 blocks (about 64 MiB) a block map goes through a
    # triple-indirect block. A sparse file gets there without writing 64 MiB.
    size = 70 * MIB
    tail = data(5000, 50)
    source = tmp_path / "sparse"
    with source.open("wb") as file:
        file.write(b"head")
        file.seek(size - len(tail))
        file.write(tail)
    # A kernel larger than its file system is taken for corruption: the file system is
    # made large enough, though the file takes only a few blocks of it.
    tree: dict[str, bytes | Link] = {"/boot/vmlinuz-1": b""}
    root = ext_fs(tmp_path / "root.ext2", tree, 72 * MIB, kind="ext2", options=("-b", "1024"))
    run("debugfs", "-w", "-R", f"write {source} /boot/vmlinuz-2", root)
    assert "(TIND)" in debugfs(root, "stat /boot/vmlinuz-2")

    boot = find_boot_files(disk(tmp_path / "disk.raw", [Part(root)]))

    assert boot.kernel_path == "/boot/vmlinuz-2"
    assert len(boot.kernel) == size
    assert boot.kernel[:4] == b"head" and boot.kernel[-len(tail) :] == tail
    assert not any(boot.kernel[4 : size - len(tail)])


def test_hashed_directories_are_read_whole(tmp_path: Path) -> None:
    tree = debian_tree()
    for index in range(600):  # many blocks of entries: an htree with index blocks
        tree[f"/boot/config-5.{index}.0-long-name-to-fill-directory-blocks"] = b"#\n"
    root = ext_fs(tmp_path / "root.ext4", tree, options=("-b", "1024"), hashed_dirs=True)
    assert "Root node dump" in debugfs(root, "htree /boot")
    del tree["/vmlinuz"], tree["/initrd.img"]  # found by listing /boot, not by the links
    root.unlink()
    root = ext_fs(root, tree, options=("-b", "1024"), hashed_dirs=True)

    boot = find_boot_files(disk(tmp_path / "disk.raw", [Part(root)]))

    assert boot.kernel == KERNEL and boot.initrd == INITRD


def test_fast_and_slow_symlinks(tmp_path: Path) -> None:
    slow = "boot/" + "./" * 40 + f"vmlinuz-{DEBIAN_VERSION}"  # over 60 bytes: a block of its own
    tree = debian_tree() | {"/vmlinuz": Link(slow)}
    root = ext_fs(tmp_path / "root.ext4", tree)
    assert "Fast link dest" not in debugfs(root, "stat /vmlinuz")
    assert "Fast link dest" in debugfs(root, "stat /initrd.img")

    boot = find_boot_files(disk(tmp_path / "disk.raw", [Part(root)]))

    assert (boot.kernel, boot.initrd) == (KERNEL, INITRD)
    assert boot.kernel_path == f"/boot/vmlinuz-{DEBIAN_VERSION}"


def test_symlinks_resolve_inside_the_image_never_outside(tmp_path: Path) -> None:
    host_kernel = tmp_path / "host-vmlinuz"
    host_kernel.write_bytes(b"the host's file")
    tree = debian_tree() | {
        # Absolute, and climbing past the root: both stay in the image.
        "/vmlinuz": Link(f"/../../../boot/vmlinuz-{DEBIAN_VERSION}"),
        "/initrd.img": Link(f"../../boot/../boot/initrd.img-{DEBIAN_VERSION}"),
    }
    boot = find_boot_files(root_image(tmp_path, tree))
    assert (boot.kernel, boot.initrd) == (KERNEL, INITRD)

    # A link to a file that exists on the host only: not followed out; /boot is listed.
    tree["/vmlinuz"] = Link(str(host_kernel))
    tree["/initrd.img"] = Link(str(host_kernel))
    (tmp_path / "disk.raw").unlink()
    (tmp_path / "root.ext4").unlink()
    boot = find_boot_files(root_image(tmp_path, tree))
    assert boot.kernel == KERNEL and boot.kernel_path == f"/boot/vmlinuz-{DEBIAN_VERSION}"


def test_inline_data_files_and_directories(tmp_path: Path) -> None:
    tiny_kernel, tiny_initrd = data(100, 60), data(40, 61)
    tree: dict[str, bytes | Link] = {
        "/boot/vmlinuz-1": tiny_kernel,
        "/boot/initrd.img-1": tiny_initrd,
    }
    root = ext_fs(tmp_path / "root.ext4", tree, options=("-O", "inline_data"))
    assert "Size of inline data" in debugfs(root, "stat /boot")
    assert "Size of inline data" in debugfs(root, "stat /boot/vmlinuz-1")

    boot = find_boot_files(disk(tmp_path / "disk.raw", [Part(root)]))

    assert (boot.kernel, boot.initrd) == (tiny_kernel, tiny_initrd)


# -- refusals -----------------------------------------------------------------------------


def _gpt_sectors(image: Path) -> tuple[bytearray, int]:
    raw = bytearray(image.read_bytes())
    return raw, len(raw) // 512 - 1


def test_a_bad_primary_gpt_falls_back_to_the_backup(tmp_path: Path) -> None:
    image = root_image(tmp_path)
    good = find_boot_files(image)
    raw, _ = _gpt_sectors(image)

    raw[512 + 24] ^= 0xFF  # MyLBA: the header CRC no longer matches
    image.write_bytes(raw)
    boot = find_boot_files(image)
    assert boot.kernel == good.kernel and boot.root_partition == 1
    assert boot.cmdline == f"{good.cmdline} gpt"  # so that the guest's kernel does the same

    raw[512 + 24] ^= 0xFF
    raw[1024 + 40] ^= 0x01  # the first entry's StartingLBA: the array CRC fails
    image.write_bytes(raw)
    assert find_boot_files(image).cmdline == f"{good.cmdline} gpt"


def test_both_gpts_bad_is_an_error(tmp_path: Path) -> None:
    image = root_image(tmp_path)
    raw, last = _gpt_sectors(image)
    raw[512 + 16] ^= 0xFF  # primary header CRC
    raw[last * 512 + 16] ^= 0xFF  # backup header CRC
    image.write_bytes(raw)
    message = error_of(image)
    assert "the GPT is unusable" in message and "header CRC mismatch" in message


def test_a_backup_gpt_pointing_outside_the_disk(tmp_path: Path) -> None:
    image = root_image(tmp_path)
    raw, last = _gpt_sectors(image)
    raw[512 + 16] ^= 0xFF
    header = last * 512
    raw[header + 72 : header + 80] = struct.pack("<Q", 1 << 40)  # PartitionEntryLBA
    raw[header + 16 : header + 20] = bytes(4)
    crc = zlib.crc32(bytes(raw[header : header + 92]))
    raw[header + 16 : header + 20] = struct.pack("<I", crc)
    image.write_bytes(raw)
    assert "outside the disk" in error_of(image)


def test_a_truncated_image(tmp_path: Path) -> None:
    image = root_image(tmp_path)
    with image.open("r+b") as file:
        file.truncate(6 * MIB)  # partition 1 goes on to 17 MiB
    message = error_of(image)
    assert "partition 1" in message and "truncated" in message

    with image.open("r+b") as file:
        file.truncate(100)  # one sector (of zeros past 100 bytes): no table, nothing
    assert "no partition table and no file system" in error_of(image)


def _foreign(tmp_path: Path, kind: str) -> bytes:
    """A partition's worth of bytes holding ``kind``, by its tool or its magic."""
    content = bytearray(8 * MIB)
    if kind == "xfs":
        content[0:4] = b"XFSB"
    elif kind == "btrfs":
        content[0x10040:0x10048] = b"_BHRfS_M"
    elif kind == "LUKS":
        content[0:6] = b"LUKS\xba\xbe"
    else:
        made = tmp_path / kind
        if kind == "swap":
            made.write_bytes(bytes(content))
            run("mkswap", made)
        else:
            run("mkfs.vfat", "-C", made, str(len(content) // 1024))
        return made.read_bytes()
    return bytes(content)


@pytest.mark.parametrize("kind", ["xfs", "btrfs", "LUKS", "swap", "vfat"])
def test_a_root_kasou_cannot_read_is_named(tmp_path: Path, kind: str) -> None:
    if shutil.which("mkswap" if kind == "swap" else "mkfs.vfat") is None and kind in (
        "swap",
        "vfat",
    ):
        pytest.skip(f"no tool to make {kind}")
    content = _foreign(tmp_path, kind)
    image = disk(tmp_path / "disk.raw", [Part(content)])
    assert error_of(image).endswith(f"partition 1 is {kind}: kasou reads only ext2/3/4")

    whole = tmp_path / "whole.raw"
    whole.write_bytes(content)
    assert f"the disk holds {kind}, no partitions" in error_of(whole)


def test_a_root_without_a_kernel(tmp_path: Path) -> None:
    image = root_image(tmp_path, {"/etc/os-release": b"ID=debian\n", "/boot/grub/x": b""})
    message = error_of(image)
    assert "no kernel" in message and "partition 1 (ext4)" in message


def test_a_boot_partition_without_a_root(tmp_path: Path) -> None:
    boot_fs = ext_fs(tmp_path / "boot.ext4", {"/vmlinuz-1": KERNEL})
    image = disk(tmp_path / "disk.raw", [Part(boot_fs), Part(b"XFSB" + bytes(MIB))])
    message = error_of(image)
    assert "partition 1 (ext4) holds kernels" in message and "partition 2 is xfs" in message


def test_not_a_disk_image(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("just some text\n" * 1000)
    assert "no partition table and no file system" in error_of(notes)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert "too small to be a disk" in error_of(empty)
    with pytest.raises(BootDiskError, match="cannot open disk image"):
        find_boot_files(tmp_path / "missing.raw")


@needs_qemu_img
def test_a_corrupt_qcow2_names_the_image(tmp_path: Path) -> None:
    image = qcow2(root_image(tmp_path))
    raw = bytearray(image.read_bytes())
    raw[40:48] = (1 << 40).to_bytes(8, "big")  # l1_table_offset: far outside the file
    image.write_bytes(raw)
    with pytest.raises(BootDiskError) as caught:
        find_boot_files(image)
    assert str(image) in str(caught.value) and "qcow2" in str(caught.value)


def test_a_corrupt_superblock(tmp_path: Path) -> None:
    image = root_image(tmp_path)
    raw = bytearray(image.read_bytes())
    raw[SUPERBLOCK + 0x18] = 20  # s_log_block_size
    image.write_bytes(raw)
    assert "superblock's checksum does not match" in error_of(image)

    image.unlink()
    (tmp_path / "root.ext4").unlink()
    image = root_image(tmp_path, options=("-O", "^metadata_csum"))
    raw = bytearray(image.read_bytes())
    raw[SUPERBLOCK + 0x18] = 20
    image.write_bytes(raw)
    assert "the block size is 2^30 bytes" in error_of(image)

    raw[SUPERBLOCK + 0x18] = 0  # back to 1 KiB, as mke2fs makes a small one
    raw[SUPERBLOCK : SUPERBLOCK + 4] = struct.pack("<I", 12345)  # inodes
    image.write_bytes(raw)
    assert "12345 inodes, but" in error_of(image)


@pytest.mark.parametrize(
    ("offset", "value", "says"),
    [
        (0, b"\x00\x00", "extent header with bad magic 0x0000"),
        (6, b"\x07\x00", "extent tree of depth 7"),
        (4, b"\x09\x00", "9 max"),  # eh_max larger than i_block holds
    ],
)
def test_a_corrupt_extent_header(tmp_path: Path, offset: int, value: bytes, says: str) -> None:
    root = ext_fs(tmp_path / "root.ext4", debian_tree(), options=("-b", "4096"))
    inode = inode_offset(root, f"/boot/vmlinuz-{DEBIAN_VERSION}", 4096)
    place(root, inode + 0x28 + offset, value)  # i_block: the extent tree's root
    subprocess.run(["e2fsck", "-n", str(root)], capture_output=True, check=False)
    image = disk(tmp_path / "disk.raw", [Part(root)])
    message = error_of(image)
    assert says in message and "the file system is corrupt" in message


def test_a_symlink_loop_is_named(tmp_path: Path) -> None:
    image = root_image(tmp_path, {"/vmlinuz": Link("vmlinuz"), "/boot/vmlinuz-1": KERNEL})
    assert "more than 40 symbolic links" in error_of(image)


# -- fuzzing ------------------------------------------------------------------------------


class Damageable(NamedTuple):
    image: bytes
    areas: list[tuple[int, int]]
    """(offset, length) of the metadata that finding the boot files reads."""


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Damageable]:
    """Small valid images (1 KiB blocks, several groups) and where their metadata is: an
    ext4 one (an extent tree of depth 1, no checksums, so that the damage
    reaches the checks behind them) and an ext2 one (indirect and double-indirect blocks)."""
    folder = tmp_path_factory.mktemp("fuzz")
    kernel = f"/boot/vmlinuz-{DEBIAN_VERSION}"
    initrd = f"/boot/initrd.img-{DEBIAN_VERSION}"
    images = {}
    for kind, options in (
        ("ext4", ("-b", "1024", "-g", "256", "-O", "^flex_bg,^resize_inode,^metadata_csum")),
        ("ext2", ("-b", "1024", "-g", "512")),
    ):
        tree = debian_tree() | {kernel: data(1_400_000, 70), initrd: data(20_000, 71)}
        for index in range(40):
            tree[f"/boot/config-{index}-with-a-longer-name"] = b"#\n"
        root = ext_fs(folder / f"{kind}.fs", tree, size=3 * MIB, kind=kind, options=options)
        paths = ["/", "/boot", kernel, initrd, "/vmlinuz", "/initrd.img"]
        areas = [(MIB + offset, length) for offset, length in metadata_areas(root, paths, 1024)]
        image = disk(folder / f"{kind}.raw", [Part(root)])
        areas += [(0, 34 * 512), (image.stat().st_size - 33 * 512, 33 * 512)]  # the GPTs
        find_boot_files(image)  # valid to begin with
        images[kind] = Damageable(image.read_bytes(), areas)
    assert extent_depth(folder / "ext4.fs", kernel) >= 1
    # An MBR disk with logical partitions: the damage goes to the partition records of the
    # MBR and of each extended boot record.
    image = folder / "mbr.raw"
    layout = partition(
        image,
        12 * MIB,
        "label: dos\nsize=1MiB, type=83\nsize=9MiB, type=5\n"
        f"{image}5 : size=1MiB, type=82\n{image}6 : size=1MiB\n{image}7 : size=4MiB\n",
    )
    root = ext_fs(folder / "mbr.fs", {"/boot/vmlinuz-1": KERNEL}, size=4 * MIB)
    place(image, layout[7][0], root)
    assert find_boot_files(image).root_partition == 7
    records = [0] + [layout[number][0] - MIB for number in (5, 6, 7)]  # EBRs 1 MiB before
    images["mbr"] = Damageable(image.read_bytes(), [(s + 446, 66) for s in records])
    return images


_damage = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=1 << 16),  # which area
        st.integers(min_value=0, max_value=(1 << 32) - 1),  # where in it
        st.sampled_from(["bit", "byte", "word"]),
        st.integers(min_value=0, max_value=(1 << 32) - 1),
    ),
    min_size=1,
    max_size=6,
)


@pytest.mark.parametrize("kind", ["ext4", "ext2", "mbr"])
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(damage=_damage)
def test_damaged_metadata_gives_only_boot_disk_errors(
    small_images: dict[str, Damageable],
    tmp_path: Path,
    kind: str,
    damage: list[tuple[int, int, str, int]],
) -> None:
    original = small_images[kind]
    raw = bytearray(original.image)
    for area, where, how, value in damage:
        start, length = original.areas[area % len(original.areas)]
        offset = start + where % length
        if how == "bit":
            raw[offset] ^= 1 << (value % 8)
        elif how == "byte":
            raw[offset] = value & 0xFF
        else:  # a whole little-endian word: block numbers, sizes, counts
            offset -= offset % 4
            raw[offset : offset + 4] = struct.pack("<I", value)
    image = tmp_path / "damaged.raw"
    image.write_bytes(raw)
    try:
        boot = find_boot_files(image)
    except BootDiskError as error:
        assert "\n" not in str(error)
        return
    assert boot.kernel  # damage that did not matter: still a kernel
