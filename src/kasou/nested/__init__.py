"""A real /dev/kvm for kasou's end-to-end tests: run one command inside a nested host.

On a host whose /dev/kvm cannot boot Linux (PVM here; shared/ENVIRONMENT.md), QEMU's TCG
emulates AMD-V, and a Linux VM started that way loads kvm-amd and offers a real /dev/kvm.
``run_nested(["make", "e2e"])`` boots such a VM (the "outer VM") on Debian's stock kernel,
gives it this host's root file system read-only over 9p with an in-memory overlay on top (same
Python, same checkout, same packages; writes are discarded), runs the command there as root
in the caller's directory, streams its output back, and powers the VM off::

    from kasou.nested import run_nested

    result = run_nested(["ls", "-l", "/dev/kvm"])  # about 5 s here, most of it booting
    result.status, result.output                   # 0, "crw------- 1 root root 10, 232 ..."

Host folders given as ``shares`` are mounted writable at their own paths, for results.
The nested host has no network; each of ``forwards`` (``parse_forward("8080:80")``) lets
this host's 127.0.0.1:8080 reach its port 80, and nothing else in or out.

``prepare()`` builds the outer kernel and initramfs once (cached under
``$KASOU_CACHE_DIR/nested``); ``nested_available()`` says whether this host can do it at all.
The package knows nothing of kasou's VMM: it is a test harness that runs any command.
"""

from __future__ import annotations

from pathlib import Path

from kasou.nested._errors import NestedError
from kasou.nested._image import STOCK_BZIMAGE, prepare
from kasou.nested._network import Forward, parse_forward
from kasou.nested._run import NestedResult, nested_available, run_nested

__all__ = [
    "Forward",
    "NestedError",
    "NestedResult",
    "nested_available",
    "parse_forward",
    "prepare",
    "run_nested",
    "stock_bzimage",
]


def stock_bzimage() -> Path:
    """Debian's stock kernel (the bzImage the outer VM's kernel comes from), cached."""
    return prepare() / STOCK_BZIMAGE
