"""How a command crosses into the outer VM: a POSIX shell script of quoted words.

The host writes the script to ``command.sh`` in the run's private share. The outer VM's
/init reads it into a variable and runs ``env -i chroot /newroot /bin/sh -c "$script"``:
the host's own ``/bin/sh`` (on the host root the VM mounts) runs it with an empty environment,
so the command sees exactly the variables the script exports. The script::

    export NAME='value'     one line per variable, names checked to be shell names
    cd '/the/cwd' || exit 125
    exec 'argv0' 'argv 1' ...    (argv0 must not start with '-')

Every word is quoted with single quotes (POSIX.1-2017 XCU §2.2.2: nothing inside single
quotes is special, so spaces, double quotes, backslashes, ``$``, newlines and any bytes other
than NUL arrive unchanged); a single quote in a word is written ``'"'"'``. Strings are encoded
with ``os.fsencode`` so non-UTF-8 file names that Python holds as surrogates get their
original bytes back. NUL cannot be in an argument or a variable (execve(2) strings end at it)
and is refused.

The script must fit in one argument (MAX_ARG_STRLEN, 32 pages: 128 KiB on x86-64).

Writable host folders ("shares") cross the same way: ``encode_mounts`` writes the lines /init
sources (``. /ctl/mounts.sh``) once the new root is assembled, one per share, mounting 9p tag
``kasoushare<N>`` at the folder's own path under ``$r`` (the new root)::

    mkdir -p "$r"'/the/folder' && mount -t 9p -o trans=virtio,... kasoushare0 "$r"'/the/folder' \
        || fail 'cannot mount the share /the/folder'
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence

__all__ = ["MAX_SCRIPT_BYTES", "SHARE_TAG_PREFIX", "encode_command", "encode_mounts"]

# Linux's MAX_ARG_STRLEN (include/uapi/linux/binfmts.h: PAGE_SIZE * 32), less room to spare.
MAX_SCRIPT_BYTES = 120 * 1024

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_EXIT_NO_CWD = 125


def _quote(word: str, what: str) -> str:
    if "\0" in word:
        raise ValueError(f"{what} contains a NUL character, which no command can receive")
    return shlex.quote(word)


def encode_command(argv: Sequence[str], *, cwd: str, env: Mapping[str, str]) -> bytes:
    """The script that runs ``argv`` in ``cwd`` with exactly the variables ``env``.

    Raises ``ValueError`` naming what cannot be passed: an empty command, a relative ``cwd``,
    a variable name that is not a shell name, a NUL, or a script too long for one argument.
    """
    if not argv:
        raise ValueError("the command is empty: give a program and its arguments")
    if not cwd.startswith("/"):
        raise ValueError(f"the working directory must be absolute: {cwd!r}")
    lines = ["# kasou nested: the command to run, written by the host"]
    for name, value in env.items():
        if not _NAME.match(name):
            raise ValueError(
                f"environment variable name {name!r} cannot be passed: use letters, digits "
                "and underscores, not starting with a digit"
            )
        lines.append(f"export {name}={_quote(value, f'variable {name}')}")
    lines.append(f"cd {_quote(cwd, 'the working directory')} || exit {_EXIT_NO_CWD}")
    if argv[0].startswith("-"):
        # exec takes no "--" in dash, and bash would read the name as an option of exec.
        raise ValueError(f"a program name cannot start with '-': {argv[0]!r}")
    words = " ".join(_quote(arg, f"argument {index}") for index, arg in enumerate(argv))
    lines.append(f"exec {words}")
    script = os.fsencode("\n".join(lines) + "\n")
    if len(script) > MAX_SCRIPT_BYTES:
        raise ValueError(
            f"the command and its environment take {len(script)} bytes, more than the "
            f"{MAX_SCRIPT_BYTES} that fit in one argument: pass less, or put it in a file"
        )
    return script


SHARE_TAG_PREFIX = "kasoushare"


def encode_mounts(paths: Sequence[str]) -> bytes:
    """The /init lines that mount share ``N`` (9p tag ``kasoushare<N>``) at ``paths[N]`` in the
    new root. ``paths`` are absolute; a folder comes after any share that holds it, so the
    caller sorts them."""
    lines = ["# kasou nested: the host folders to mount writable, written by the host"]
    for index, path in enumerate(paths):
        if not path.startswith("/"):
            raise ValueError(f"a shared folder must be an absolute path: {path!r}")
        where = '"$r"' + _quote(path, "a shared folder")
        tag = f"{SHARE_TAG_PREFIX}{index}"
        lines.append(
            f"mkdir -p {where} && mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 "
            f"{tag} {where} || fail {_quote(f'cannot mount the share {path}', 'a message')}"
        )
    return os.fsencode("\n".join(lines) + "\n")
