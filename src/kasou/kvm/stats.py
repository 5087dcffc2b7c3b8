"""KVM's own counters: the binary statistics of a VM or vCPU fd (KVM_GET_STATS_FD).

KVM counts what it handles without user space: every VM exit, halts, external interrupts,
page faults, emulated instructions. ``KVM_GET_STATS_FD`` on a VM or vCPU fd returns a
read-only fd whose contents are laid out as Documentation/virt/kvm/api.rst, section
"KVM_GET_STATS_FD", draws them (all fields in host byte order)::

    0             struct kvm_stats_header: u32 flags, name_size, num_desc,
                  id_offset, desc_offset, data_offset
    id_offset     the id string ("kvm-PID/vcpu-N"), name_size bytes, NUL padded
    desc_offset   num_desc descriptors, each a struct kvm_stats_desc (u32 flags, s16 exponent,
                  u16 size, u32 offset, u32 bucket_size: 16 bytes) followed by its name,
                  name_size bytes with a terminating NUL
    data_offset   the values: u64 each, ``size`` of them at ``offset`` bytes into this block
                  (one for a counter, one per bucket for a histogram)

The header and the descriptors never change for the fd's life; the values do. ``KvmStats``
reads the descriptors once, on first use (so opening one costs a vCPU's start nothing but an
ioctl), and every later ``read`` is one ``pread`` of the data block. ``exit_counts`` picks the
exit counters out of a vCPU's values.

The layout comes from the kernel, but it is parsed as if it did not: sizes and counts are
bounded, a descriptor whose name is not terminated inside its field, whose values lie past
the data block or that repeats a name is skipped, and a header that cannot be right raises
``HostError``. A kernel without binary statistics (before 5.14) gives ``open_stats`` None.

This module does not decide what kasou reports; ``vmm/vm.py`` does (``status``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from kasou.errors import HostError, KvmError
from kasou.kvm import bindings as b

__all__ = [
    "KvmStats",
    "StatsDescriptor",
    "StatsLayout",
    "StatsSample",
    "exit_counts",
    "open_stats",
    "parse_layout",
]

log = logging.getLogger(__name__)

# Bounds on what a header may claim. The kernel's names are 48 bytes (KVM_STATS_NAME_SIZE)
# and a vCPU has about 60 statistics; these leave room for kernels to come.
MAX_NAME_SIZE = 1024
MAX_DESCRIPTORS = 4096
MAX_DATA_SIZE = 1 << 20

_HEADER_SIZE = ctypes.sizeof(b.KvmStatsHeader)
_DESC_SIZE = ctypes.sizeof(b.KvmStatsDesc)
_WORD = 8  # every value is a u64
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# KVM's vCPU counters that count exits or work done in the kernel on one, by the reason kasou
# reports; any other ``*_exits`` counter is reported under its prefix. They overlap: a signal
# exit follows another exit, an emulated instruction or a page fault is handled inside one.
_EXIT_COUNTERS = {
    "exits": "all",
    "hypercalls": "hypercall",
    "insn_emulation": "emulation",
    "pf_taken": "page_fault",
}


class StatsDescriptor(NamedTuple):
    """One statistic: its name, its ``kind`` (``KVM_STATS_TYPE_*``), ``unit``
    (``KVM_STATS_UNIT_*``) and ``base`` (``KVM_STATS_BASE_*``), the value's scale
    (``base ** exponent`` units), how many u64 it has (``size``) at which byte ``offset``
    of the data block, and a linear histogram's ``bucket_size``."""

    name: str
    kind: int
    unit: int
    base: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def histogram(self) -> bool:
        return self.kind in (b.KVM_STATS_TYPE_LINEAR_HIST, b.KVM_STATS_TYPE_LOG_HIST)


class StatsSample(NamedTuple):
    """One read: single values by name, and histograms (a tuple of buckets) by name."""

    values: dict[str, int]
    histograms: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class StatsLayout:
    """A stats fd's header and descriptors: where ``read`` finds each value."""

    id: str
    descriptors: tuple[StatsDescriptor, ...]
    data_offset: int
    data_size: int  # bytes: up to the end of the last descriptor's values

    def decode(self, data: bytes) -> StatsSample:
        """The values in ``data`` (the data block, or its start if the read came back
        short: statistics past its end are left out)."""
        words = memoryview(data)[: len(data) - len(data) % _WORD].cast("Q")
        available = len(words)
        values: dict[str, int] = {}
        histograms: dict[str, tuple[int, ...]] = {}
        for descriptor in self.descriptors:
            first = descriptor.offset // _WORD
            if first + descriptor.size > available:
                continue
            if descriptor.histogram:
                histograms[descriptor.name] = tuple(words[first : first + descriptor.size])
            elif descriptor.size == 1:
                values[descriptor.name] = words[first]
            else:  # a kind this module does not know, with several values: keep them all
                histograms[descriptor.name] = tuple(words[first : first + descriptor.size])
        words.release()
        return StatsSample(values, histograms)


