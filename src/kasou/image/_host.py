"""The build's dealings with the host: Debian packages it needs, and commands run with their
output kept in a log."""

from __future__ import annotations

import logging
import os
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from kasou.image._errors import ImageBuildError
from kasou.image._progress import Progress

__all__ = ["TAIL_LINES", "ensure_packages", "missing_packages", "package_version", "run_logged"]

_log = logging.getLogger("kasou.image")

TAIL_LINES = 20
"""How many of a failed command's last log lines its ImageBuildError quotes."""


def _failure(what: str, log: Path) -> ImageBuildError:
    try:
        with open(log, encoding="utf-8", errors="replace") as text:
            tail = "".join(deque(text, maxlen=TAIL_LINES))
    except OSError:
        tail = ""
    return ImageBuildError(f"{what} failed; the last lines of its log:\n{tail}full log: {log}")


def run_logged(
    argv: Sequence[str],
    log: Path,
    what: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run ``argv``, appending its output (stdout and stderr) to ``log``. Raises
    ``ImageBuildError`` naming ``what``, quoting the log's tail, if it fails to start or exits
    non-zero. ``on_line`` sees each output line as it comes (for progress)."""
    with open(log, "a", encoding="utf-8", errors="replace", buffering=1) as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        try:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=None if env is None else {**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
        except OSError as err:
            out.write(f"cannot run {argv[0]}: {err}\n")
            out.close()
            raise _failure(what, log) from err
        assert proc.stdout is not None
        with proc:
            for line in proc.stdout:
                out.write(line)
                if on_line is not None:
                    on_line(line)
        if proc.returncode != 0:
            out.write(f"exit status {proc.returncode}\n")
            out.close()
            raise _failure(what, log)


def package_version(package: str) -> str | None:
    """The installed version of a Debian package, or None if it is not installed."""
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Status}\t${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    status, _, version = result.stdout.partition("\t")
    if result.returncode != 0 or not status.endswith(" installed"):
        return None
    return version


def missing_packages(packages: Sequence[str]) -> list[str]:
    """Those of ``packages`` that dpkg does not list as installed."""
    return [name for name in packages if package_version(name) is None]


def ensure_packages(packages: Sequence[str], progress: Progress, log: Path) -> None:
    """Install those of ``packages`` that are missing, with apt-get, telling the user which.
    Only root can: anyone else gets an ImageBuildError with the command to run."""
    missing = missing_packages(packages)
    if not missing:
        return
    names = " ".join(missing)
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"building the default guest needs these Debian packages: {names}; "
            f"install them with `sudo apt-get install -y {names}` and run it again"
        )
    progress.step(f"installing Debian packages: {names}")
    _log.warning("installing Debian packages: %s", names)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    try:
        run_logged(install, log, f"apt-get install {names}", env=env)
    except ImageBuildError:
        # A stale package index is the usual cause: refresh it once and try again.
        run_logged(["apt-get", "update"], log, "apt-get update", env=env)
        run_logged(install, log, f"apt-get install {names}", env=env)
