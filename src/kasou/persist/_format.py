"""What every kasou.persist encoding shares: the format version and the error for bad input.

The version numbers the encoding (section files, state maps, migration frames), not kasou's
release: a kasou reads every version from ``MIN_FORMAT_VERSION`` to ``FORMAT_VERSION``.
"""

from __future__ import annotations

from kasou.errors import SnapshotError

__all__ = ["FORMAT_VERSION", "MIN_FORMAT_VERSION", "SnapshotFormatError", "check_version"]

FORMAT_VERSION: int = 1
MIN_FORMAT_VERSION: int = 1


class SnapshotFormatError(SnapshotError):
    """Snapshot or migration data that is malformed, corrupt or of an unsupported version."""


def check_version(version: int, *, where: str, wrote: str, fix: str) -> None:
    """Refuse ``version`` unless this kasou reads it; ``wrote`` says who wrote it and in what
    ("written by snapshot format"), ``fix`` what to do instead."""
    if not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
        raise SnapshotFormatError(
            f"{where}: {wrote} version {version}; this kasou reads versions "
            f"{MIN_FORMAT_VERSION} to {FORMAT_VERSION}: {fix}"
        )
