"""Options shared by every tier.

``--progress-log FILE`` appends one JSON line when a test starts and one per phase report
(setup, call, teardown) as it happens. ``make test`` (tests/run_tiers.py) reads it while the
e2e tier runs inside the nested host: it tells a nested host that stopped making progress
from a slow test, names the test it hung in, and lets the tier go on after it without
running again what already ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--progress-log",
        type=Path,
        default=None,
        help="append a JSON line per test start and per phase report to this file",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--progress-log")
    if path is not None:
        config.pluginmanager.register(ProgressLog(path), "kasou-progress-log")


class ProgressLog:
    def __init__(self, path: Path):
        self.path = path

    def _write(self, record: dict[str, str]) -> None:
        # Opened, written and closed per line: the file is read from outside (over 9p) while
        # the run goes on, and a run killed mid-test leaves every line before it whole.
        with self.path.open("a") as log:
            log.write(json.dumps(record) + "\n")

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self._write({"event": "start", "nodeid": nodeid})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._write(
            {"event": report.when or "", "nodeid": report.nodeid, "outcome": report.outcome}
        )
