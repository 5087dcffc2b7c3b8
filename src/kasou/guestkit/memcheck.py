"""The host's side of the guest kit's ``memcheck`` workload: its addresses, its status block
and a mirror of what it writes, so that a test can check guest RAM while the VM is paused.

The workload (``src/user.c``, ``user_memcheck``) cycles over ``mib`` MiB of guest RAM from
``MEMCHECK_BASE``. Pass ``p`` visits page ``i`` (0-based within the area) and, for each
little-endian 8-byte word ``w``, first checks that it holds ``expected_word(p - 1, i, w)``
(pass 0 checks nothing), then writes ``expected_word(p, i, w)``. A word that differs ends
the run: ``kasou-guest: fail memcheck: page I word W pass P: got 0x... want 0x...``
(``mismatch_line``). It prints ``memcheck: ready base=0x1000000 mib=M`` once, and
``memcheck: pass N`` as pass N starts for every ``report``-th N.

Status block at ``MEMCHECK_STATUS_GPA``, six little-endian u64s::

    +0   magic       MEMCHECK_MAGIC (b"memcheck"), written last, once the rest is valid
    +8   base        MEMCHECK_BASE
    +16  area pages  mib * 256
    +24  pass        the pass under way; set as it starts
    +32  done        pages finished, all passes together (only grows)
    +40  mismatches  0 while running; 1 once a mismatch has ended the run

``done`` is the guest's position: with ``done = P * pages + k``, pages below ``k`` hold pass
``P``'s words, page ``k`` is being written (a mix of two passes), pages above ``k`` hold pass
``P - 1``'s (zeros before the first pass ends). ``MemcheckStatus.page_pass`` says which.

This module reads guest RAM through anything with ``read(gpa, size) -> bytes`` (a
``kasou.memory.GuestMemory``); it boots nothing and knows nothing of KVM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

from kasou.guestkit.build import GuestKitError

__all__ = [
    "MEMCHECK_BASE",
    "MEMCHECK_MAGIC",
    "MEMCHECK_MAX_MIB",
    "MEMCHECK_STATUS_GPA",
    "PAGE_SIZE",
    "WORDS_PER_PAGE",
    "MemcheckStatus",
    "expected_page",
    "expected_word",
    "memory_needed",
    "mismatch_line",
    "page_gpa",
    "read_status",
]

# Fixed guest-physical addresses (src/user.c): the status block sits in the page after the
# `counter` workload's counter (COUNTER_GPA, 2 MiB), the area above the virtio heap (4 to
# 16 MiB, src/virtio.c), which memcheck does not use.
MEMCHECK_STATUS_GPA = 0x20_1000
MEMCHECK_BASE = 0x100_0000
MEMCHECK_MAGIC = int.from_bytes(b"memcheck", "little")
MEMCHECK_MAX_MIB = 2048  # keeps page << 9 | word below 2**32 and the area below 3 GiB
PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8

_STATUS = struct.Struct("<6Q")
_PAGE = struct.Struct(f"<{WORDS_PER_PAGE}Q")
_MASK = (1 << 64) - 1


class GuestRam(Protocol):
    """What ``read_status`` needs of guest memory (``kasou.memory.GuestMemory`` has it)."""

    def read(self, gpa: int, size: int) -> bytes: ...


@dataclass(frozen=True)
class MemcheckStatus:
    """The workload's status block, as read while the VM was paused."""

    pass_: int  # the pass under way
    pages: int  # pages finished in all passes together
    mismatches: int
    area_pages: int  # pages in the area (mib * 256)

    @property
    def passes_done(self) -> int:
        """Whole passes finished."""
        return self.pages // self.area_pages

    def page_pass(self, page: int) -> int | None:
        """The pass whose words ``page`` holds now; ``None`` for the page being written
        (its words are from two passes) and for pages no pass has written yet."""
        if not 0 <= page < self.area_pages:
            raise ValueError(f"page {page} is outside the area of {self.area_pages} pages")
        current, position = divmod(self.pages, self.area_pages)
        if page < position:
            return current
        if page == position or current == 0:
            return None
        return current - 1


def read_status(memory: GuestRam) -> MemcheckStatus:
    """The status block in ``memory``. Read it while the VM is paused: the guest changes it
    as it goes. Raises ``GuestKitError`` when the workload has not started (no magic) or
    the block does not hold together (guest RAM is the guest's: check it)."""
    magic, base, area_pages, pass_, done, mismatches = _STATUS.unpack(
        memory.read(MEMCHECK_STATUS_GPA, _STATUS.size)
    )
    where = f"memcheck status block at {MEMCHECK_STATUS_GPA:#x}"
    if magic != MEMCHECK_MAGIC:
        raise GuestKitError(
            f"no {where} (magic {magic:#018x}): the memcheck workload has not started; "
            "wait for its 'memcheck: ready' line"
        )
    if base != MEMCHECK_BASE:
        raise GuestKitError(f"{where} is corrupt: base {base:#x}, not {MEMCHECK_BASE:#x}")
    if not 0 < area_pages <= MEMCHECK_MAX_MIB << 8 or area_pages % 256:
        raise GuestKitError(f"{where} is corrupt: the area is {area_pages} pages")
    # The guest sets `pass` as a pass starts, just after `done` reaches its first page.
    current, position = divmod(done, area_pages)
    if pass_ != current and not (position == 0 and pass_ == current - 1):
        raise GuestKitError(
            f"{where} is corrupt: pass {pass_} with {done} of {area_pages}-page passes done"
        )
    if mismatches > 1:
        raise GuestKitError(f"{where} is corrupt: {mismatches} mismatches (the first ends it)")
    return MemcheckStatus(pass_=pass_, pages=done, mismatches=mismatches, area_pages=area_pages)


def _mix(value: int) -> int:
    # splitmix64's output function, as memcheck_mix in src/user.c.
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def expected_word(pass_: int, page: int, word: int) -> int:
    """What pass ``pass_`` writes to word ``word`` (0..511) of area page ``page``."""
    if not 0 <= word < WORDS_PER_PAGE or not 0 <= page < MEMCHECK_MAX_MIB << 8 or pass_ < 0:
        raise ValueError(f"no memcheck word {word} of page {page} in pass {pass_}")
    return _mix((pass_ << 32 | page << 9 | word) & _MASK)


def expected_page(pass_: int, page: int) -> bytes:
    """The 4096 bytes pass ``pass_`` writes to area page ``page``."""
    expected_word(pass_, page, 0)  # validates the arguments
    key = pass_ << 32 | page << 9
    return _PAGE.pack(*(_mix(key | word) for word in range(WORDS_PER_PAGE)))


def page_gpa(page: int) -> int:
    """The guest-physical address of area page ``page``."""
    return MEMCHECK_BASE + page * PAGE_SIZE


def memory_needed(mib: int) -> int:
    """Bytes of guest RAM the workload needs for an area of ``mib`` MiB."""
    return MEMCHECK_BASE + (mib << 20)


def mismatch_line(page: int, word: int, pass_: int, got: int, want: int) -> str:
    """The reason the guest gives when pass ``pass_`` found ``got`` where it wanted
    ``want`` (it follows ``kasou-guest: fail``)."""
    return f"memcheck: page {page} word {word} pass {pass_}: got {got:#018x} want {want:#018x}"
