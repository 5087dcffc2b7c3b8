"""``GET /v1/events``: the daemon's event log as server-sent events (HTML Living Standard,
"Server-sent events", §9.2).

Each event is ``id: N`` (the ``Event.id``, so a client resumes with ``?since=N`` or the
``Last-Event-ID`` header its EventSource sends on reconnecting) and ``data:`` the Event as
JSON. The stream first replays what is newer than ``since``, then waits for more in a worker
thread (``Daemon.wait_events``), a second at a time so that a client that leaves frees its
thread within a second. A comment line every ``KEEPALIVE`` seconds keeps proxies and idle
timers from closing a quiet stream.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio.to_thread

from kasou.daemon import Daemon
from kasou.spec import Event

__all__ = ["KEEPALIVE", "event_stream"]

KEEPALIVE = 15.0
_WAIT = 1.0
_REPLAY_BATCH = 1000


def _frame(event: Event) -> bytes:
    # Event JSON has no newlines (json.dumps without indent escapes them in strings), so one
    # data: line carries it.
    return f"id: {event.id}\ndata: {event.model_dump_json()}\n\n".encode()


def _replay(daemon: Daemon, since: int) -> list[Event]:
    return daemon.events(since=since, limit=_REPLAY_BATCH)


async def event_stream(daemon: Daemon, since: int) -> AsyncIterator[bytes]:
    """Frames of the events after ``since``, then of new ones as they come, without end."""
    last = since
    yield b"retry: 1000\n\n"
    while True:  # the replay, in batches
        batch = await anyio.to_thread.run_sync(_replay, daemon, last)
        for event in batch:
            last = max(last, event.id)
            yield _frame(event)
        if len(batch) < _REPLAY_BATCH:
            break
    quiet_since = time.monotonic()
    while True:
        events = await anyio.to_thread.run_sync(
            daemon.wait_events, last, _WAIT, abandon_on_cancel=True
        )
        for event in events:
            if event.id > last:
                last = event.id
                yield _frame(event)
                quiet_since = time.monotonic()
        if time.monotonic() - quiet_since >= KEEPALIVE:
            yield b": keep-alive\n\n"
            quiet_since = time.monotonic()
