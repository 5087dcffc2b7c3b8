"""The default guest's kernel: Linux 6.1 from Debian's ``linux-source-6.1`` package, configured
as ``make tinyconfig`` plus kasou's fragment (``kernel.config`` next to this module).

The cache key is a hash of the fragment, the source package's version and this recipe's
version, so the kernel is rebuilt exactly when one of them changes. This module does not know
how the kernel is booted; ``kasou.loader`` does.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kasou.image import _cache
from kasou.image._errors import ImageBuildError
from kasou.image._host import ensure_packages, package_version, run_logged
from kasou.image._progress import Progress

__all__ = [
    "FRAGMENT",
    "SOURCE_PACKAGE",
    "Kernel",
    "build_kernel",
    "check_config",
    "find_kernel",
    "merge_fragment",
    "parse_config",
]

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_PACKAGES = ("flex", "bison", "bc", "libelf-dev", "libssl-dev", "make", "gcc", "xz-utils")
FRAGMENT = Path(__file__).with_name("kernel.config")

# Bump when the way the kernel is built changes in a way the fragment does not show.
_RECIPE = "kernel-1"

# Lines of `make` output for a build from clean (counted on one); only scales the progress bar.
_EXPECTED_MAKE_LINES = 1600

# The kernel's own build stamps (`uname -v`), fixed so that two builds of one key agree
# (Documentation/kbuild/reproducible-builds.rst).
_KBUILD_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "Thu Jan  1 00:00:00 UTC 1970",
    "KBUILD_BUILD_USER": "kasou",
    "KBUILD_BUILD_HOST": "kasou",
}

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


@dataclass(frozen=True)
class Kernel:
    vmlinux: Path
    bzimage: Path


def parse_config(text: str) -> dict[str, str]:
    """The options a .config or fragment sets: ``{"CONFIG_X": "y"}``, with ``"n"`` for
    ``# CONFIG_X is not set``. Other lines are comments."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        match = _SET.match(line) or _UNSET.match(line)
        if match is not None:
            options[match.group(1)] = match.group(2) if match.lastindex == 2 else "n"
    return options


def merge_fragment(config: str, fragment: dict[str, str]) -> str:
    """``config`` with every option of ``fragment`` set to the fragment's value (the option's
    old lines removed, the fragment's appended)."""
    kept = []
    for raw in config.splitlines():
        line = raw.strip()
        match = _SET.match(line) or _UNSET.match(line)
        if match is None or match.group(1) not in fragment:
            kept.append(raw)
    for name, value in fragment.items():
        kept.append(f"# {name} is not set" if value == "n" else f"{name}={value}")
    return "\n".join(kept) + "\n"


def check_config(final: dict[str, str], fragment: dict[str, str]) -> list[str]:
    """The fragment's options that ``make olddefconfig`` did not keep, one line each
    (``CONFIG_X: asked y, got n``). Kconfig drops an option whose dependencies are unmet
    without a word; an option absent from .config is off."""
    dropped = []
    for name, wanted in fragment.items():
        got = final.get(name, "n")
        if got != wanted:
            dropped.append(f"{name}: asked {wanted}, got {got}")
    return dropped


def _key(fragment: bytes, source_version: str) -> str:
    digest = hashlib.sha256()
    for part in (_RECIPE.encode(), fragment, source_version.encode()):
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()[:16]


def _fragment_sha(fragment: bytes) -> str:
    return hashlib.sha256(fragment).hexdigest()


def _entry(path: Path) -> Kernel:
    return Kernel(vmlinux=path / "vmlinux", bzimage=path / "bzImage")


