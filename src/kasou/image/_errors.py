"""The error the default-guest builder raises."""

from __future__ import annotations

from kasou.errors import KasouError

__all__ = ["ImageBuildError"]


class ImageBuildError(KasouError):
    """The default guest is missing, out of date, or could not be built.

    A failed build step's message ends with the last lines of its log and the log's path.
    """
