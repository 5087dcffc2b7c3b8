"""kasou (仮想, "virtual"): a virtual machine monitor in Python on Linux KVM.

The package's public surface is small on purpose: the error hierarchy here, and the
`kasou.vmm` entry points (`VmConfig`, `build_vm`). Everything else is an implementation
layer; see shared/DESIGN.md for the map.
"""

import logging

from kasou.errors import (
    ConfigError,
    GuestError,
    HostError,
    KasouError,
    LifecycleError,
    MigrationError,
    SnapshotError,
)

__all__ = [
    "ConfigError",
    "GuestError",
    "HostError",
    "KasouError",
    "LifecycleError",
    "MigrationError",
    "SnapshotError",
]
__version__ = "0.1.0"

logging.getLogger("kasou").addHandler(logging.NullHandler())
