"""The default guest's user space: busybox (Debian's busybox-static) with its applet links,
kasou's guest agent, and the init scripts in ``rootfs/`` next to this module. The same tree
goes out twice: as a gzipped cpio initramfs (with ``/init`` and the two device nodes the kernel
needs before /dev is mounted) and as an ext4 root disk image (no ``/init``: the kernel runs
``/sbin/init``, busybox init). Neither needs root to build.

The root disk alone also has ``/sbin/kasou-iobench`` (``agent/iobench.c``), the random-read
tool that bench/virtio_guest.py runs on a second disk: a static binary of about 780 KB that
would grow the initramfs by a quarter, and the initramfs's unpacking is part of the boot time
that bench/boot.py measures.

The cache key hashes every input: the agent's and the tool's sources, the scripts, the busybox
binary and this recipe's version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kasou.image import _cache
from kasou.image._cpio import Entry, write_cpio_gz
from kasou.image._errors import ImageBuildError
from kasou.image._host import ensure_packages, run_logged
from kasou.image._progress import Progress

__all__ = [
    "AGENT_SOURCE",
    "IOBENCH_SOURCE",
    "OVERLAY",
    "Userland",
    "build_userland",
    "compile_agent",
    "compile_iobench",
    "find_userland",
    "make_ext4",
    "tree",
]

_HERE = Path(__file__).parent
AGENT_SOURCE = _HERE / "agent" / "agent.c"
IOBENCH_SOURCE = _HERE / "agent" / "iobench.c"
OVERLAY = _HERE / "rootfs"
BUSYBOX = Path("/bin/busybox")
PACKAGES = ("busybox-static", "gcc", "libc6-dev", "e2fsprogs")
ROOTFS_SIZE = "64M"

# Bump when the way the tree or the images are made changes.
_RECIPE = "userland-2"

# Directories every boot expects, with their modes; the parents of files are added as 0755.
_DIRS = {
    "bin": 0o755,
    "dev": 0o755,
    "dev/pts": 0o755,
    "etc": 0o755,
    "mnt": 0o755,
    "proc": 0o555,
    "root": 0o700,
    "run": 0o755,
    "sbin": 0o755,
    "sys": 0o555,
    "tmp": 0o1777,
    "usr/bin": 0o755,
    "usr/sbin": 0o755,
    "var": 0o755,
}

# The nodes the kernel opens before /init has mounted devtmpfs: init's stdio is /dev/console
# (init/main.c), and busybox redirects to /dev/null. Numbers from
# Documentation/admin-guide/devices.txt.
_INITRAMFS_NODES = (
    Entry("dev/console", "chardev", 0o600, rdev=(5, 1)),
    Entry("dev/null", "chardev", 0o666, rdev=(1, 3)),
)

# A fixed file system UUID, so that the root disk is the same from build to build.
_ROOTFS_UUID = "6b617361-6f75-4b61-8000-726f6f746673"


@dataclass(frozen=True)
class Userland:
    initrd: Path
    rootfs: Path


def _overlay_files() -> list[tuple[str, bytes]]:
    files = []
    for path in sorted(OVERLAY.rglob("*")):
        if path.is_file():
            files.append((path.relative_to(OVERLAY).as_posix(), path.read_bytes()))
    return files


def _key() -> str:
    digest = hashlib.sha256()
    parts = [_RECIPE.encode(), AGENT_SOURCE.read_bytes(), IOBENCH_SOURCE.read_bytes()]
    for name, data in _overlay_files():
        parts += [name.encode(), data]
    try:
        parts.append(BUSYBOX.read_bytes())
    except OSError:
        parts.append(b"no busybox")
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:16]


def find_userland() -> tuple[Userland | None, str]:
    """The cached initramfs and root disk for the current inputs, or None with the reason."""
    parent = _cache.guest_dir() / "userland"
    entry = parent / _key()
    if _cache.read_manifest(entry) is not None:
        return Userland(initrd=entry / "initrd.cpio.gz", rootfs=entry / "rootfs.ext4"), ""
    stale = parent.is_dir() and any(parent.iterdir())
    return None, "out of date" if stale else "not built"


def compile_agent(out: Path, log: Path) -> None:
    """Build ``kasou-agent`` from ``agent/agent.c``: static, so it needs no libc in the guest."""
    run_logged(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-s", "-o", str(out), str(AGENT_SOURCE)],
        log,
        "compiling the guest agent",
    )


def compile_iobench(out: Path, log: Path) -> None:
    """Build ``kasou-iobench`` from ``agent/iobench.c``, static like the agent."""
    run_logged(
        [
            "gcc",
            "-static",
            "-O2",
            "-Wall",
            "-Wextra",
            "-pthread",
            "-s",
            "-o",
            str(out),
            str(IOBENCH_SOURCE),
        ],
        log,
        "compiling the benchmark tool",
    )


def _applets(busybox: Path) -> list[str]:
    """Where busybox's applets live ("bin/sh", "usr/bin/free"), from ``busybox --list-full``."""
    try:
        listed = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise ImageBuildError(f"{busybox} --list-full failed: {err}") from err
    # "linuxrc" is the applet for an initrd's old /linuxrc; busybox itself is put there as a file.
    return [line for line in listed.split() if "/" in line and line != "bin/busybox"]


