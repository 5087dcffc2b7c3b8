"""The outer VM's boot files: a Debian kernel and an initramfs that runs one command.

``prepare()`` makes, once per host, a cache entry ``<cache>/nested/<key>/`` holding:

- ``kernel``: the kernel of Debian's ``linux-image-amd64`` for this distribution (the
  versioned package it depends on, fetched with ``apt-get download`` and unpacked with
  ``dpkg-deb -x``), chosen when the entry is built. It is the vmlinux taken out of the
  bzImage when that has a PVH entry point (Debian's has: CONFIG_PVH), which QEMU starts
  directly in 32-bit mode: under TCG that skips about 3.5 s of real-mode setup and xz
  decompression. Otherwise it is the bzImage as shipped;
- ``initramfs.cpio.gz``: busybox (static) as the shell of ``/init``, the modules the nested
  host needs (9p over virtio-pci for the host's root, virtio-serial for the command's output,
  kvm-amd for /dev/kvm, overlay for a writable root, virtio-net for forwarded ports),
  uncompressed, and ``/init`` itself;
- ``info.json``: which kernel package and modules went in.

The key hashes everything that decides the initramfs except the kernel (busybox's bytes, the
init script and what is filled into it, the module list, this layout's version), so finding
an entry needs no apt query (apt-cache takes about a second per call here). The kernel is the
one Debian offered when the entry was built; delete the entry to pick up a newer one.

What /init does is drawn in ``_INIT``. The archive is written by kasou.image's newc writer
and the cache lives beside the default guest's (kasou.image's ``cache_dir``). This module
does not start QEMU or pass commands (``_run`` and ``_command``).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.segments import NoteSegment

from kasou.image._cache import cache_dir
from kasou.image._cpio import Entry, write_cpio_gz
from kasou.nested._cache import ensure_entry
from kasou.nested._errors import NestedError
from kasou.nested._modules import ModuleError, module_bytes, resolve_modules
from kasou.nested._network import GUEST_ADDRESS

__all__ = [
    "CONTROL_TAG",
    "HOST_ROOT_TAG",
    "INITRAMFS",
    "KERNEL",
    "OUTPUT_PORT",
    "Progress",
    "build_initramfs",
    "cache_entry_if_built",
    "find_busybox",
    "init_script",
    "prepare",
]

Progress = Callable[[str], None]

KERNEL = "kernel"
INITRAMFS = "initramfs.cpio.gz"
# Debian's stock bzImage as shipped: the e2e tier boots it under kasou inside the nested host.
STOCK_BZIMAGE = "stock-bzImage"
_INFO = "info.json"

# The 9p mount tags and the virtio-serial port name that QEMU's command line (``_run``) and
# /init agree on.
HOST_ROOT_TAG = "hostroot"
CONTROL_TAG = "kasouctl"
OUTPUT_PORT = "kasou.out"

_LAYOUT_VERSION = "2"  # 2: keeps the stock bzImage too
_KEY_PREFIX = "outer-"
_META_PACKAGE = "linux-image-amd64"
# The modules /init loads, named by what they give; resolve_modules adds what they depend on
# (for Debian 12's 6.1: 9pnet netfs fscache 9p virtio_ring virtio 9pnet_virtio
# virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_console irqbypass kvm ccp
# kvm_amd overlay tun failover net_failover virtio_net).
_WANTED_MODULES = (
    "9p",
    "9pnet_virtio",
    "virtio_pci",
    "virtio_console",
    "kvm_amd",
    "overlay",
    "tun",  # TAP devices for the guests' virtio-net interfaces
    "virtio_net",  # the NIC of forwarded ports (``_network``), when QEMU gives one
)
_BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")

# /init, run by busybox sh as PID 1 of the outer VM. @MODULES@ becomes the module names in
# load order. Everything it prints goes to the kernel console (ttyS0, a log file on the host);
# only the command's own output goes to the virtio-serial port.
#
#   initramfs (rootfs)          /newroot: overlay, what the command sees as /
#   ├── /ctl    9p "kasouctl"   ├── lower: /lower = the host's / over 9p, read-only
#   │           (read-write:    ├── upper: a tmpfs (/upper), so every path is writable
#   │           command.sh,     ├── /proc /sys /dev (+ pts, shm, fd links): fresh
#   │           mounts.sh in;   ├── /tmp /run: empty tmpfs
#   │           status out)     └── shared folders: 9p "kasoushare<N>", writable
#   └── /lower  9p "hostroot"
_INIT = r"""#!/bin/sh
# kasou nested host: /init of the outer VM (written by kasou.nested).
export PATH=/bin
ctl=

