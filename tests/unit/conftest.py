"""Fixtures the virtio device tests share: an event loop on its own thread, as a VM's device
loop is, and guest RAM (lazily committed, so its size costs nothing until touched)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kasou.event import EventLoop
from kasou.memory import GuestMemory


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    memory = GuestMemory.create([(0, 64 << 20)])
    yield memory
    memory.close()


@pytest.fixture
def loop(memory: GuestMemory) -> Iterator[EventLoop]:
    """Made after ``memory`` so that it stops first, as a VM's loops stop before its RAM is
    unmapped: a handler still running on the loop may hold views of guest RAM."""
    loop = EventLoop("test-devices")
    loop.start()
    yield loop
    loop.stop()
