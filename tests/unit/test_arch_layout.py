"""The x86-64 guest-physical memory map: RAM regions, e820 map, boot areas, MMIO windows."""

from __future__ import annotations

import itertools

import pytest

from kasou.arch.x86_64 import layout
from kasou.arch.x86_64.layout import e820_map, ram_layout, virtio_mmio_address
from kasou.errors import ConfigError
from kasou.loader import bootparams

MiB = 1 << 20
GiB = 1 << 30


def test_small_guest_is_one_region_from_zero() -> None:
    assert ram_layout(512 * MiB) == [(0, 512 * MiB)]
    assert ram_layout(3 * GiB) == [(0, 3 * GiB)]


def test_large_guest_continues_above_4g() -> None:
    assert ram_layout(4 * GiB) == [(0, 3 * GiB), (4 * GiB, 1 * GiB)]
    assert ram_layout(16 * GiB) == [(0, 3 * GiB), (4 * GiB, 13 * GiB)]


@pytest.mark.parametrize("size", [8 * MiB, 16 * MiB + 1, 2 << 40, 0])
def test_sizes_kasou_cannot_lay_out(size: int) -> None:
    with pytest.raises(ConfigError) as error:
        ram_layout(size)
    assert error.value.field == "memory"


def test_e820_map_reserves_the_ebda_to_1mib() -> None:
    assert e820_map(ram_layout(64 * MiB)) == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x100000 - 0x9FC00, 2),
        (0x100000, 63 * MiB, 1),
    ]
    high = e820_map(ram_layout(5 * GiB))
    assert high[-2:] == [(0x100000, 3 * GiB - MiB, 1), (4 * GiB, 2 * GiB, 1)]


def test_e820_types_match_the_loaders() -> None:
    assert (layout.E820_RAM, layout.E820_RESERVED) == (
        bootparams.E820_RAM,
        bootparams.E820_RESERVED,
    )


def test_boot_areas_are_disjoint_below_1mib_and_inside_the_smallest_guest() -> None:
    areas = sorted(layout.BOOT_AREAS, key=lambda area: area[1])
    for (name, start, size), (other, next_start, _) in itertools.pairwise(areas):
        assert start + size <= next_start, f"{name} overlaps {other}"
    assert all(start >= 0x500 and start + size <= 0x100000 for _, start, size in areas)
    low_ram = ram_layout(layout.MIN_MEMORY)[0]
    assert all(start + size <= low_ram[1] for _, start, size in areas)
    # The MP table is where Linux scans for it (the last KiB below 640 KiB) and reserved.
    assert 639 * 1024 <= layout.MPTABLE < 640 * 1024
    assert layout.EBDA_START <= layout.MPTABLE
    # Page tables: PML4, PDPT, then four PDs in a row, matching the named addresses.
    assert (layout.PDPT, layout.PD) == (layout.PML4 + 0x1000, layout.PML4 + 0x2000)
    assert layout.PD + 4 * 0x1000 <= layout.PAGE_TABLES + layout.PAGE_TABLES_SIZE


def test_device_windows_sit_in_the_mmio_hole_without_overlap() -> None:
    windows = [
        (virtio_mmio_address(0), layout.VIRTIO_MMIO_SLOTS * layout.VIRTIO_MMIO_SIZE),
        (layout.IOAPIC_ADDRESS, layout.IOAPIC_SIZE),
        (layout.LAPIC_ADDRESS, layout.LAPIC_SIZE),
        (layout.KVM_IDENTITY_MAP, 0x1000),
        (layout.KVM_TSS, layout.KVM_TSS_SIZE),
    ]
    windows.sort()
    for (start, size), (next_start, _) in itertools.pairwise(windows):
        assert start + size <= next_start
    assert all(
        start >= layout.MMIO_HOLE_START and start + size <= layout.MMIO_HOLE_END
        for start, size in windows
    )
    assert virtio_mmio_address(1) - virtio_mmio_address(0) == layout.VIRTIO_MMIO_SIZE
    with pytest.raises(ValueError, match="slot"):
        virtio_mmio_address(layout.VIRTIO_MMIO_SLOTS)


def test_virtio_irqs_avoid_legacy_lines() -> None:
    legacy = {layout.IRQ_PIT, layout.IRQ_I8042, layout.IRQ_COM1, layout.IRQ_COM2, layout.IRQ_RTC}
    assert not legacy & set(layout.VIRTIO_IRQS)
    assert all(irq < layout.IOAPIC_PINS for irq in layout.VIRTIO_IRQS)
    assert len(layout.VIRTIO_IRQS) >= 16
