"""How a build reports progress to a front end, without the builder knowing the front end."""

from __future__ import annotations

import logging
from typing import Protocol

__all__ = ["LogProgress", "Progress"]

_log = logging.getLogger("kasou.image")


class Progress(Protocol):
    """Receives a build's progress. The CLI implements it with a progress bar.

    ``step`` starts a named step ("building the kernel"); ``advance`` says how much of the
    current step is done, as a fraction from 0.0 to 1.0 (it only grows within a step).
    """

    def step(self, name: str) -> None: ...

    def advance(self, fraction: float) -> None: ...


class LogProgress:
    """The progress sink used when the caller gives none: each step is logged at INFO."""

    def step(self, name: str) -> None:
        _log.info("%s", name)

    def advance(self, fraction: float) -> None:
        pass
