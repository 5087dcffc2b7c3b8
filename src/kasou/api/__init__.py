"""Clients of kasou's control interfaces (the SDK side of the control socket)."""

from kasou.api.client import ControlClient

__all__ = ["ControlClient"]
