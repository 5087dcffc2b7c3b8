"""The Python SDK: clients of a VM's control socket and of its guest agent over vsock.

Front ends (cli/, later api/ and web/) use it; it never imports the VMM. The agent's client and
``kasou cp``'s engine are imported on first use (tens of milliseconds that ``kasou status``
need not pay).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kasou.client.control import ControlClient

if TYPE_CHECKING:
    from kasou.client.agent import (
        AgentSession,
        AgentUnavailableError,
        connect_vsock,
        open_session,
    )
    from kasou.client.copy import CopyError, copy_from_guest, copy_to_guest

__all__ = [
    "AgentSession",
    "AgentUnavailableError",
    "ControlClient",
    "CopyError",
    "connect_vsock",
    "copy_from_guest",
    "copy_to_guest",
    "open_session",
]

_LAZY = {
    "AgentSession": "kasou.client.agent",
    "AgentUnavailableError": "kasou.client.agent",
    "connect_vsock": "kasou.client.agent",
    "open_session": "kasou.client.agent",
    "CopyError": "kasou.client.copy",
    "copy_from_guest": "kasou.client.copy",
    "copy_to_guest": "kasou.client.copy",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
