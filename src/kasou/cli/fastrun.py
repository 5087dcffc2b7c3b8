"""``kasou run`` on the stdlib parser: the fast way to a running VM (see ``cli/__init__``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kasou.cli.options import RUN_EXAMPLE, RUN_OPTIONS
from kasou.errors import KasouError

if TYPE_CHECKING:
    from collections.abc import Callable

    from kasou.vmm.vcpu import GuestExit
    from kasou.vmm.vm import Vm

__all__ = ["parser", "run_command", "run_vm"]


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog="kasou run", description="Boot a guest.", epilog=f"example: {RUN_EXAMPLE}"
    )
    for option in RUN_OPTIONS:
        if option.flag:
            parse.add_argument(f"--{option.name}", action="store_true", help=option.help)
            continue
        if option.repeat:
            parse.add_argument(f"--{option.name}", action="append", help=option.help)
            continue
        parse.add_argument(
            f"--{option.name}",
            default=option.default,
            type=option.kind,
            choices=option.choices or None,
            help=option.help,
        )
    return parse


def default_guest() -> Any:
    """The default guest, built first (with a progress display) if it is not cached."""
    from kasou import image

    try:
        return image.default_guest(build=False)
    except image.ImageBuildError:
        pass
    from kasou.cli.progress import BuildProgress

    sys.stderr.write("kasou: building the default guest (once; it is cached)\n")
    with BuildProgress() as progress:
        return image.default_guest(build=True, progress=progress)


def run_command(args: list[str]) -> int:
    options = vars(parser().parse_args(args))
    return run_vm(options)


def run_vm(options: dict[str, object], started: Callable[[bool], None] | None = None) -> int:
    """Build the config from parsed options, run the VM, map its end to an exit status.

    ``started`` is called once: with True when the first boot's vCPUs run (the VM is built:
    its control socket no longer says "booting"), with False at once for a VM that has no
    such moment here (a jailed VM runs in its jail's process, an incoming one waits for its
    sender); not at all when the VM cannot be built."""
    scratch: list[Path] = []
    on_boot = None if started is None else _once(started)
    try:
        from kasou.vmm.runner import print_crash, run

        if options.get("restore") or options.get("incoming") or options.get("clone"):
            if options.get("jail"):
                from kasou.errors import ConfigError

                raise ConfigError("jail", "--jail runs a new VM: not with --restore or --incoming")
            if options.get("incoming") and started is not None:
                started(False)
            ending = _run_saved(options, scratch, on_boot)
        else:
            config = _config(options, scratch)
            if config.jail is not None:
                from kasou.vmm.jailed import run_jailed_vm

                if started is not None:
                    started(False)
                return run_jailed_vm(config)  # the VMM ran, and reported, in the jail
            ending = run(config, on_boot=on_boot)
    except KasouError as error:
        sys.stderr.write(f"kasou: error: {error}\n")
        return 2
    finally:
        if scratch:
            import shutil

            for folder in scratch:
                shutil.rmtree(folder, ignore_errors=True)
    if ending.report is not None or ending.kind.status:
        print_crash(ending)
    return ending.status  # a debug exit's status is the guest's choice


# What a restored or incoming VM keeps from its saved config unless given again.
_SAVED_OPTIONS = ("disk", "net", "vsock", "api_sock", "console")
# Options that describe a new VM, which a saved one already has.
_BOOT_OPTIONS = (
    "kernel",
    "initrd",
    "image",
    "image_writable",
    "cmdline",
    "cloud_init",
    "rng",
    "no_acpi",
    "balloon",
    "reclaim",
    "virtio_console",
    "debug_exit",
)


def _once(started: Callable[[bool], None]) -> Callable[[Vm], None]:
    """``run``'s ``on_boot`` (called at each boot) that calls ``started(True)`` at the
    first."""
    calls: list[None] = []

    def on_boot(vm: Vm) -> None:
        if not calls:
            calls.append(None)
            started(True)

    return on_boot


def _run_saved(
    options: dict[str, object],
    scratch: list[Path],
    on_boot: Callable[[Vm], None] | None = None,
) -> GuestExit:
    """``--restore DIR`` or ``--incoming URL``: a VM saved by a snapshot or sent by a
    migration, with the disks, interfaces and sockets given here replacing the saved ones."""
    from kasou.errors import ConfigError
    from kasou.vmm.config import parse_disk, parse_net, parse_vsock
    from kasou.vmm.runner import run

    given = [name for name in _BOOT_OPTIONS if options.get(name)]
    if given:
        flag = given[0].replace("_", "-")
        raise ConfigError(
            flag, f"--{flag} describes a new VM; a restored or incoming one has its own"
        )
    if options.get("clone") and not options.get("restore"):
        raise ConfigError("clone", "--clone makes a clone of a snapshot: give --restore DIR too")
    if options.get("restore") and options.get("incoming"):
        raise ConfigError("incoming", "give --restore or --incoming, not both")
    overrides: dict[str, Any] = {
        "disks": [parse_disk(str(text)) for text in options["disk"]]  # type: ignore[attr-defined]
        if options.get("disk")
        else None,
        "nets": [parse_net(str(text)) for text in options["net"]]  # type: ignore[attr-defined]
        if options.get("net")
        else None,
        "vsock": parse_vsock(str(options["vsock"])) if options.get("vsock") else None,
        "api_sock": Path(str(options["api_sock"])) if options.get("api_sock") else None,
        # The console is this command's (default stdio), never the saved run's file.
        "console": str(options.get("console") or "stdio"),
        "clone": bool(options.get("clone")),
    }
    if options.get("incoming"):
        from kasou.vmm.migration import run_incoming

        return run_incoming(str(options["incoming"]), scratch=scratch, **overrides)
    from kasou.vmm.snapshot import load_snapshot

    image = load_snapshot(Path(str(options["restore"])), scratch=scratch, **overrides)
    return run(image.config, restore=image, on_boot=on_boot)


def _config(options: dict[str, object], scratch: list[Path]) -> Any:
    from kasou.vmm.config import (
        DEFAULT_CMDLINE,
        VmConfig,
        VsockConfig,
        parse_debug_exit,
        parse_disk,
        parse_net,
        parse_virtio_console,
        parse_vsock,
    )

    limits = _limits(options)  # before any guest is built or overlay made
    kernel, initrd, cmdline = options.get("kernel"), options.get("initrd"), options["cmdline"]
    # --initrd is repeatable: a Multiboot kernel's modules; a Linux kernel takes one.
    initrds = [str(text) for text in initrd or ()]  # type: ignore[attr-defined]
    debug_exit = parse_debug_exit(str(options["debug_exit"])) if options.get("debug_exit") else None
    disks = [parse_disk(str(text)) for text in options.get("disk") or ()]  # type: ignore[attr-defined]
    nets = tuple(parse_net(str(text)) for text in options.get("net") or ())  # type: ignore[attr-defined]
    vsock = parse_vsock(str(options["vsock"])) if options.get("vsock") else None
    console_text = options.get("virtio_console")
    virtio_console = parse_virtio_console(str(console_text)) if console_text is not None else None
    api_sock = Path(str(options["api_sock"])) if options.get("api_sock") else None
    rng = bool(options.get("rng"))
    reclaim = _reclaim(options)
    jail = _jail(options)
    cloud_init = options.get("cloud_init")
    # Built first: bad user-data is refused before the default guest is built or any
    # overlay is made.
    seed = _cloud_init_seed(str(cloud_init), scratch) if cloud_init else None
    # The default guest's kernel and distribution kernels find virtio devices through ACPI.
    known_acpi_kernel = False
    image = options.get("image")
    if image:
        # A disk image: the boot files read from it, the image as /dev/vda (through a
        # throw-away overlay unless --image-writable) and, as for the default guest, the
        # agent on vsock next to the control socket and an entropy device.
        writable = bool(options.get("image_writable"))
        kernel_given = bool(kernel)
        boot = _image_boot(Path(str(image)), kernel, initrds, cmdline, writable, scratch)
        kernel, initrds, cmdline, root_disk = boot
        disks.insert(0, root_disk)
        known_acpi_kernel = not kernel_given
        if vsock is None and api_sock is not None:
            vsock = VsockConfig(cid=3, uds=Path(f"{api_sock}.vsock"))
        rng = True
    elif options.get("image_writable"):
        from kasou.errors import ConfigError

        raise ConfigError("image-writable", "give the image too: --image DISK --image-writable")
    elif not kernel:
        # The default guest: its root disk as /dev/vda through a throw-away qcow2 overlay
        # (the cached image stays pristine and is shared by every VM), the agent on vsock
        # next to the control socket, and an entropy device.
        guest = default_guest()
        kernel = guest.kernel
        known_acpi_kernel = True
        if initrd:
            cmdline = cmdline or guest.cmdline
        else:
            disks.insert(0, _root_overlay(guest.rootfs, scratch))
            cmdline = cmdline or guest.disk_cmdline
        if vsock is None and api_sock is not None:
            vsock = VsockConfig(cid=3, uds=Path(f"{api_sock}.vsock"))
        rng = True
    if seed is not None:
        disks.append(seed)  # after every other disk: the others keep their names
    return VmConfig.from_options(
        kernel=str(kernel),
        initrd=initrds[0] if initrds else None,
        extra_initrds=tuple(Path(text) for text in initrds[1:]),
        memory=options["memory"],  # type: ignore[arg-type]
        console=str(options["console"]),
        cmdline=cmdline or DEFAULT_CMDLINE,
        vcpus=options["vcpus"],
        api_sock=api_sock,
        on_reboot=options["on_reboot"],
        disks=tuple(disks),
        nets=nets,
        vsock=vsock,
        rng=rng,
        acpi=not options.get("no_acpi"),
        seccomp=not options.get("no_seccomp"),
        virtio_cmdline=not known_acpi_kernel,
        balloon=bool(options.get("balloon")),
        reclaim=reclaim,
        virtio_console=virtio_console,
        debug_exit=debug_exit,
        jail=jail,
        limits=limits,
    )


def _limits(options: dict[str, object]) -> Any:
    """``--cpus-quota``, ``--cpu-weight``, ``--cpu-pin``, ``--memory-limit``,
    ``--pids-limit`` as ``kasou.resources.ResourceLimits``; None when none is given."""
    names = ("cpus_quota", "cpu_weight", "cpu_pin", "memory_limit", "pids_limit")
    if all(options.get(name) is None for name in names):
        return None
    from kasou.errors import ConfigError
    from kasou.memory import parse_size
    from kasou.resources import (
        ResourceLimits,
        parse_cpu_pin,
        parse_cpu_weight,
        parse_cpus_quota,
        parse_pids_limit,
    )

    memory_limit = None
    if options.get("memory_limit") is not None:
        try:
            memory_limit = parse_size(str(options["memory_limit"]))
        except ValueError as error:
            raise ConfigError("memory-limit", str(error)) from None

    def given(name: str, parse: Any) -> Any:
        value = options.get(name)
        return None if value is None else parse(str(value))

    return ResourceLimits(
        cpus_quota=given("cpus_quota", parse_cpus_quota),
        cpu_weight=given("cpu_weight", parse_cpu_weight),
        cpu_pin=given("cpu_pin", parse_cpu_pin) or (),
        memory_limit=memory_limit,
        pids_limit=given("pids_limit", parse_pids_limit),
    )


def _jail(options: dict[str, object]) -> Any:
    """``--jail``'s settings (``kasou.jail``), or None; its options alone are refused."""
    from kasou.jail import DEFAULT_BASE, DEFAULT_ID, JailConfig, check_jail

    given = [name for name in ("jail_dir", "jail_uid", "jail_gid") if options.get(name) is not None]
    if not options.get("jail"):
        if given:
            from kasou.errors import ConfigError

            flag = given[0].replace("_", "-")
            raise ConfigError(flag, f"--{flag} is for a jailed VM: add --jail")
        return None
    uid, gid = options.get("jail_uid"), options.get("jail_gid")
    jail = JailConfig(
        base=Path(str(options.get("jail_dir") or DEFAULT_BASE)),
        uid=DEFAULT_ID if uid is None else int(str(uid)),
        gid=DEFAULT_ID if gid is None else int(str(gid)),
    )
    check_jail(jail)  # before the default guest is built or an overlay made
    return jail


