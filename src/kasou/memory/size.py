"""Memory sizes as users write them ("512M", "2G") and as the host has them."""

from __future__ import annotations

import re

__all__ = ["format_size", "host_memory_bytes", "parse_size"]

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Return the number of bytes in ``text``: a plain byte count or a count with a binary
    unit suffix (K, M, G, T; "MiB" and "MB" read the same). Raises ``ValueError`` with the
    accepted forms."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text}")
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size: write it like 512M, 2G or 1073741824")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def format_size(size: int) -> str:
    """The shortest exact form of ``size`` with a binary unit ("512M", "1536K")."""
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def host_memory_bytes() -> int:
    """The host's physical memory (MemTotal in /proc/meminfo)."""
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal missing from /proc/meminfo")
