"""``kasou run`` on the stdlib parser: the fast way to a running VM (see ``cli/__init__``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kasou.cli.options import RUN_EXAMPLE, RUN_OPTIONS
from kasou.errors import KasouError

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


def run_vm(options: dict[str, object]) -> int:
    """Build the config from parsed options, run the VM, map its end to an exit status."""
    scratch: list[Path] = []
    try:
        config = _config(options, scratch)
        from kasou.vmm.runner import print_crash, run

        ending = run(config)
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
    return ending.kind.status


def _config(options: dict[str, object], scratch: list[Path]) -> Any:
    from kasou.vmm.config import (
        DEFAULT_CMDLINE,
        VmConfig,
        VsockConfig,
        parse_disk,
        parse_net,
        parse_virtio_console,
        parse_vsock,
    )

    kernel, initrd, cmdline = options.get("kernel"), options.get("initrd"), options["cmdline"]
    disks = [parse_disk(str(text)) for text in options.get("disk") or ()]  # type: ignore[attr-defined]
    nets = tuple(parse_net(str(text)) for text in options.get("net") or ())  # type: ignore[attr-defined]
    vsock = parse_vsock(str(options["vsock"])) if options.get("vsock") else None
    console_text = options.get("virtio_console")
    virtio_console = parse_virtio_console(str(console_text)) if console_text is not None else None
    api_sock = Path(str(options["api_sock"])) if options.get("api_sock") else None
    rng = bool(options.get("rng"))
    if not kernel:
        # The default guest: its root disk as /dev/vda through a throw-away qcow2 overlay
        # (the cached image stays pristine and is shared by every VM), the agent on vsock
        # next to the control socket, and an entropy device.
        guest = default_guest()
        kernel = guest.kernel
        if initrd:
            cmdline = cmdline or guest.cmdline
        else:
            disks.insert(0, _root_overlay(guest.rootfs, scratch))
            cmdline = cmdline or guest.disk_cmdline
        if vsock is None and api_sock is not None:
            vsock = VsockConfig(cid=3, uds=Path(f"{api_sock}.vsock"))
        rng = True
    return VmConfig.from_options(
        kernel=str(kernel),
        initrd=initrd,  # type: ignore[arg-type]
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
        balloon=bool(options.get("balloon")),
        virtio_console=virtio_console,
    )


def _root_overlay(base: Path, scratch: list[Path]) -> Any:
    """A qcow2 overlay over the default guest's root image, removed when kasou ends."""
    import tempfile

    from kasou.disk import create_overlay
    from kasou.vmm.config import DiskConfig

    folder = Path(tempfile.mkdtemp(prefix="kasou-root-"))
    scratch.append(folder)
    overlay = folder / "root.qcow2"
    create_overlay(overlay, base, backing_format="raw")
    return DiskConfig(overlay, serial="kasou-root")