def _reclaim(options: dict[str, object]) -> Any:
    """``--reclaim``'s policy (checked against the guest by ``VmConfig``), or None; refused
    before anything is built when it is malformed or has no balloon to inflate."""
    text = options.get("reclaim")
    if text is None:
        return None
    from kasou.errors import ConfigError
    from kasou.vmm.reclaim import parse_reclaim

    if not options.get("balloon"):
        raise ConfigError("reclaim", "--reclaim inflates the balloon: add --balloon")
    return parse_reclaim(str(text))


def _cloud_init_seed(text: str, scratch: list[Path]) -> Any:
    """A NoCloud seed (``--cloud-init``) as a read-only raw disk, removed when kasou ends."""
    from kasou._sys.scratch import scratch_folder
    from kasou.cloudinit import SEED_LABEL, build_seed, parse_cloud_init
    from kasou.vmm.config import DiskConfig, VmConfig

    files = parse_cloud_init(text)
    folder = scratch_folder("seed")
    scratch.append(folder)
    seed = folder / "seed.iso"
    build_seed(seed, files, hostname=VmConfig.name)  # the VM's name (the class default)
    return DiskConfig(seed, read_only=True, format="raw", serial=SEED_LABEL, scratch=True)


def _image_boot(
    image: Path,
    kernel: object,
    initrds: list[str],
    cmdline: object,
    writable: bool,
    scratch: list[Path],
) -> tuple[object, list[str], str, Any]:
    """``--image``: the kernel, initrds, command line and root disk to boot the image with.

    The image's kernel and initrd are written to a scratch folder (the loader takes files)
    unless --kernel/--initrd replace them; the command line is the default one plus the
    image's ``root=UUID=... ro``, or --cmdline plus the image's ``root=`` where it has none.
    """
    import os

    from kasou._sys.scratch import scratch_folder
    from kasou.bootdisk import find_boot_files
    from kasou.vmm.config import DEFAULT_CMDLINE, DiskConfig

    boot = find_boot_files(image)
    folder = scratch_folder("image")
    scratch.append(folder)
    if not kernel:
        kernel = folder / "vmlinuz"
        kernel.write_bytes(boot.kernel)
    if not initrds and boot.initrd is not None:
        (folder / "initrd.img").write_bytes(boot.initrd)
        initrds = [str(folder / "initrd.img")]
    if not cmdline:
        # ``quiet``, as for the default guest: every byte logged on COM1 is two exits, and a
        # distribution's verbose boot log (kernel and systemd) costs more time than the rest
        # of its boot where exits are slow. --cmdline without it shows the whole log.
        cmdline = f"{DEFAULT_CMDLINE} quiet {boot.cmdline}"
    elif not any(word.startswith("root=") for word in str(cmdline).split()):
        cmdline = " ".join([str(cmdline), *(w for w in boot.cmdline.split() if w != "ro")])
    if writable:
        return kernel, initrds, str(cmdline), DiskConfig(image, serial="kasou-root")
    from kasou.disk import create_overlay

    overlay = folder / "root.qcow2"
    create_overlay(overlay, os.path.abspath(image))  # the backing format: the image's own
    return kernel, initrds, str(cmdline), DiskConfig(overlay, serial="kasou-root", scratch=True)


def _root_overlay(base: Path, scratch: list[Path]) -> Any:
    """A qcow2 overlay over the default guest's root image, removed when kasou ends."""
    from kasou._sys.scratch import scratch_folder
    from kasou.disk import create_overlay
    from kasou.vmm.config import DiskConfig

    folder = scratch_folder("root")
    scratch.append(folder)
    overlay = folder / "root.qcow2"
    create_overlay(overlay, base, backing_format="raw")
    return DiskConfig(overlay, serial="kasou-root", scratch=True)
