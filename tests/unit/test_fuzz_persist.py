"""The atheris harness tests/fuzz/fuzz_persist.py, run for a short bounded time: no input it
finds may make kasou.persist's readers raise anything but SnapshotFormatError.

It starts from seeds that are valid inputs (a section file of encoded states, frames, a
hello), so the paths behind the magic and the CRCs are reached at once.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kasou.persist import encode_state, frame_header, pack_sections, stream_hello

HARNESS = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_persist.py"
SECONDS = 15


@dataclass(frozen=True)
class QueueState:
    """The harness's QueueState, field for field (its sample state's shape)."""

    index: int
    ready: bool
    desc_gpa: int | None


@dataclass(frozen=True)
class SampleState:
    name: str
    regs: bytes
    msrs: tuple[tuple[int, int], ...]
    queues: tuple[QueueState, ...]
    pending: QueueState | None
    halted: bool = False


def seeds(corpus: Path) -> None:
    queue = QueueState(0, True, 0x10000)
    state = SampleState("blk", b"\x01" * 16, ((0x10, 7),), (queue,), queue, halted=True)
    files = {
        "sections": pack_sections({"vcpu0": encode_state(state), "empty": b""}),
        "state": encode_state(state),
        "frames": frame_header(1, b"page") + b"page" + frame_header(2, b"") + b"",
        "hello": stream_hello(),
    }
    corpus.mkdir()
    for name, data in files.items():
        (corpus / name).write_bytes(data)


def test_the_fuzz_harness_finds_no_crash(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install atheris==2.3.0, in the dev extras)")
    corpus = tmp_path / "corpus"
    seeds(corpus)
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
