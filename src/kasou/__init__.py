"""kasou (仮想, "virtual"): a virtual machine monitor in Python on Linux KVM.

The package's public surface is small on purpose: the error hierarchy here, the
`kasou.vmm` entry points (`VmConfig`, `build_vm`), and kasoud's SDK (`kasou.Client`,
`kasou.AsyncClient`, `kasou.Sandbox`), imported on first use so that `import kasou` (and
`kasou run`) does not pay for httpx and pydantic. Everything else is an implementation
layer; see shared/DESIGN.md for the map.
"""

import importlib
import logging
from typing import TYPE_CHECKING

from kasou.errors import (
    ConfigError,
    GuestError,
    HostError,
    KasouError,
    LifecycleError,
    MigrationError,
    SnapshotError,
)

if TYPE_CHECKING:
    from kasou.sdk import AsyncClient, AsyncSandbox, Client, Sandbox

__all__ = [
    "AsyncClient",
    "AsyncSandbox",
    "Client",
    "ConfigError",
    "GuestError",
    "HostError",
    "KasouError",
    "LifecycleError",
    "MigrationError",
    "Sandbox",
    "SnapshotError",
]
__version__ = "0.1.0"

logging.getLogger("kasou").addHandler(logging.NullHandler())

_LAZY = {
    "AsyncClient": "kasou.sdk",
    "AsyncSandbox": "kasou.sdk",
    "Client": "kasou.sdk",
    "Sandbox": "kasou.sdk",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