say() { echo "kasou-nested: $*"; }
fail() {
	say "$*"
	[ -n "$ctl" ] && echo "$*" > "$ctl/error"
	poweroff -f
	sleep 3600
}
uptime_s() { read -r up _ < /proc/uptime; echo "$up"; }

/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs"
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"

for module in @MODULES@; do
	insmod "/lib/modules/$module.ko" || fail "cannot load module $module"
done
say "modules loaded at $(uptime_s) s"

mkdir -p /ctl /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 @CONTROL_TAG@ /ctl \
	|| fail "cannot mount the control share"
ctl=/ctl
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144@ROOT_OPTIONS@ @HOST_ROOT_TAG@ \
	/lower || fail "cannot mount the host's root over 9p"
mount -t tmpfs -o mode=0755 upper /upper || fail "cannot mount the overlay's tmpfs"
mkdir /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work overlay /newroot \
	|| fail "cannot mount the overlay root"

r=/newroot
mount -t proc proc $r/proc || fail "cannot mount /proc in the new root"
mount -t sysfs sysfs $r/sys || fail "cannot mount /sys in the new root"
mount -t devtmpfs devtmpfs $r/dev || fail "cannot mount /dev in the new root"
mkdir -p $r/dev/pts $r/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts $r/dev/pts || fail "cannot mount devpts"
mount -t tmpfs -o mode=1777 shm $r/dev/shm || fail "cannot mount /dev/shm"
ln -sf /proc/self/fd $r/dev/fd
ln -sf /proc/self/fd/0 $r/dev/stdin
ln -sf /proc/self/fd/1 $r/dev/stdout
ln -sf /proc/self/fd/2 $r/dev/stderr
mount -t tmpfs -o mode=1777 tmp $r/tmp || fail "cannot mount /tmp"
mount -t tmpfs -o mode=0755 run $r/run || fail "cannot mount /run"
. "$ctl/mounts.sh" || fail "cannot mount the shared folders"
hostname kasou-nested
ip link set lo up || fail "cannot bring up the loopback interface"
# The NIC that carries forwarded ports (kasou.nested._network) exists only when ports are
# forwarded; loopback is the one interface without a device behind it. It gets slirp's guest
# address and no route: there is nowhere to go, only connections coming in.
for dev in /sys/class/net/*; do
	[ -e "$dev/device" ] || continue
	nic=${dev##*/}
	ip addr add @GUEST_ADDRESS@ dev "$nic" && ip link set "$nic" up \
		|| fail "cannot bring up the network interface $nic"
	say "$nic up at @GUEST_ADDRESS@ for the forwarded ports"
done
say "file systems mounted at $(uptime_s) s"

# The output port appears once QEMU has announced it over virtio-serial's control queue
# (virtio 1.2 section 5.3.6.2), after the module has loaded: wait for it, up to 10 s.
port=
tries=0
while [ -z "$port" ]; do
	for name in /sys/class/virtio-ports/*/name; do
		[ -f "$name" ] && [ "$(cat "$name")" = @OUTPUT_PORT@ ] || continue
		dir=${name%/name}
		[ -c "/dev/${dir##*/}" ] && port=/dev/${dir##*/}
	done
	[ -n "$port" ] && break
	tries=$((tries + 1))
	[ $tries -gt 200 ] && fail "the output port @OUTPUT_PORT@ did not appear"
	sleep 0.05
done

