"""A read-only ext2/ext3/ext4 reader: enough to find and read a kernel and an initrd.

Follows the kernel's Documentation/filesystems/ext4/ (cited as "ext4 docs", by page):
the superblock (super.rst; its crc32c checked with metadata_csum), group descriptors of 32
and 64 bytes (group_descr.rst, with meta_bg placement), inodes of any size (inodes.rst),
extent trees of any depth (ifork.rst, "Extent Tree"), classic block maps with indirect,
double- and triple-indirect blocks (ifork.rst, "Direct/Indirect Block Addressing"), linear
directories, and hashed (htree) directories read linearly, as their leaves are linear blocks
and their index blocks look like empty entries (directory.rst); fast and slow symlinks; inline
data and inline directories (inline_data.rst) whose bytes are in i_block and the in-inode
``system.data`` attribute.

Everything read is untrusted: each block number is checked against the file system's size,
each length against its container, an extent tree's depth against the header it came from and
its ranges against its parent's; walks are bounded by the file's size, symlink chains by 40
links, and a file by a size limit the caller gives. Corruption raises ``BootDiskError``.

Not handled: writing of any kind, the journal (a file system that needs recovery is read as
it is on disk: fine for /boot, which is rarely being written), checksums other than the
superblock's, encrypted or compressed inodes (refused), extended attributes beyond inline
data, htree lookups by hash (directories are scanned).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kasou.bootdisk._errors import BootDiskError
from kasou.bootdisk._probe import ext_kind
from kasou.bootdisk._region import Region

__all__ = ["MAX_SYMLINKS", "ExtFs", "Inode", "is_dir", "is_file", "is_link", "show"]

MAX_SYMLINKS = 40  # symbolic links followed in one lookup (Linux's MAXSYMLINKS)
_MAX_DIRECTORY = 64 << 20  # bytes of a directory read at most
_MAX_LINK = 4096  # bytes of a symlink target (PATH_MAX)
_MAX_NAME = 255  # bytes of a name in a directory (EXT4_NAME_LEN)

_SUPER = 1024  # the superblock's byte offset in the file system
_ROOT = 2  # the root directory's inode (ext4 docs, special_inodes.rst)
_MAGIC = 0xEF53

# super.rst: s_feature_compat, s_feature_incompat, s_feature_ro_compat bits.
_COMPAT_SPARSE_SUPER2 = 0x200
_INCOMPAT_COMPRESSION = 0x1
_INCOMPAT_FILETYPE = 0x2
_INCOMPAT_RECOVER = 0x4
_INCOMPAT_JOURNAL_DEV = 0x8
_INCOMPAT_META_BG = 0x10
_INCOMPAT_EXTENTS = 0x40
_INCOMPAT_64BIT = 0x80
_INCOMPAT_MMP = 0x100
_INCOMPAT_FLEX_BG = 0x200
_INCOMPAT_EA_INODE = 0x400
_INCOMPAT_DIRDATA = 0x1000
_INCOMPAT_CSUM_SEED = 0x2000
_INCOMPAT_LARGEDIR = 0x4000
_INCOMPAT_INLINE_DATA = 0x8000
_INCOMPAT_ENCRYPT = 0x10000
_INCOMPAT_CASEFOLD = 0x20000
_INCOMPAT_READABLE = (
    _INCOMPAT_FILETYPE
    | _INCOMPAT_RECOVER  # the journal is not replayed: /boot is read as it is on disk
    | _INCOMPAT_META_BG
    | _INCOMPAT_EXTENTS
    | _INCOMPAT_64BIT
    | _INCOMPAT_MMP
    | _INCOMPAT_FLEX_BG
    | _INCOMPAT_EA_INODE
    | _INCOMPAT_CSUM_SEED
    | _INCOMPAT_LARGEDIR
    | _INCOMPAT_INLINE_DATA
    | _INCOMPAT_ENCRYPT  # the file system may; an encrypted inode is refused when read
    | _INCOMPAT_CASEFOLD  # names are stored as given; lookups here are exact
)
_INCOMPAT_NAMES = {
    _INCOMPAT_COMPRESSION: "compression",
    _INCOMPAT_JOURNAL_DEV: "journal_dev (an external journal, not a file system)",
    _INCOMPAT_DIRDATA: "dirdata",
}
_RO_COMPAT_SPARSE_SUPER = 0x1
_RO_COMPAT_GDT_CSUM = 0x10
_RO_COMPAT_BIGALLOC = 0x200
_RO_COMPAT_METADATA_CSUM = 0x400

# group_descr.rst: bg_inode_table_lo at 0x8, bg_flags at 0x12, bg_inode_table_hi at 0x28.
_BG_INODE_UNINIT = 0x1

# inodes.rst: i_mode's file type, and i_flags.
_S_IFMT = 0xF000
_S_IFDIR = 0x4000
_S_IFREG = 0x8000
_S_IFLNK = 0xA000
_ENCRYPT_FL = 0x800
_EXTENTS_FL = 0x80000
_INLINE_DATA_FL = 0x10000000
_INODE_BASE = 128  # the original inode size; i_extra_isize counts from here
_I_BLOCK = slice(0x28, 0x28 + 60)

# ifork.rst: struct ext4_extent_header, ext4_extent_idx, ext4_extent (12 bytes each).
_EXTENT_HEADER = struct.Struct("<HHHHI")  # eh_magic, eh_entries, eh_max, eh_depth, eh_generation
_EXTENT_INDEX = struct.Struct("<IIHH")  # ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
_EXTENT = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
_EXTENT_MAGIC = 0xF30A
_EXTENT_MAX_DEPTH = 5  # EXT4_MAX_EXTENT_DEPTH (fs/ext4/ext4_extents.h)
_EXTENT_INIT_MAX = 32768  # ee_len above this: an unwritten extent of ee_len - 32768 blocks
_LOGICAL_END = 1 << 32  # logical block numbers are 32 bits

# directory.rst: struct ext4_dir_entry(_2): inode, rec_len, name_len (u16 without the
# filetype feature, else u8 + file_type).
_DIRENT = struct.Struct("<IHBB")

# attributes.rst: the in-inode attribute area starts with this magic; entries follow, each
# struct ext4_xattr_entry (e_name_len, e_name_index, e_value_offs, e_value_inum,
# e_value_size, e_hash) and its name padded to 4 bytes; four zero bytes end the list.
_XATTR_MAGIC = 0xEA020000
_XATTR_ENTRY = struct.Struct("<BBHIII")
_XATTR_SYSTEM = 7  # e_name_index of "system." (inline data lives in "system.data")

_Run = list[int]  # [first logical block, first physical block, block count]


class Inode(NamedTuple):
    number: int
    mode: int
    size: int
    flags: int
    blocks: int
    """i_blocks: 512-byte sectors in use (fast symlinks have none)."""
    file_acl: int
    raw: bytes
    """The whole on-disk inode (i_block and the in-inode attributes are in it)."""

    @property
    def block(self) -> bytes:
        """i_block: the extent tree's root, the block map, a fast symlink or inline data."""
        return self.raw[_I_BLOCK]


