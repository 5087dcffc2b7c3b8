"""The one error the nested host raises."""

from __future__ import annotations

from kasou.errors import HostError

__all__ = ["NestedError"]


class NestedError(HostError):
    """The nested host cannot be set up (QEMU, busybox or the kernel missing), did not boot,
    or did not run the command to its end (a timeout); the message says which and what to do.

    ``output`` holds what the command wrote before the run failed, if it started.
    """

    def __init__(self, message: str, *, output: str = "") -> None:
        super().__init__(message)
        self.output = output
