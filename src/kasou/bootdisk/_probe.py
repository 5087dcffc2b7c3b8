"""What a partition holds, told by its magic numbers (as blkid does, for a few formats).

Only enough to name the contents in a message ("partition 1 is xfs") and to pick the
ext2/3/4 file systems; nothing here is trusted beyond the magic and ext's feature words.
"""

from __future__ import annotations

import struct

from kasou.bootdisk._region import Region

__all__ = ["EXT_KINDS", "ext_kind", "probe"]

EXT_KINDS = ("ext2", "ext3", "ext4")

# ext4 disk layout (kernel Documentation/filesystems/ext4/super.rst): the superblock is at
# byte 1024; s_magic at 0x38, the feature words at 0x5C (compat), 0x60 (incompat) and 0x64
# (ro_compat).
_EXT_SUPER = 1024
_EXT_MAGIC = 0xEF53
_COMPAT_HAS_JOURNAL = 0x4
# Features an ext2/ext3 file system never has (ext4's: extents, 64bit, flex_bg, ...).
_INCOMPAT_EXT4 = ~(0x2 | 0x4 | 0x10)  # all but filetype, recover, meta_bg
_RO_COMPAT_EXT4 = ~(0x1 | 0x2 | 0x4)  # all but sparse_super, large_file, btree_dir

_HEAD = 4096  # bytes read from the start of the partition to look for most magics


def probe(region: Region) -> str | None:
    """The name of what ``region`` holds: "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat",
    "swap", "LUKS", "LVM", "squashfs", "ntfs", "iso9660", "f2fs"; None if nothing known."""
    head = region.read(0, min(_HEAD, region.size), "the first bytes")
    if len(head) >= _EXT_SUPER + 0x68:
        (magic,) = struct.unpack_from("<H", head, _EXT_SUPER + 0x38)
        if magic == _EXT_MAGIC:
            return ext_kind(head[_EXT_SUPER:])
    for offset, magic, name in _MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    if _is_fat(head):
        return "vfat"
    if len(head) == _HEAD and head[_HEAD - 10 :] in (b"SWAPSPACE2", b"SWAP-SPACE"):
        return "swap"  # at the end of the first 4 KiB page (linux/swap.h, union swap_header)
    if len(head) >= 0x440 + 4 and struct.unpack_from("<I", head, 0x400)[0] == 0xF2F52010:
        return "f2fs"
    for offset, magic, name in _FAR_MAGICS:
        fits = region.size >= offset + len(magic)
        if fits and region.read(offset, len(magic), f"the {name} magic") == magic:
            return name
    return None


def ext_kind(superblock: bytes) -> str:
    """ext2, ext3 or ext4, by the features an ext2/3 file system cannot have."""
    compat, incompat, ro_compat = struct.unpack_from("<III", superblock, 0x5C)
    if incompat & _INCOMPAT_EXT4 or ro_compat & _RO_COMPAT_EXT4:
        return "ext4"
    return "ext3" if compat & _COMPAT_HAS_JOURNAL else "ext2"


_MAGICS = (
    (0, b"XFSB", "xfs"),  # xfs_sb.sb_magicnum
    (0, b"LUKS\xba\xbe", "LUKS"),  # LUKS1 and LUKS2 primary header
    (0, b"SKUL\xba\xbe", "LUKS"),  # LUKS2 secondary header
    (0, b"hsqs", "squashfs"),
    (3, b"NTFS    ", "ntfs"),
    (512 + 24, b"LVM2 001", "LVM"),  # the PV label in sector 1 ("LABELONE" ... "LVM2 001")
)
_FAR_MAGICS = (
    (0x10040, b"_BHRfS_M", "btrfs"),  # the superblock at 64 KiB, magic at its byte 0x40
    (0x8001, b"CD001", "iso9660"),  # the primary volume descriptor at sector 16 (2 KiB)
)


def _is_fat(head: bytes) -> bool:
    """A FAT boot sector: a jump instruction, a sane bytes-per-sector, and the file system
    type string of FAT12/16 (byte 54) or FAT32 (byte 82) (Microsoft FAT specification)."""
    if len(head) < 512 or head[0] not in (0xEB, 0xE9) or head[510:512] != b"\x55\xaa":
        return False
    (sector_size,) = struct.unpack_from("<H", head, 11)
    if sector_size not in (512, 1024, 2048, 4096):
        return False
    return head[54:57] == b"FAT" or head[82:87] == b"FAT32"
