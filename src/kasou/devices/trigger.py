"""The interrupt line a device raises: the one thing a device knows about interrupts.

A device model holds a ``Trigger`` and calls ``trigger()`` when its interrupt condition goes
from false to true. What stands behind it (a KVM irqfd write, a counter in a test) is the
wiring's business (``vmm/builder.py``), never the device's. Edge semantics follow from the
irqfd: each call is one pulse on the line, so a device signals a new event, not a level.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Trigger"]


class Trigger(Protocol):
    """One interrupt line, raised by edges."""

    def trigger(self) -> None:
        """Raise one edge on the line (for KVM: write 1 to the line's irqfd)."""
