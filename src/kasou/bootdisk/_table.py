"""Partition tables: GPT (UEFI 2.10 §5.3) and MBR with extended/logical partitions.

Reads where each partition lies and what the table says it is, checking every field against
the disk's size. GPT: the header's and the entry array's CRC32s are checked; when the primary
table is unusable the backup at the disk's last sector is used (and the result says so: the
guest's kernel then needs ``gpt`` on its command line to do the same, block/partitions/efi.c).
MBR: the four primary entries and the chain of extended boot records, numbered as Linux does
(logical partitions from 5, block/partitions/msdos.c).

Not handled: sectors other than 512 bytes (a GPT made for 4096-byte sectors is not found),
hybrid MBRs (the GPT wins), BSD disklabels and other nested tables.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

from kasou.bootdisk._errors import BootDiskError
from kasou.bootdisk._region import Region

__all__ = ["SECTOR", "Partition", "Table", "read_table"]

SECTOR = 512

# UEFI 2.10 §5.3.2, table 5.5 "GPT Header": Signature, Revision, HeaderSize, HeaderCRC32,
# Reserved, MyLBA, AlternateLBA, FirstUsableLBA, LastUsableLBA, DiskGUID, PartitionEntryLBA,
# NumberOfPartitionEntries, SizeOfPartitionEntry, PartitionEntryArrayCRC32.
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
assert _GPT_HEADER.size == 92
_GPT_SIGNATURE = b"EFI PART"
_GPT_CRC_FIELD = slice(16, 20)
# §5.3.3, table 5.6 "GPT Partition Entry": PartitionTypeGUID, UniquePartitionGUID,
# StartingLBA, EndingLBA, Attributes, PartitionName (36 UTF-16LE code units).
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")
assert _GPT_ENTRY.size == 128
_GPT_MAX_ARRAY = 4 << 20  # bytes of entries read at most (the usual array is 16 KiB)

# MBR: the partition record at byte 446 + 16*i (UEFI 2.10 §5.2.1, table 5.2): BootIndicator,
# StartingCHS, OSType, EndingCHS, StartingLBA, SizeInLBA; the signature 0xAA55 at byte 510.
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_MBR_ENTRIES = 446
_MBR_SIGNATURE = b"\x55\xaa"
_MBR_DISK_SIGNATURE = 440  # UniqueMBRDiskSignature, Linux's PARTUUID for MBR disks
_MBR_PROTECTIVE = 0xEE
_MBR_EXTENDED = {0x05, 0x0F, 0x85}  # DOS, Windows (LBA) and Linux extended partitions
_MAX_LOGICAL = 128  # logical partitions followed at most (also ends a looping EBR chain)

# Partition types worth naming in messages; the rest are told apart by their contents.
_GPT_TYPES = {
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI system",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "bc13c2ff-59e6-4262-a352-b275fd6f7172": "Linux extended boot",
}
_MBR_TYPES = {0x82: "Linux swap", 0xEF: "EFI system"}


class Partition(NamedTuple):
    number: int
    """1-based, as Linux numbers it (vda1, vda5 for the first logical); 0 for a whole disk."""
    offset: int
    """Bytes from the start of the disk."""
    size: int
    """Bytes; the partition lies within the disk."""
    kind: str
    """A known partition type ("BIOS boot", "EFI system", "Linux swap", ...), else ""."""
    uuid: str
    """The kernel's PARTUUID: the GPT unique GUID, or ``SSSSSSSS-PP`` on an MBR disk."""


class Table(NamedTuple):
    scheme: str
    """"gpt", "mbr" or "none" (a file system on the whole disk)."""
    partitions: tuple[Partition, ...]
    problems: tuple[str, ...]
    """Partitions the table lists but that cannot be read (past the end of the disk)."""
    backup_gpt: bool = False
    """The primary GPT is unusable and the backup was read."""


class _BadGpt(Exception):
    """A GPT header or array that fails a check (internal: becomes a BootDiskError)."""

    def __init__(self, reason: str, signed: bool) -> None:
        super().__init__(reason)
        self.signed = signed  # the "EFI PART" signature was there


