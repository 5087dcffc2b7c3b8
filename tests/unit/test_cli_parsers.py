"""The ``kasou`` command line (kasou.cli): the fast ``kasou run`` parser and the typer app must
agree, every command explains itself, and errors are one line with exit status 2."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from kasou.cli import main
from kasou.cli.app import app
from kasou.cli.fastrun import parser

COMMANDS = {
    "run",
    "host",
    "snapshot",
    "migrate",
    "status",
    "pause",
    "resume",
    "stop",
    "shutdown",
    "exec",
    "image",
    "nested",
    "demo",
    "disk",
    "devices",
    "balloon",
    "reclaim",
    "cp",
    "limits",
    "rate-limit",
    # kasoud's VMs (cli/vms.py)
    "ps",
    "create",
    "start",
    "restart",
    "rm",
    "logs",
    "console",
    "events",
    "top",
    "inspect",
    # backups and restores on kasoud (cli/backups.py)
    "backup",
    "restore",
    # sandboxes from a template snapshot (cli/sandbox.py)
    "sandbox",
}
# Every command a user can run, as words after "kasou" (groups name their subcommands).
LEAF_COMMANDS = (
    [[name] for name in sorted(COMMANDS - {"image", "disk", "snapshot", "backup", "sandbox"})]
    + [["backup", verb] for verb in ("create", "ls", "rm", "restore", "verify", "policy")]
    + [["sandbox", verb] for verb in ("template", "run")]
    + [
        ["snapshot", "create"],
        ["snapshot", "merge"],
        ["snapshot", "info"],
        ["image", "build"],
        ["disk", "create"],
        ["disk", "info"],
    ]
)


def _typer_run_options() -> dict[str, Any]:
    """``kasou run``'s options as typer builds them: long flag -> the click parameter."""
    group = typer.main.get_command(app)
    run = group.commands["run"]  # type: ignore[attr-defined]
    options: dict[str, Any] = {}
    for param in run.params:
        assert param.param_type_name == "option", f"{param.name} is not an option"
        (flag,) = [opt for opt in param.opts if opt.startswith("--")]
        options[flag] = param
    return options


def _fast_run_options() -> dict[str, argparse.Action]:
    """The same for the stdlib parser of the fast path (its ``--help`` aside)."""
    return {
        flag: action
        for action in parser()._actions  # argparse keeps no public list of its actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    }


def test_both_run_parsers_take_the_same_long_options() -> None:
    assert sorted(_typer_run_options()) == sorted(_fast_run_options())


def test_both_run_parsers_have_the_same_defaults() -> None:
    fast_defaults = vars(parser().parse_args([]))
    typer_options = _typer_run_options()
    for flag, action in _fast_run_options().items():
        param = typer_options[flag]
        assert action.dest == param.name
        assert fast_defaults[action.dest] == param.default, flag
    assert fast_defaults["memory"] == "512M"
    assert fast_defaults["vcpus"] == 1


def test_both_run_parsers_say_the_same_about_each_option() -> None:
    typer_options = _typer_run_options()
    for flag, action in _fast_run_options().items():
        assert action.help == typer_options[flag].help, flag


def test_the_fast_parser_reads_typed_values() -> None:
    args = parser().parse_args(
        ["--kernel", "vmlinux", "--vcpus", "2", "--memory", "1G", "--on-reboot", "restart"]
    )
    assert (args.kernel, args.vcpus, args.memory, args.on_reboot) == ("vmlinux", 2, "1G", "restart")


def test_kasou_help_lists_every_command() -> None:
    group = typer.main.get_command(app)
    assert set(group.commands) == COMMANDS  # type: ignore[attr-defined]
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f" {name} " in result.output, name


@pytest.mark.parametrize("words", LEAF_COMMANDS, ids=" ".join)
def test_each_command_shows_an_example(words: list[str]) -> None:
    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output
    assert f"kasou {' '.join(words)}" in " ".join(result.output.split())  # the example runs it


def test_run_help_goes_through_typer_and_shows_the_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Example: kasou run --kernel vmlinux" in out
    assert "--on-reboot" in out


def test_a_missing_kernel_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--kernel", "/nonexistent"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("kasou: error: ")
    assert "kernel: /nonexistent does not exist" in lines[0]


def test_a_bad_memory_size_is_one_line_and_status_2(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    assert main(["run", "--kernel", str(kernel), "--memory", "lots"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("kasou: error: memory: 'lots' is not a size")


def _status(argv: list[str]) -> int:
    """What the ``kasou`` script exits with: it runs ``sys.exit(main())``."""
    try:
        return main(argv)
    except SystemExit as leave:
        return int(leave.code or 0)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["run", "--vcpus", "two"], "invalid int value"),
        (["run", "--on-reboot", "halt"], "invalid choice"),
        (["run", "--no-such-option"], "unrecognized arguments"),
        (["status"], "Missing"),  # --sock is required
        (["no-such-command"], "No such command"),
        (["exec", "--sock", "/tmp/vm.sock"], "Missing"),  # no command to run
    ],
)
def test_usage_errors_exit_2_with_a_message_not_a_traceback(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _status(argv) == 2
    err = capsys.readouterr().err
    assert says in err
    assert "Traceback" not in err


def test_a_request_to_a_vm_that_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--sock", "/nonexistent/vm.sock"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("kasou: error: ")
    assert "is the VM running with --api-sock?" in line
