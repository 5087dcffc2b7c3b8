"""The CLI's backup, restore and migration commands on kasoud: ``kasou backup
create|ls|rm|restore|verify|policy``, ``kasou restore DIR --name NEW``, and the daemon forms
of ``kasou snapshot create NAME DIR`` and ``kasou migrate NAME URL`` (their ``--sock`` forms,
for a single ``kasou run``, stay in ``cli/app.py`` and call in here without one).

Each command only turns arguments into SDK calls (``kasou.sdk``) and answers into text; long
work (a backup, a verification, a snapshot, a migration) is followed with a progress bar
(rich) unless ``--json``. The SDK and rich are imported inside the commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kasou.cli.vms import HostOption, JsonOption, NameArgument, _connected, fail

if TYPE_CHECKING:
    from kasou.sdk import Client
    from kasou.spec import Backup, Operation

__all__ = ["migrate_vm", "register", "snapshot_vm"]

backup_app = typer.Typer(
    help="Backups of kasoud's VMs: make, list, remove, restore, verify; schedule and retention.",
    no_args_is_help=True,
)
BackupIdArgument = Annotated[str, typer.Argument(help="The backup's id (kasou backup ls NAME).")]


def _follow(client: Client, operation: Operation, what: str, quiet: bool) -> Operation:
    """Poll ``operation`` to its end with a progress bar; exit 2 when it failed."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=quiet) as progress:
        task = progress.add_task(what, total=1.0)
        while operation.state.value == "running":
            progress.update(task, completed=operation.progress)
            time.sleep(0.1)
            operation = client.operation(operation.id)
    if operation.state.value != "done":
        fail(operation.error.detail if operation.error is not None else "the operation failed")
    return operation


def _backup_line(backup: Backup) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(backup.created))
    kind = "scheduled" if backup.scheduled else "manual"
    return f"{backup.id:<24} {when:<20} {backup.size / 2**20:>9.1f} MiB  {kind}"


@backup_app.command("create", epilog="Example: kasou backup create db")
def backup_create(
    name: NameArgument, json_output: JsonOption = False, host: HostOption = None
) -> None:
    """Back up a running VM (paused while written), then apply its retention."""
    with _connected(host) as client:
        done = _follow(client, client.backups.create(name), f"backing up {name}", json_output)
    result: dict[str, Any] = done.result or {}
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(f"{name}: backup {result.get('id')} ({int(result.get('size', 0)) >> 20} MiB)")


@backup_app.command("ls", epilog="Example: kasou backup ls db --json")
def backup_ls(name: NameArgument, json_output: JsonOption = False, host: HostOption = None) -> None:
    """List a VM's backups, oldest first: id, time, size, how it was made."""
    with _connected(host) as client:
        backups = client.backups.list(name)
    if json_output:
        typer.echo(json.dumps([b.model_dump(mode="json") for b in backups], indent=2))
        return
    typer.echo(f"{'ID':<24} {'CREATED':<20} {'SIZE':>13}  MADE")
    for backup in backups:
        typer.echo(_backup_line(backup))
        for line in _disk_lines(backup):
            typer.echo(f"  {line}")


def _disk_lines(backup: Backup) -> list[str]:
    """One line a disk of the backup: where the VM had it, and its copy (or why none)."""
    lines = []
    for disk in backup.disks or []:
        if disk.file is None:
            lines.append(f"disk {disk.path}: read-only, not copied")
        else:
            size = f"{(disk.size or 0) / 2**20:.1f} MiB"
            lines.append(f"disk {disk.path}: copy {disk.file} ({size}, sha256 {disk.sha256})")
    return lines


@backup_app.command(
    "inspect", epilog="Example: kasou backup inspect db 20260301T020000-1a2b3c --json"
)
def backup_inspect(
    name: NameArgument,
    backup_id: BackupIdArgument,
    json_output: JsonOption = False,
    host: HostOption = None,
) -> None:
    """Show one backup: when and how it was made, its size, and each disk it copied."""
    with _connected(host) as client:
        backup = client.backups.get(name, backup_id)
    if json_output:
        typer.echo(json.dumps(backup.model_dump(mode="json"), indent=2))
        return
    typer.echo(_backup_line(backup))
    for line in _disk_lines(backup):
        typer.echo(f"  {line}")


@backup_app.command("rm", epilog="Example: kasou backup rm db 20260301T020000-1a2b3c")
def backup_rm(
    name: NameArgument,
    backup_ids: Annotated[list[str], typer.Argument(help="Backup ids.")],
    host: HostOption = None,
) -> None:
    """Remove backups of a VM."""
    with _connected(host) as client:
        for backup_id in backup_ids:
            client.backups.delete(name, backup_id)
            typer.echo(f"{name}: removed {backup_id}")


