"""The qcow2 file format's byte layouts: header, header extensions, table entry bits.

Everything here follows QEMU's docs/interop/qcow2.txt (cited as "qcow2 spec, <section>").
This module parses and validates a header (untrusted file data: every field is range-checked
against the file before it is used), and encodes the header of a new image. It does no I/O
beyond what it is handed and knows nothing of L1/L2 lookups or refcount updates (``_qcow2``).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from kasou.disk._errors import DiskError

__all__ = [
    "COMPRESSED",
    "COPIED",
    "EXT_BACKING_FORMAT",
    "EXT_END",
    "HEADER_V3_LENGTH",
    "INCOMPAT_COMPRESSION",
    "INCOMPAT_CORRUPT",
    "INCOMPAT_DIRTY",
    "L1_RESERVED",
    "L2_RESERVED",
    "MAGIC",
    "MAX_CLUSTER_BITS",
    "MAX_L1_BYTES",
    "MAX_REFTABLE_BYTES",
    "MIN_CLUSTER_BITS",
    "OFFSET_MASK",
    "REFTABLE_RESERVED",
    "ZERO",
    "Header",
    "encode_header",
    "parse_header",
]

MAGIC = b"QFI\xfb"

# qcow2 spec, "Header": bytes 0-71 (all versions), big-endian.
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# Bytes 72-103 (version 3): incompatible, compatible, autoclear features, refcount_order,
# header_length; byte 104 is compression_type when header_length > 104.
_HEADER_V3 = struct.Struct(">QQQII")
assert _HEADER_V2.size == 72 and _HEADER_V3.size == 32
HEADER_V3_LENGTH = 112  # 104 bytes of fields, compression_type, padding to a multiple of 8

# qcow2 spec, "Header": incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION
_INCOMPAT_NAMES = {
    INCOMPAT_DATA_FILE: "an external data file",
    INCOMPAT_EXTL2: "extended L2 entries (subclusters)",
}

# qcow2 spec, "Header extensions": extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
_EXTENSION = struct.Struct(">II")
_FEATURE_NAME = struct.Struct(">BB46s")  # qcow2 spec, "Feature name table"

# Implementation limits, the same as QEMU's (qcow2 spec, "Header" notes on cluster_bits and
# size, "Host cluster management"): 512-byte to 2 MiB clusters, a 32 MiB L1 table, an 8 MiB
# refcount table. They bound how much of an untrusted file kasou reads into memory.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
_MAX_BACKING_NAME = 1023
_MAX_SNAPSHOTS = 65536

# qcow2 spec, "Cluster mapping" and "Host cluster management": entry bits.
COPIED = 1 << 63  # L1 and L2: the cluster's refcount is exactly one
COMPRESSED = 1 << 62  # L2: a compressed cluster descriptor
ZERO = 1 << 0  # L2 standard descriptor (version 3): the cluster reads as zeros
OFFSET_MASK = ((1 << 56) - 1) & ~0x1FF  # bits 9-55: a cluster-aligned host offset
L1_RESERVED = (0x7F << 56) | 0x1FF  # bits 0-8 and 56-62
L2_RESERVED = (0x3F << 56) | 0x1FE  # bits 1-8 and 56-61 of a standard descriptor
REFTABLE_RESERVED = 0x1FF  # bits 0-8


class Header(NamedTuple):
    """A qcow2 header as read and validated (qcow2 spec, "Header")."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_file: str | None
    backing_format: str | None

    @property
    def cluster_size(self) -> int:
        """Bytes per cluster."""
        return 1 << self.cluster_bits


def _problem(text: str) -> DiskError:
    return DiskError(text)