def is_dir(inode: Inode) -> bool:
    return inode.mode & _S_IFMT == _S_IFDIR


def is_file(inode: Inode) -> bool:
    return inode.mode & _S_IFMT == _S_IFREG


def is_link(inode: Inode) -> bool:
    return inode.mode & _S_IFMT == _S_IFLNK


def show(name: bytes) -> str:
    """A name from the image, fit for a one-line message (control bytes escaped)."""
    text = name.decode("utf-8", "backslashreplace")
    return text if text.isprintable() else repr(text)[1:-1]


class _Walk:
    """An extent tree walk's progress: the next logical block an extent may start at, and
    how many more tree blocks it may read."""

    def __init__(self, budget: int) -> None:
        self.next = 0
        self.budget = budget


class ExtFs:
    """An ext2/3/4 file system in ``region``, read only. The constructor checks the
    superblock; everything else is read when asked for."""

    def __init__(self, region: Region) -> None:
        self.region = region
        sb = region.read(_SUPER, 1024, "the ext superblock")
        self.kind = ext_kind(sb)
        self.label = f"{region.name} ({self.kind})"

        def u16(offset: int) -> int:
            return int(struct.unpack_from("<H", sb, offset)[0])

        def u32(offset: int) -> int:
            return int(struct.unpack_from("<I", sb, offset)[0])

        if u16(0x38) != _MAGIC:
            raise BootDiskError(f"{region.name}: no ext2/3/4 superblock")
        self.compat, self.incompat, self.ro_compat = u32(0x5C), u32(0x60), u32(0x64)
        if self.ro_compat & _RO_COMPAT_METADATA_CSUM and u32(0x3FC) != _crc32c(sb[:0x3FC]):
            raise self._corrupt("the superblock's checksum does not match")
        unreadable = self.incompat & ~_INCOMPAT_READABLE
        if unreadable:
            names = [name for bit, name in _INCOMPAT_NAMES.items() if unreadable & bit]
            what = ", ".join(names) or f"incompatible feature bits 0x{unreadable:x}"
            raise BootDiskError(f"{self.label}: uses {what}, which kasou cannot read")
        log_block = u32(0x18)
        if log_block > 6:
            raise self._corrupt(f"the block size is 2^{10 + log_block} bytes")
        self.block_size = 1024 << log_block
        wide = bool(self.incompat & _INCOMPAT_64BIT)
        self.blocks_count = u32(0x04) | (u32(0x150) << 32 if wide else 0)
        self.first_data_block = u32(0x14)
        self.blocks_per_group = u32(0x20)
        self.inodes_per_group = u32(0x28)
        self.inodes_count = u32(0x00)
        revision = u32(0x4C)
        self.inode_size = _INODE_BASE if revision == 0 else u16(0x58)
        self.desc_size = u16(0xFE) if wide else 32
        self.first_meta_bg = u32(0x104)
        self.backup_groups = (u32(0x24C), u32(0x250))
        self.uuid = _uuid_text(sb[0x68:0x78])
        self.filetype = bool(self.incompat & _INCOMPAT_FILETYPE)
        bigalloc = self.ro_compat & _RO_COMPAT_BIGALLOC
        log_cluster = u32(0x1C) if bigalloc else log_block
        if not log_block <= log_cluster <= 29:
            raise self._corrupt(f"the cluster size is 2^{10 + log_cluster} bytes")
        self.cluster_size = 1024 << log_cluster
        self._check_geometry()
        self._inodes: dict[int, Inode] = {}
        self._directories: dict[int, dict[bytes, int]] = {}
        self._descriptors: dict[int, bytes] = {}

    def _check_geometry(self) -> None:
        """The checks the kernel makes before mounting (fs/ext4/super.c, ext4_fill_super),
        so that every later computation stays inside the file system."""
        bs = self.block_size
        if not self.first_data_block < self.blocks_count:
            raise self._corrupt(
                f"the first data block {self.first_data_block} is past the "
                f"{self.blocks_count} blocks"
            )
        if self.blocks_count * bs > self.region.size:
            raise BootDiskError(
                f"{self.label}: the file system ({self.blocks_count * bs} bytes) is larger "
                f"than its partition ({self.region.size} bytes): is the image truncated?"
            )
        size = self.inode_size
        if size < _INODE_BASE or size > bs or size & (size - 1):
            raise self._corrupt(f"the inode size is {size} bytes")
        desc = self.desc_size
        if (
            desc < 32
            or desc > 1024
            or desc & (desc - 1)
            or (self.incompat & _INCOMPAT_64BIT and desc < 64)
        ):
            raise self._corrupt(f"the group descriptor size is {desc} bytes")
        if not 0 < self.blocks_per_group <= 8 * self.cluster_size:
            raise self._corrupt(f"{self.blocks_per_group} blocks per group")
        if not 0 < self.inodes_per_group <= 8 * bs:
            raise self._corrupt(f"{self.inodes_per_group} inodes per group")
        groups = -(-(self.blocks_count - self.first_data_block) // self.blocks_per_group)
        if groups * self.inodes_per_group != self.inodes_count:
            raise self._corrupt(
                f"{self.inodes_count} inodes, but {groups} groups of {self.inodes_per_group}"
            )
        self.inode_table_blocks = -(-self.inodes_per_group * size // bs)

    def _corrupt(self, what: str) -> BootDiskError:
        return BootDiskError(
            f"{self.label}: {what}: the file system is corrupt (check it with e2fsck -fn)"
        )

    # -- inodes -------------------------------------------------------------------------

    def inode(self, number: int) -> Inode:
        """Inode ``number``, which must be in use."""
        cached = self._inodes.get(number)
        if cached is not None:
            return cached
        if not 1 <= number <= self.inodes_count:
            raise self._corrupt(f"inode number {number} is out of range")
        group, index = divmod(number - 1, self.inodes_per_group)
        desc = self._descriptor(group)
        (table,) = struct.unpack_from("<I", desc, 0x08)
        if self.desc_size >= 64:
            table |= struct.unpack_from("<I", desc, 0x28)[0] << 32
        (group_flags,) = struct.unpack_from("<H", desc, 0x12)
        if group_flags & _BG_INODE_UNINIT and self.ro_compat & (
            _RO_COMPAT_GDT_CSUM | _RO_COMPAT_METADATA_CSUM
        ):
            raise self._corrupt(f"inode {number} is in group {group}, which has none in use")
        if table == 0 or table + self.inode_table_blocks > self.blocks_count:
            raise self._corrupt(f"group {group}'s inode table is at block {table}")
        offset = table * self.block_size + index * self.inode_size
        raw = self.region.read(offset, self.inode_size, f"inode {number}")
        # inodes.rst: i_mode, i_size_lo, i_links_count, i_blocks_lo, i_flags, i_file_acl_lo,
        # i_size_high, and osd2's l_i_blocks_high and l_i_file_acl_high (Linux).
        (mode,) = struct.unpack_from("<H", raw, 0x00)
        (size_lo,) = struct.unpack_from("<I", raw, 0x04)
        (links,) = struct.unpack_from("<H", raw, 0x1A)
        blocks_lo, flags = struct.unpack_from("<II", raw, 0x1C)
        if mode == 0 or links == 0:
            raise self._corrupt(f"inode {number} is linked from a directory but not in use")
        (acl_lo,) = struct.unpack_from("<I", raw, 0x68)
        (size_hi,) = struct.unpack_from("<I", raw, 0x6C)
        blocks_hi, acl_hi = struct.unpack_from("<HH", raw, 0x74)
        inode = Inode(
            number=number,
            mode=mode,
            size=size_lo | size_hi << 32,
            flags=flags,
            blocks=blocks_lo | blocks_hi << 32,
            file_acl=acl_lo | acl_hi << 32,
            raw=raw,
        )
        self._inodes[number] = inode
        return inode

    def _descriptor(self, group: int) -> bytes:
        """Group ``group``'s descriptor (group_descr.rst; with meta_bg, the descriptors of a
        meta group are in its first group, after a superblock backup if it has one)."""
        cached = self._descriptors.get(group)
        if cached is not None:
            return cached
        per_block = self.block_size // self.desc_size
        index, slot = divmod(group, per_block)
        if self.incompat & _INCOMPAT_META_BG and index >= self.first_meta_bg:
            first = index * per_block
            block = self.first_data_block + first * self.blocks_per_group
            block += 1 if self._has_super(first) else 0
        else:
            # The table follows the superblock's block: block 1 with 1 KiB blocks, else 0.
            block = (1 if self.block_size == 1024 else 0) + 1 + index
        if block >= self.blocks_count:
            raise self._corrupt(f"group {group}'s descriptor would be at block {block}")
        offset = block * self.block_size + slot * self.desc_size
        desc = self.region.read(offset, self.desc_size, f"group descriptor {group}")
        self._descriptors[group] = desc
        return desc

    def _has_super(self, group: int) -> bool:
        """Whether ``group`` starts with a superblock backup (super.rst, sparse_super and
        sparse_super2)."""
        if group == 0:
            return True
        if self.compat & _COMPAT_SPARSE_SUPER2:
            return group in self.backup_groups
        if group == 1 or not self.ro_compat & _RO_COMPAT_SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            power = base
            while power < group:
                power *= base
            if power == group:
                return True
        return False

    # -- file contents ------------------------------------------------------------------

    def read(self, inode: Inode, limit: int, what: str) -> bytes:
        """The contents of ``inode`` (at most ``limit`` bytes, else an error naming it as
        ``what``). Holes and unwritten extents read as zeros."""
        if inode.flags & _ENCRYPT_FL:
            raise BootDiskError(f"{self.label}: {what} is encrypted: kasou cannot read it")
        size = inode.size
        if size > limit:
            raise BootDiskError(
                f"{self.label}: {what} is {size} bytes, more than the {limit} kasou reads"
            )
        if size > self.blocks_count * self.block_size:
            raise self._corrupt(f"{what} is {size} bytes, more than the file system")
        if inode.flags & _INLINE_DATA_FL:
            data = self._inline(inode, what)
            if len(data) < size:
                raise self._corrupt(f"{what} has {len(data)} bytes of inline data, not {size}")
            return data[:size]
        blocks = -(-size // self.block_size)
        if inode.flags & _EXTENTS_FL:
            runs = self._extent_runs(inode, blocks, what)
        else:
            runs = self._mapped_runs(inode, blocks, what)
        buffer = bytearray(size)
        view = memoryview(buffer)
        bs = self.block_size
        for logical, physical, count in runs:
            start = logical * bs
            self.region.read_into(physical * bs, view[start : min(size, start + count * bs)], what)
        return bytes(buffer)

    def _add(self, runs: list[_Run], logical: int, physical: int, count: int, what: str) -> None:
        """Map ``count`` blocks from ``logical`` to ``physical``, merging with the previous run
        when both sides continue it (one read for a contiguous file)."""
        if physical < 1 or physical + count > self.blocks_count:
            raise self._corrupt(f"{what} points at blocks {physical}..{physical + count - 1}")
        if runs:
            last = runs[-1]
            if last[0] + last[2] == logical and last[1] + last[2] == physical:
                last[2] += count
                return
        runs.append([logical, physical, count])

    def _extent_runs(self, inode: Inode, blocks: int, what: str) -> list[_Run]:
        runs: list[_Run] = []
        # A tree that obeys the range checks below has at most one node per block of the
        # file at each level; the budget stops one that does not, whatever it does.
        walk = _Walk(budget=(_EXTENT_MAX_DEPTH + 1) * blocks + 16)
        self._extent_node(inode.block, None, 0, _LOGICAL_END, blocks, runs, walk, what)
        return runs

    def _extent_node(
        self,
        node: bytes,
        depth: int | None,
        low: int,
        high: int,
        blocks: int,
        runs: list[_Run],
        walk: _Walk,
        what: str,
    ) -> None:
        """Walk one node of an extent tree (ifork.rst): the root in i_block (``depth``
        None), or a tree block whose parent index says it has ``depth`` and covers logical
        blocks ``[low, high)``. Entries past the file's ``blocks`` are not followed."""
        magic, count, capacity, node_depth, _ = _EXTENT_HEADER.unpack_from(node)
        if magic != _EXTENT_MAGIC:
            raise self._corrupt(f"{what} has an extent header with bad magic 0x{magic:04x}")
        if count > capacity or capacity > (len(node) - _EXTENT_HEADER.size) // 12:
            raise self._corrupt(f"{what} has an extent node of {count} entries, {capacity} max")
        if depth is None:
            if node_depth > _EXTENT_MAX_DEPTH:
                raise self._corrupt(f"{what} has an extent tree of depth {node_depth}")
        elif node_depth != depth or count == 0:
            raise self._corrupt(
                f"{what} has an extent block of depth {node_depth} and {count} entries "
                f"where its parent wants depth {depth}"
            )
        previous = -1
        for index in range(count):
            offset = _EXTENT_HEADER.size + 12 * index
            if node_depth == 0:
                first, length, start_hi, start_lo = _EXTENT.unpack_from(node, offset)
                if first >= blocks:
                    return  # the rest lies past the end of the file
                unwritten = length > _EXTENT_INIT_MAX
                if unwritten:
                    length -= _EXTENT_INIT_MAX
                if length == 0 or first < max(low, walk.next) or first + length > high:
                    raise self._corrupt(f"{what} has extents out of order or overlapping")
                walk.next = first + length
                physical = start_hi << 32 | start_lo
                if unwritten:  # reads as zeros (ifork.rst), but must still be in range
                    self._add([], first, physical, length, what)
                else:
                    self._add(runs, first, physical, min(length, blocks - first), what)
                continue
            first, leaf_lo, leaf_hi, _ = _EXTENT_INDEX.unpack_from(node, offset)
            if first >= blocks:
                return
            if first < low or first >= high or first <= previous:
                raise self._corrupt(f"{what} has extent index entries out of order")
            previous = first
            end = high
            if index + 1 < count:
                end = min(high, _EXTENT_INDEX.unpack_from(node, offset + 12)[0])
            leaf = leaf_hi << 32 | leaf_lo
            if leaf < 1 or leaf >= self.blocks_count:
                raise self._corrupt(f"{what} has an extent index pointing at block {leaf}")
            walk.budget -= 1
            if walk.budget < 0:
                raise self._corrupt(f"{what} has an extent tree larger than the file")
            child = self.region.read(leaf * self.block_size, self.block_size, what)
            self._extent_node(child, node_depth - 1, first, end, blocks, runs, walk, what)

    def _mapped_runs(self, inode: Inode, blocks: int, what: str) -> list[_Run]:
        """The classic block map (ifork.rst): i_block[0..11] point at data, i_block[12] at
        a block of pointers, [13] at a block of such blocks, [14] one level deeper. A zero
        pointer is a hole."""
        runs: list[_Run] = []
        pointers = struct.unpack("<15I", inode.block)
        for logical in range(min(12, blocks)):
            if pointers[logical]:
                self._add(runs, logical, pointers[logical], 1, what)
        per_block = self.block_size // 4
        logical = 12
        for level in (1, 2, 3):
            if logical >= blocks:
                return runs
            self._indirect(pointers[11 + level], level, logical, blocks, runs, what)
            logical += per_block**level
        if logical < blocks:
            raise self._corrupt(f"{what} is larger than its block map can address")
        return runs

    def _indirect(
        self, block: int, level: int, first: int, blocks: int, runs: list[_Run], what: str
    ) -> None:
        """A block of pointers ``level`` levels above the data, mapping from logical block
        ``first``."""
        if block == 0:
            return  # a hole spanning everything below this pointer
        if block >= self.blocks_count:
            raise self._corrupt(f"{what} has an indirect block pointer to block {block}")
        per_block = self.block_size // 4
        data = self.region.read(block * self.block_size, self.block_size, what)
        pointers = struct.unpack(f"<{per_block}I", data)
        span = per_block ** (level - 1)
        for index, pointer in enumerate(pointers):
            logical = first + index * span
            if logical >= blocks:
                return
            if level == 1:
                if pointer:
                    self._add(runs, logical, pointer, 1, what)
            else:
                self._indirect(pointer, level - 1, logical, blocks, runs, what)

    def _inline(self, inode: Inode, what: str) -> bytes:
        """Inline data (inline_data.rst): i_block's 60 bytes, then the value of the in-inode
        attribute ``system.data``."""
        return inode.block + (self._system_data(inode, what) or b"")

    def _system_data(self, inode: Inode, what: str) -> bytes | None:
        raw = inode.raw
        if len(raw) <= _INODE_BASE + 4:
            return None
        (extra,) = struct.unpack_from("<H", raw, 0x80)  # i_extra_isize
        start = _INODE_BASE + extra
        if extra % 4 or start + 4 > len(raw):
            return None
        if struct.unpack_from("<I", raw, start)[0] != _XATTR_MAGIC:
            return None
        base = position = start + 4
        while position + _XATTR_ENTRY.size <= len(raw):  # each entry moves it 16 or more
            name_len, index, value_offset, value_inode, value_size, _ = _XATTR_ENTRY.unpack_from(
                raw, position
            )
            if not struct.unpack_from("<I", raw, position)[0]:
                return None  # the end of the list
            name = raw[position + 16 : position + 16 + name_len]
            if index == _XATTR_SYSTEM and name == b"data":
                value = base + value_offset
                if value_inode or value + value_size > len(raw):
                    raise self._corrupt(f"{what} has its inline data outside the inode")
                return raw[value : value + value_size]
            position += (_XATTR_ENTRY.size + name_len + 3) & ~3
        return None

    # -- directories and paths ----------------------------------------------------------

    def entries(self, directory: Inode) -> dict[bytes, int]:
        """A directory's entries: name -> inode number ("." and ".." included)."""
        cached = self._directories.get(directory.number)
        if cached is not None:
            return cached
        what = f"directory inode {directory.number}"
        entries: dict[bytes, int] = {}
        if directory.flags & _INLINE_DATA_FL:
            # inline_data.rst, "Inline Directories": the parent's inode number, then entries
            # in the rest of i_block and in the system.data value, each area on its own.
            if directory.flags & _ENCRYPT_FL:
                raise BootDiskError(f"{self.label}: {what} is encrypted: kasou cannot read it")
            entries[b".."] = struct.unpack_from("<I", directory.block)[0]
            self._parse_entries(directory.block[4:], 56, entries, what)
            extra = self._system_data(directory, what) or b""
            self._parse_entries(extra, max(len(extra), 1), entries, what)
        else:
            data = self.read(directory, _MAX_DIRECTORY, what)
            self._parse_entries(data, self.block_size, entries, what)
        self._directories[directory.number] = entries
        return entries

    def _parse_entries(self, data: bytes, chunk: int, out: dict[bytes, int], what: str) -> None:
        """Linear directory entries (directory.rst), ``chunk`` bytes at a time: an entry never
        crosses a block. htree index blocks read as one unused entry (inode 0) spanning the
        block; the checksum tail is an unused entry too."""
        for base in range(0, len(data), chunk):
            end = min(base + chunk, len(data))
            position = base
            while position < end:  # each entry moves it 8 bytes or more
                if position + _DIRENT.size > end:
                    raise self._corrupt(f"{what} has a truncated entry at byte {position}")
                number, length, name_len, file_type = _DIRENT.unpack_from(data, position)
                if not self.filetype:
                    name_len |= file_type << 8
                if self.block_size == 65536 and length in (0, 65535):
                    length = 65536  # ext4_rec_len_from_disk: 64 KiB does not fit in 16 bits
                if length < 8 or length % 4 or position + length > end:
                    raise self._corrupt(f"{what} has an entry of length {length}")
                if number:
                    if _DIRENT.size + name_len > length or name_len > _MAX_NAME:
                        raise self._corrupt(f"{what} has a name longer than its entry")
                    name = data[position + 8 : position + 8 + name_len]
                    if name:
                        out.setdefault(name, number)
                position += length

    def readlink(self, link: Inode) -> bytes:
        """A symbolic link's target: in i_block for a fast symlink (no blocks of its own),
        else in its data (inodes.rst, "Symbolic Links")."""
        what = f"symbolic link inode {link.number}"
        size = link.size
        if not 0 < size <= _MAX_LINK:
            raise self._corrupt(f"{what} is {size} bytes long")
        if link.flags & _ENCRYPT_FL:
            raise BootDiskError(f"{self.label}: {what} is encrypted: kasou cannot read it")
        attribute_blocks = self.cluster_size // 512 if link.file_acl else 0
        if link.flags & _INLINE_DATA_FL or link.blocks - attribute_blocks != 0:
            target = self.read(link, _MAX_LINK, what)
        elif size < 60:
            target = link.block[:size]
        else:
            raise self._corrupt(f"{what} is {size} bytes long but has no blocks")
        if b"\0" in target:
            raise self._corrupt(f"{what} has a NUL byte in its target")
        return target

    def lookup(self, path: bytes, follow: bool = True) -> tuple[Inode, bytes] | None:
        """The inode at ``path`` and its path with symlinks resolved, or None if there is
        none. Symbolic links resolve inside this file system, never outside: an absolute
        target starts again from its root, and ``..`` stops at the root. The last component
        is followed only with ``follow``."""
        todo = path.split(b"/")[::-1]
        chain: list[tuple[int, bytes]] = []  # (inode, name) from the root down
        links = 0
        while todo:
            name = todo.pop()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if chain:
                    chain.pop()
                continue
            parent = self.inode(chain[-1][0] if chain else _ROOT)
            if not is_dir(parent):
                return None
            number = self.entries(parent).get(name)
            if number is None:
                return None
            inode = self.inode(number)
            if is_link(inode) and (todo or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise BootDiskError(
                        f"{self.label}: {show(path)} goes through more than {MAX_SYMLINKS} "
                        "symbolic links (a loop?)"
                    )
                target = self.readlink(inode)
                if target.startswith(b"/"):
                    chain.clear()
                todo.extend(target.split(b"/")[::-1])
                continue
            chain.append((number, name))
        inode = self.inode(chain[-1][0] if chain else _ROOT)
        return inode, b"/" + b"/".join(name for _, name in chain)


def _uuid_text(raw: bytes) -> str:
    """A file system UUID (stored big-endian, RFC 4122 order) as blkid prints it."""
    text = raw.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def _crc32c(data: bytes) -> int:
    """ext4's checksum: CRC-32C seeded with ~0 and not inverted at the end (ext4 docs,
    checksums.rst; e2fsprogs' ext2fs_crc32c_le(~0, ...))."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc
