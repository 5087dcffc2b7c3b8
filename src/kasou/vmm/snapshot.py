"""Snapshots: a VM's whole state in a folder, and the VMs restored from it.

A snapshot folder holds::

    state.kasou    the sections (kasou.persist): meta, config, kvm, vcpuN, dev.ID
    memory.bin     guest RAM as one sparse file, region i at file_offsets(layout)[i]
    diskN.FORMAT   copies of the disks kasou made for the run (scratch disks: the default
                   guest's overlay, a cloud-init seed) and, with ``disks="all"``, of every
                   writable disk; read-only disks always stay where they are
    diskN.K.FORMAT a copy's qcow2 backing file when that belongs to a snapshot (a restored
                   VM's overlay sits on its snapshot's copy), named relative to the folder

Disk copies are made while the VM is paused, after every disk backend flushed, so they hold
what the guest had written at that instant, consistent with the saved memory (the guest's
page cache included). They are sparse: a reflink where the file system has one, else only
the data extents (``kasou._sys.fs.copy_sparse``); the copy's time counts in the pause. A
qcow2 image is copied top file only: its backing file elsewhere (a base image, which kasou
never writes) stays where it is and the copy names it by its absolute path. A copy's suffix
is the format kasou opened the disk with, and a restore opens the copy as that format (a
guest that wrote a qcow2 header into a raw disk cannot make kasou read it as qcow2).

A full snapshot's memory file has every non-zero page; a diff snapshot's only the pages
written since the previous snapshot of the same VM (KVM's dirty log and the devices' write
log, ``vmm/dirty.py``), listed in its ``pages.N`` sections. ``merge_snapshots`` folds diffs
into their full base. A VM is restored only from a full snapshot: its memory is mapped
copy-on-write from ``memory.bin`` (``GuestMemory.from_file``), so restoring does not read
the memory and takes the same time for any size; clones of one snapshot share its pages in
the host's page cache until they write them.

Writes are atomic: a snapshot is written into a hidden sibling folder and swapped into
place (``renameat2(RENAME_EXCHANGE)`` when it replaces an older one), so a crash or a full
disk mid-way leaves the previous snapshot as it was and no half-written folder. The VM is
paused (vCPUs out of KVM_RUN, device loops parked: nothing writes guest RAM) only while it
is being written, and runs on whatever happens to the snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from kasou import __version__
from kasou._sys.scratch import pid_alive, scratch_folder
from kasou.errors import ConfigError, HostError, KasouError, SnapshotError
from kasou.memory import GuestMemory, PageBitmap
from kasou.persist import (
    SnapshotFormatError,
    decode_state,
    encode_state,
    read_sections,
    write_sections,
)
from kasou.vmm.config import DiskConfig, NetConfig, VmConfig, VsockConfig
from kasou.vmm.lifecycle import VmState
from kasou.vmm.vm import Vm

__all__ = [
    "DISK_MODES",
    "MEMORY_FILE",
    "STATE_FILE",
    "MachineImage",
    "SnapshotMeta",
    "create_snapshot",
    "decode_config",
    "device_state",
    "encode_config",
    "load_snapshot",
    "merge_snapshots",
    "preload_restore_modules",
    "quiesced",
    "remove_abandoned",
    "restore_machine",
    "restored_nets",
    "restored_vsock",
    "save_machine",
    "snapshot_info",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.kasou"
MEMORY_FILE = "memory.bin"
DISK_MODES = ("scratch", "all")  # which disks a snapshot copies (create_snapshot's disks=)


@dataclass(frozen=True)
class SnapshotMeta:
    """What a snapshot is. Field names are a format contract.

    ``disks`` has, per disk of the config, the name of its copy in the folder or ``None``
    (the disk stays at its own path); ``pages`` counts the pages in ``memory.bin``."""

    id: str
    kind: str  # "full" or "diff"
    parent: str | None  # a diff: the id of the snapshot it applies on
    kasou_version: str
    created: float  # seconds since the epoch
    layout: tuple[tuple[int, int], ...]
    vcpus: int
    disks: tuple[str | None, ...]
    pages: int


class MachineImage(NamedTuple):
    """What a VM is restored from: its config, its saved sections, and its memory: a
    snapshot's memory file, mapped copy-on-write, or ``memory``, RAM already filled (a
    migration's; the VM takes it over). ``clone`` tells the guest it is a new copy (a new
    generation ID)."""

    config: VmConfig
    sections: Mapping[str, bytes]
    memory_file: Path | None
    clone: bool = False
    memory: GuestMemory | None = None


# --- the config --------------------------------------------------------------------------


def _encode_hook(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    raise NotImplementedError(f"cannot save a {type(value).__name__} in a snapshot's config")


def _decode_hook(kind: type, value: object) -> object:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError(f"expected a {kind.__name__}")


def encode_config(config: VmConfig) -> bytes:
    """The VM's config as JSON (readable with any tool)."""
    return msgspec.json.encode(config, enc_hook=_encode_hook)


def decode_config(data: bytes) -> VmConfig:
    """A saved config, marked ``restoring`` (its kernel need not exist any more). Its
    validation runs as for any config: a bad value is a ``ConfigError`` naming it."""
    try:
        raw = msgspec.json.decode(data)
        if not isinstance(raw, dict):
            raise SnapshotFormatError("the snapshot's config is not a JSON object")
        raw["restoring"] = True
        return msgspec.convert(raw, VmConfig, dec_hook=_decode_hook)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise SnapshotFormatError(f"the snapshot's config is not valid: {error}") from None


# --- saving ------------------------------------------------------------------------------


@contextlib.contextmanager
def quiesced(vm: Vm, *, resume: bool = True) -> Iterator[bool]:
    """Pause the vCPUs (if running) and park every device loop, so nothing writes guest RAM
    or device state; undo both on the way out (the vCPUs only if ``resume`` and they were
    running). Yields whether the VM was running."""
    running = vm.state is VmState.RUNNING
    if running:
        vm.pause()
    elif vm.state is not VmState.PAUSED:
        raise SnapshotError(f"the VM is {vm.state.value}: only a running or paused VM is saved")
    parked = []
    try:
        for loop in vm.loops:
            loop.park()
            parked.append(loop)
        yield running
    finally:
        for loop in reversed(parked):
            loop.unpark()
        if running and resume and vm.state is VmState.PAUSED:
            vm.resume()


def save_machine(vm: Vm) -> dict[str, bytes]:
    """Every state of a quiesced VM as sections: config, KVM VM, vCPUs, devices."""
    from kasou.vmm.state import save_kvm_vm

    sections = {"config": encode_config(vm.config), "kvm": encode_state(save_kvm_vm(vm.vm_fd))}
    for vcpu_state in vm.save_vcpus():
        sections[f"vcpu{vcpu_state.index}"] = encode_state(vcpu_state)
    for key, device in vm.devices.items():
        save = getattr(device, "save", None)
        if save is not None:
            sections[f"dev.{key}"] = encode_state(save())
    return sections


def create_snapshot(
    vm: Vm,
    path: Path,
    *,
    diff: bool = False,
    stop: bool = False,
    extra: Callable[[], Mapping[str, bytes]] | None = None,
    disks: str = "scratch",
) -> dict[str, Any]:
    """Write a snapshot of ``vm`` to the folder ``path`` (replacing a snapshot there) and
    return what was written. ``extra()`` adds sections of the VM's owner (the runner's
    agent channel), read while the VM is paused. ``disks`` says which disks are copied
    into the folder: "scratch" (those kasou made for the run) or "all" (every writable
    disk too; read-only disks are never copied); ``paused_seconds`` includes the copies.
    The VM runs on afterwards unless ``stop``; it also runs on, unchanged, when writing
    fails (the error says why; nothing is left behind)."""
    path = Path(os.path.abspath(path))
    if disks not in DISK_MODES:
        raise ConfigError("disks", f"disks={disks!r}: give one of {', '.join(DISK_MODES)}")
    _check_destination(path)
    if diff and (vm.dirty is None or not vm.dirty.active or vm.last_snapshot is None):
        raise SnapshotError(
            "a diff snapshot holds the pages written since this VM's previous snapshot, and "
            "it has none: take a full one first (without --diff)"
        )
    from kasou.memory import save_memory

    remove_abandoned(path)
    work = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    with quiesced(vm, resume=not stop):
        paused_at = time.monotonic()
        try:
            work.mkdir()
            sections = save_machine(vm)
            if extra is not None:
                sections.update(extra())
            copies = _save_disks(vm, work, every=disks == "all")
            pages = vm.dirty.collect() if diff and vm.dirty is not None else None
            written = save_memory(vm.memory, work / MEMORY_FILE, only=pages)
            meta = SnapshotMeta(
                id=uuid.uuid4().hex,
                kind="diff" if diff else "full",
                parent=vm.last_snapshot if diff else None,
                kasou_version=__version__,
                created=time.time(),
                layout=tuple(vm.memory.layout),
                vcpus=len(vm.vcpus),
                disks=copies,
                pages=written.pages,
            )
            sections["meta"] = encode_state(meta)
            if pages is not None:
                for index, bitmap in enumerate(pages):
                    sections[f"pages.{index}"] = bitmap.to_bytes()
            write_sections(work / STATE_FILE, sections)
            _fsync_folder(work)
            _install(work, path)
        except BaseException as error:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(error, OSError | HostError):
                reason = error.strerror if isinstance(error, OSError) else None
                raise HostError(
                    f"cannot write the snapshot {path}: {reason or error}. The VM runs on and "
                    "any earlier snapshot there is intact"
                ) from error
            raise
        if vm.dirty is None:
            from kasou.vmm.dirty import DirtyTracker

            vm.dirty = DirtyTracker(vm.vm_fd, vm.memory)
        # From here on pages written count toward the next diff snapshot.
        if vm.dirty.active:
            vm.dirty.collect()
        else:
            vm.dirty.start()
        vm.last_snapshot = meta.id
        paused = time.monotonic() - paused_at
    if stop:
        vm.stop("stopped after a snapshot")
    return {
        "path": str(path),
        "id": meta.id,
        "kind": meta.kind,
        "pages": written.pages,
        "bytes": written.bytes,
        "seconds": round(time.monotonic() - started, 3),
        "paused_seconds": round(paused, 3),
        "state": vm.state.value,
        "disks": [
            {"path": str(disk.path), "copy": name}
            for disk, name in zip(vm.config.disks, copies, strict=True)
        ],
    }


def _check_destination(path: Path) -> None:
    if not path.parent.is_dir():
        raise ConfigError("snapshot", f"{path.parent} does not exist: create it first")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError("snapshot", f"{path.parent} is not writable")
    if path.exists() and not (path / STATE_FILE).is_file():
        raise ConfigError(
            "snapshot",
            f"{path} exists and is not a kasou snapshot: give a new folder (an old snapshot "
            "there would be replaced)",
        )


def remove_abandoned(path: Path) -> list[Path]:
    """Remove the hidden work folders a killed kasou left beside ``path`` (a snapshot or
    merge it was writing: ``.NAME.tmp-PID-*``, ``.NAME.merge-PID-*``) whose process is gone;
    return them. A folder of a kasou still running is left alone."""
    removed = []
    for kind in ("tmp", "merge"):
        for folder in path.parent.glob(f".{path.name}.{kind}-*-*"):
            pid = folder.name[len(f".{path.name}.{kind}-") :].split("-", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _save_disks(vm: Vm, folder: Path, *, every: bool) -> tuple[str | None, ...]:
    """Flush every disk; copy the scratch ones (they die with this kasou), and with
    ``every`` each writable one, into ``folder``. The copies' names, per disk (None: not
    copied)."""
    names: list[str | None] = []
    for index, disk in enumerate(vm.config.disks):
        transport = vm.devices.get(f"block{index}")
        backend = transport.device.backend if transport is not None else None
        if backend is not None:
            backend.flush()
        if not disk.scratch and (disk.read_only or not every):
            names.append(None)
            continue
        names.append(_copy_disk(disk, backend, folder, f"disk{index}"))
    return tuple(names)


def _copy_disk(disk: DiskConfig, backend: object, folder: Path, stem: str) -> str:
    """Copy one disk into ``folder`` as ``STEM.FORMAT`` (the format kasou opened it with)
    and return that name. A qcow2 image's backing file that belongs to a snapshot (whose
    folders are replaced and pruned) comes along as ``STEM.1.FORMAT``, and so on down the
    chain, each copy naming the next relative to ``folder``; the first backing file that
    lies elsewhere stays there, named by its absolute path."""
    from kasou._sys.fs import copy_sparse
    from kasou.disk import Qcow2Disk, set_backing_name

    image_format = getattr(backend, "format", None)
    if backend is None or image_format not in ("raw", "qcow2"):
        name = f"{stem}{disk.path.suffix or '.img'}"  # the format is probed at restore
        copy_sparse(disk.path, folder / name)
        return name
    top = name = f"{stem}.{image_format}"
    level = 0
    image: object = backend
    while True:
        copy_sparse(getattr(image, "path", disk.path), folder / name)
        if not isinstance(image, Qcow2Disk) or image.backing is None:
            return top
        stored = image.header.backing_file
        assert stored is not None  # an image with a backing has its name
        # qcow2 spec, "Header": a relative name is relative to the image's folder.
        below = Path(stored) if Path(stored).is_absolute() else image.path.parent / stored
        if (below.parent / STATE_FILE).is_file():
            level += 1
            below_name = f"{stem}.{level}.{image.backing.format}"
            set_backing_name(folder / name, below_name)
            name, image = below_name, image.backing
            continue
        if not Path(stored).is_absolute():
            set_backing_name(folder / name, os.path.abspath(below))
        return top


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(work: Path, path: Path) -> None:
    """Put the finished folder ``work`` at ``path`` in one step, then drop what was there."""
    from kasou._sys.fs import rename_exchange

    if path.exists():
        rename_exchange(work, path)
        shutil.rmtree(work, ignore_errors=True)  # now the old snapshot
    else:
        os.rename(work, path)
    _fsync_folder(path.parent)


# --- reading and restoring ---------------------------------------------------------------


def _read(path: Path) -> tuple[SnapshotMeta, dict[str, bytes]]:
    state = path / STATE_FILE
    if not state.is_file():
        raise SnapshotError(f"{path} is not a kasou snapshot: it has no {STATE_FILE}")
    sections = read_sections(state)
    if "meta" not in sections or "config" not in sections:
        raise SnapshotFormatError(f"{state} has no meta or config section")
    meta = decode_state(sections["meta"], SnapshotMeta, what="meta")
    if meta.kind not in ("full", "diff"):
        raise SnapshotFormatError(f"{state}: unknown snapshot kind {meta.kind!r}")
    return meta, sections


def snapshot_info(path: Path) -> dict[str, Any]:
    """What ``kasou snapshot info`` shows."""
    meta, sections = _read(path)
    config = decode_config(sections["config"])
    memory = path / MEMORY_FILE
    allocated = memory.stat().st_blocks * 512 if memory.exists() else 0
    return {
        "path": str(path),
        "id": meta.id,
        "kind": meta.kind,
        "parent": meta.parent,
        "kasou_version": meta.kasou_version,
        "created": meta.created,
        "vcpus": meta.vcpus,
        "memory": config.memory,
        "memory_pages": meta.pages,
        "memory_file_bytes": allocated,
        "disks": [
            {"path": str(disk.path), "copy": name}
            for disk, name in zip(config.disks, meta.disks, strict=False)
        ],
        "sections": sorted(sections),
    }


def load_snapshot(
    path: Path,
    *,
    scratch: list[Path],
    disks: Sequence[DiskConfig] | None = None,
    nets: Sequence[NetConfig] | None = None,
    vsock: VsockConfig | None = None,
    api_sock: Path | None = None,
    console: str | None = None,
    clone: bool = False,
) -> MachineImage:
    """The VM saved at ``path``, with the overrides given, ready for ``build_vm``.

    Disks, interfaces and the vsock socket are those of the saved config unless replaced
    (the guest has as many as it had: a replacement list must be as long). A disk kasou made
    for the saved run is attached through a new throw-away overlay over its copy in the
    snapshot; with ``clone`` every writable disk is, so clones never share a writable file,
    and every interface gets a new MAC address. ``scratch`` collects the folders to remove
    when the VM ends."""
    path = Path(os.path.abspath(path))
    meta, sections = _read(path)
    if meta.kind != "full":
        raise SnapshotError(
            f"{path} is a diff snapshot: fold it into its full snapshot first "
            f"(kasou snapshot merge BASE {path}), then restore BASE"
        )
    saved = decode_config(sections["config"])
    from kasou.arch.x86_64 import layout as memory_layout

    if tuple(meta.layout) != tuple(memory_layout.ram_layout(saved.memory)):
        raise SnapshotFormatError(f"{path}: the memory layout does not match its config")
    if len(meta.disks) != len(saved.disks):
        raise SnapshotFormatError(f"{path}: the disk list does not match its config")
    memory_file = path / MEMORY_FILE
    if not memory_file.is_file() or memory_file.stat().st_size != saved.memory:
        raise SnapshotError(f"{path}: {MEMORY_FILE} is missing or not {saved.memory} bytes")
    new_disks = _restored_disks(path, saved, meta, disks, clone, scratch)
    new_nets = restored_nets(saved, nets, clone)
    new_vsock = restored_vsock(saved, vsock, api_sock)
    changes: dict[str, Any] = {
        "disks": new_disks,
        "nets": new_nets,
        "vsock": new_vsock,
        "api_sock": api_sock,
    }
    if console is not None:
        from kasou.vmm.config import parse_console

        changes["console"] = parse_console(console)
    config = replace(saved, **changes)
    config.check_devices()
    preload_restore_modules()
    return MachineImage(config, sections, memory_file, clone)


def preload_restore_modules() -> None:
    """Import what a restore runs (device models, KVM state) while the snapshot is read, so
    that the restore itself, from ``build_vm`` to the first KVM_RUN, is not Python loading
    modules (bench/snapshot.py measures that span)."""
    import kasou.devices.virtio
    import kasou.vmm.state  # noqa: F401


def _restored_disks(
    path: Path,
    saved: VmConfig,
    meta: SnapshotMeta,
    given: Sequence[DiskConfig] | None,
    clone: bool,
    scratch: list[Path],
) -> tuple[DiskConfig, ...]:
    if given is not None and len(given) != len(saved.disks):
        raise ConfigError(
            "disk",
            f"the snapshot's guest has {len(saved.disks)} disk(s): give --disk that many "
            "times, in the same order, or not at all",
        )
    disks: list[DiskConfig] = []
    folder: Path | None = None
    for index, disk in enumerate(saved.disks):
        copy = meta.disks[index]
        if given is not None:
            disks.append(given[index])
            continue
        if copy is not None:
            source = path / copy
            if not source.is_file():
                raise SnapshotError(f"{path}: the disk copy {copy} is missing")
        else:
            source = disk.path
        if disk.read_only:
            disks.append(disk._replace(path=source, scratch=copy is not None))
            continue
        if copy is None and not clone:
            disks.append(disk)
            continue
        if folder is None:
            folder = scratch_folder("restore")
            scratch.append(folder)
        from kasou.disk import create_overlay

        overlay = folder / f"disk{index}.qcow2"
        try:
            create_overlay(overlay, source, backing_format=_copy_format(copy, disk))
        except (KasouError, OSError) as error:
            raise ConfigError("disk", f"cannot make an overlay over {source}: {error}") from None
        disks.append(disk._replace(path=overlay, format="qcow2", scratch=True))
    return tuple(disks)


def _copy_format(copy: str | None, disk: DiskConfig) -> str | None:
    """The format to open a disk's copy with: the one its name records (the format kasou
    ran it with), else the disk's configured one, else None (probed, as for snapshots made
    before copies were named so)."""
    if copy is not None:
        suffix = Path(copy).suffix.lstrip(".")
        if suffix in ("raw", "qcow2"):
            return suffix
    return disk.format


def restored_nets(
    saved: VmConfig, given: Sequence[NetConfig] | None, clone: bool
) -> tuple[NetConfig, ...]:
    """The interfaces of a saved VM brought back: the saved ones or as many ``given``; a
    clone's each get a new MAC and, unless given, a new TAP."""
    if given is not None and len(given) != len(saved.nets):
        raise ConfigError(
            "net",
            f"the snapshot's guest has {len(saved.nets)} interface(s): give --net that many "
            "times, in the same order, or not at all",
        )
    if given is not None:
        nets = tuple(given)
        if clone:  # a clone's interfaces get new MACs unless given one
            nets = tuple(net._replace(mac=net.mac or _random_mac()) for net in nets)
        return nets
    if clone:
        # Each interface of a clone is new: a TAP of its own (named by the kernel: the saved
        # one belongs to the VM it was cloned from) and a new MAC (locally administered,
        # unicast).
        return tuple(NetConfig(tap=None, mac=_random_mac()) for _ in saved.nets)
    return saved.nets


def _random_mac() -> str:
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{octet:02x}" for octet in octets)


def restored_vsock(
    saved: VmConfig, given: VsockConfig | None, api_sock: Path | None
) -> VsockConfig | None:
    """The vsock device of a saved VM brought back: ``given`` (same CID), else the saved
    one, its socket following the new control socket when it was kasou's default."""
    if saved.vsock is None:
        if given is not None:
            raise ConfigError("vsock", "the snapshot's guest has no vsock device to attach")
        return None
    if given is not None:
        if given.cid != saved.vsock.cid:
            raise ConfigError(
                "vsock",
                f"cid={given.cid}: the guest was saved with cid={saved.vsock.cid}, which it "
                "keeps; give the same cid with a new uds",
            )
        return given
    # kasou's own default (the agent's socket next to the control socket) follows the new
    # control socket.
    if (
        api_sock is not None
        and saved.api_sock is not None
        and saved.vsock.uds == Path(f"{saved.api_sock}.vsock")
    ):
        return saved.vsock._replace(uds=Path(f"{api_sock}.vsock"))
    return saved.vsock


def restore_machine(vm: Vm, image: MachineImage) -> None:
    """Put the saved KVM, vCPU and virtio states into ``vm`` (built from ``image`` by
    ``build_vm``, its legacy devices already restored there), before it starts. Raises
    ``SnapshotError`` naming the first state refused."""
    from kasou.devices.virtio import VirtioMmio, VirtioMmioState
    from kasou.vmm.state import KvmVmState, VcpuState, restore_kvm_vm

    sections = image.sections
    restore_kvm_vm(vm.vm_fd, decode_state(_section(sections, "kvm"), KvmVmState, what="kvm"))
    vcpus = [
        decode_state(_section(sections, f"vcpu{index}"), VcpuState, what=f"vcpu{index}")
        for index in range(len(vm.vcpus))
    ]
    vm.restore_vcpus(vcpus)
    for key, transport in vm.virtio().items():
        assert isinstance(transport, VirtioMmio)
        name = f"dev.{key}"
        transport.restore(decode_state(_section(sections, name), VirtioMmioState, what=name))
    if image.clone and vm.config.acpi:
        _new_generation(vm)


def _new_generation(vm: Vm) -> None:
    """Tell a clone's guest it is a new copy: a new VM generation ID and its ACPI
    notification (GPE 0; Linux's vmgenid driver then reseeds its random number generator,
    so clones never share random numbers)."""
    from kasou.arch.x86_64.acpi import write_generation_id

    write_generation_id(vm.memory, os.urandom(16))
    if not vm.devices["pm"].notify_generation_change():
        log.info(
            "the clone's guest has not enabled the generation ID event; it reads the new ID later"
        )


def _section(sections: Mapping[str, bytes], name: str) -> bytes:
    try:
        return sections[name]
    except KeyError:
        raise SnapshotFormatError(f"the snapshot has no {name!r} section") from None


def device_state(image: MachineImage, key: str, kind: type[Any]) -> Any:
    """The saved state of legacy device ``key`` (``None`` when the snapshot has none)."""
    data = image.sections.get(f"dev.{key}")
    return None if data is None else decode_state(data, kind, what=f"dev.{key}")


# --- merging -----------------------------------------------------------------------------


def merge_snapshots(base: Path, diffs: Sequence[Path]) -> dict[str, Any]:
    """Fold diff snapshots, oldest first, into the full snapshot ``base``. Each must apply
    on the one before (its parent id). ``base`` is replaced in one step at the end: an error
    or a crash leaves it as it was."""
    from kasou._sys.fs import copy_sparse
    from kasou.memory import merge_memory

    base = Path(os.path.abspath(base))
    base_meta, _ = _read(base)
    if base_meta.kind != "full":
        raise SnapshotError(f"{base} is a diff snapshot: give the full snapshot first")
    if not diffs:
        raise ConfigError("merge", "give one or more diff snapshots after the base")
    chain: list[tuple[Path, SnapshotMeta, dict[str, bytes]]] = []
    parent = base_meta.id
    for given in diffs:
        diff = Path(os.path.abspath(given))
        meta, sections = _read(diff)
        if meta.kind != "diff":
            raise SnapshotError(f"{diff} is a full snapshot, not a diff")
        if meta.parent != parent:
            raise SnapshotError(
                f"{diff} does not apply on {chain[-1][0] if chain else base}: it was taken "
                "after another snapshot (give the diffs in the order they were taken)"
            )
        if tuple(meta.layout) != tuple(base_meta.layout):
            raise SnapshotError(f"{diff} has another memory layout than {base}")
        chain.append((diff, meta, sections))
        parent = meta.id
    remove_abandoned(base)
    work = base.parent / f".{base.name}.merge-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    merged = 0
    try:
        work.mkdir()
        copy_sparse(base / MEMORY_FILE, work / MEMORY_FILE)
        for diff, meta, sections in chain:
            pages = [
                PageBitmap.from_bytes(_section(sections, f"pages.{index}"), size // 4096)
                for index, (_, size) in enumerate(meta.layout)
            ]
            merged += merge_memory(work / MEMORY_FILE, diff / MEMORY_FILE, pages, meta.layout)
        last_path, last_meta, last_sections = chain[-1]
        # The newest states, and the newest disk copies with their chains (they go with
        # those states).
        for entry in sorted(last_path.iterdir()):
            if entry.is_file() and entry.name.startswith("disk"):
                copy_sparse(entry, work / entry.name)
        full = replace(last_meta, kind="full", parent=None, pages=_allocated_pages(work))
        sections = {
            name: data for name, data in last_sections.items() if not name.startswith("pages.")
        }
        sections["meta"] = encode_state(full)
        write_sections(work / STATE_FILE, sections)
        _fsync_folder(work)
        _install(work, base)
    except BaseException as error:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(error, OSError):
            raise HostError(
                f"cannot merge into {base}: {error.strerror or error}; it is unchanged"
            ) from error
        raise
    return {"path": str(base), "id": full.id, "diffs": len(chain), "pages_merged": merged}


def _allocated_pages(folder: Path) -> int:
    return (folder / MEMORY_FILE).stat().st_blocks * 512 // 4096
