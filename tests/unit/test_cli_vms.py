"""The daemon side of the ``kasou`` command line (cli/vms.py) where no kasoud is needed: which
of --sock and NAME a shared command takes, and one-line errors with exit status 2. The
commands against a live kasoud are in tests/kvm/test_cli_vms.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kasou.cli import main
from kasou.cli.app import app


def error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith("kasou: error: ")
    return line


@pytest.mark.parametrize("command", ["stop", "pause", "resume", "status", "shutdown"])
def test_a_shared_command_takes_sock_or_names_not_both(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = error_line([command, "--sock", "/tmp/vm.sock", "web"], capsys)
    assert "give --sock or NAME..., not both" in line
    assert "Missing option '--sock' or argument NAME" in error_line([command], capsys)


def test_a_name_goes_to_kasoud_and_says_when_it_is_not_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    socket = tmp_path / "kasoud.sock"
    host = ["--host", str(socket)]
    for argv in (
        ["stop", *host, "web"],
        ["ps", *host],
        ["exec", *host, "web", "--", "true"],  # options before NAME: what follows is the command
        ["logs", *host, "web"],
    ):
        line = error_line(argv, capsys)
        assert line == f"kasou: error: kasoud is not running on {socket}: start it with `kasoud`"


def test_kasou_host_is_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KASOU_HOST", str(tmp_path / "elsewhere.sock"))
    assert "elsewhere.sock: start it" in error_line(["ps"], capsys)


def test_bad_arguments_are_refused_before_kasoud_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = ["--host", str(tmp_path / "kasoud.sock")]  # nothing listens: must not matter
    assert "Missing command" in error_line(["exec", *host, "web", "--"], capsys)
    assert "--tty needs the VM's control socket" in error_line(
        ["exec", *host, "-t", "web", "--", "sh"], capsys
    )
    assert "give KEY=VALUE" in error_line(["create", "web", "--label", "team", *host], capsys)
    assert "memory" in error_line(["create", "web", "--memory", "lots", *host], capsys)


def test_shell_completion_is_offered() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert "--install-completion" in result.output
    assert "--show-completion" in result.output
