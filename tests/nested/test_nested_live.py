"""kasou.nested for real: boot the outer VM under QEMU TCG and run commands in it.

Slow (each test boots a VM: 5-15 s on a 2-core host, more when the host is busy) and skipped
where the nested host cannot run (no QEMU, no busybox-static). The first test to run builds
the cached outer kernel and initramfs, which downloads Debian's kernel package (70 MB).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from kasou.nested import NestedError, nested_available, run_nested

_REASON = nested_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_REASON is not None, reason=f"no nested host: {_REASON}"),
]

HERE = Path(__file__).resolve().parent
# The project's interpreter: the nested host sees the same file system, venv included.
PYTHON = sys.executable


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (a run's private temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and str(os.getpid()) != entry.name:
            found.append(cmdline)
    return found


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make run_nested put its private directory (and so QEMU's paths) under ``tmp_path``."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_exit_status_and_output_come_back(private_tmp: Path) -> None:
    result = run_nested(["sh", "-c", "echo hi; exit 3"], cwd=HERE, stream=False, timeout=600)
    assert result.status == 3
    assert result.output == "hi\n"
    assert result.wall_seconds > 0
    assert list(private_tmp.iterdir()) == []  # the private directory is gone


def test_dev_kvm_inside_is_a_real_kvm() -> None:
    kvm_api = "import fcntl,os; fd=os.open('/dev/kvm',os.O_RDWR); print(fcntl.ioctl(fd,0xAE00))"
    script = f'grep -c svm /proc/cpuinfo; ls -l /dev/kvm; {PYTHON} -c "{kvm_api}"'
    result = run_nested(["sh", "-c", script], cwd=HERE, stream=False, cpus=2, timeout=600)
    assert result.status == 0, result.output
    svm_cpus, dev_kvm, api_version = result.output.splitlines()
    assert svm_cpus == "2"  # both vCPUs offer AMD-V
    assert dev_kvm.startswith("c")  # a character device
    assert api_version == "12"  # KVM_GET_API_VERSION (Documentation/virt/kvm/api.rst 4.1)


def test_arguments_directory_environment_and_writes() -> None:
    args = ["two words", "it's", 'a "quote"', "new\nline", "ünïcödé ☃", "$HOME", ""]
    code = textwrap.dedent(
        """
        import json, os, sys
        open("/usr/kasou-nested-write-test", "w").write("x")  # the root is writable
        print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(),
                          "var": os.environ.get("KASOU_NESTED_TEST"),
                          "home": os.environ.get("HOME")}))
        """
    )
    result = run_nested(
        [PYTHON, "-c", code, *args],
        cwd=HERE,
        env={"KASOU_NESTED_TEST": "a 'value'"},
        stream=False,
        timeout=600,
    )
    assert result.status == 0, result.output
    report = json.loads(result.output)
    assert report == {
        "argv": args,
        "cwd": str(HERE),
        "var": "a 'value'",
        "home": os.environ.get("HOME", "/root"),
    }
    assert not Path("/usr/kasou-nested-write-test").exists()  # writes stay in the VM


def test_a_timeout_kills_the_vm(private_tmp: Path) -> None:
    started = time.monotonic()
    with pytest.raises(NestedError, match="hung for 3 s and was killed"):
        run_nested(["sleep", "1000"], cwd=HERE, timeout=3, stream=False)
    assert time.monotonic() - started < 60
    assert processes_mentioning(str(private_tmp)) == []
    assert list(private_tmp.iterdir()) == []


def test_sigterm_to_the_caller_kills_the_vm(tmp_path: Path) -> None:
    child_code = textwrap.dedent(
        f"""
        from pathlib import Path
        from kasou.nested import run_nested
        run_nested(["sh", "-c", "echo ready; sleep 1000"], cwd=Path({str(HERE)!r}),
                   timeout=600)
        """
    )
    child = subprocess.Popen(
        [PYTHON, "-c", child_code],
        stdout=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert child.stdout is not None
    try:
        # The command's output is streamed: "ready" means the VM is up and running it.
        assert child.stdout.readline() == b"ready\n"
        assert processes_mentioning(str(tmp_path)) != []  # QEMU, using the private dir
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert processes_mentioning(str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_a_shared_folder_brings_results_back(tmp_path: Path) -> None:
    # As `make test` uses it: a scratch folder under /tmp (which is a fresh tmpfs inside),
    # shared, written by the command, read here afterwards.
    results = tmp_path / "results dir"
    results.mkdir()
    result = run_nested(
        ["sh", "-c", 'pwd; echo "from the nested host" > "report 1.txt"'],
        cwd=results,
        shares=[results],
        stream=False,
        timeout=600,
    )
    assert result.status == 0, result.output
    assert result.output == f"{results}\n"
    assert (results / "report 1.txt").read_text() == "from the nested host\n"