script=$(cat "$ctl/command.sh") || fail "cannot read the command"
say "running the command at $(uptime_s) s"
: > "$ctl/started"
# In a subshell, so the redirections are the command's alone: the shell's own notes ("Killed"
# when a signal ends the command) go to the console, not into the command's output.
(exec env -i /bin/chroot $r /bin/sh -c "$script") < /dev/null > "$port" 2>&1
status=$?
echo "$status" > "$ctl/status"
say "the command ended with status $status at $(uptime_s) s"
poweroff -f
sleep 3600
"""

# The 9p cache mode for the host root, appended to its mount options (Documentation/
# filesystems/9p.rst). cache=loose keeps what was read in the outer VM's page and dentry
# caches; measured here (three boots each, alternating), importing kasou.nested, msgspec, json
# and asyncio in the venv's Python took 4.6-5.2 s the first time and 2.2-2.8 s again with it,
# 5.7-6.5 s and 3.0-4.0 s without (cache=none). Host files changed during a run may be seen
# stale; overlayfs forbids changing its lower layer anyway (Documentation/filesystems/
# overlayfs.rst, "Changes to underlying filesystems").
_ROOT_OPTIONS = ",cache=loose"


def init_script(module_names: list[str]) -> str:
    """/init with the module names (load order) and the agreed names filled in."""
    return (
        _INIT.replace("@MODULES@", " ".join(module_names))
        .replace("@CONTROL_TAG@", CONTROL_TAG)
        .replace("@HOST_ROOT_TAG@", HOST_ROOT_TAG)
        .replace("@OUTPUT_PORT@", OUTPUT_PORT)
        .replace("@ROOT_OPTIONS@", _ROOT_OPTIONS)
        .replace("@GUEST_ADDRESS@", GUEST_ADDRESS)
    )


def find_busybox() -> Path | None:
    """A statically linked busybox (Debian's busybox-static), or None: the initramfs has no
    shared libraries for a dynamic one."""
    for candidate in _BUSYBOX_PATHS:
        path = Path(candidate)
        if path.is_file() and _is_static(path):
            return path
    return None


def _is_static(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            elf = ELFFile(file)
            return all(segment["p_type"] != "PT_INTERP" for segment in elf.iter_segments())
    except Exception:
        return False


def build_initramfs(busybox: bytes, modules: list[tuple[str, bytes]]) -> bytes:
    """The gzip-compressed newc initramfs holding busybox, ``modules`` (name, uncompressed
    image; loaded in this order) and /init."""
    entries = [Entry(name, "dir", 0o755) for name in ("bin", "dev", "proc", "sys", "lib")]
    entries += [
        Entry("lib/modules", "dir", 0o755),
        # The kernel opens /dev/console for init's stdin, stdout and stderr before devtmpfs
        # is mounted (init/main.c, console_on_rootfs): ship the node, char 5:1 (devices.txt).
        Entry("dev/console", "chardev", 0o600, rdev=(5, 1)),
        Entry("bin/busybox", "file", 0o755, busybox),
        Entry("bin/sh", "symlink", 0o777, b"busybox"),
    ]
    entries += [Entry(f"lib/modules/{name}.ko", "file", 0o644, image) for name, image in modules]
    script = init_script([name for name, _ in modules]).encode()
    entries.append(Entry("init", "file", 0o755, script))
    out = io.BytesIO()
    write_cpio_gz(entries, out)
    return out.getvalue()


def _cache_key(busybox: bytes) -> str:
    digest = hashlib.sha256()
    parts = (_LAYOUT_VERSION, _INIT, _ROOT_OPTIONS, GUEST_ADDRESS, " ".join(_WANTED_MODULES))
    for part in (*parts, _META_PACKAGE):
        digest.update(part.encode() + b"\0")
    digest.update(hashlib.sha256(busybox).digest())
    return f"{_KEY_PREFIX}{digest.hexdigest()[:16]}"


def _nested_cache() -> Path:
    return cache_dir() / "nested"


def cache_entry_if_built() -> Path | None:
    """The cache entry for this host's busybox, if it has been built."""
    busybox = find_busybox()
    if busybox is None:
        return None
    entry = _nested_cache() / _cache_key(busybox.read_bytes())
    return entry if entry.is_dir() else None


def prepare(progress: Progress | None = None) -> Path:
    """Build the outer VM's kernel and initramfs unless cached; return the cache entry.

    Idempotent and safe to call from several processes at once. Needs apt (``apt-get
    download`` works without root) and network access to the Debian mirror the first time.
    """
    say = progress or (lambda message: None)
    busybox = find_busybox()
    if busybox is None:
        raise NestedError(
            "a statically linked busybox is missing: install it: apt-get install busybox-static"
        )
    busybox_bytes = busybox.read_bytes()
    key = _cache_key(busybox_bytes)
    built = False

    def build(work: Path) -> None:
        nonlocal built
        package = _kernel_package()
        say(f"downloading {package}")
        download = work / "download"
        download.mkdir()
        _tool(["apt-get", "download", package], cwd=download, what=f"downloading {package}")
        debs = sorted(download.glob("*.deb"))
        if not debs:
            raise NestedError(f"apt-get download {package} wrote no .deb file")
        version = _tool(["dpkg-deb", "-f", str(debs[0]), "Version"], what="reading the package")
        say(f"unpacking {package} {version.strip()}")
        tree = work / "tree"
        _tool(["dpkg-deb", "-x", str(debs[0]), str(tree)], what=f"unpacking {debs[0].name}")
        kernels = sorted(tree.glob("boot/vmlinuz-*"))
        module_dirs = sorted(tree.glob("lib/modules/*")) + sorted(tree.glob("usr/lib/modules/*"))
        if not kernels or not module_dirs:
            raise NestedError(f"{debs[0].name} holds no boot/vmlinuz-* or lib/modules/*")
        say("writing the initramfs")
        try:
            modules = resolve_modules(module_dirs[0], _WANTED_MODULES)
            images = [(module.name, module_bytes(module.path)) for module in modules]
        except ModuleError as error:
            raise NestedError(f"the kernel in {debs[0].name} cannot serve: {error}") from error
        (work / INITRAMFS).write_bytes(build_initramfs(busybox_bytes, images))
        (work / KERNEL).write_bytes(_fast_booting(kernels[0].read_bytes()))
        shutil.copyfile(kernels[0], work / STOCK_BZIMAGE)
        info = {
            "kernel_package": package,
            "kernel_version": version.strip(),
            "kernel_release": module_dirs[0].name,
            "modules": [module.name for module in modules],
            "busybox": str(busybox),
        }
        (work / _INFO).write_text(json.dumps(info, indent=2) + "\n")
        shutil.rmtree(download)
        shutil.rmtree(tree)
        built = True

    entry = ensure_entry(_nested_cache(), key, build)
    if built:
        _remove_other_entries(entry)
    for name in (KERNEL, INITRAMFS, STOCK_BZIMAGE):
        if not (entry / name).is_file():
            raise NestedError(f"the cache entry {entry} lacks {name}: delete it and retry")
    return entry


def _remove_other_entries(entry: Path) -> None:
    """Drop the entries of earlier layouts or busybox builds: 70 MB each, never used again."""
    for other in entry.parent.glob(f"{_KEY_PREFIX}*"):
        if other != entry:
            shutil.rmtree(other, ignore_errors=True)


def _fast_booting(bzimage: bytes) -> bytes:
    """The vmlinux inside ``bzimage`` if QEMU can boot it through PVH, else ``bzimage``."""
    from kasou.errors import ImageError
    from kasou.loader.bzimage import extract_vmlinux

    try:
        vmlinux = extract_vmlinux(bzimage)
    except ImageError:
        return bzimage
    return vmlinux if _has_pvh_entry(vmlinux) else bzimage


def _has_pvh_entry(vmlinux: bytes) -> bool:
    """Whether the ELF kernel carries XEN_ELFNOTE_PHYS32_ENTRY (type 18, xen/include/public/
    elfnote.h), the 32-bit entry point QEMU's -kernel uses for an ELF image (the PVH boot
    ABI, Xen's docs/misc/pvh.pandoc)."""
    elf = ELFFile(io.BytesIO(vmlinux))
    for segment in elf.iter_segments():
        if not isinstance(segment, NoteSegment):
            continue
        for note in segment.iter_notes():
            if note["n_name"] == "Xen" and note["n_type"] in (18, "NT_XEN_PHYS32_ENTRY"):
                return True
    return False


def _kernel_package() -> str:
    """The versioned kernel package ``linux-image-amd64`` depends on (linux-image-6.1.0-N-amd64
    on Debian 12)."""
    out = _tool(["apt-cache", "depends", _META_PACKAGE], what=f"asking apt about {_META_PACKAGE}")
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)\s*$", line)
        if match:
            return match.group(1)
    raise NestedError(
        f"apt-cache depends {_META_PACKAGE} names no kernel package: run apt-get update, "
        "or check that this is Debian"
    )


def _tool(argv: list[str], *, what: str, cwd: Path | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise NestedError(f"{what} needs {argv[0]}, which is missing: the nested host needs apt")
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip().splitlines()[-3:]
        raise NestedError(
            f"{what} failed ({' '.join(argv)} exited with status {result.returncode}: "
            f"{' / '.join(detail)}); check apt's sources and network, or run apt-get update"
        )
    return result.stdout
