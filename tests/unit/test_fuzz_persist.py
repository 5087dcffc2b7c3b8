"""The atheris harness tests/fuzz/fuzz_persist.py, run for a short bounded time: no input it
finds may make kasou.persist's readers raise anything but SnapshotFormatError.

It starts from the harness's own seeds (``--write-seeds``): valid inputs, so the paths behind
the magic and the CRCs are reached at once.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_persist.py"
SECONDS = 15


def test_the_fuzz_harness_finds_no_crash(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install atheris==2.3.0, in the dev extras)")
    corpus = tmp_path / "corpus"
    seeded = subprocess.run(
        [sys.executable, str(HARNESS), "--write-seeds", str(corpus)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert seeded.returncode == 0 and len(list(corpus.iterdir())) == 4, seeded.stderr
    result = subprocess.run(
        [
            sys.executable,
            str(HARNESS),
            f"-max_total_time={SECONDS}",
            "-timeout=10",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SECONDS + 120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    done = re.search(r"Done (\d+) runs", output)
    assert done is not None, output[-6000:]
    assert int(done.group(1)) > 1000, output[-6000:]
    assert not list(tmp_path.glob("crash-*"))
