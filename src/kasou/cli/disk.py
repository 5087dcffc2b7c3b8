"""``kasou disk``: create qcow2 images and overlays, and describe an image's chain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from kasou.disk import DiskInfo

__all__ = ["disk_app"]

disk_app = typer.Typer(help="Disk images: raw and qcow2.", no_args_is_help=True)


def _fail(error: Exception) -> NoReturn:
    typer.echo(f"kasou: error: {error}", err=True)
    raise typer.Exit(2)


@disk_app.command(
    "create", epilog="Example: kasou disk create --backing debian.raw --size 20G vm.qcow2"
)
def create(
    out: Annotated[Path, typer.Argument(help="The qcow2 image to create (must not exist).")],
    backing: Annotated[
        Path | None,
        typer.Option(help="Make an overlay over this image (raw or qcow2)."),
    ] = None,
    backing_format: Annotated[
        str | None,
        typer.Option(help="The backing image's format: raw or qcow2. Default: probed."),
    ] = None,
    size: Annotated[
        str | None,
        typer.Option(help="Virtual size, like 10G. Default: the backing image's size."),
    ] = None,
    cluster_size: Annotated[
        str, typer.Option(help="qcow2 cluster size, a power of two from 512 to 2M.")
    ] = "64K",
) -> None:
    """Create a qcow2 (v3) image: empty, or an overlay over a backing image.

    A relative --backing path is taken from the current folder and stored relative to the
    overlay's folder, where anyone opening the overlay will look for it."""
    from kasou.disk import create_overlay, create_qcow2
    from kasou.errors import KasouError
    from kasou.memory import format_size, parse_size

    try:
        virtual_size = None if size is None else parse_size(size)
        cluster = parse_size(cluster_size)
    except ValueError as error:
        _fail(error)
    try:
        if backing is None:
            if virtual_size is None:
                _fail(ValueError("--size is needed for an image without --backing"))
            create_qcow2(out, virtual_size, cluster_size=cluster)
        else:
            create_overlay(
                out,
                _stored_backing(backing, out),
                backing_format=backing_format,
                size=virtual_size,
                cluster_size=cluster,
            )
    except KasouError as error:
        _fail(error)
    info = _inspect(out)
    chain = f" over {info.backing.path} ({info.backing.format})" if info.backing else ""
    typer.echo(f"created {out}: qcow2, {format_size(info.size)}{chain}")


@disk_app.command("info", epilog="Example: kasou disk info vm.qcow2")
def info(
    image: Annotated[Path, typer.Argument(help="A raw or qcow2 image.")],
) -> None:
    """Show an image's format, virtual size, allocated bytes and backing chain."""
    level: DiskInfo | None = _inspect(image)
    depth = 0
    while level is not None:
        indent = "  " * depth
        for name, value in _fields(level):
            typer.echo(f"{indent}{name:<10} {value}")
        level = level.backing
        depth += 1


def _inspect(image: Path) -> DiskInfo:
    from kasou.disk import inspect_disk
    from kasou.errors import KasouError

    try:
        return inspect_disk(image)
    except KasouError as error:
        _fail(error)


def _fields(info: DiskInfo) -> list[tuple[str, str]]:
    from kasou.memory import format_size

    fields = [("image", str(info.path))]
    detail = ""
    if info.format == "qcow2":
        detail = f" (version {info.version}, clusters of {format_size(info.cluster_size or 0)})"
    fields.append(("format", info.format + detail))
    fields.append(("size", f"{format_size(info.size)} ({info.size} bytes)"))
    fields.append(
        ("allocated", f"{info.allocated} bytes in this image, {info.file_size} bytes on disk")
    )
    if info.backing is not None:
        fields.append(("backing", f"{info.backing.path} ({info.backing.format})"))
    return fields


def _stored_backing(backing: Path, out: Path) -> str:
    """The backing path to store in ``out``: absolute as given, or relative to ``out``'s
    folder (the qcow2 rule) when given relative to the current folder."""
    if backing.is_absolute():
        return str(backing)
    return os.path.relpath(os.path.abspath(backing), os.path.abspath(out.parent))