def tree(
    busybox: bytes,
    applets: list[str],
    agent: bytes,
    *,
    initramfs: bool,
    iobench: bytes | None = None,
) -> list[Entry]:
    """The guest's file tree, parents before children. ``initramfs`` adds ``/init`` and the
    device nodes; without it the tree is the root disk's, which gets ``iobench`` (when given)
    as ``/sbin/kasou-iobench``."""
    entries: dict[str, Entry] = {}
    for path, mode in _DIRS.items():
        entries[path] = Entry(path, "dir", mode)
    entries["bin/busybox"] = Entry("bin/busybox", "file", 0o755, busybox)
    for applet in applets:
        entries[applet] = Entry(applet, "symlink", 0o777, b"/bin/busybox")
    for name, data in _overlay_files():
        if name == "init" and not initramfs:
            continue
        mode = 0o755 if data.startswith(b"#!") else 0o644
        entries[name] = Entry(name, "file", mode, data)
    entries["sbin/kasou-agent"] = Entry("sbin/kasou-agent", "file", 0o755, agent)
    if iobench is not None and not initramfs:
        entries["sbin/kasou-iobench"] = Entry("sbin/kasou-iobench", "file", 0o755, iobench)
    entries["etc/mtab"] = Entry("etc/mtab", "symlink", 0o777, b"/proc/mounts")
    if initramfs:
        for node in _INITRAMFS_NODES:
            entries[node.path] = node
    for path in list(entries):
        parent = path.rpartition("/")[0]
        while parent and parent not in entries:
            entries[parent] = Entry(parent, "dir", 0o755)
            parent = parent.rpartition("/")[0]
    # A path sorts before every path below it, so parents come first.
    return [entries[path] for path in sorted(entries)]


def _write_tree(entries: list[Entry], root: Path) -> None:
    """Lay ``entries`` (no device nodes) out under ``root``, mtimes zeroed."""
    for entry in entries:
        path = root / entry.path
        if entry.kind == "dir":
            path.mkdir()
        elif entry.kind == "file":
            path.write_bytes(entry.data)
        elif entry.kind == "symlink":
            os.symlink(entry.data, path)
        else:
            raise ValueError(f"{entry.path}: a {entry.kind} cannot go on the root disk")
        if entry.kind != "symlink":
            os.chmod(path, entry.mode)
    # Children first, so that setting a file's time does not touch its directory's again.
    for entry in reversed(entries):
        os.utime(root / entry.path, (entry.mtime, entry.mtime), follow_symlinks=False)


def make_ext4(entries: list[Entry], image: Path, staging: Path, log: Path) -> None:
    """An ext4 image of ``ROOTFS_SIZE`` holding ``entries``, every file owned by root: made
    with ``mkfs.ext4 -d`` and, where the builder is not root, ``debugfs`` to set owners."""
    root = staging / "tree"
    root.mkdir()
    _write_tree(entries, root)
    run_logged(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "kasou-root",
            "-U",
            _ROOTFS_UUID,
            "-E",
            f"root_owner=0:0,hash_seed={_ROOTFS_UUID}",
            "-d",
            str(root),
            str(image),
            ROOTFS_SIZE,
        ],
        log,
        "making the root disk (mkfs.ext4)",
    )
    if any(e.uid != os.geteuid() or e.gid != os.getegid() for e in entries):
        # mkfs.ext4 -d copies the owners the files have on the host: the builder's.
        commands = staging / "owners.debugfs"
        commands.write_text(
            "".join(f'sif "/{e.path}" uid {e.uid}\nsif "/{e.path}" gid {e.gid}\n' for e in entries)
        )
        run_logged(
            ["debugfs", "-w", "-f", str(commands), str(image)],
            log,
            "setting owners on the root disk (debugfs)",
        )


def build_userland(progress: Progress) -> Userland:
    """Build the initramfs and root disk into the cache (callers hold ``_cache.build_lock``)."""
    log = _cache.log_dir() / "userland.log"
    log.write_text("")
    ensure_packages(PACKAGES, progress, log)
    key = _key()
    started = time.monotonic()
    with _cache.staging_dir(f"userland-{key}") as stage:
        progress.step("building the guest agent")
        agent = stage / "kasou-agent"
        compile_agent(agent, log)
        iobench = stage / "kasou-iobench"
        compile_iobench(iobench, log)
        busybox = BUSYBOX.read_bytes()
        applets = _applets(BUSYBOX)
        out = stage / "out"
        out.mkdir()
        progress.step("packing the initramfs")
        initrd = out / "initrd.cpio.gz"
        with open(initrd, "wb") as file:
            write_cpio_gz(tree(busybox, applets, agent.read_bytes(), initramfs=True), file)
        progress.step("making the root disk")
        make_ext4(
            tree(
                busybox, applets, agent.read_bytes(), initramfs=False, iobench=iobench.read_bytes()
            ),
            out / "rootfs.ext4",
            stage,
            log,
        )
        shutil.copyfile(log, out / "build.log")
        manifest = {"recipe": _RECIPE, "build_seconds": f"{time.monotonic() - started:.1f}"}
        entry = _cache.install(out, "userland", key, manifest)
    return Userland(initrd=entry / "initrd.cpio.gz", rootfs=entry / "rootfs.ext4")
