"""kasou's exceptions: one root, subclasses by meaning.

::

    KasouError                  anything kasou raises on purpose
    ├── ConfigError             the user asked for something invalid; names the field and the fix
    ├── HostError               the host cannot do it: no /dev/kvm, a missing capability, no memory
    │   └── KvmError            an ioctl failed; carries the ioctl name and errno
    ├── GuestError              the guest did something wrong or its image is unusable
    │   ├── GuestMemoryError    an access outside guest RAM
    │   └── ImageError          a kernel or initrd that cannot be loaded
    ├── LifecycleError          an action in the wrong VM state; names current and wanted state
    ├── SnapshotError           a snapshot cannot be written or read back
    ├── MigrationError          a migration failed
    └── DaemonError             a request to the host daemon (kasoud) cannot be met
        ├── NotFoundError       no VM, operation or backup by that name
        ├── ConflictError       the name is taken
        ├── SpecError           a VM spec kasou cannot run; names the field
        └── StateError          the action does not fit the VM's state (the daemon's view)

Every message says what happened and what to do about it. Causes are chained with ``from``.
Front ends turn a ``KasouError`` into a one-line message and exit status 2.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "DaemonError",
    "GuestError",
    "GuestMemoryError",
    "HostError",
    "ImageError",
    "KasouError",
    "KvmError",
    "LifecycleError",
    "MigrationError",
    "NotFoundError",
    "SnapshotError",
    "SpecError",
    "StateError",
]


class KasouError(Exception):
    """The root of every error kasou raises on purpose."""


class ConfigError(KasouError):
    """An invalid configuration value.

    ``field`` names the offending setting (as the user wrote it, e.g. ``memory``), so front
    ends can point at it.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class HostError(KasouError):
    """The host lacks something kasou needs (a device, a capability, memory)."""


class KvmError(HostError):
    """A KVM ioctl failed with ``errno``."""

    def __init__(self, call: str, errno: int, message: str = "") -> None:
        import os

        detail = f": {message}" if message else ""
        super().__init__(f"{call} failed: {os.strerror(errno)} (errno {errno}){detail}")
        self.call = call
        self.errno = errno


class GuestError(KasouError):
    """The guest, or an image given for it, is at fault."""


class GuestMemoryError(GuestError):
    """An access to guest-physical memory that is not guest RAM."""


class ImageError(GuestError):
    """A kernel, initrd or other boot image that cannot be used."""


class LifecycleError(KasouError):
    """An action asked of a VM in a state that does not allow it."""

    def __init__(self, current: str, wanted: str, action: str = "") -> None:
        what = f"cannot {action}: " if action else ""
        super().__init__(f"{what}the VM is {current}, it must be {wanted}")
        self.current = current
        self.wanted = wanted


class SnapshotError(KasouError):
    """A snapshot cannot be written, or one read back is invalid."""


class MigrationError(KasouError):
    """A live migration failed."""


class DaemonError(KasouError):
    """A request to the host daemon cannot be met; each subclass maps to one API problem type
    (``kasou.spec.ProblemType``)."""


class NotFoundError(DaemonError):
    """No VM, operation or backup goes by that name."""


class ConflictError(DaemonError):
    """The name is already taken."""


class SpecError(DaemonError):
    """A VM spec that kasou cannot run (a missing file, memory beyond the host)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StateError(DaemonError):
    """An action that does not fit the VM's current state."""

    def __init__(self, name: str, state: str, action: str, wanted: str) -> None:
        super().__init__(f"cannot {action} {name}: it is {state}, it must be {wanted}")
        self.state = state
