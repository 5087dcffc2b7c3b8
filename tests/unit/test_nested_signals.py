"""SIGTERM during a nested run: clean-up runs first, then the signal does what it would have.

Each case runs in a child Python, since the default action ends the process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap


def run_child(body: str) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        """
        import os, signal, sys
        from kasou.nested._run import _sigterm_raises
        """
    ) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)


def test_sigterm_unwinds_through_cleanup_then_kills_the_process() -> None:
    child = run_child(
        """
        with _sigterm_raises():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                print("not reached")
            finally:
                print("cleaned up", flush=True)
        print("not reached either")
        """
    )
    assert child.stdout == "cleaned up\n"
    assert child.returncode == -signal.SIGTERM


def test_a_previous_handler_gets_the_signal_after_cleanup() -> None:
    child = run_child(
        """
        def handler(signum, frame):
            print("handler", signum == signal.SIGTERM, flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, handler)
        with _sigterm_raises():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                print("cleaned up", flush=True)
        """
    )
    assert child.stdout == "cleaned up\nhandler True\n"
    assert child.returncode == 7


def test_the_previous_handler_is_back_afterwards() -> None:
    child = run_child(
        """
        with _sigterm_raises():
            pass
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
        """
    )
    assert child.stdout == "True\n"
