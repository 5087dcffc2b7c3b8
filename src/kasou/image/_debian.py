"""kasou's Debian 12 image: a disk shaped like Debian's own cloud images, built from Debian's
packages with mmdebstrap, kept in the cache next to the kernel and initramfs it boots with.

What is in it: Debian 12 (bookworm, ``minbase`` plus ``GUEST_PACKAGES``) with systemd as
init, Debian's stock cloud kernel and an initramfs made by initramfs-tools (virtio-mmio,
virtio-pci and virtio-blk in it), systemd-networkd (DHCP on every Ethernet interface, a static
address from ``ip=`` on the kernel command line through systemd-network-generator, or from a
cloud-init network-config), cloud-init reading only local seeds (a NoCloud seed; off for a
boot without one), OpenSSH, and kasou's guest agent as a systemd service. The files kasou adds
are in ``debian/rootfs/`` next to this module and the steps run inside the new root in
``debian/hooks.sh``; both say why in their comments.

The disk (a qcow2 of ``DISK_SIZE`` virtual bytes; GPT laid out as in Debian's cloud images)::

    sector  2048    partition 14  BIOS boot, 3 MiB (empty: no boot loader)
            8192    partition 15  EFI system, 124 MiB (FAT16, empty)
            262144  partition 1   Linux root (x86-64), ext4, to the last MiB of the disk

The ext4 file system is made by ``mke2fs -d`` straight into the raw file at the partition's
offset (no loop device, no mount); its UUID, the partitions' and the disk's GUIDs are derived
from the cache key, so one set of inputs always gives the same identifiers.

Cache entry ``cache_dir()/debian-12/<key>/``: ``disk.qcow2``, ``vmlinuz``, ``initrd.img``
(copied out of the root's /boot, for booting without a boot loader: kasou and QEMU alike),
``manifest.json`` (root UUID, kernel version, command line) and ``build.log``. The key hashes
the recipe's version, the suite, the package list, dpkg's options, the overlay, the hooks and
the agent's source; what Debian's mirror serves is not in it (a rebuild on another day takes
newer packages). Building needs root (mmdebstrap --mode=root: the root's files must belong to
root before mke2fs copies them).

This module builds files; it does not boot them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from kasou.image import _cache
from kasou.image._errors import ImageBuildError

if TYPE_CHECKING:
    from kasou.image._progress import Progress

__all__ = [
    "DISK_SIZE",
    "DISTRO",
    "ESP",
    "GUEST_PACKAGES",
    "HOST_PACKAGES",
    "PARTITIONS",
    "ROOT",
    "DebianImage",
    "Partition",
    "Recipe",
    "boot_cmdline",
    "build_debian",
    "current_recipe",
    "debian_image",
    "derived_uuid",
    "distro_dir",
    "find_debian",
    "fstab",
    "image_from_manifest",
    "partition_script",
]

DISTRO = "debian-12"
SUITE = "bookworm"
VARIANT = "minbase"

GUEST_PACKAGES = (
    "systemd-sysv",
    "udev",
    "dbus",
    "linux-image-cloud-amd64",
    "initramfs-tools",
    "e2fsprogs",
    "cloud-init",
    "sudo",
    "openssh-server",
    "iproute2",
    "systemd-resolved",
    "zstd",
)
"""What mmdebstrap installs on top of the minbase variant. dbus is for hostnamectl and
networkctl (cloud-init sets the hostname through the first); e2fsprogs for fsck of the root at
boot; sudo for the users cloud-init creates; systemd-resolved for the DNS servers DHCP gives;
zstd for initramfs-tools' default compression (without it, gzip: slower to unpack)."""

# The image keeps no manuals, documentation (bar copyright files) or translations: dpkg skips
# them now and for packages installed later in the guest (Debian's own slim container images
# do the same).
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)