@backup_app.command(
    "restore", epilog="Example: kasou backup restore db 20260301T020000-1a2b3c --name db-copy"
)
def backup_restore(
    name: NameArgument,
    backup_id: BackupIdArgument,
    new_name: Annotated[
        str | None,
        typer.Option("--name", help="Restore into this new VM (a clone); default: into NAME."),
    ] = None,
    no_start: Annotated[bool, typer.Option("--no-start", help="Do not start it.")] = False,
    host: HostOption = None,
) -> None:
    """Bring a backup back: into a new VM, or into the VM itself (stopped first)."""
    with _connected(host, timeout=120.0) as client:
        vm = client.backups.restore(name, backup_id, new_name, start=not no_start)
    typer.echo(f"{vm.name} {vm.state.value}")


@backup_app.command("verify", epilog="Example: kasou backup verify db 20260301T020000-1a2b3c")
def backup_verify(
    name: NameArgument,
    backup_id: BackupIdArgument,
    json_output: JsonOption = False,
    host: HostOption = None,
) -> None:
    """Check a backup's checksums and run it as a throwaway clone; exit 2 if it is damaged."""
    with _connected(host) as client:
        operation = client.backups.verify(name, backup_id)
        done = _follow(client, operation, f"verifying {backup_id}", json_output)
    if json_output:
        typer.echo(json.dumps(done.result, indent=2))
    else:
        typer.echo(f"{name}: backup {backup_id} is good")


@backup_app.command(
    "policy", epilog="Example: kasou backup policy db --every 3600 --keep-last 24 --keep-daily 7"
)
def backup_policy(
    name: NameArgument,
    every: Annotated[
        float | None, typer.Option("--every", help="Back up every SECONDS.", min=1)
    ] = None,
    daily_at: Annotated[
        str | None, typer.Option("--daily-at", help="Back up each day at HH:MM (local time).")
    ] = None,
    keep_last: Annotated[int | None, typer.Option("--keep-last", min=0)] = None,
    keep_daily: Annotated[int | None, typer.Option("--keep-daily", min=0)] = None,
    keep_weekly: Annotated[int | None, typer.Option("--keep-weekly", min=0)] = None,
    clear: Annotated[bool, typer.Option("--clear", help="No schedule, keep every backup.")] = False,
    json_output: JsonOption = False,
    host: HostOption = None,
) -> None:
    """Show a VM's backup schedule and retention, or set them (any option given)."""
    with _connected(host) as client:
        if clear:
            policy = client.backups.set_policy(name)
        else:
            policy = client.backups.policy(name)
            fields = policy.model_dump(mode="json")
            if every is not None or daily_at is not None:
                fields["schedule"] = {"every": every, "daily_at": daily_at}
            rules = {"keep_last": keep_last, "keep_daily": keep_daily, "keep_weekly": keep_weekly}
            if any(value is not None for value in rules.values()):
                fields["retention"] = rules
            if fields != policy.model_dump(mode="json"):
                policy = client.backups.set_policy(name, **fields)
    typer.echo(json.dumps(policy.model_dump(mode="json"), indent=2 if not json_output else None))


def restore(
    folder: Annotated[Path, typer.Argument(help="A snapshot folder (kasou snapshot create).")],
    name: Annotated[str, typer.Option("--name", help="The new VM's name.")],
    clone: Annotated[
        bool,
        typer.Option("--clone", help="A clone: its own disk overlays, MACs and vsock."),
    ] = False,
    no_start: Annotated[bool, typer.Option("--no-start", help="Only declare it.")] = False,
    host: HostOption = None,
) -> None:
    """Create a VM of kasoud from a snapshot folder, and start it."""
    with _connected(host) as client:
        vm = client.vms.create(
            name=name, restore=str(folder.absolute()), clone=clone, start=not no_start
        )
    typer.echo(f"{vm.name} {vm.state.value}")


def snapshot_vm(name: str, folder: Path, json_output: bool, host: str | None) -> None:
    """``kasou snapshot create NAME DIR``: a snapshot of a VM of kasoud, written by its
    process into DIR (a path on kasoud's host)."""
    with _connected(host) as client:
        operation = client.vms.snapshot(name, str(folder.absolute()))
        done = _follow(client, operation, f"saving {name}", json_output)
    result: dict[str, Any] = done.result or {}
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(
            f"{result.get('kind')} snapshot {result.get('path')}: {result.get('pages')} pages "
            f"in {float(result.get('seconds', 0)):.3f} s, now {result.get('state')}"
        )


def migrate_vm(name: str, url: str, downtime: float, json_output: bool, host: str | None) -> None:
    """``kasou migrate NAME URL``: live-migrate a VM of kasoud; it is stopped here after."""
    with _connected(host) as client:
        operation = client.vms.migrate(name, url, downtime)
        done = _follow(client, operation, f"migrating {name} to {url}", json_output)
    result: dict[str, Any] = done.result or {}
    if json_output:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(
            f"migrated {name} to {url}: downtime {float(result.get('downtime') or 0) * 1000:.0f}"
            f" ms; {name} is stopped here"
        )


def register(app: typer.Typer) -> None:
    """Add ``kasou backup ...`` and ``kasou restore`` to ``app``."""
    app.add_typer(backup_app, name="backup")
    app.command("restore", epilog="Example: kasou restore /var/tmp/snap1 --name web2 --clone")(
        restore
    )
