"""Files and directory trees copied between the host and the guest: ``kasou cp``'s engine.

A copy is a tar stream through the guest agent (``AgentSession``), so neither side holds a
whole file in memory:

- host to guest: Python's tarfile writes the archive into a pipe from a thread, and the session
  streams the pipe into ``tar -x -f - -C DIR`` in the guest (busybox tar). Entries go in owned by
  root (uid 0), whoever runs kasou on the host.
- guest to host: the guest runs ``tar -c -f - -C DIR NAME``; its output goes through a pipe to a
  thread that extracts it with tarfile's ``data`` filter (Python 3.12 docs, "Extraction
  filters"). The archive comes from the guest, so it is untrusted: every entry must lie under
  the one NAME asked for, and the filter refuses absolute names, ``..``, links that point out
  of the destination and device files. It also drops setuid/setgid/sticky and group/other
  write bits and leaves directories their default modes; owners are the user running kasou.

Symbolic links are copied as links, directories recursively, both ways. Destinations follow
cp(1): an existing directory receives the sources under their own names; otherwise the one
source is copied to that name.

What it does not do: parse ``:PATH`` arguments (the CLI does) or open the session.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from kasou.client.agent import AgentSession
from kasou.errors import KasouError

__all__ = ["CopyError", "copy_from_guest", "copy_to_guest", "extract_archive"]

_STDERR_KEPT = 4096  # bytes of the guest tar's stderr kept for the error message


class CopyError(KasouError):
    """A copy that cannot be done, or that failed: a missing source, a destination that is no
    directory, the guest's tar failing, an archive entry that would land outside the
    destination."""


class _Refused(CopyError):
    """An archive entry from the guest that would land outside the destination."""


class _Head:
    """The first few KiB of a stream (the guest tar's stderr), for an error message."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data[: max(0, _STDERR_KEPT - len(self.data))]

    def first_line(self) -> str:
        """The first complaint is the cause (GNU tar adds "Exiting with failure status")."""
        lines = self.data.decode("utf-8", "replace").strip().splitlines()
        return lines[0] if lines else "no message"


class _Worker(threading.Thread):
    """A thread that runs ``work`` and keeps what it raised."""

    def __init__(self, work: Callable[[], None], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._work = work
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._work()
        except BaseException as error:  # reported by the caller, after the guest's side
            self.error = error


def _guest_path(path: str) -> str:
    """``path`` as an absolute, normalised guest path (the agent's commands run in /)."""
    if not path:
        raise CopyError("an empty guest path: write :/path/in/the/guest")
    return posixpath.normpath(posixpath.join("/", path))


def _as_root(member: tarfile.TarInfo) -> tarfile.TarInfo:
    member.uid = member.gid = 0
    member.uname = member.gname = "root"
    return member


def copy_to_guest(session: AgentSession, sources: Sequence[Path], dest: str) -> None:
    """Copy host files or trees ``sources`` to guest path ``dest``: into it if it is a
    directory there, else (one source only) to that name."""
    if not sources:
        raise CopyError("nothing to copy: name a source")
    names = []
    for source in sources:
        if not os.path.lexists(source):
            raise CopyError(f"{source}: no such file or directory")
        name = os.path.basename(os.path.normpath(os.path.abspath(source)))
        if not name:
            raise CopyError(f"{source}: cannot copy the host's root; name a directory in it")
        names.append(name)
    target = _guest_path(dest)
    if session.exec(["test", "-d", target]) == 0:
        folder = target
    elif dest.endswith("/") or len(sources) > 1:
        raise CopyError(f":{dest} is not a directory in the guest")
    else:
        folder, names = posixpath.dirname(target), [posixpath.basename(target)]

    read_end, write_end = os.pipe2(os.O_CLOEXEC)

    def write_archive() -> None:
        with os.fdopen(write_end, "wb") as pipe, tarfile.open(fileobj=pipe, mode="w|") as tar:
            for source, name in zip(sources, names, strict=True):
                tar.add(source, arcname=name, filter=_as_root)

    writer = _Worker(write_archive, "kasou-cp-archive")
    writer.start()
    messages = _Head()
    try:
        status = session.exec(
            ["tar", "-x", "-f", "-", "-C", folder], stdin=read_end, stderr=messages.write
        )
    finally:
        os.close(read_end)  # a writer still going (the guest's tar gave up) gets EPIPE
        writer.join()
    # A guest tar that is done may leave the archive's zero padding unread: no harm. Any
    # other failure of the writer cut the archive short, which is why the guest's tar failed.
    if writer.error is not None and not isinstance(writer.error, BrokenPipeError):
        raise CopyError(f"reading the sources: {writer.error}") from writer.error
    if status != 0:
        raise CopyError(f"tar in the guest failed (status {status}): {messages.first_line()}")


def copy_from_guest(session: AgentSession, sources: Sequence[str], dest: str | Path) -> None:
    """Copy guest files or trees ``sources`` to host path ``dest``: into it if it is a
    directory, else (one source only) to that name."""
    if not sources:
        raise CopyError("nothing to copy: name a source")
    paths = [_guest_path(source) for source in sources]
    if any(path == "/" for path in paths):
        raise CopyError("cannot copy the guest's root; name a directory in it")
    wants_folder = os.fspath(dest).endswith("/")
    dest = Path(dest)
    if dest.is_dir():
        folder, rename = dest, None
    elif len(sources) > 1 or wants_folder:
        raise CopyError(f"{dest} is not a directory")
    elif not dest.parent.is_dir():
        raise CopyError(f"{dest.parent} is not a directory")
    else:
        folder, rename = dest.parent, dest.name
    for path in paths:
        _copy_one_from_guest(session, path, folder, rename)


def _copy_one_from_guest(
    session: AgentSession, path: str, folder: Path, rename: str | None
) -> None:
    name = posixpath.basename(path)
    read_end, write_end = os.pipe2(os.O_CLOEXEC)

    def extract() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            extract_archive(pipe, folder, name, rename)
            # Read the archive's zero padding too: tar in the guest would die of SIGPIPE.
            while pipe.read(1 << 16):
                pass

    extractor = _Worker(extract, "kasou-cp-extract")
    extractor.start()
    messages = _Head()
    try:
        status = session.exec(
            ["tar", "-c", "-f", "-", "-C", posixpath.dirname(path), name],
            stdout=write_end,
            stderr=messages.write,
        )
    finally:
        os.close(write_end)  # the end of the archive, for the extractor
        extractor.join()
    if isinstance(extractor.error, _Refused):
        raise extractor.error  # that is what went wrong, whatever tar said after
    if status != 0:
        raise CopyError(f"tar in the guest failed (status {status}): {messages.first_line()}")
    if extractor.error is not None:
        raise CopyError(f"extracting :{path}: {extractor.error}") from extractor.error


def _renamed(name: str, top: str, new: str) -> str:
    """``name`` (an archive entry's) with its first component ``top`` replaced by ``new``."""
    first, _, rest = name.partition("/")
    if first != top:
        raise _Refused(f"the guest's archive holds {name!r}, which is not under {top!r}: refused")
    return f"{new}/{rest}" if rest else new


def extract_archive(stream: IO[bytes], folder: Path, top: str, rename: str | None = None) -> None:
    """Extract a tar stream whose entries all lie under ``top`` into ``folder``, ``top`` renamed
    to ``rename`` if given. An entry elsewhere, or one the ``data`` filter refuses (an absolute
    name, ``..`` out of ``folder``, a link pointing out, a device), raises CopyError; entries
    before it stay extracted."""
    new = rename or top

    def admit(member: tarfile.TarInfo, destination: str) -> tarfile.TarInfo | None:
        name = _renamed(member.name, top, new)
        # A hard link names another entry of the archive; a symbolic link's target is a path.
        link = _renamed(member.linkname, top, new) if member.islnk() else member.linkname
        try:
            return tarfile.data_filter(
                member.replace(name=name, linkname=link, deep=False), destination
            )
        except tarfile.FilterError as refused:
            raise _Refused(f"refused {member.name!r} from the guest: {refused}") from None

    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            archive.extractall(folder, filter=admit)
    except tarfile.TarError as error:
        raise CopyError(f"the guest's archive is unreadable: {error}") from error