# mmdebstrap's merged-/usr hooks: /usr merged as debootstrap does, and usr-is-merged installed
# with the essential packages. Without them apt meets init-system-helpers' dependency on
# "usrmerge | usr-is-merged" with usrmerge, which brings perl (45 MB) into the image.
MERGED_USR_HOOKS = "/usr/share/mmdebstrap/hooks/merged-usr"

HOST_PACKAGES = ("mmdebstrap", "fdisk", "dosfstools", "qemu-utils", "e2fsprogs", "gcc", "libc6-dev")
"""What the build runs on the host: mmdebstrap, sfdisk, mkfs.vfat, qemu-img, mke2fs, and the
compiler for the agent."""

_HERE = Path(__file__).parent
OVERLAY = _HERE / "debian" / "rootfs"
HOOKS = _HERE / "debian" / "hooks.sh"
AGENT_SOURCE = _HERE / "agent" / "agent.c"
AGENT_PATH = "usr/local/sbin/kasou-agent"

# Bump when the way the image is made changes in a way its inputs do not show.
_RECIPE = "debian-1"

# SOURCE_DATE_EPOCH for mmdebstrap and what it runs (reproducible-builds.org's convention):
# what honours it writes the same bytes from build to build. Debian 12's release, 2023-06-10.
_SOURCE_DATE_EPOCH = "1686355200"

SECTOR = 512
MiB = 1 << 20
DISK_SIZE = 2 << 30
"""The disk's virtual size, as Debian's cloud images have it."""

# GPT partition type GUIDs (UEFI 2.10 §5.3.3 for the EFI system partition; the others from
# the Discoverable Partitions Specification and GRUB's BIOS boot partition).
_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
_EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"

# A GPT keeps a backup header and a 32-sector entry array at the end of the disk (UEFI 2.10
# §5.3.2): the last usable sector is 33 before the last one.
_GPT_TAIL = 33


class Partition(NamedTuple):
    number: int
    start: int
    """First sector (512 bytes)."""
    size: int
    """Sectors."""
    type_guid: str
    name: str

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def bytes(self) -> int:
        return self.size * SECTOR


