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
    try:
        from kasou.vmm.config import DEFAULT_CMDLINE, VmConfig

        kernel, initrd, cmdline = options.get("kernel"), options.get("initrd"), options["cmdline"]
        if not kernel:
            guest = default_guest()
            kernel, initrd = guest.kernel, initrd or guest.initrd
            cmdline = cmdline or guest.cmdline
        api_sock = options.get("api_sock")
        config = VmConfig.from_options(
            kernel=str(kernel),
            initrd=initrd,  # type: ignore[arg-type]
            memory=options["memory"],  # type: ignore[arg-type]
            console=str(options["console"]),
            cmdline=cmdline or DEFAULT_CMDLINE,
            vcpus=options["vcpus"],
            api_sock=Path(str(api_sock)) if api_sock else None,
            on_reboot=options["on_reboot"],
        )
        from kasou.vmm.runner import print_crash, run

        ending = run(config)
    except KasouError as error:
        sys.stderr.write(f"kasou: error: {error}\n")
        return 2
    if ending.report is not None or ending.kind.status:
        print_crash(ending)
    return ending.kind.status
