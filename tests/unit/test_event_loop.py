"""The per-VM event loop (kasou.event.EventLoop) on real pipes and threads."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator

import pytest

from kasou.event import EventLoop

DEADLINE = 5.0  # seconds a test waits for the loop before it fails


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    events = EventLoop("kasou-test-loop")
    events.start()
    yield events
    events.stop()


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    made: list[tuple[int, int]] = []
    yield made
    for read_end, write_end in made:
        os.close(read_end)
        os.close(write_end)


def _pipe(pipes: list[tuple[int, int]]) -> tuple[int, int]:
    ends = os.pipe()
    pipes.append(ends)
    return ends


def _barrier(loop: EventLoop) -> None:
    """Return once the loop has run everything queued before this call."""
    done = threading.Event()
    loop.call_soon(done.set)
    assert done.wait(DEADLINE), "the event loop did not answer"


def test_a_reader_is_called_on_the_loop_thread(
    loop: EventLoop, pipes: list[tuple[int, int]]
) -> None:
    read_end, write_end = _pipe(pipes)
    got: list[tuple[bytes, bool, str]] = []
    called = threading.Event()

    def on_readable(events: int) -> None:
        got.append((os.read(read_end, 100), loop.in_loop_thread, threading.current_thread().name))
        called.set()

    loop.add_reader(read_end, on_readable)
    os.write(write_end, b"ping")
    assert called.wait(DEADLINE)
    assert got == [(b"ping", True, "kasou-test-loop")]
    assert not loop.in_loop_thread  # the test's own thread is not the loop's


def test_call_soon_from_other_threads_runs_in_order_on_the_loop(loop: EventLoop) -> None:
    order: list[int] = []
    threads_seen: set[bool] = set()

    def call(number: int) -> None:
        order.append(number)
        threads_seen.add(loop.in_loop_thread)

    def producer() -> None:
        for number in range(100):
            loop.call_soon(functools.partial(call, number))

    worker = threading.Thread(target=producer)
    worker.start()
    worker.join()
    _barrier(loop)
    assert order == list(range(100))
    assert threads_seen == {True}


def test_timers_run_in_the_order_they_fall_due(loop: EventLoop) -> None:
    order: list[str] = []
    both = threading.Event()

    def late() -> None:
        order.append("late")
        both.set()

    loop.call_later(0.05, late)
    loop.call_later(0.01, lambda: order.append("early"))
    loop.call_soon(lambda: order.append("soon"))
    assert both.wait(DEADLINE)
    assert order == ["soon", "early", "late"]


def test_a_timer_does_not_run_before_its_delay(loop: EventLoop) -> None:
    # A long timer set first must not have run when a short one set after it does.
    order: list[str] = []
    short_ran = threading.Event()
    loop.call_later(60.0, lambda: order.append("long"))
    loop.call_later(0.0, lambda: (order.append("short"), short_ran.set()))
    assert short_ran.wait(DEADLINE)
    _barrier(loop)
    assert order == ["short"]


def test_a_failing_handler_is_removed_and_the_loop_serves_the_others(
    loop: EventLoop, pipes: list[tuple[int, int]], caplog: pytest.LogCaptureFixture
) -> None:
    bad_read, bad_write = _pipe(pipes)
    good_read, good_write = _pipe(pipes)
    bad_calls: list[int] = []
    good_calls: list[bytes] = []
    good_called = threading.Condition()

    def bad(events: int) -> None:
        bad_calls.append(events)
        raise RuntimeError("a device bug")  # leaves its byte unread: the fd stays readable

    def good(events: int) -> None:
        with good_called:
            good_calls.append(os.read(good_read, 100))
            good_called.notify_all()

    loop.add_reader(bad_read, bad)
    loop.add_reader(good_read, good)
    with caplog.at_level(logging.ERROR, logger="kasou.event.loop"):
        os.write(bad_write, b"x")
        os.write(good_write, b"1")
        with good_called:
            assert good_called.wait_for(lambda: len(good_calls) == 1, DEADLINE)
        os.write(good_write, b"2")
        with good_called:
            assert good_called.wait_for(lambda: len(good_calls) == 2, DEADLINE)
        _barrier(loop)
    # Still readable, but no longer watched: had it stayed, level-triggered epoll would have
    # called it again on every turn.
    assert len(bad_calls) == 1
    assert good_calls == [b"1", b"2"]
    assert f"event handler for fd {bad_read} failed" in caplog.text


def test_a_failing_call_does_not_stop_the_loop(loop: EventLoop) -> None:
    def broken() -> None:
        raise ValueError("oops")

    ran = threading.Event()
    loop.call_soon(broken)
    loop.call_later(0.0, broken)
    loop.call_soon(ran.set)
    assert ran.wait(DEADLINE)
    _barrier(loop)


def test_remove_stops_calls(loop: EventLoop, pipes: list[tuple[int, int]]) -> None:
    read_end, write_end = _pipe(pipes)
    calls: list[int] = []
    loop.add_reader(read_end, calls.append)
    loop.remove(read_end)
    loop.remove(read_end)  # removing twice is harmless
    os.write(write_end, b"x")
    _barrier(loop)
    _barrier(loop)
    assert calls == []


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stop_joins_the_thread_and_closes_its_fds() -> None:
    before = _fds()
    threads_before = set(threading.enumerate())
    loop = EventLoop("kasou-stop-test")
    loop.start()
    assert len(_fds() - before) == 2  # the epoll and the wake-up eventfd
    ran = threading.Event()
    loop.call_soon(ran.set)
    assert ran.wait(DEADLINE)
    loop.stop()
    assert set(threading.enumerate()) == threads_before
    assert _fds() == before
    loop.stop()  # a second stop does nothing


def test_a_loop_never_started_can_be_stopped() -> None:
    before = _fds()
    EventLoop().stop()
    assert _fds() == before