def _tarball_identity() -> str | None:
    """The source tarball's size and mtime: a new package version brings a new file."""
    try:
        st = SOURCE_TARBALL.stat()
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def find_kernel() -> tuple[Kernel | None, str]:
    """The cached kernel for the current fragment and source package, or None with the reason
    ("not built", "out of date"). dpkg is asked for the package's version only when the source
    tarball is not the file the kernel was built from (a stat is cheaper than dpkg-query, and
    this runs whenever the default guest boots). Without the tarball, a kernel built from the
    same fragment is taken whatever the source version was."""
    sha = _fragment_sha(FRAGMENT.read_bytes())
    try:
        entries = sorted((_cache.guest_dir() / "kernel").iterdir())
    except OSError:
        return None, "not built"
    identity = _tarball_identity()
    version: str | None = None
    for entry in entries:
        manifest = _cache.read_manifest(entry)
        if manifest is None or manifest.get("fragment_sha256") != sha:
            continue
        if manifest.get("recipe") != _RECIPE:
            continue
        if identity is None or manifest.get("source_tarball") == identity:
            return _entry(entry), ""
        if version is None:
            version = package_version(SOURCE_PACKAGE) or ""
        if manifest.get("source_version") == version:
            return _entry(entry), ""
    return None, "out of date" if entries else "not built"


def build_kernel(progress: Progress) -> Kernel:
    """Build the kernel into the cache (callers hold ``_cache.build_lock``)."""
    log = _cache.log_dir() / "kernel.log"
    log.write_text("")
    needed = list(BUILD_PACKAGES)
    if not SOURCE_TARBALL.exists():
        needed.append(SOURCE_PACKAGE)
    ensure_packages(needed, progress, log)
    version = package_version(SOURCE_PACKAGE)
    if version is None or not SOURCE_TARBALL.exists():
        raise ImageBuildError(
            f"{SOURCE_TARBALL} is missing although {SOURCE_PACKAGE} is installed: "
            f"reinstall it with `apt-get install --reinstall {SOURCE_PACKAGE}`"
        )
    fragment_bytes = FRAGMENT.read_bytes()
    fragment = parse_config(fragment_bytes.decode())
    key = _key(fragment_bytes, version)
    started = time.monotonic()
    with _cache.staging_dir(f"kernel-{key}") as stage:
        src = stage / "linux"
        src.mkdir()
        progress.step(f"unpacking {SOURCE_PACKAGE} {version}")
        run_logged(
            ["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(src), "--strip-components=1"],
            log,
            f"unpacking {SOURCE_TARBALL}",
        )
        progress.step("configuring the kernel")
        make = ["make", "-C", str(src)]
        run_logged([*make, "tinyconfig"], log, "make tinyconfig", env=_KBUILD_ENV)
        dot_config = src / ".config"
        dot_config.write_text(merge_fragment(dot_config.read_text(), fragment))
        run_logged([*make, "olddefconfig"], log, "make olddefconfig", env=_KBUILD_ENV)
        dropped = check_config(parse_config(dot_config.read_text()), fragment)
        if dropped:
            raise ImageBuildError(
                f"the kernel configuration dropped options of {FRAGMENT} (their dependencies "
                "are not met; add the options they depend on to the fragment):\n  "
                + "\n  ".join(dropped)
            )
        progress.step("building the kernel (several minutes)")
        lines = 0

        def on_line(_line: str) -> None:
            nonlocal lines
            lines += 1
            progress.advance(min(0.99, lines / _EXPECTED_MAKE_LINES))

        jobs = str(os.cpu_count() or 1)
        run_logged(
            [*make, f"-j{jobs}", "vmlinux", "bzImage"],
            log,
            "building the kernel",
            env=_KBUILD_ENV,
            on_line=on_line,
        )
        progress.advance(1.0)
        out = stage / "out"
        out.mkdir()
        shutil.copyfile(src / "vmlinux", out / "vmlinux")
        shutil.copyfile(src / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copyfile(dot_config, out / "config")
        shutil.copyfile(log, out / "build.log")
        manifest = {
            "recipe": _RECIPE,
            "fragment_sha256": _fragment_sha(fragment_bytes),
            "source_package": SOURCE_PACKAGE,
            "source_version": version,
            "source_tarball": _tarball_identity() or "",
            "build_seconds": f"{time.monotonic() - started:.0f}",
        }
        entry = _cache.install(out, "kernel", key, manifest)
    return _entry(entry)