def parse_layout(read: Callable[[int, int], bytes]) -> StatsLayout:
    """The layout of a stats file, read through ``read(offset, length)`` (``os.pread`` on the
    fd, or a slice of captured bytes). Raises ``HostError`` for a header that cannot be right;
    skips descriptors that are not (see the module docstring)."""
    header_bytes = read(0, _HEADER_SIZE)
    if len(header_bytes) < _HEADER_SIZE:
        raise _malformed(f"the header is {len(header_bytes)} bytes, not {_HEADER_SIZE}")
    header = b.KvmStatsHeader.from_buffer_copy(header_bytes)
    name_size, count = header.name_size, header.num_desc
    if not 0 < name_size <= MAX_NAME_SIZE:
        raise _malformed(f"a name size of {name_size} bytes")
    if count > MAX_DESCRIPTORS:
        raise _malformed(f"{count} statistics (at most {MAX_DESCRIPTORS} are read)")
    stride = _DESC_SIZE + name_size
    table = read(header.desc_offset, count * stride) if count else b""
    identity = read(header.id_offset, name_size).split(b"\0", 1)[0]

    descriptors: list[StatsDescriptor] = []
    seen: set[str] = set()
    for index in range(count):
        start = index * stride
        if start + stride > len(table):
            log.debug("KVM statistic %d lies past the end of the file", index)
            break  # the rest lie further still
        descriptor = _descriptor(table, start, name_size)
        if descriptor is None or descriptor.name in seen:
            log.debug("KVM statistic %d skipped: malformed or repeated", index)
            continue
        seen.add(descriptor.name)
        descriptors.append(descriptor)
    data_size = max((d.offset + d.size * _WORD for d in descriptors), default=0)
    return StatsLayout(
        id=identity.decode("ascii", "replace"),
        descriptors=tuple(descriptors),
        data_offset=header.data_offset,
        data_size=data_size,
    )


def _descriptor(table: bytes, start: int, name_size: int) -> StatsDescriptor | None:
    """The descriptor at ``start`` of the descriptor block, or None if it is not usable."""
    raw = b.KvmStatsDesc.from_buffer_copy(table, start)
    field = table[start + _DESC_SIZE : start + _DESC_SIZE + name_size]
    end = field.find(b"\0")
    if end <= 0:  # no terminating NUL inside the field (the name runs on), or an empty name
        return None
    name = field[:end].decode("ascii", "replace")
    if not _NAME.fullmatch(name):
        return None
    if raw.size == 0 or raw.offset % _WORD or raw.offset + raw.size * _WORD > MAX_DATA_SIZE:
        return None
    return StatsDescriptor(
        name=name,
        kind=raw.flags & b.KVM_STATS_TYPE_MASK,
        unit=raw.flags & b.KVM_STATS_UNIT_MASK,
        base=raw.flags & b.KVM_STATS_BASE_MASK,
        exponent=raw.exponent,
        size=raw.size,
        offset=raw.offset,
        bucket_size=raw.bucket_size,
    )


def _malformed(detail: str) -> HostError:
    return HostError(
        f"KVM's binary statistics are malformed ({detail}): kasou reports no KVM counters "
        "for this VM; the VM itself is not affected"
    )


class KvmStats:
    """An open stats fd (owned: ``close`` closes it) and its layout, parsed on first read.

    Reading is safe from any thread and while the vCPU runs: it is a ``pread`` of a file the
    kernel fills, and takes no vCPU lock."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._layout: StatsLayout | HostError | None = None

    @property
    def layout(self) -> StatsLayout:
        """The header and descriptors (read once). Raises ``HostError`` if malformed, the
        same error on every later call."""
        if self._layout is None:
            fd = self.fd
            try:
                self._layout = parse_layout(lambda offset, length: os.pread(fd, length, offset))
            except HostError as error:
                self._layout = error
        if isinstance(self._layout, HostError):
            raise self._layout
        return self._layout

    def read(self) -> StatsSample:
        """Every statistic's current value: one ``pread`` of the data block. Raises
        ``HostError`` (a malformed layout) or ``OSError`` (a closed fd)."""
        layout = self.layout
        return layout.decode(os.pread(self.fd, layout.data_size, layout.data_offset))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _HasStatsFd(Protocol):
    def get_stats_fd(self) -> int: ...


def open_stats(owner: _HasStatsFd) -> KvmStats | None:
    """The statistics of ``owner`` (a ``VmFd`` or a ``VcpuFd`` that has not run yet), or None
    when this kernel has no binary statistics (the ioctl is unknown to it)."""
    try:
        return KvmStats(owner.get_stats_fd())
    except KvmError as error:
        if error.errno in (errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
            return None
        raise


def exit_counts(values: Mapping[str, int]) -> dict[str, int]:
    """The exit counters among a vCPU's ``values``, by reason: ``all`` (every VM exit),
    ``io``, ``mmio``, ``halt``, ``irq``, ``signal``, ``irq_window``, ... (KVM's ``*_exits``),
    ``hypercall``, ``emulation`` (instructions emulated) and ``page_fault``. The reasons
    overlap and do not add up to ``all``."""
    counts: dict[str, int] = {}
    for name, value in values.items():
        reason = _EXIT_COUNTERS.get(name)
        if reason is None and name.endswith("_exits"):
            reason = name.removesuffix("_exits")
        if reason is not None:
            counts[reason] = value
    return counts
