"""The ``kasou`` command line.

``main`` sends ``kasou run`` (without ``--help``) straight to a small stdlib parser, so a VM
starts without paying for typer's and rich's imports (kasou's start time is a target: exec to
the first guest instruction in 60 ms). Every other command, and ``kasou run --help``, goes
through the typer app in ``cli/app.py``. Both parsers are built from the options table in
``cli/options.py``, and a unit test keeps them equal.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kasou`` console script."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["run"] and not {"-h", "--help"} & set(args):
        from kasou.cli.fastrun import run_command

        return run_command(args[1:])
    from kasou.cli.app import app

    try:
        result = app(args=args, prog_name="kasou", standalone_mode=False)
    except SystemExit as leave:
        return int(leave.code or 0)
    except Exception as error:  # usage errors, formatted by typer
        import typer  # typer carries its own copy of click: its errors are not click's

        if isinstance(error, typer.TyperException):
            show = getattr(error, "show", None)  # a usage error prints the usage line too
            if callable(show):
                show()
            else:
                sys.stderr.write(f"kasou: error: {error.format_message()}\n")
            return 2
        if isinstance(error, typer.Abort):
            return 130
        raise
    return int(result or 0)
