"""The one error the disk package raises."""

from __future__ import annotations

from kasou.errors import GuestError

__all__ = ["DiskError"]


class DiskError(GuestError):
    """A disk image that cannot be used as asked, or a request it cannot serve.

    A ``GuestError``: the image given for the guest is at fault (corrupt, truncated, an
    unsupported qcow2 feature, a backing chain that loops), or the request is (a read or write
    past the disk's end, a write to a read-only disk). The message names the image and the
    problem, and says what to do where there is something to do. Host I/O failures are left
    as ``OSError``.
    """