def _root_partition() -> Partition:
    start = 256 * 1024  # 128 MiB
    last_usable = DISK_SIZE // SECTOR - 1 - _GPT_TAIL
    whole_mib = (last_usable + 1 - start) * SECTOR // MiB
    return Partition(1, start, whole_mib * MiB // SECTOR, _ROOT_X86_64, "root")


PARTITIONS = (
    Partition(14, 2048, 6144, _BIOS_BOOT, "bios"),
    Partition(15, 8192, 253952, _EFI_SYSTEM, "efi"),
    _root_partition(),
)
"""In the order of the disk. Sectors as in Debian's cloud images (``sfdisk -l`` of
debian-12-genericcloud-amd64): 2048+6144, 8192+253952, 262144+3930112."""

ROOT = PARTITIONS[2]
ESP = PARTITIONS[1]
_ROOT_LABEL = "root"
_ESP_LABEL = "UEFI"


class Recipe(NamedTuple):
    """Every input of a build that the cache key covers."""

    version: str
    suite: str
    variant: str
    packages: tuple[str, ...]
    dpkg_options: tuple[str, ...]
    files: tuple[tuple[str, bytes], ...]
    """The overlay's files (``rootfs/etc/hostname``...) and the hooks, by path."""
    agent_source: bytes

    def key(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        parts: list[str | bytes] = [
            self.version,
            self.suite,
            self.variant,
            "\0".join(self.packages),
            "\0".join(self.dpkg_options),
            self.agent_source,
        ]
        for name, data in self.files:
            parts += [name, data]
        for part in parts:
            raw = part.encode() if isinstance(part, str) else part
            # Length-prefixed: ("ab", "c") and ("a", "bc") differ.
            digest.update(len(raw).to_bytes(8, "little") + raw)
        return digest.hexdigest()[:16]


def _files() -> tuple[tuple[str, bytes], ...]:
    files = [("hooks.sh", HOOKS.read_bytes())]
    for path in sorted(OVERLAY.rglob("*")):
        if path.is_file():
            files.append((f"rootfs/{path.relative_to(OVERLAY).as_posix()}", path.read_bytes()))
    return tuple(files)


def current_recipe() -> Recipe:
    """The recipe as this checkout has it."""
    return Recipe(
        version=_RECIPE,
        suite=SUITE,
        variant=VARIANT,
        packages=GUEST_PACKAGES,
        dpkg_options=DPKG_OPTIONS,
        files=_files(),
        agent_source=AGENT_SOURCE.read_bytes(),
    )


def derived_uuid(key: str, purpose: str) -> str:
    """A random-looking (version 4, RFC 9562) UUID that depends only on ``key`` and
    ``purpose`` ("root", "disk"...)."""
    import hashlib
    import uuid

    digest = hashlib.sha256(f"kasou {DISTRO} {key} {purpose}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def boot_cmdline(root_uuid: str) -> str:
    """The kernel command line that boots the image with its kernel and initramfs."""
    return f"console=ttyS0 root=UUID={root_uuid} ro"


def fstab(root_uuid: str) -> str:
    """The image's /etc/fstab: the root by UUID, checked at boot (pass 1). The EFI partition
    is not mounted: nothing is installed on it."""
    return (
        "# kasou's Debian 12 image: <file system> <mount point> <type> <options> <dump> <pass>\n"
        f"UUID={root_uuid} / ext4 rw,errors=remount-ro 0 1\n"
    )


def partition_script(key: str, device: str) -> str:
    """sfdisk's input for the disk's GPT (sfdisk(8), "Input format"); ``device`` is the
    name sfdisk is given, from which it takes each line's partition number."""
    lines = [
        "label: gpt",
        f"label-id: {derived_uuid(key, 'disk')}",
        "unit: sectors",
        "first-lba: 2048",
        "sector-size: 512",
        "",
    ]
    for part in sorted(PARTITIONS, key=lambda p: p.number):
        guid = derived_uuid(key, f"partition {part.number}")
        lines.append(
            f"{device}{part.number} : start={part.start}, size={part.size}, "
            f"type={part.type_guid}, uuid={guid}, name={part.name}"
        )
    return "\n".join(lines) + "\n"


class DebianImage(NamedTuple):
    disk: Path
    """The qcow2 disk. Shared by every user of the cache: boot it through an overlay (or
    QEMU's snapshot=on), never write it."""
    kernel: Path
    """The stock cloud kernel (bzImage), copied out of the root's /boot."""
    initrd: Path
    """Its initramfs, made by initramfs-tools in the image."""
    root_uuid: str
    kernel_version: str
    cmdline: str
    """The command line that boots it: ``console=ttyS0 root=UUID=... ro``."""


def distro_dir() -> Path:
    return _cache.cache_dir() / DISTRO


def image_from_manifest(entry: Path, manifest: dict[str, str]) -> DebianImage | None:
    """The image a cache entry holds, or None if its manifest lacks something."""
    try:
        return DebianImage(
            disk=entry / "disk.qcow2",
            kernel=entry / "vmlinuz",
            initrd=entry / "initrd.img",
            root_uuid=manifest["root_uuid"],
            kernel_version=manifest["kernel_version"],
            cmdline=manifest["cmdline"],
        )
    except KeyError:
        return None


def _is_key(name: str) -> bool:
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def find_debian() -> tuple[DebianImage | None, str]:
    """The cached image for the current inputs, or None with the reason ("not built", "out
    of date")."""
    parent = distro_dir()
    entry = parent / current_recipe().key()
    manifest = _cache.read_manifest(entry)
    image = None if manifest is None else image_from_manifest(entry, manifest)
    if image is not None:
        return image, ""
    stale = parent.is_dir() and any(_is_key(p.name) for p in parent.iterdir())
    return None, "out of date" if stale else "not built"


def debian_image(build: bool = True, progress: Progress | None = None) -> DebianImage:
    """The cached Debian 12 image, built first if it is missing or out of date and ``build``
    is true; otherwise ``ImageBuildError`` says what to run."""
    image, why = find_debian()
    if image is not None:
        return image
    if not build:
        raise ImageBuildError(
            f"the Debian 12 image is {why}: run `kasou image build --distro {DISTRO}`"
        )
    return build_debian(progress)


def build_debian(progress: Progress | None = None, force: bool = False) -> DebianImage:
    """Build the image into the cache (a few minutes, most of it mmdebstrap) unless it is
    there already, or whatever is there with ``force``. Raises ImageBuildError if a step
    fails, with its log's tail and path."""
    import os

    from kasou.image._progress import LogProgress

    sink: Progress = progress if progress is not None else LogProgress()
    root = distro_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _cache.build_lock(root):
        # Looked for again under the lock: another process may have built it meanwhile.
        found = None if force else find_debian()[0]
        if found is not None:
            return found
        if os.geteuid() != 0:
            raise ImageBuildError(
                "building the Debian 12 image needs root (mmdebstrap --mode=root, so that the "
                f"root's files belong to root): run `sudo kasou image build --distro {DISTRO}`"
            )
        return _build(sink)


# mmdebstrap's own progress lines ("I: ...") and how far into its run each comes, measured on
# one build; they only move the progress bar.
_MMDEBSTRAP_STAGES = (
    ("downloading packages", 0.05),
    ("extracting archives", 0.25),
    ("installing essential packages", 0.35),
    ("running --essential-hook", 0.45),
    ("installing remaining packages", 0.5),
    ("running --customize-hook", 0.85),
    ("cleaning package lists", 0.97),
)


def _build(progress: Progress) -> DebianImage:
    import json
    import shlex
    import shutil
    import time

    from kasou.image._host import ensure_packages, run_logged
    from kasou.image._userland import compile_agent

    log = _cache.log_dir(distro_dir()) / "build.log"
    log.write_text("")
    ensure_packages(HOST_PACKAGES, progress, log)
    recipe = current_recipe()
    key = recipe.key()
    root_uuid = derived_uuid(key, "root")
    started = time.monotonic()
    with _cache.staging_dir(f"build-{key}", distro_dir()) as stage:
        progress.step("building the guest agent")
        overlay = stage / "overlay"
        shutil.copytree(OVERLAY, overlay)
        agent = overlay / AGENT_PATH
        agent.parent.mkdir(parents=True)
        compile_agent(agent, log)
        (overlay / "etc" / "fstab").write_text(fstab(root_uuid))

        progress.step(f"installing Debian 12 with mmdebstrap (about a minute): {log}")
        tree = stage / "root"

        def on_line(line: str) -> None:
            for marker, fraction in _MMDEBSTRAP_STAGES:
                if marker in line:
                    progress.advance(fraction)

        hook = f'sh {shlex.quote(str(HOOKS))} %s {shlex.quote(str(overlay))} "$1"'
        run_logged(
            [
                "mmdebstrap",
                "--mode=root",
                f"--variant={VARIANT}",
                f"--include={','.join(GUEST_PACKAGES)}",
                f"--hook-dir={MERGED_USR_HOOKS}",
                *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
                f"--essential-hook={hook % 'essential'}",
                f"--customize-hook={hook % 'customize'}",
                SUITE,
                str(tree),
            ],
            log,
            "installing Debian 12 (mmdebstrap)",
            env={"SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH},
            on_line=on_line,
        )
        progress.advance(1.0)

        out = stage / "out"
        out.mkdir()
        kernel_version = _copy_boot_files(tree, out)
        progress.step("making the disk: GPT, EFI partition, ext4 root")
        raw = stage / "disk.raw"
        _make_disk(raw, tree, key, root_uuid, log)
        # The root's copy is no longer needed: free its ~400 MB before qemu-img writes as much.
        shutil.rmtree(tree)
        progress.step("converting the disk to qcow2")
        run_logged(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
            log,
            "converting the disk to qcow2 (qemu-img)",
        )
        shutil.copyfile(log, out / "build.log")
        manifest = {
            "recipe": _RECIPE,
            "distro": DISTRO,
            "root_uuid": root_uuid,
            "kernel_version": kernel_version,
            "cmdline": boot_cmdline(root_uuid),
            "build_seconds": f"{time.monotonic() - started:.0f}",
        }
        (out / _cache.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        entry = _install(out, key)
    image = image_from_manifest(entry, manifest)
    assert image is not None  # the manifest above has every field
    return image


def _copy_boot_files(tree: Path, out: Path) -> str:
    """Copy the one kernel and its initramfs out of ``tree``'s /boot; returns its version."""
    import shutil

    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        found = ", ".join(p.name for p in kernels) or "none"
        raise ImageBuildError(f"expected one kernel in the image's /boot, found {found}")
    version = kernels[0].name.removeprefix("vmlinuz-")
    initrd = tree / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise ImageBuildError(f"the image has no {initrd.name}: update-initramfs did not run")
    shutil.copyfile(kernels[0], out / "vmlinuz")
    shutil.copyfile(initrd, out / "initrd.img")
    return version


def _make_disk(raw: Path, tree: Path, key: str, root_uuid: str, log: Path) -> None:
    """The raw disk: partition table, empty EFI partition, ext4 root holding ``tree``. Each
    file system is written straight into ``raw`` at its partition's offset."""
    from kasou.image._host import run_logged

    with open(raw, "wb") as file:
        file.truncate(DISK_SIZE)
    script = raw.with_suffix(".sfdisk")
    script.write_text(partition_script(key, raw.name))
    # sfdisk reads its script on stdin, which run_logged does not give: a shell redirects it.
    run_logged(
        [
            "sh",
            "-c",
            'exec sfdisk --no-reread --no-tell-kernel "$1" <"$2"',
            "sfdisk",
            raw.name,
            str(script),
        ],
        log,
        "writing the partition table (sfdisk)",
        cwd=raw.parent,
    )
    # mkfs.fat(8): --offset in sectors, the size in KiB; --invariant fixes the times it writes.
    run_logged(
        [
            "mkfs.vfat",
            "-F",
            "16",
            "-n",
            _ESP_LABEL,
            "-i",
            derived_uuid(key, "efi")[:8],
            "--invariant",
            f"--offset={ESP.start}",
            str(raw),
            str(ESP.bytes // 1024),
        ],
        log,
        "making the EFI partition (mkfs.vfat)",
    )
    # mke2fs(8): -E offset in bytes, the size in blocks of -b bytes; the hash seed fixed like
    # the UUID, so that directory hashes do not differ between builds of one key.
    run_logged(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-L",
            _ROOT_LABEL,
            "-U",
            root_uuid,
            "-E",
            f"offset={ROOT.offset},hash_seed={derived_uuid(key, 'hash seed')}",
            "-d",
            str(tree),
            str(raw),
            str(ROOT.bytes // 4096),
        ],
        log,
        "making the root file system (mke2fs)",
    )


def _install(built: Path, key: str) -> Path:
    """Move the finished entry into place (atomically: one rename) and drop older entries."""
    import shutil

    parent = distro_dir()
    final = parent / key
    if final.exists():
        # A forced rebuild: the old entry goes with the staging directory.
        final.rename(built.parent / f"replaced-{key}")
    built.rename(final)
    for other in parent.iterdir():
        if other.name != key and _is_key(other.name):
            shutil.rmtree(other, ignore_errors=True)
    return final
