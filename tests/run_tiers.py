"""Run every test tier this machine can run and print the count of each (``make test``).

Tiers (shared/DESIGN.md, "Tests"):

- static: ruff (lint and format), mypy --strict, import-linter layer contracts;
- unit: no /dev/kvm needed;
- kvm: the guest kit's tiny guests on this host's /dev/kvm (PVM is enough), and the same
  guests under QEMU;
- tools: the tooling around kasou under QEMU: the nested host itself, the guest agent;
- e2e: the default Linux guest, on hardware KVM directly, else inside the nested host.

The default guest and the Debian 12 image are built first (cached; the first build compiles a
kernel, ~7 min here, and the Debian image takes about a minute).

A tier that ran no test is reported as not run and fails the run (set KASOU_ALLOW_SKIP=1 to
accept that on a machine that cannot run it), so a skipped tier cannot pass unnoticed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"


@dataclass
class TierResult:
    name: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    note: str = ""

    @property
    def ran(self) -> int:
        return self.passed + self.failed


def _junit_counts(path: Path, result: TierResult) -> None:
    if not path.exists():
        return
    root = ElementTree.parse(path).getroot()
    for suite in root.iter("testsuite"):
        tests = int(suite.get("tests", 0))
        failures = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        result.failed += failures
        result.skipped += skipped
        result.passed += tests - failures - skipped


def run_static() -> TierResult:
    result = TierResult("static")
    start = time.monotonic()
    checks = [
        [str(VENV / "ruff"), "check", "src", "tests", "bench"],
        [str(VENV / "ruff"), "format", "--check", "src", "tests", "bench"],
        [str(VENV / "mypy")],
        [str(VENV / "lint-imports")],
    ]
    for command in checks:
        print(f"\n$ {Path(command[0]).name} {' '.join(command[1:])}", flush=True)
        if subprocess.run(command, cwd=ROOT, check=False).returncode == 0:
            result.passed += 1
        else:
            result.failed += 1
    result.seconds = time.monotonic() - start
    return result


def run_pytest(name: str, paths: list[str]) -> TierResult:
    result = TierResult(name)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"kasou-{name}-") as scratch:
        report = Path(scratch) / "junit.xml"
        command = [str(VENV / "pytest"), "-q", *paths, f"--junitxml={report}"]
        print(f"\n=== tier {name}: {' '.join(command[1:-1])}", flush=True)
        code = subprocess.run(command, cwd=ROOT, check=False).returncode
        _junit_counts(report, result)
        if code not in (0, 5) and result.failed == 0:
            result.failed += 1
            result.note = f"pytest exited {code}"
    result.seconds = time.monotonic() - start
    return result


# The e2e tier inside the nested host (QEMU TCG emulating AMD-V). That host now and then
# hangs as a whole (its kernel, not a test: nothing inside moves any more), so the tier is
# watched through the progress log the tests append to (tests/conftest.py):
NESTED_TIMEOUT = 2400  # seconds for one nested host, the whole tier
TEST_TIMEOUT = 600  # pytest-timeout per test inside (the longest takes ~150 s here)
STALL = TEST_TIMEOUT + 180  # no progress line for this long: the nested host hung
ATTEMPTS = 3  # nested hosts booted at most; each goes on after the tests already run


def run_nested_tier(name: str, paths: list[str]) -> TierResult:
    """A hung nested host is killed once it stops making progress, and a new one goes on
    with the tests that have not run. A test that hangs it twice fails."""
    result = TierResult(name)
    start = time.monotonic()
    outcomes: dict[str, str] = {}
    hangs: dict[str, int] = {}
    notes: list[str] = []
    for attempt in range(1, ATTEMPTS + 1):
        with tempfile.TemporaryDirectory(prefix=f"kasou-{name}-") as scratch:
            os.chmod(scratch, 0o777)  # written from inside the nested host
            log = Path(scratch) / "progress.jsonl"
            command = [
                str(VENV / "pytest"), "-q", *paths, f"--timeout={TEST_TIMEOUT}",
                *(f"--deselect={nodeid}" for nodeid in outcomes),
            ]  # fmt: skip
            print(f"\n=== tier {name} (nested host {attempt}): {' '.join(command[1:])}", flush=True)
            wrapper = [str(VENV / "kasou"), "nested", "--timeout", str(NESTED_TIMEOUT)]
            command = [*wrapper, "--share", scratch, "--", *command, f"--progress-log={log}"]
            code, hung = _watch(command, log)
            finished, current = read_progress(log)
        outcomes.update(finished)
        if not hung:
            if code not in (0, 5) and "failed" not in outcomes.values():
                notes.append(f"pytest exited {code}")
                result.failed += 1
            break
        where = current or "before its first test"
        print(f"\n=== the nested host stopped making progress ({where})", flush=True)
        if current is not None:
            hangs[current] = hangs.get(current, 0) + 1
            if hangs[current] == 2:
                outcomes[current] = "failed"
                notes.append(f"{current} hung the nested host twice")
    else:
        notes.append(f"the nested host hung {ATTEMPTS} times")
        result.failed += 1
    for outcome in outcomes.values():
        setattr(result, outcome, getattr(result, outcome) + 1)
    retries = sum(hangs.values())
    if retries:
        notes.append(f"the nested host hung {retries} time(s) and was restarted after them")
    result.note = "; ".join(notes) or "inside the nested host"
    result.seconds = time.monotonic() - start
    return result


def _watch(command: list[str], log: Path) -> tuple[int, bool]:
    """Run ``command``; its status, and whether it hung (killed at the nested host's own
    timeout, or here when ``log`` went ``STALL`` seconds without a line)."""
    process = subprocess.Popen(command, cwd=ROOT)
    started = time.monotonic()
    while True:
        try:
            code = process.wait(5)
        except subprocess.TimeoutExpired:
            pass
        else:
            return code, code == 124  # `kasou nested`: the outer VM hung
        try:
            idle = time.time() - log.stat().st_mtime
        except FileNotFoundError:
            idle = time.monotonic() - started
        if idle > STALL:
            process.terminate()  # `kasou nested` kills its QEMU on the way out
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            return 124, True


def read_progress(log: Path) -> tuple[dict[str, str], str | None]:
    """The outcome of each test that finished (passed, failed or skipped), and the test that
    started and did not finish, if any."""
    outcomes: dict[str, str] = {}
    finished: dict[str, str] = {}
    current = None
    try:
        lines = log.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the last line of a run killed while writing it
        nodeid, event = record["nodeid"], record["event"]
        if event == "start":
            current = nodeid
            outcomes[nodeid] = "passed"
            continue
        outcome = record.get("outcome")
        if outcome == "failed":
            outcomes[nodeid] = "failed"
        elif outcome == "skipped" and outcomes.get(nodeid) != "failed":
            outcomes[nodeid] = "skipped"
        if event == "teardown":
            finished[nodeid] = outcomes[nodeid]
            if current == nodeid:
                current = None
    return finished, current


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from kasou.kvm.host import probe_host

    host = probe_host()
    results = [run_static(), run_pytest("unit", ["tests/unit"])]
    print("\n=== building the default guest (cached)", flush=True)
    built = (
        subprocess.run([str(VENV / "kasou"), "image", "build"], cwd=ROOT, check=False).returncode
        == 0
    )
    # The Debian 12 image of the e2e tier: built here, since mmdebstrap needs Debian's mirror
    # and the nested host has no network (cached; about a minute when it is not).
    print("\n=== building the Debian 12 image (cached)", flush=True)
    command = [str(VENV / "kasou"), "image", "build", "--distro", "debian-12"]
    built = subprocess.run(command, cwd=ROOT, check=False).returncode == 0 and built
    if host.problem is None:
        results.append(run_pytest("kvm", ["tests/kvm", "tests/guestkit_qemu"]))
    else:
        results.append(TierResult("kvm", note=f"not run: {host.problem}"))
    results.append(run_pytest("tools", ["tests/nested", "tests/image_qemu"]))
    if not built:
        results.append(TierResult("e2e", failed=1, note="a guest image did not build"))
    elif host.backend.boots_linux:
        results.append(run_pytest("e2e", ["tests/e2e"]))
    else:
        results.append(run_nested_tier("e2e", ["tests/e2e"]))

    allow_skip = os.environ.get("KASOU_ALLOW_SKIP") == "1"
    print("\n tier     passed  failed  skipped  seconds  note")
    for result in results:
        note = result.note or ("" if result.ran else "NOT RUN")
        print(
            f" {result.name:<8} {result.passed:>6}  {result.failed:>6}  {result.skipped:>7}"
            f"  {result.seconds:>7.1f}  {note}"
        )
    passed = sum(result.passed for result in results)
    failed = sum(result.failed for result in results)
    skipped = sum(result.skipped for result in results)
    not_run = [result.name for result in results if result.ran == 0]
    print(f"\n{passed} passed, {failed} failed, {skipped} skipped")
    if not_run and not allow_skip:
        print(f"tiers that ran nothing: {', '.join(not_run)} (a skipped tier has not passed)")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
