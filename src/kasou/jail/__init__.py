"""The jailer: ``kasou run --jail`` runs the VMM in namespaces of its own, pivoted into a
per-VM folder, as an unprivileged user without capabilities.

Shape::

    kasou run (supervisor: host namespaces, root)
      │ checks; makes BASE/NAME-PID/{root,sock/N,supervisor}; lends files; links sockets
      │ unshare(CLONE_NEWPID); fork
      ▼
    VMM, PID 1 of a new PID namespace
      PR_SET_PDEATHSIG(SIGKILL); unshare mount, IPC, UTS and (without TAPs) network
      / rprivate; a tmpfs on root/ with, at their host paths: the kernel, initrds and disks
      (bound file by file), the sockets' folders (bound from sock/N), /dev/kvm, /dev/net/tun,
      /dev/urandom, /dev/null (mknod with the host's numbers), a fresh /proc, a tmpfs /tmp,
      and read-only the interpreter, its libraries and kasou
      pivot_root; the old root detached; / read-only; hostname = the VM's name
      before_drop() (opens the TAPs); rlimits; bounding set, groups, gid, uid, capabilities,
      no_new_privs; every fd closed but 0-2 and the TAPs; then the VM (vmm.runner.run)

The supervisor forwards SIGTERM, SIGINT and SIGHUP, exits with the VMM's status, and removes
BASE/NAME-PID. Mounts exist in the child's mount namespace only, so neither end leaves one
on the host. A kill -9 of the VMM: the supervisor cleans up. A kill -9 of the supervisor:
the VMM dies of PDEATHSIG and the next ``kasou run --jail`` on that BASE removes folders
whose supervisor is gone (the pid and its start time, in the folder's ``supervisor`` file).

Files keep their host paths inside the jail, so the VMM's config is not rewritten (qcow2
backing paths keep working). Files the VMM writes (writable disks, a console file) are
lent to the jail id: chowned to it for the run and given back at the end, as Firecracker's
jailer does with the files it puts in its jail. Files it only reads must be readable by the
jail id. /dev/kvm is 0660 root:GID in the jail (the host's node is untouched), so the VMM
opens it after the drop.

Sockets (control socket, vsock, virtio-console) are made inside the jail folder
(``BASE/NAME-PID/sock/N``, bound at the socket's folder in the jail) and reached from the
host through a symbolic link at the path the user gave, removed at the end. So the VMM sees
none of the host folder the socket is in. A consequence: guest-initiated vsock connections
(``UDS_PORT`` listeners a host program makes) must be made in that jail folder.

Not done here: seccomp (``kasou.jail.seccomp``), cgroups (``kasou.resources``).
Layer: stdlib, ``kasou.errors``; ctypes for the calls ``os`` lacks (``_libc``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from kasou.jail._config import DEFAULT_BASE, DEFAULT_ID, JailConfig, JailPlan, check_jail

__all__ = [
    "DEFAULT_BASE",
    "DEFAULT_ID",
    "JailConfig",
    "JailPlan",
    "check_jail",
    "run_jailed",
    "sweep",
]


def run_jailed(
    config: JailConfig,
    plan: JailPlan,
    before_drop: Callable[[], Sequence[int]],
    body: Callable[[], int],
) -> int:
    """Run ``body`` (the VMM) in a jail and return the exit status it ends with; the jail
    folder is gone when this returns. ``before_drop`` runs inside, still root, and returns
    the fds to keep (TAPs). Raises ``KasouError`` (nothing left on the host) when the jail
    cannot be made."""
    from kasou.jail import _jail  # ctypes and the rest: only for a jailed run

    return _jail.run_jailed(config, plan, before_drop, body)


def sweep(base: Path) -> None:
    """Remove the jail folders in ``base`` whose supervisor is gone (after a kill -9)."""
    from kasou.jail import _jail

    _jail.sweep(base)
