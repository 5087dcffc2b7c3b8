"""Seccomp programs compiled once in a warm template and filled in per VM
(kasou.jail.seccomp, "Compiled once, filled in per VM"), and reports sent to a log given
after the filters started (``Seccomp.report_to``). Filters are installed in child processes
only, so this test process stays unfiltered."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kasou.jail import seccomp

pytest.importorskip("pyseccomp")


@pytest.fixture(scope="module")
def blueprints() -> dict[str, seccomp._Blueprint]:
    made = seccomp._precompile(seccomp.load_lists())
    assert made is not None, "libseccomp's programs could not be precompiled"
    return made


@pytest.mark.parametrize(("channel", "reporter"), [(3, 2), (17, 4242), (1023, (1 << 22) - 1)])
def test_filled_programs_are_the_ones_libseccomp_compiles_for_those_values(
    blueprints: dict[str, seccomp._Blueprint], channel: int, reporter: int
) -> None:
    compiled = seccomp._compile_programs(seccomp.load_lists(), channel, reporter)
    assert set(blueprints) == set(compiled)
    for name, program in compiled.items():
        assert blueprints[name].fill((channel, reporter)) == program, name


def test_the_values_land_in_argument_checks(blueprints: dict[str, seccomp._Blueprint]) -> None:
    # control allows kill and wait4 of the reporter only: its pid is in the program.
    control = blueprints["control"].fill((5, 0x123456))
    assert (0x123456).to_bytes(4, "little") in control
    assert (0x123456).to_bytes(4, "little") not in blueprints["control"].program
    assert {index for _, index in blueprints["control"].slots} == {0, 1}
    assert {index for _, index in blueprints["vcpu"].slots} == {0}  # sendmsg: channel only


def test_programs_that_differ_beyond_the_stand_ins_are_refused() -> None:
    lists = seccomp.load_lists()
    one = seccomp.compile_filter(lists["vcpu"])
    other = seccomp.compile_filter(lists["vcpu"] | {"getppid"})
    assert seccomp._Blueprint.compare(one, other) is None
    assert seccomp._Blueprint.compare(one, one[:-8]) is None
    blank = seccomp._Blueprint.compare(one, one)
    assert blank is not None and blank.slots == () and blank.fill((1, 2)) == one


def _child(body: str) -> subprocess.CompletedProcess[str]:
    script = "import os, threading\nfrom kasou.jail.seccomp import Seccomp\n"
    return subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_precompiled_filters_report_a_forbidden_call_to_the_log_given_later() -> None:
    ran = _child("""
        Seccomp.prepare(precompile=True)
        assert Seccomp._precompiled[1] is not None
        guard = Seccomp.start()
        read_end, write_end = os.pipe()
        guard.report_to(write_end)
        def victim():
            guard.enter("vcpu")
            os.write(1, b"allowed\\n")
            os.getppid()  # in no list
        thread = guard.spawn(lambda: threading.Thread(target=victim, name="victim"))
        guard.spawn(thread.start)
        thread.join()
    """)
    assert ran.returncode == -9, ran
    assert ran.stdout == "allowed\n"
    assert ran.stderr == ""  # reported to the pipe, not to the fd 2 it started with


def test_close_ends_and_reaps_the_reporter_once() -> None:
    ran = _child("""
        guard = Seccomp.start()
        guard.close()
        guard.close()
        try:
            os.kill(guard.reporter, 0)
        except ProcessLookupError:
            print("reaped")
    """)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "reaped\n"
