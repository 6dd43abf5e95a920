"""Server-sent events read incrementally: bytes in, whole events out, no I/O.

An upstream's stream arrives in whatever pieces the network cuts it into; the
transport hands each piece to :meth:`SseReader.feed` and gets back the events
it completed, so nothing buffers more than the event being read. The grammar
is WHATWG's event-stream, as the ``openai`` and ``anthropic`` SDKs read it:

- UTF-8 (invalid bytes become U+FFFD), one byte order mark dropped at the start;
- lines end in CRLF, LF or CR, a CRLF split between two pieces included;
- a blank line ends an event; ``data`` lines of one event are joined by
  ``\\n``; ``event`` names it (default ``message``); ``id`` sets the last
  event id (kept across events); lines starting with ``:`` are comments
  (keep-alives); ``retry`` and unknown fields are ignored; an event without
  ``data`` lines is not dispatched;
- ``data: [DONE]`` (OpenAI's end) is an event with :attr:`Event.done`; the
  reader ignores everything after it, as the SDK stops reading there.

An event bigger than ``max_event_size`` raises :class:`EventTooLarge`, so a
stream that never ends its line cannot grow the buffer without bound. Where a
stream breaks off mid-event, the spec drops the unfinished event:
:attr:`SseReader.pending` says whether that happened.

Here in ``workers/providers`` because the worker reads upstream streams; no
other role reads SSE (the gateway writes it).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

from workers.errors import WorkerError

__all__ = ["DEFAULT_MAX_EVENT_SIZE", "Event", "EventTooLarge", "SseError", "SseReader"]

DEFAULT_MAX_EVENT_SIZE = 1 << 20
"""Characters: far above any chat chunk (a few hundred), below memory trouble."""

_EOL = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"


class SseError(WorkerError):
    """The event stream cannot be read on."""


class EventTooLarge(SseError):
    """One event (its data lines and the line being read) exceeded the bound.

    ``events`` holds the events the same :meth:`SseReader.feed` completed
    before it, in order.
    """

    def __init__(self, limit: int, events: list[Event]) -> None:
        super().__init__(f"server-sent event larger than {limit} characters")
        self.limit = limit
        self.events = events


@dataclass(slots=True)
class Event:
    """One dispatched event; read-only by convention (not ``frozen``: that costs
    ~1 µs more to make, once per token)."""

    data: str
    event: str = "message"
    id: str | None = None
    """The last event id at dispatch (an ``id`` line of this event or an earlier one)."""

    @property
    def done(self) -> bool:
        """OpenAI's end of stream: the SDK stops at data starting ``[DONE]``."""
        return self.data.startswith("[DONE]")


class SseReader:
    """Feed it the bytes of one stream in any pieces; it returns whole events.

    After an :class:`SseError` the reader is spent: every later feed raises it again.
    """

    def __init__(self, max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> None:
        self.max_event_size = max_event_size
        self.done = False
        """``[DONE]`` was read: later bytes are ignored."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False  # the first character (a possible BOM) was seen
        self._skip_lf = False  # the last piece ended in CR: a leading LF completes it
        self._partial: list[str] = []  # the unfinished line, in pieces
        self._partial_size = 0
        self._data: list[str] = []
        self._data_size = 0  # each data line's length + 1: the joined data's size
        self._event = ""
        self._id: str | None = None
        self._failed: SseError | None = None
        self._clean = False  # between events: nothing buffered, past the start

    @property
    def pending(self) -> bool:
        """Whether part of an event is buffered: a stream that ends now broke off mid-event."""
        return bool(self._partial or self._data or self._event)

    def feed(self, chunk: bytes) -> list[Event]:
        """The events ``chunk`` completes, in order (often none, sometimes several)."""
        if self._failed is not None:
            raise self._failed
        if self.done:
            return []
        events: list[Event] = []
        if self._clean:
            # Whole ``data: ...`` events up to the piece's last blank line, the
            # way nearly every upstream writes them, read in a few C calls; the
            # rest (or all of it, when anything else is there) takes the way below.
            end = chunk.rfind(b"\n\n") + 2
            if end > 1 and self._simple(chunk[:end], events):
                if self.done or end == len(chunk):
                    return events
                chunk = chunk[end:]
        self._read(chunk, events)
        return events

    def _simple(self, head: bytes, events: list[Event]) -> bool:
        """Read ``head`` (ending in a blank line) if it holds nothing but single-line
        ``data`` events; else read nothing and say so."""
        if b"\r" in head:
            return False
        text = head.decode("utf-8", "replace")
        start = len(events)
        last_id = self._id
        for line in text[:-2].split("\n\n"):
            # One data line per event, no other field, comment or blank line, in bound.
            if not line.startswith("data:") or "\n" in line or len(line) > self.max_event_size:
                del events[start:]
                return False
            events.append(
                Event(line[6:] if line.startswith(" ", 5) else line[5:], "message", last_id)
            )
        if "[DONE]" in text:
            for i in range(start, len(events)):
                if events[i].done:  # the end: what follows it is ignored
                    del events[i + 1 :]
                    self.done = True
                    break
        return True

    def _read(self, chunk: bytes, events: list[Event]) -> None:
        """The whole grammar: any piece, in any state."""
        text = self._decoder.decode(chunk)
        if not text:
            return
        if not self._started:
            self._started = True
            text = text.removeprefix(_BOM)
        if self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        self._clean = False
        start = 0
        for end in _EOL.finditer(text):
            piece = text[start : end.start()]
            start = end.end()
            if self._partial:
                self._partial.append(piece)
                piece = "".join(self._partial)
                self._partial.clear()
                self._partial_size = 0
            self._line(piece, events)
            if self.done:
                return
        rest = text[start:]
        if rest:
            self._partial.append(rest)
            self._partial_size += len(rest)
            self._bound(self._partial_size, events)
        self._skip_lf = text.endswith("\r")
        self._clean = not (self._skip_lf or self.pending or self._decoder.getstate()[0])

    def _bound(self, line: int, events: list[Event]) -> None:
        """Raise (and stay failed) when the event being read outgrows the bound."""
        if self._data_size + line > self.max_event_size:
            self._failed = EventTooLarge(self.max_event_size, events)
            raise self._failed

    def _line(self, line: str, events: list[Event]) -> None:
        if not line:
            self._dispatch(events)
            return
        self._bound(len(line), events)
        if line[0] == ":":
            return
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
            self._data_size += len(value) + 1
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value

    def _dispatch(self, events: list[Event]) -> None:
        if not self._data:
            self._event = ""
            return
        event = Event("\n".join(self._data), self._event or "message", self._id)
        self._data.clear()
        self._data_size = 0
        self._event = ""
        self.done = event.done
        events.append(event)
