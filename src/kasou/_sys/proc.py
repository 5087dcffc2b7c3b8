"""What /proc says about a process's memory."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["resident_bytes"]


def resident_bytes(pid: int | str = "self", skip: Callable[[int, int], bool] | None = None) -> int:
    """Resident bytes of process ``pid``, leaving out each mapping ``[low, high)`` for which
    ``skip(low, high)`` is true (e.g. guest RAM), from /proc/PID/smaps."""
    total, skipping = 0, False
    with open(f"/proc/{pid}/smaps", encoding="ascii", errors="replace") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                low, high = (int(part, 16) for part in first.split("-"))
                skipping = skip is not None and skip(low, high)
            elif first == "Rss:" and not skipping:
                total += int(line.split()[1]) * 1024
    return total
