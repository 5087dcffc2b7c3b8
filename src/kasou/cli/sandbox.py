"""``kasou sandbox``: sandbox templates and one-shot sandboxes, on kasoud through the SDK
(``kasou.Sandbox``).

- ``kasou sandbox template DIR``: boot the default guest, wait for its agent, snapshot it into
  DIR, remove the VM (``Sandbox.make_template``).
- ``kasou sandbox run DIR -- CMD``: a clone of the template for one command, its output printed
  as it comes, removed after; exits with the command's status.

The SDK is imported inside the commands (``kasou --help`` does not pay for httpx).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from kasou.cli.vms import HostOption, fail

__all__ = ["sandbox_app"]

sandbox_app = typer.Typer(
    help="Throw-away VMs cloned from a snapshot of a booted guest.", no_args_is_help=True
)


@sandbox_app.command("template", epilog="Example: kasou sandbox template /var/lib/kasou/tpl")
def template(
    folder: Annotated[Path, typer.Argument(help="The snapshot folder to write.")],
    memory: Annotated[str, typer.Option(help="Guest memory of every sandbox.")] = "256M",
    vcpus: Annotated[int, typer.Option(help="vCPUs of every sandbox.")] = 1,
    host: HostOption = None,
) -> None:
    """Boot the default guest, snapshot it once its agent answers, and remove it."""
    from kasou.errors import KasouError
    from kasou.sdk import Client, Sandbox

    try:
        with Client(host) as client:
            written = Sandbox.make_template(folder, client, memory=memory, vcpus=vcpus)
    except KasouError as error:
        fail(error)
    typer.echo(str(written))


@sandbox_app.command("run", epilog="Example: kasou sandbox run /var/lib/kasou/tpl -- uname -a")
def run(
    folder: Annotated[Path, typer.Argument(help="The template (a snapshot folder).")],
    command: Annotated[list[str], typer.Argument(help="The command and its arguments.")],
    timeout: Annotated[float, typer.Option(help="Seconds before the command is killed.")] = 60.0,
    host: HostOption = None,
) -> None:
    """Run one command in a fresh clone of the template; the clone is removed after."""
    from kasou.errors import KasouError
    from kasou.sdk import Client, Sandbox

    status: int | None = None
    try:
        with (
            Client(host) as client,
            Sandbox(folder, client, timeout=timeout) as box,
            box.exec_stream(command) as output,
        ):
            for chunk in output:
                out = sys.stdout if chunk.stream == "stdout" else sys.stderr
                out.write(chunk.data)
                out.flush()
            status = output.exit_code
    except KasouError as error:
        fail(error)
    raise typer.Exit(255 if status is None else status)
