"""The guest kit's memcheck workload on /dev/kvm: it makes progress, the host's mirror of what it
writes matches guest RAM, and it does fail when a word changes behind its back.

These are the checker's own tests; the snapshot, restore, clone and migration tests lean on
it to show that guest memory and the guest's progress come through exactly.
"""

from __future__ import annotations

import time

from kasou.guestkit import FAIL_PREFIX
from kasou.guestkit.memcheck import (
    PAGE_SIZE,
    WORDS_PER_PAGE,
    expected_page,
    expected_word,
    memory_needed,
    mismatch_line,
    page_gpa,
    read_status,
)
from kasou.vmm import ExitKind

from .conftest import Booted, BootFactory

READY = "memcheck: ready base=0x1000000 mib="


def _pass_line(number: int) -> str:
    return f"memcheck: pass {number}\n"


def _boot_and_wait(boot: BootFactory, passes: int, **args: int) -> Booted:
    """Boots memcheck and waits until ``passes`` whole passes are done (``report`` is 1)."""
    vm = boot("memcheck", report=1, **args)
    vm.console.wait_for(READY)
    vm.console.wait_for(_pass_line(passes))
    return vm


def test_passes_grow_while_running_and_stop_while_paused(boot: BootFactory) -> None:
    vm = boot("memcheck")
    vm.console.wait_for(f"{READY}16\n")
    vm.console.wait_for(_pass_line(16))  # every 16th pass is reported by default
    vm.pause()
    first = read_status(vm.vm.memory)
    assert first.area_pages == 16 * 256
    assert first.passes_done >= 16
    assert first.mismatches == 0
    assert read_status(vm.vm.memory) == first  # paused: nothing moves
    vm.resume()

    later = (first.passes_done // 16 + 2) * 16
    vm.console.wait_for(_pass_line(later))
    vm.pause()
    second = read_status(vm.vm.memory)
    assert second.passes_done >= later
    assert second.pages > first.pages
    assert second.mismatches == 0
    vm.resume()


def test_host_mirror_matches_guest_ram_while_paused(boot: BootFactory) -> None:
    vm = _boot_and_wait(boot, passes=2, mib=4)
    vm.pause()
    status = read_status(vm.vm.memory)
    position = status.pages % status.area_pages
    checked = 0
    around = {position - 1, position + 1, status.area_pages - 1}
    for page in sorted(around | set(range(0, status.area_pages, 64))):
        if not 0 <= page < status.area_pages or page == position:
            continue  # outside the area, or the page under way (checked below)
        pass_ = status.page_pass(page)
        assert pass_ is not None
        held = vm.vm.memory.read(page_gpa(page), PAGE_SIZE)
        assert held == expected_page(pass_, page), f"page {page} of pass {pass_}"
        assert held != expected_page(pass_ + 1, page)  # the mirror tells passes apart
        checked += 1
    assert checked >= 16

    # The page under way holds the new pass's words up to some word, the old pass's after.
    new, old = status.pages // status.area_pages, status.pages // status.area_pages - 1
    held_words = [
        vm.vm.memory.read_int(page_gpa(position) + 8 * word, 8) for word in range(WORDS_PER_PAGE)
    ]
    sources = [
        new if value == expected_word(new, position, word) else old
        for word, value in enumerate(held_words)
        if value in (expected_word(new, position, word), expected_word(old, position, word))
    ]
    assert len(sources) == WORDS_PER_PAGE, "a word of the page under way is from neither pass"
    assert sources == sorted(sources, reverse=True)

    vm.resume()  # and the guest, which checks every word, finds nothing wrong either
    vm.console.wait_for(_pass_line(status.passes_done + 2))
    assert FAIL_PREFIX not in vm.console.text


def test_a_word_changed_by_the_host_is_reported_and_ends_the_run(boot: BootFactory) -> None:
    vm = _boot_and_wait(boot, passes=2, mib=4)
    vm.pause()
    status = read_status(vm.vm.memory)
    position = status.pages % status.area_pages
    page = (position + status.area_pages // 2) % status.area_pages
    word = 77
    holds = status.page_pass(page)
    assert holds is not None
    gpa = page_gpa(page) + 8 * word
    want = expected_word(holds, page, word)
    assert vm.vm.memory.read_int(gpa, 8) == want
    bad = want ^ (1 << 13)
    vm.vm.memory.write_int(gpa, 8, bad)
    vm.resume()

    # The pass after the one that wrote the page checks it.
    reason = mismatch_line(page, word, holds + 1, bad, want)
    vm.console.wait_for(f"{FAIL_PREFIX}{reason}\n")
    assert vm.wait().kind is ExitKind.REBOOT  # the guest kit ends a failed run with a reset
    assert read_status(vm.vm.memory).mismatches == 1


def test_rate_caps_pages_per_millisecond(boot: BootFactory) -> None:
    # 1 MiB, 256 pages, at 2 pages per 1 ms tick: four passes take at least 511 ticks.
    vm = boot("memcheck", mib=1, rate=2, report=1)
    vm.console.wait_for(READY)
    start = time.monotonic()
    vm.console.wait_for(_pass_line(4))
    elapsed = time.monotonic() - start
    vm.pause()
    status = read_status(vm.vm.memory)
    vm.resume()
    assert status.passes_done >= 4
    # Without the cap the four passes take about a millisecond.
    assert elapsed >= 0.4, f"4 passes of 256 pages at 2 pages/ms took {elapsed:.3f} s"


def test_too_little_ram_for_the_area_fails_with_what_to_give(boot: BootFactory) -> None:
    vm = boot("memcheck", memory=24 << 20, mib=16)
    needed = memory_needed(16) >> 20
    text = vm.console.wait_for(
        f"{FAIL_PREFIX}memcheck: no RAM in 0x1000000+16 MiB: give the VM at least {needed} MiB\n"
    )
    assert vm.wait().kind is ExitKind.REBOOT
    assert READY not in text
