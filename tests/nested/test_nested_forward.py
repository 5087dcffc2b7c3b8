"""A forwarded port of the nested host, for real: a server inside answers on this host's
127.0.0.1, and the nested host still reaches nothing outside (QEMU's ``restrict=on``).

One boot of the outer VM (10-20 s here). Skipped where the nested host cannot run.
"""

from __future__ import annotations

import socket
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kasou.nested import Forward, NestedResult, nested_available, run_nested

_REASON = nested_available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_REASON is not None, reason=f"no nested host: {_REASON}"),
]

HERE = Path(__file__).resolve().parent
GUEST_PORT = 8481
DEADLINE = 300.0  # seconds for the boot and the exchange, on a busy 2-core host


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ask(port: int, deadline: float, done: threading.Event) -> bytes:
    """What the server behind the forwarded port says. Until it listens, QEMU takes the
    connection and closes it (no bytes): try again until it answers or the run ends."""
    while time.monotonic() < deadline and not done.is_set():
        with socket.socket() as client:
            # Long enough for a server under TCG on a busy host: one that took the connection
            # answers it and ends, so a reply given up on would be lost.
            client.settimeout(120)
            try:
                client.connect(("127.0.0.1", port))
                answer = client.recv(256)
            except OSError:
                answer = b""
        if answer:
            return answer
        done.wait(0.2)  # polling another machine's boot, with a deadline
    return b""


def test_a_server_inside_answers_on_the_forwarded_port_and_nothing_goes_out() -> None:
    host_port = _free_port()
    with socket.socket() as bait:
        # A service of this host the nested host must not reach: slirp's 10.0.2.2 is this
        # host's own address, which restrict=on cuts off.
        bait.bind(("127.0.0.1", 0))
        bait.listen(1)
        bait.setblocking(False)
        bait_port = bait.getsockname()[1]
        server = textwrap.dedent(
            f"""
            import socket
            try:
                socket.create_connection(("10.0.2.2", {bait_port}), timeout=5).close()
                reach = b"reached this host"
            except OSError:
                reach = b"reached nothing"
            with socket.create_server(("0.0.0.0", {GUEST_PORT})) as listener:
                connection, peer = listener.accept()
                with connection:
                    connection.sendall(b"inside: " + reach + b"\\n")
            """
        )
        result: list[NestedResult | BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                result.append(
                    run_nested(
                        ["python3", "-c", server],
                        cwd=HERE,
                        forwards=[Forward(host_port, GUEST_PORT)],
                        stream=False,
                        timeout=DEADLINE,
                    )
                )
            except BaseException as error:
                result.append(error)
            finally:
                done.set()

        thread = threading.Thread(target=run)
        thread.start()
        try:
            answer = _ask(host_port, time.monotonic() + DEADLINE, done)
        finally:
            thread.join(DEADLINE + 60)
        with pytest.raises(BlockingIOError):
            bait.accept()  # nothing came in from the nested host
    assert result, "run_nested did not return"
    ended = result[0]
    if isinstance(ended, BaseException):
        raise ended
    assert ended.status == 0, ended.output
    assert answer == b"inside: reached nothing\n"
