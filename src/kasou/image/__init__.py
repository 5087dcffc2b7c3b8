"""kasou's default guest: a minimal Linux built from Debian packages alone, kept in a cache.

What it is: a kernel from ``linux-source-6.1`` configured by ``kernel.config`` (virtio-mmio
built in, ACPI, no modules, no PCI), an initramfs of busybox plus kasou's guest agent, and
an ext4 root disk with the same user space. ``default_guest()`` returns the cached paths,
building what is missing or out of date; ``build()`` rebuilds on demand (``kasou image
build``). The host side of the agent's protocol is in ``kasou.agent.protocol``.

``debian_image()`` and ``build_debian()`` do the same for a Debian 12 image shaped like Debian's
cloud images (``_debian``): a qcow2 disk with the stock cloud kernel and initramfs beside it.

This package builds files; it does not boot them (``kasou.loader`` and ``kasou.vmm`` do) and
does not draw progress (front ends pass a ``Progress``).

Booting the guest: ``DefaultGuest.cmdline`` is for the kernel with the initramfs. To boot the
root disk instead, give it as the first virtio-blk disk with ``root=/dev/vda rw`` added (and no
initrd). Either way busybox init starts the agent on COM2 and a root shell on COM1; ``poweroff``
in the guest writes kasou's power-off register (``kasou.agent.protocol.POWEROFF_PORT``), ``reboot``
resets through the i8042, and the ACPI power button (``kasou shutdown``) makes the kernel signal
init to power off the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kasou.image._cache import cache_dir
from kasou.image._errors import ImageBuildError
from kasou.image._progress import Progress

if TYPE_CHECKING:  # the builders themselves are imported when first needed
    from kasou.image import _kernel, _userland
    from kasou.image._debian import DebianImage

__all__ = [
    "CMDLINE",
    "ROOT_ON_DISK",
    "DebianImage",
    "DefaultGuest",
    "ImageBuildError",
    "Progress",
    "build",
    "build_debian",
    "cache_dir",
    "debian_image",
    "default_guest",
]

# ``quiet``: every byte the kernel logs is two exits to the VMM (an LSR poll and a THR write),
# about 20,000 for a boot log; keeping the log to warnings takes a visible share off boot
# time. Drop it (kasou run --cmdline) to see the whole log.
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"
"""The default guest's kernel command line: the console on COM1; reboot through the keyboard
controller (kasou's FADT has no reset register); on a panic, reboot at once so the VMM sees the
guest end."""


ROOT_ON_DISK = "root=/dev/vda rw"
"""Added to ``CMDLINE`` when the root disk is /dev/vda rather than the initramfs."""


@dataclass(frozen=True)
class DefaultGuest:
    kernel: Path
    """vmlinux (ELF, with a PVH note, so QEMU -M microvm boots the same file)."""
    bzimage: Path
    """arch/x86/boot/bzImage of the same build."""
    initrd: Path
    """The initramfs, a gzipped newc cpio."""
    rootfs: Path
    """The ext4 root disk image. Shared by every user of the cache: copy it before writing."""
    cmdline: str
    """The command line the guest wants (booted with the initramfs)."""

    @property
    def disk_cmdline(self) -> str:
        """The command line for booting the root disk as the first virtio-blk disk."""
        return f"{self.cmdline} {ROOT_ON_DISK}"


def default_guest(build: bool = True, progress: Progress | None = None) -> DefaultGuest:
    """The cached default guest. What is missing or out of date is built when ``build`` is
    true; otherwise ``ImageBuildError`` says to run ``kasou image build``."""
    from kasou.image import _kernel, _userland

    kernel, kernel_why = _kernel.find_kernel()
    userland, userland_why = _userland.find_userland()
    if kernel is not None and userland is not None:
        return _assemble(kernel, userland)
    if not build:
        why = "out of date" if "out of date" in (kernel_why, userland_why) else "not built"
        raise ImageBuildError(f"the default guest is {why}: run `kasou image build`")
    return _build(force=False, progress=progress)


def build(force: bool = False, progress: Progress | None = None) -> DefaultGuest:
    """Build the default guest into the cache: only what is missing or out of date, or all of
    it with ``force``. Raises ImageBuildError if a step fails (with its log's tail and path)."""
    return _build(force=force, progress=progress)


def debian_image(build: bool = True, progress: Progress | None = None) -> DebianImage:
    """The cached Debian 12 image, built first if it is missing or out of date and ``build``
    is true; otherwise ``ImageBuildError`` says what to run. (Imported when first needed:
    ``kasou.image`` is on the start path of every default-guest boot.)"""
    from kasou.image import _debian

    return _debian.debian_image(build, progress)


def __getattr__(name: str) -> object:
    if name == "DebianImage":
        from kasou.image._debian import DebianImage

        return DebianImage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_debian(force: bool = False, progress: Progress | None = None) -> DebianImage:
    """Build the Debian 12 image (``kasou image build --distro debian-12``): only if it is
    missing or out of date, or again with ``force``. Needs root. Raises ImageBuildError if a
    step fails (with its log's tail and path)."""
    from kasou.image import _debian

    return _debian.build_debian(progress, force=force)


def _build(force: bool, progress: Progress | None) -> DefaultGuest:
    from kasou.image import _cache, _kernel, _userland
    from kasou.image._progress import LogProgress

    sink: Progress = progress if progress is not None else LogProgress()
    with _cache.build_lock():
        # Found again under the lock: another process may have built it meanwhile.
        kernel = None if force else _kernel.find_kernel()[0]
        if kernel is None:
            kernel = _kernel.build_kernel(sink)
        userland = None if force else _userland.find_userland()[0]
        if userland is None:
            userland = _userland.build_userland(sink)
    return _assemble(kernel, userland)


def _assemble(kernel: _kernel.Kernel, userland: _userland.Userland) -> DefaultGuest:
    return DefaultGuest(
        kernel=kernel.vmlinux,
        bzimage=kernel.bzimage,
        initrd=userland.initrd,
        rootfs=userland.rootfs,
        cmdline=CMDLINE,
    )
