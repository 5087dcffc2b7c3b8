"""A server-sent events parser (the HTML Living Standard, §9.2.6 "Interpreting an event
stream"), fed one line at a time, and the step from a message to a ``kasou.spec.Event``.

kasoud's ``GET /v1/events`` sends one message per event: ``id:`` the event's id, ``data:`` its
JSON. The parser takes what the standard allows besides (comments as keep-alives, data over
several lines, ``event:`` and ``retry:`` fields) so that a proxy or a newer kasoud does not
break an older client. It does no I/O: the clients split the stream into lines (httpx does,
on CR, LF and CRLF as the standard asks).
"""

from __future__ import annotations

import dataclasses

from pydantic import ValidationError

from kasou.errors import DaemonError
from kasou.spec import Event

__all__ = ["SseMessage", "SseParser", "event_from"]


@dataclasses.dataclass(frozen=True)
class SseMessage:
    event: str  # "message" unless the stream named it
    data: str
    id: str  # the last event ID seen so far (it carries over from earlier messages)


class SseParser:
    """Turns lines of an event stream into messages (one per blank line that ends data)."""

    def __init__(self) -> None:
        self.last_id = ""
        self.retry: int | None = None  # the reconnection time the server asked for, in ms
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> SseMessage | None:
        """Take one line (without its line ending); return a message when it completes one."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment: servers send them to keep the stream alive
            return None
        field, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]  # one space after the colon is not part of the value
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\0" not in value:  # the standard ignores an id with NUL in it
                self.last_id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
        # Any other field is ignored (§9.2.6).
        return None

    def _dispatch(self) -> SseMessage | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:  # a message without data dispatches nothing
            return None
        return SseMessage(event=event, data="\n".join(data), id=self.last_id)


def event_from(message: SseMessage) -> Event | None:
    """The kasou event a message carries; None for messages of another kind (a named event
    kasou does not send today)."""
    if message.event not in ("message", "event"):
        return None
    try:
        return Event.model_validate_json(message.data)
    except ValidationError as error:
        raise DaemonError(
            f"kasoud sent an event this client cannot read ({error.error_count()} problems, "
            f"first: {error.errors()[0]['msg']}): is the SDK older than kasoud?"
        ) from error
