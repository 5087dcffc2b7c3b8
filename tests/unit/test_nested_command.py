"""How a command crosses into the nested host (kasou.nested._command), run for real.

The script is run the way the outer VM's /init runs it: busybox sh reads it into a variable
and hands it to the host's /bin/sh with an empty environment (only the chroot is left out).
The program it starts is this Python, which reports the argv, directory and environment it got.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kasou.nested._command import MAX_SCRIPT_BYTES, encode_command, encode_mounts

REPORT = (
    "import json, os, sys; "
    "print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'env': dict(os.environ)}))"
)
BUSYBOX = shutil.which("busybox")
# /init's own line, less the chroot: script=$(cat ...); env -i /bin/sh -c "$script"
INIT_LAUNCH = 'script=$(cat "$1") || exit 99; exec env -i /bin/sh -c "$script"'


def run_script(script: bytes, tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "command.sh"
    path.write_bytes(script)
    if BUSYBOX is not None:
        argv = [BUSYBOX, "sh", "-c", INIT_LAUNCH, "init", str(path)]
    else:
        argv = ["env", "-i", "/bin/sh", "-c", script.decode()]
    result = subprocess.run(argv, capture_output=True, check=True, env={})
    report: dict[str, object] = json.loads(result.stdout)
    return report


def python_command(*args: str) -> list[str]:
    return [sys.executable, "-S", "-c", REPORT, *args]


NASTY = [
    "two words",
    "it's",
    'say "hi"',
    "back\\slash",
    "$HOME and `date` and $(id)",
    "line one\nline two\n",
    "\ttab\r",
    "",
    "*",
    "ünïcödé ☃ 仮想",
    "ā \u0081 \x7f",  # UTF-8 bytes 0x81.. are internal markers in ash and dash: must survive
    "'",
    "''\"\"",
    "-n",
    "--",
    "a=b",
]


def test_arguments_arrive_unchanged(tmp_path: Path) -> None:
    script = encode_command(python_command(*NASTY), cwd=str(tmp_path), env={})
    assert run_script(script, tmp_path)["argv"] == NASTY


def test_directory_and_environment_are_exactly_those_given(tmp_path: Path) -> None:
    workdir = tmp_path / "a dir with 'quotes' and ünïcödé"
    workdir.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": "/home/x y", "KASOU_TEST": "v'a\"l\nue $x"}
    report = run_script(encode_command(python_command(), cwd=str(workdir), env=env), tmp_path)
    assert report["cwd"] == str(workdir)
    assert isinstance(report["env"], dict)
    # The shell adds PWD and OLDPWD with the cd, Python adds LC_CTYPE when it finds the C
    # locale (PEP 538); nothing else may come in.
    added = {"PWD", "OLDPWD", "LC_CTYPE"}
    assert {k: v for k, v in report["env"].items() if k not in added} == env


def test_a_missing_directory_ends_with_status_125(tmp_path: Path) -> None:
    script = encode_command(["true"], cwd=str(tmp_path / "missing"), env={})
    (tmp_path / "command.sh").write_bytes(script)
    result = subprocess.run(
        ["/bin/sh", str(tmp_path / "command.sh")], capture_output=True, check=False
    )
    assert result.returncode == 125


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0")),
        max_size=5,
    )
)
def test_any_text_arguments_arrive_unchanged(args: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        script = encode_command(python_command(*args), cwd=tmp, env={})
        assert run_script(script, Path(tmp))["argv"] == args


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {}, "empty"),
        (["echo", "a\0b"], {}, "NUL"),
        (["echo"], {"A": "x\0"}, "NUL"),
        (["echo"], {"1A": "x"}, "cannot be passed"),
        (["echo"], {"A-B": "x"}, "cannot be passed"),
        (["-x"], {}, "cannot start with '-'"),
        (["echo", "x" * MAX_SCRIPT_BYTES], {}, "fit in one argument"),
    ],
)
def test_what_cannot_be_passed_is_refused(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_command(argv, cwd="/", env=env)


def test_relative_directory_is_refused() -> None:
    with pytest.raises(ValueError, match="absolute"):
        encode_command(["true"], cwd="work", env={})


def test_non_utf8_names_keep_their_bytes(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9")  # Latin-1 bytes: a surrogate in Python's str
    script = encode_command(["printf", "%s", name], cwd=str(tmp_path), env={})
    (tmp_path / "command.sh").write_bytes(script)
    result = subprocess.run(
        ["/bin/sh", str(tmp_path / "command.sh")], capture_output=True, check=False
    )
    assert result.stdout == b"caf\xe9"


@pytest.mark.skipif(BUSYBOX is None, reason="needs busybox")
def test_shared_folders_are_mounted_at_their_own_paths(tmp_path: Path) -> None:
    folders = ["/work/a b", "/tmp/it's", "/srv/ünï\ncode"]
    (tmp_path / "mounts.sh").write_bytes(encode_mounts(folders))
    assert BUSYBOX is not None
    root = tmp_path / "newroot"
    # /init's context: $r is the new root, and mount is the one command faked here (it prints
    # what it was asked), since mounting needs root and a 9p device.
    harness = (
        'r="$1"; fail() { echo "FAIL $*"; exit 1; }; mount() { printf \'%s\\0\' "$@"; }; . "$2"'
    )
    result = subprocess.run(
        [BUSYBOX, "sh", "-c", harness, "init", str(root), str(tmp_path / "mounts.sh")],
        capture_output=True,
        check=True,
    )
    calls = result.stdout.decode().split("\0")[:-1]
    options = "trans=virtio,version=9p2000.L,msize=262144"
    expected: list[str] = []
    for index, folder in enumerate(folders):
        expected += ["-t", "9p", "-o", options, f"kasoushare{index}", f"{root}{folder}"]
        assert (root / folder.lstrip("/")).is_dir()  # made in the new root first
    assert calls == expected


def test_shared_folders_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="absolute"):
        encode_mounts(["results"])
