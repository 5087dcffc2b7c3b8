"""``kasou cp NAME:PATH LOCAL`` and ``kasou cp LOCAL NAME:PATH``: one file into or out of a
VM of kasoud, through its files API (``GET``/``PUT /v1/vms/{name}/files``).

The ``--sock`` form (``kasou.cli.guest``) talks to one ``kasou run``'s agent and copies
trees; this one copies a single regular file, since the files API carries one file's bytes.
A local destination that is a folder receives the file under its guest name; a guest path
ending in ``/`` receives the local file under its own name. The local file is written
beside its final name and renamed into place, so a failed copy leaves nothing half-written.

The SDK (httpx) is imported inside the command, like the other daemon commands.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kasou.errors import ConfigError
from kasou.spec import NAME_PATTERN

__all__ = ["GuestPath", "copy", "parse_guest_path"]

_LOCAL_MODE = 0o644
_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class GuestPath:
    """``NAME:PATH``: a path inside the guest of kasoud's VM ``NAME``."""

    vm: str
    path: str


def parse_guest_path(text: str) -> GuestPath | None:
    """``NAME:/abs/path`` -> GuestPath; anything else (a local path) -> None.

    A local path that holds a colon is taken as local unless what comes before the first
    colon is a valid VM name and what follows is an absolute path (write ``./a:/b`` for a
    local file called ``a:/b``)."""
    name, colon, path = text.partition(":")
    if not colon or not _NAME.fullmatch(name) or not path.startswith("/"):
        return None
    return GuestPath(name, path)


def _plan(source: str, dest: str) -> tuple[GuestPath, Path, bool]:
    """(the guest side, the local side, True when copying out of the guest)."""
    guest_source, guest_dest = parse_guest_path(source), parse_guest_path(dest)
    if guest_source is not None and guest_dest is not None:
        raise ConfigError("cp", "both paths are in guests: copy through a local file")
    if guest_source is not None:
        return guest_source, Path(dest), True
    if guest_dest is not None:
        return guest_dest, Path(source), False
    raise ConfigError(
        "cp",
        f"neither {source!r} nor {dest!r} is NAME:/PATH: write the guest side as "
        "NAME:/path (or use --sock S with :PATH for a `kasou run`)",
    )


def _write_local(target: Path, data: bytes) -> None:
    folder = target.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temporary, _LOCAL_MODE)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def copy(source: str, dest: str, host: str | None) -> str:
    """Copy one file between the local host and a VM of kasoud; return a line saying what
    was copied. Errors are ``KasouError``s (the SDK's ``ApiError`` for kasoud's answers)."""
    from kasou.sdk import Client

    guest, local, out_of_guest = _plan(source, dest)
    if out_of_guest:
        if local.is_dir():
            local = local / posixpath.basename(guest.path.rstrip("/"))
        if not local.parent.is_dir():
            raise ConfigError("cp", f"{local.parent} is not a folder: make it first")
        with Client(host) as client:
            data = client.vms.files.read(guest.vm, guest.path)
        try:
            _write_local(local, data)
        except OSError as error:
            raise ConfigError("cp", f"cannot write {local}: {error.strerror}") from None
        return f"{guest.vm}:{guest.path} -> {local} ({len(data)} bytes)"
    if not local.is_file():
        raise ConfigError("cp", f"{local} is not a regular file: kasou cp NAME:... copies one file")
    target = guest.path
    if target.endswith("/"):
        target += local.name
    try:
        data = local.read_bytes()
    except OSError as error:
        raise ConfigError("cp", f"cannot read {local}: {error.strerror}") from None
    with Client(host) as client:
        client.vms.files.write(guest.vm, target, data)
    return f"{local} -> {guest.vm}:{target} ({len(data)} bytes)"