def parse_header(data: bytes, file_size: int) -> Header:
    """Parse and validate the header in ``data`` (the start of the file, at least the first
    cluster or the whole file if shorter). Raises ``DiskError`` naming what is wrong; the
    caller adds the image's path."""
    if len(data) < _HEADER_V2.size:
        raise _problem(f"truncated: the file has {len(data)} bytes, a qcow2 header needs 72")
    (
        magic,
        version,
        backing_offset,
        backing_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_offset,
        reftable_offset,
        reftable_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _HEADER_V2.unpack_from(data)
    if magic != MAGIC:
        raise _problem("not a qcow2 image (no QFI\\xfb magic)")
    if version not in (2, 3):
        raise _problem(f"qcow2 version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise _problem(
            f"cluster_bits {cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}"
        )
    cluster_size = 1 << cluster_bits
    incompatible = compatible = autoclear = 0
    refcount_order, header_length, compression_type = 4, _HEADER_V2.size, 0
    if version == 3:
        if len(data) < _HEADER_V2.size + _HEADER_V3.size:
            raise _problem("truncated: the version 3 header is cut short")
        incompatible, compatible, autoclear, refcount_order, header_length = _HEADER_V3.unpack_from(
            data, _HEADER_V2.size
        )
        if header_length < 104 or header_length % 8 or header_length > cluster_size:
            raise _problem(f"header_length {header_length} is not valid")
        if len(data) < header_length:
            raise _problem("truncated: the header is cut short")
        if header_length > 104:
            compression_type = data[104]
    if len(data) < min(cluster_size, file_size):
        raise _problem("truncated: the first cluster is cut short")
    header_cluster = bytes(data[:cluster_size])

    if crypt_method != 0:
        raise _problem(
            "the image is encrypted; kasou cannot open encrypted qcow2 images "
            "(decrypt it with qemu-img convert)"
        )
    _check_incompatible(incompatible, compression_type, header_cluster, header_length)
    if refcount_order > 6:
        raise _problem(f"refcount_order {refcount_order} is above 6")
    if size > 1 << 62:
        raise _problem(f"virtual size {size} is too large")

    # qcow2 spec, "Cluster mapping": each L2 table maps cluster_size / 8 clusters.
    l2_entries = cluster_size // 8
    needed_l1 = -(-size // (cluster_size * l2_entries))
    if l1_size < needed_l1:
        raise _problem(f"the L1 table ({l1_size} entries) is too small for the virtual size")
    if l1_size * 8 > MAX_L1_BYTES:
        raise _problem(f"the L1 table ({l1_size} entries) is larger than 32 MiB")
    if l1_size:
        _check_table("L1 table", l1_offset, l1_size * 8, cluster_size, file_size, need_inside=True)
    if reftable_clusters == 0:
        raise _problem("the refcount table is empty")
    if reftable_clusters * cluster_size > MAX_REFTABLE_BYTES:
        raise _problem("the refcount table is larger than 8 MiB")
    _check_table(
        "refcount table",
        reftable_offset,
        reftable_clusters * cluster_size,
        cluster_size,
        file_size,
        need_inside=False,
    )
    if nb_snapshots > _MAX_SNAPSHOTS:
        raise _problem(f"{nb_snapshots} snapshots is more than {_MAX_SNAPSHOTS}")
    if nb_snapshots and (snapshots_offset % cluster_size or snapshots_offset >= file_size):
        raise _problem(f"the snapshot table offset {snapshots_offset:#x} is not valid")

    backing_format = _parse_extensions(header_cluster, header_length, cluster_size)
    backing_file = None
    if backing_offset:
        if backing_size > _MAX_BACKING_NAME:
            raise _problem(f"the backing file name is {backing_size} bytes, above 1023")
        if backing_offset + backing_size > cluster_size:
            raise _problem("the backing file name lies outside the first cluster")
        if backing_offset + backing_size > len(header_cluster):
            raise _problem("truncated: the backing file name is cut short")
        raw_name = header_cluster[backing_offset : backing_offset + backing_size]
        try:
            backing_file = raw_name.decode()
        except UnicodeDecodeError:
            raise _problem("the backing file name is not UTF-8") from None
        if not backing_file or "\0" in backing_file:
            raise _problem(f"the backing file name {backing_file!r} is not a path")

    return Header(
        version=version,
        cluster_bits=cluster_bits,
        size=size,
        l1_size=l1_size,
        l1_table_offset=l1_offset,
        refcount_table_offset=reftable_offset,
        refcount_table_clusters=reftable_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        incompatible_features=incompatible,
        compatible_features=compatible,
        autoclear_features=autoclear,
        refcount_order=refcount_order,
        header_length=header_length,
        compression_type=compression_type,
        backing_file=backing_file,
        backing_format=backing_format,
    )


def _check_incompatible(
    incompatible: int, compression_type: int, header_cluster: bytes, header_length: int
) -> None:
    """qcow2 spec, "Header", incompatible_features: refuse every bit kasou does not handle."""
    unknown = incompatible & ~_INCOMPAT_KNOWN
    if unknown:
        names = [
            _INCOMPAT_NAMES.get(1 << bit)
            or _feature_name(header_cluster, header_length, bit)
            or f"bit {bit}"
            for bit in range(64)
            if unknown >> bit & 1
        ]
        raise _problem(
            f"the image uses incompatible features kasou does not support: {', '.join(names)}"
        )
    if bool(incompatible & INCOMPAT_COMPRESSION) != (compression_type != 0):
        raise _problem(
            f"compression_type {compression_type} does not match the compression type bit"
        )
    if compression_type not in (0, 1):
        raise _problem(f"compression type {compression_type} is unknown (0 zlib, 1 zstd)")


def _check_table(
    name: str, offset: int, length: int, cluster_size: int, file_size: int, need_inside: bool
) -> None:
    """A table must start on a cluster boundary inside the file. The L1 table must also end
    inside it; the refcount table may end short (QEMU does not write its zero tail)."""
    if offset % cluster_size or offset == 0:
        raise _problem(f"the {name} offset {offset:#x} is not a non-zero cluster boundary")
    if offset >= file_size or (need_inside and offset + length > file_size):
        raise _problem(
            f"the {name} at {offset:#x} ({length} bytes) points outside the file "
            f"({file_size} bytes): the image is truncated or corrupt"
        )


def _extensions(header_cluster: bytes, header_length: int) -> list[tuple[int, bytes]]:
    """qcow2 spec, "Header extensions": (type, data) pairs up to the end marker."""
    found: list[tuple[int, bytes]] = []
    offset = header_length
    while offset + _EXTENSION.size <= len(header_cluster):
        kind, length = _EXTENSION.unpack_from(header_cluster, offset)
        if kind == EXT_END:
            return found
        start = offset + _EXTENSION.size
        if start + length > len(header_cluster):
            raise _problem(f"header extension {kind:#x} runs past the first cluster")
        found.append((kind, header_cluster[start : start + length]))
        offset = start + (length + 7) // 8 * 8
    raise _problem("the header extensions have no end marker in the first cluster")


def _feature_name(header_cluster: bytes, header_length: int, bit: int) -> str | None:
    """The image's own name for incompatible feature ``bit``, from its feature name table."""
    try:
        extensions = _extensions(header_cluster, header_length)
    except DiskError:
        return None
    for kind, data in extensions:
        if kind != EXT_FEATURE_NAMES:
            continue
        for start in range(0, len(data) - _FEATURE_NAME.size + 1, _FEATURE_NAME.size):
            table, number, name = _FEATURE_NAME.unpack_from(data, start)
            if table == 0 and number == bit:
                return bytes(name).rstrip(b"\0").decode(errors="replace")
    return None


def _parse_extensions(header_cluster: bytes, header_length: int, cluster_size: int) -> str | None:
    """The backing format named by the header extensions, if any. Unknown extensions are
    ignored, as the spec allows."""
    backing_format = None
    for kind, data in _extensions(header_cluster, header_length):
        if kind == EXT_BACKING_FORMAT:
            try:
                backing_format = data.decode("ascii")
            except UnicodeDecodeError:
                raise _problem("the backing format name is not ASCII") from None
    return backing_format


def encode_header(
    *,
    cluster_bits: int,
    size: int,
    l1_size: int,
    l1_table_offset: int,
    refcount_table_offset: int,
    refcount_table_clusters: int,
    backing_file: str | None,
    backing_format: str | None,
) -> bytes:
    """The first cluster's content for a new version 3 image: header, header extensions
    (the backing format, then the end marker), and the backing file name after them (qcow2
    spec, "Header extensions": the name goes between the extensions and the cluster end).
    Raises ``DiskError`` when the backing file name does not fit."""
    extensions = b""
    if backing_format is not None:
        name = backing_format.encode("ascii")
        extensions += _EXTENSION.pack(EXT_BACKING_FORMAT, len(name)) + _pad8(name)
    extensions += _EXTENSION.pack(EXT_END, 0)
    backing = backing_file.encode() if backing_file is not None else b""
    if len(backing) > _MAX_BACKING_NAME:
        raise DiskError(f"the backing file name is {len(backing)} bytes; qcow2 allows 1023")
    backing_offset = HEADER_V3_LENGTH + len(extensions) if backing else 0
    cluster_size = 1 << cluster_bits
    if HEADER_V3_LENGTH + len(extensions) + len(backing) > cluster_size:
        raise DiskError(
            f"the backing file name does not fit in a {cluster_size}-byte cluster: "
            "use a shorter path or a larger cluster size"
        )
    header = _HEADER_V2.pack(
        MAGIC,
        3,
        backing_offset,
        len(backing),
        cluster_bits,
        size,
        0,  # crypt_method: none
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        0,  # nb_snapshots
        0,  # snapshots_offset
    ) + _HEADER_V3.pack(0, 0, 0, 4, HEADER_V3_LENGTH)  # no features, 16-bit refcounts
    header += bytes(HEADER_V3_LENGTH - len(header))  # compression_type 0 (zlib), padding
    return header + extensions + backing


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)
