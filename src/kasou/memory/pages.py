"""Sets of guest pages: one bit per 4 KiB page of one RAM region.

A ``PageBitmap`` says which pages of a region a snapshot or a migration round must carry:
the pages a device wrote (``GuestMemory.mark_written``), the pages KVM saw a vCPU write
(``merge_kvm``), the pages a diff snapshot holds (``to_bytes``/``from_bytes``, stored beside
the memory file). It knows nothing of addresses or files: page ``n`` is the region's
``n``-th page.

Bit layout, also the serialised form: page ``n`` is bit ``n % 8`` (least significant first)
of byte ``n // 8``. This is KVM's dirty bitmap read as bytes: an array of little-endian
64-bit words where page ``n`` is bit ``n % 64`` of word ``n // 64``
(Documentation/virt/kvm/api.rst, 4.8 KVM_GET_DIRTY_LOG), so merging one is a plain OR.

Not thread-safe: ``GuestMemory`` serialises the marks of its write log itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kasou.errors import SnapshotError

__all__ = ["PageBitmap"]

# Maps every non-zero byte to 1, so runs of non-zero bytes are found with bytes.find (memchr).
_NONZERO_TO_ONE = bytes([0] + [1] * 255)
# runs() turns this many bitmap bytes at a time into an int: bit operations on it stay cheap
# however many runs a dense, fragmented bitmap has.
_PIECE = 64


class PageBitmap:
    """One bit per page of a region of ``pages`` pages; all clear when made."""

    __slots__ = ("_bits", "pages")

    def __init__(self, pages: int) -> None:
        if pages < 0:
            raise ValueError(f"a page bitmap cannot have {pages} pages")
        self.pages = pages
        self._bits = bytearray(_byte_length(pages))

    @classmethod
    def from_bytes(cls, data: bytes, pages: int) -> PageBitmap:
        """The bitmap ``to_bytes`` gave, for a region of ``pages`` pages.

        ``data`` comes from a snapshot file, so it is checked: its length must be exactly
        ``ceil(pages / 8)`` bytes and no bit past the last page may be set. Raises
        ``SnapshotError`` otherwise.
        """
        bitmap = cls(pages)
        if len(data) != len(bitmap._bits):
            raise SnapshotError(
                f"a page bitmap of {len(data)} bytes does not fit a region of {pages} pages "
                f"(it needs {len(bitmap._bits)} bytes): the snapshot is corrupt or not of "
                "this memory layout"
            )
        if pages % 8 and data[-1] >> (pages % 8):
            raise SnapshotError(
                f"a page bitmap for {pages} pages marks pages past the region's end: "
                "the snapshot is corrupt"
            )
        bitmap._bits[:] = data
        return bitmap

    def mark(self, first_page: int, count: int = 1) -> None:
        """Mark ``count`` pages from ``first_page``; ``ValueError`` if they leave the region."""
        end = first_page + count
        if first_page < 0 or count < 0 or end > self.pages:
            raise ValueError(
                f"pages {first_page}+{count} are not inside a region of {self.pages} pages"
            )
        bits = self._bits
        if count == 1:  # the common case: one page of a device's buffer
            bits[first_page >> 3] |= 1 << (first_page & 7)
            return
        if count == 0:
            return
        head, tail = first_page >> 3, (end - 1) >> 3  # the bytes holding the first, last page
        if head == tail:
            bits[head] |= ((1 << count) - 1) << (first_page & 7)
            return
        bits[head] |= (0xFF << (first_page & 7)) & 0xFF
        if tail > head + 1:
            bits[head + 1 : tail] = b"\xff" * (tail - head - 1)
        bits[tail] |= 0xFF >> (7 - ((end - 1) & 7))

    def merge_kvm(self, words: Any) -> None:
        """OR in a dirty bitmap as ``KVM_GET_DIRTY_LOG`` fills it: a ctypes array of
        ``c_uint64`` (``ceil(pages / 64)`` words), or its bytes. A bitmap of this object's
        own ``to_bytes`` length is taken too. Bits past the last page are ignored."""
        data = memoryview(words).cast("B")
        nbytes = len(self._bits)
        kvm_bytes = -(-self.pages // 64) * 8
        if not nbytes <= len(data) <= kvm_bytes:
            raise ValueError(
                f"a dirty bitmap of {len(data)} bytes does not fit a region of "
                f"{self.pages} pages ({kvm_bytes} bytes as KVM lays it out)"
            )
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(data[:nbytes], "little")
        self._bits[:] = (merged & ((1 << self.pages) - 1)).to_bytes(nbytes, "little")

    def count(self) -> int:
        """How many pages are marked."""
        return int.from_bytes(self._bits, "little").bit_count()

    def runs(self) -> Iterator[tuple[int, int]]:
        """The marked pages as ``(first_page, count)`` runs of consecutive pages, ascending.

        Zero bytes are skipped in bulk (found by memchr, not one by one in Python), so a
        sparse bitmap of a large region costs little. The bitmap is copied first:
        marking it while iterating does not change what is yielded.
        """
        bits = bytes(self._bits)
        start = count = 0  # the run being built; count 0: none yet
        for span_start, span_end in byte_runs(bits.translate(_NONZERO_TO_ONE)):
            for piece in range(span_start, span_end, _PIECE):
                value = int.from_bytes(bits[piece : min(piece + _PIECE, span_end)], "little")
                page = piece * 8
                while value:
                    zeros = (value & -value).bit_length() - 1  # clear bits below the next run
                    value >>= zeros
                    page += zeros
                    ones = (value ^ (value + 1)).bit_length() - 1  # the run's length
                    if count and start + count == page:
                        count += ones  # the run goes on across pieces
                    else:
                        if count:
                            yield start, count
                        start, count = page, ones
                    value >>= ones
                    page += ones
        if count:
            yield start, count

    def to_bytes(self) -> bytes:
        """The bitmap as ``ceil(pages / 8)`` bytes (the layout in the module docstring)."""
        return bytes(self._bits)

    def clear(self) -> None:
        """Unmark every page."""
        self._bits = bytearray(len(self._bits))

    def copy(self) -> PageBitmap:
        """An independent bitmap with the same pages marked."""
        other = PageBitmap(self.pages)
        other._bits[:] = self._bits
        return other

    def __ior__(self, other: PageBitmap) -> PageBitmap:
        if not isinstance(other, PageBitmap):
            return NotImplemented
        if other.pages != self.pages:
            raise ValueError(
                f"cannot merge a bitmap of {other.pages} pages into one of {self.pages} pages"
            )
        merged = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        self._bits[:] = merged.to_bytes(len(self._bits), "little")
        return self

    def __contains__(self, page: object) -> bool:
        if not isinstance(page, int) or not 0 <= page < self.pages:
            return False
        return bool(self._bits[page >> 3] >> (page & 7) & 1)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageBitmap):
            return NotImplemented
        return self.pages == other.pages and self._bits == other._bits

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PageBitmap(pages={self.pages}, marked={self.count()})"


def byte_runs(flags: bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each run of 1 bytes in ``flags`` (a string of 0 and 1 bytes), found
    with ``bytes.find`` so long runs of 0 cost C time, not Python steps."""
    position = 0
    while (start := flags.find(1, position)) >= 0:
        end = flags.find(0, start)
        if end < 0:
            end = len(flags)
        yield start, end
        position = end


def _byte_length(pages: int) -> int:
    return (pages + 7) // 8