def read_table(disk: Region) -> Table | None:
    """The partition table of ``disk``, or None if it has none (a whole-disk file system, or
    no disk image at all: the caller probes for a file system)."""
    if disk.size < SECTOR:
        raise BootDiskError(f"the image is {disk.size} bytes: too small to be a disk")
    mbr = disk.read(0, SECTOR, "the master boot record")
    entries = _mbr_entries(mbr)
    protective = entries is not None and any(e[2] == _MBR_PROTECTIVE for e in entries)
    table = _read_gpt(disk, protective)
    if table is not None:
        return table
    if entries is None or not any(e[2] for e in entries):
        return None
    return _read_mbr(disk, mbr, entries)


# -- GPT ------------------------------------------------------------------------------------


def _read_gpt(disk: Region, protective: bool) -> Table | None:
    last = disk.size // SECTOR - 1
    try:
        return _gpt_at(disk, 1, last, backup=False)
    except _BadGpt as bad:
        primary = bad
    try:
        return _gpt_at(disk, last, last, backup=True)
    except _BadGpt as bad:
        backup = bad
    if not (primary.signed or backup.signed or protective):
        return None
    raise BootDiskError(
        f"the GPT is unusable (primary at sector 1: {primary}; backup at sector {last}: "
        f"{backup}): repair the image's partition table (sgdisk --verify shows what is wrong)"
    )


def _gpt_at(disk: Region, lba: int, last: int, backup: bool) -> Table:
    if lba < 1 or lba > last:
        raise _BadGpt("the disk is too small", signed=False)
    sector = disk.read(lba * SECTOR, SECTOR, f"the GPT header at sector {lba}")
    (
        signature,
        _revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        _alternate,
        _first_usable,
        _last_usable,
        _disk_guid,
        entries_lba,
        count,
        entry_size,
        entries_crc,
    ) = _GPT_HEADER.unpack_from(sector)
    if signature != _GPT_SIGNATURE:
        raise _BadGpt("no GPT header", signed=False)
    if not _GPT_HEADER.size <= header_size <= SECTOR:
        raise _BadGpt(f"header size {header_size} is invalid", signed=True)
    header = bytearray(sector[:header_size])
    header[_GPT_CRC_FIELD] = bytes(4)
    if zlib.crc32(header) != header_crc:
        raise _BadGpt("header CRC mismatch", signed=True)
    if my_lba != lba:
        raise _BadGpt(f"the header says it is at sector {my_lba}", signed=True)
    if entry_size < _GPT_ENTRY.size or entry_size % 8 or count * entry_size > _GPT_MAX_ARRAY:
        raise _BadGpt(f"{count} entries of {entry_size} bytes are invalid", signed=True)
    array_bytes = count * entry_size
    if entries_lba < 1 or entries_lba * SECTOR + array_bytes > disk.size:
        raise _BadGpt(f"the entry array at sector {entries_lba} is outside the disk", signed=True)
    array = disk.read(entries_lba * SECTOR, array_bytes, "the GPT entry array")
    if zlib.crc32(array) != entries_crc:
        raise _BadGpt("entry array CRC mismatch", signed=True)
    partitions: list[Partition] = []
    problems: list[str] = []
    for index in range(count):
        type_guid, unique, first, end, _attributes, _name = _GPT_ENTRY.unpack_from(
            array, index * entry_size
        )
        if not any(type_guid):
            continue  # an unused entry (§5.3.3: PartitionTypeGUID zero)
        number = index + 1
        if first > end or first < 1:
            problems.append(f"partition {number} has sectors {first}..{end}, which is invalid")
            continue
        if (end + 1) * SECTOR > disk.size:
            problems.append(
                f"partition {number} ends at sector {end}, past the end of the disk "
                f"({disk.size // SECTOR} sectors): is the image truncated?"
            )
            continue
        kind = _GPT_TYPES.get(guid_text(type_guid), "")
        size = (end - first + 1) * SECTOR
        partitions.append(Partition(number, first * SECTOR, size, kind, guid_text(unique)))
    return Table("gpt", tuple(partitions), tuple(problems), backup_gpt=backup)


