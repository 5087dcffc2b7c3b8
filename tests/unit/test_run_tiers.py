"""make test's watch over the e2e tier in the nested host (tests/run_tiers.py): the progress
log the tests write is read back into outcomes, and a run that stops writing it is killed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run_tiers


def test_the_progress_log_written_by_pytest_reads_back_as_outcomes(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "@pytest.mark.skip\n"
        "def test_skipped(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError\n"
        "def test_setup_error(broken): pass\n"
    )
    log = tmp_path / "progress.jsonl"
    conftest = Path(__file__).resolve().parents[1] / "conftest.py"
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    run = [*command, f"--progress-log={log}"]
    subprocess.run(run, cwd=tmp_path, capture_output=True, check=False)
    finished, current = run_tiers.read_progress(log)
    assert {nodeid.split("::")[1]: outcome for nodeid, outcome in finished.items()} == {
        "test_ok": "passed",
        "test_bad": "failed",
        "test_skipped": "skipped",
        "test_setup_error": "failed",
    }
    assert current is None


def test_a_test_that_started_and_never_finished_is_named(tmp_path: Path) -> None:
    log = tmp_path / "progress.jsonl"
    log.write_text(
        '{"event": "start", "nodeid": "a"}\n'
        '{"event": "setup", "nodeid": "a", "outcome": "passed"}\n'
        '{"event": "call", "nodeid": "a", "outcome": "passed"}\n'
        '{"event": "teardown", "nodeid": "a", "outcome": "passed"}\n'
        '{"event": "start", "nodeid": "b"}\n'
        '{"event": "setup", "nodeid": "b", "outc'  # cut by the kill
    )
    assert run_tiers.read_progress(log) == ({"a": "passed"}, "b")
    assert run_tiers.read_progress(tmp_path / "never-written") == ({}, None)


def test_a_run_that_stops_writing_its_log_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run_tiers, "STALL", 1.0)
    log = tmp_path / "progress.jsonl"
    script = f"open({str(log)!r}, 'w').write('x\\n'); import time; time.sleep(60)"
    started = time.monotonic()
    code, hung = run_tiers._watch([sys.executable, "-c", script], log)
    assert hung and code == 124
    assert time.monotonic() - started < 30  # well before the command's own 60 s


def test_a_run_that_ends_is_not_hung(tmp_path: Path) -> None:
    code, hung = run_tiers._watch([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "x")
    assert (code, hung) == (3, False)
