"""kasoud's waits on file descriptors work for any fd number: a daemon of many VMs holds
more than select(2) can take (1024)."""

from __future__ import annotations

import os
import resource

import pytest

from kasou.daemon._process import readable


def test_a_pipe_past_fd_1023_polls_readable_when_written_and_when_closed() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1500:
        pytest.fail(f"the test needs more than 1500 open files; this host allows {hard}")
    if soft <= 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    reader, writer = os.pipe()
    high = os.dup2(reader, 1500)
    try:
        assert not readable(high, 0)
        os.write(writer, b"B")
        assert readable(high, 1.0) and os.read(high, 1) == b"B"
        os.close(writer)
        writer = -1
        assert readable(high, 1.0) and os.read(high, 1) == b""  # every writer gone
    finally:
        for fd in (reader, high, writer):
            if fd >= 0:
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