def guid_text(raw: bytes) -> str:
    """A GUID as text: the first three fields are little-endian on disk (UEFI 2.10 appendix
    A, "EFI GUID Format")."""
    a, b, c = struct.unpack_from("<IHH", raw)
    tail = raw[8:16].hex()
    return f"{a:08x}-{b:04x}-{c:04x}-{tail[:4]}-{tail[4:]}"


# -- MBR ------------------------------------------------------------------------------------

_MbrEntry = tuple[int, bytes, int, bytes, int, int]
_Adder = Callable[[int, int, int, int], None]  # number, start sector, sectors, OS type


def _mbr_entries(sector: bytes) -> list[_MbrEntry] | None:
    """The four partition records, or None if ``sector`` is no MBR: no signature, or a boot
    indicator other than 0x00/0x80 (a file system's boot sector, such as FAT's, has code
    there)."""
    if sector[510:512] != _MBR_SIGNATURE:
        return None
    entries = [_MBR_ENTRY.unpack_from(sector, _MBR_ENTRIES + 16 * i) for i in range(4)]
    if any(entry[0] not in (0x00, 0x80) for entry in entries):
        return None
    return entries


def _read_mbr(disk: Region, mbr: bytes, entries: list[_MbrEntry]) -> Table:
    (signature,) = struct.unpack_from("<I", mbr, _MBR_DISK_SIGNATURE)
    sectors = disk.size // SECTOR
    partitions: list[Partition] = []
    problems: list[str] = []

    def add(number: int, start: int, count: int, os_type: int) -> None:
        if start < 1 or start + count > sectors:
            problems.append(
                f"partition {number} (sectors {start}..{start + count - 1}) lies past the end "
                f"of the disk ({sectors} sectors): is the image truncated?"
            )
            return
        kind = _MBR_TYPES.get(os_type, "")
        uuid = f"{signature:08x}-{number:02x}"
        partitions.append(Partition(number, start * SECTOR, count * SECTOR, kind, uuid))

    extended: tuple[int, int] | None = None
    for index, (_boot, _chs, os_type, _chs_end, start, count) in enumerate(entries):
        if not os_type or not count:
            continue
        if os_type in _MBR_EXTENDED:
            if extended is None:  # Linux follows the first extended partition only
                extended = (start, count)
            continue
        add(index + 1, start, count, os_type)
    if extended is not None:
        _read_logical(disk, extended, add)
    return Table("mbr", tuple(partitions), tuple(problems))


def _read_logical(disk: Region, extended: tuple[int, int], add: _Adder) -> None:
    """Follow the chain of extended boot records: each holds one logical partition (its start
    relative to the EBR) and a link to the next EBR (relative to the extended partition)."""
    base, count = extended
    if base < 1 or (base + count) * SECTOR > disk.size:
        raise BootDiskError(
            f"the extended partition (sectors {base}..{base + count - 1}) lies past the end of "
            "the disk: is the image truncated?"
        )
    ebr_lba = base
    seen: set[int] = set()
    number = 5
    for _ in range(_MAX_LOGICAL):
        seen.add(ebr_lba)
        ebr = disk.read(ebr_lba * SECTOR, SECTOR, f"the extended boot record at sector {ebr_lba}")
        if ebr[510:512] != _MBR_SIGNATURE:
            raise BootDiskError(
                f"the extended boot record at sector {ebr_lba} has no signature: the MBR "
                "partition table is corrupt"
            )
        logical = _MBR_ENTRY.unpack_from(ebr, _MBR_ENTRIES)
        link = _MBR_ENTRY.unpack_from(ebr, _MBR_ENTRIES + 16)
        if logical[2] and logical[5] and logical[2] not in _MBR_EXTENDED:
            add(number, ebr_lba + logical[4], logical[5], logical[2])
            number += 1
        if link[2] not in _MBR_EXTENDED or not link[5]:
            return
        ebr_lba = base + link[4]
        if ebr_lba in seen or not base <= ebr_lba < base + count:
            raise BootDiskError(
                f"the chain of extended boot records goes to sector {ebr_lba}, "
                f"{'a loop' if ebr_lba in seen else 'outside the extended partition'}: the "
                "MBR partition table is corrupt"
            )
    raise BootDiskError(
        f"the extended partition holds more than {_MAX_LOGICAL} logical partitions: the MBR "
        "partition table is corrupt"
    )
