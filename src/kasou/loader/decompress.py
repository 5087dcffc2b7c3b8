"""Decompressors for the payload formats a Linux bzImage may carry.

This module owns telling the format of a compressed kernel payload by its magic bytes and
undoing it with a bounded output size: gzip (zlib), xz and lzma (stdlib ``lzma``), bzip2
(``bz2``), zstd (``zstandard``) and lz4 in the "legacy" frame format that the kernel's build
produces with ``lz4 -l``. It knows nothing about bzImage headers (``bzimage.py``). LZO payloads
are recognised and refused: no maintained Python binding is pinned.

The input is untrusted: every decompressor stops at ``limit`` bytes of output, and any library
error becomes an ``ImageError``.
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Literal, Protocol

import lz4.block
import zstandard

from kasou.errors import ImageError

__all__ = ["DEFAULT_LIMIT", "Format", "decompress", "detect_format"]

Format = Literal["gzip", "xz", "lzma", "bzip2", "zstd", "lz4", "lzo"]

# A vmlinux is tens of MiB; nothing a kernel payload decompresses to comes near this.
DEFAULT_LIMIT = 1 << 30

# Magic numbers, as the kernel's lib/decompress.c tells formats apart.
_MAGICS: tuple[tuple[bytes, Format], ...] = (
    (b"\x1f\x8b", "gzip"),  # RFC 1952
    (b"\x1f\x9e", "gzip"),  # old gzip
    (b"\xfd7zXZ\x00", "xz"),  # xz file format, section 2.1.1.1
    (b"\x5d\x00\x00", "lzma"),  # .lzma "alone" header: properties byte 0x5d, dictionary size
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),  # RFC 8878 section 3.1.1
    (b"\x02\x21\x4c\x18", "lz4"),  # lz4 legacy frame (lz4 frame format doc, "Legacy frame")
    (b"\x89LZO", "lzo"),
)

_ZSTD_SLICE = 4096
_LZ4_LEGACY_MAGIC = 0x184C2102
# The lz4 legacy format cuts its input into independent blocks of 8 MiB of uncompressed data.
_LZ4_LEGACY_BLOCK = 8 << 20


class _Decompressor(Protocol):
    """What zlib, lzma and bz2 decompressor objects have in common."""

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes | memoryview, max_length: int, /) -> bytes: ...


def detect_format(data: bytes | memoryview) -> Format:
    """The compression format of ``data``, by its magic bytes; ``ImageError`` if unknown."""
    head = bytes(data[:6])
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    raise ImageError(
        f"unknown compression (magic {head.hex()}): the kernel payload must be gzip, xz, "
        "lzma, bzip2, zstd or lz4"
    )


def decompress(data: bytes | memoryview, limit: int = DEFAULT_LIMIT) -> bytes:
    """Decompress the first stream in ``data`` (trailing bytes are ignored, except for lz4
    legacy frames, see ``_lz4_legacy``). Raises ``ImageError`` for corrupt or truncated input
    or output over ``limit`` bytes."""
    kind = detect_format(data)
    try:
        if kind == "gzip":
            return _finish(kind, zlib.decompressobj(16 + zlib.MAX_WBITS), data, limit)
        if kind == "xz":
            return _finish(kind, lzma.LZMADecompressor(lzma.FORMAT_XZ), data, limit)
        if kind == "lzma":
            return _finish(kind, lzma.LZMADecompressor(lzma.FORMAT_ALONE), data, limit)
        if kind == "bzip2":
            return _finish(kind, bz2.BZ2Decompressor(), data, limit)
        if kind == "zstd":
            return _zstd(data, limit)
        if kind == "lz4":
            return _lz4_legacy(data, limit)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, zstandard.ZstdError) as error:
        raise ImageError(
            f"the {kind} payload is corrupt ({error}): the image is damaged"
        ) from error
    raise ImageError(
        "the kernel payload is LZO-compressed, which kasou cannot decompress: build the "
        "kernel with another KERNEL_ compression or pass its vmlinux"
    )


def _finish(
    kind: Format,
    decompressor: _Decompressor,
    data: bytes | memoryview,
    limit: int,
) -> bytes:
    out = decompressor.decompress(data, limit + 1)
    _check_limit(kind, len(out), limit)
    if not decompressor.eof:
        raise ImageError(f"the {kind} payload is truncated: the image is damaged")
    return out


def _zstd(data: bytes | memoryview, limit: int) -> bytes:
    # The kernel compresses with `zstd -22 --ultra`, whose window may exceed the library's
    # default cap (128 MiB); a window never needs to be larger than the output limit.
    decompressor = zstandard.ZstdDecompressor(max_window_size=max(limit, 1 << 27))
    stream = decompressor.decompressobj()
    view = memoryview(data)
    chunks: list[bytes] = []
    total = 0
    # The decompression object has no output cap, so it is fed small slices: one slice of
    # 4 KiB expands to at most 128 MiB (RLE blocks), checked before the next one.
    for start in range(0, len(view), _ZSTD_SLICE):
        chunk = stream.decompress(view[start : start + _ZSTD_SLICE])
        total += len(chunk)
        _check_limit("zstd", total, limit)
        chunks.append(chunk)
        if stream.eof:
            return b"".join(chunks)
    raise ImageError("the zstd payload is truncated: the image is damaged")


def _lz4_legacy(data: bytes | memoryview, limit: int) -> bytes:
    """Decode lz4 legacy frames: a magic, then blocks of (u32 LE compressed size, data).

    A legacy stream has no end mark: it ends with the input. A kernel payload carries its
    4-byte uncompressed size after the last block (scripts/Makefile.lib, size_append), so
    exactly 4 bytes left that cannot start a block end the stream too. Another magic starts
    another frame.
    """
    view = memoryview(data)
    position = 0
    chunks: list[bytes] = []
    total = 0
    while len(view) - position >= 4:
        size = int.from_bytes(view[position : position + 4], "little")
        if size == _LZ4_LEGACY_MAGIC:
            position += 4
            continue
        if position + 4 + size > len(view):
            if len(view) - position == 4:
                break
            raise ImageError("the lz4 payload is truncated: the image is damaged")
        block = bytes(view[position + 4 : position + 4 + size])
        position += 4 + size
        try:
            chunk = lz4.block.decompress(block, uncompressed_size=_LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as error:
            raise ImageError(
                f"the lz4 payload is corrupt ({error}): the image is damaged"
            ) from error
        total += len(chunk)
        _check_limit("lz4", total, limit)
        chunks.append(chunk)
    if not chunks:
        raise ImageError("the lz4 payload holds no data: the image is damaged")
    return b"".join(chunks)


def _check_limit(kind: Format, size: int, limit: int) -> None:
    if size > limit:
        raise ImageError(
            f"the {kind} payload decompresses to more than {limit >> 20} MiB: "
            "this is not a kernel image"
        )
