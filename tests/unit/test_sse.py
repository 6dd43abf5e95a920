"""The incremental SSE reader: WHATWG's grammar, and the same events whatever the pieces."""

from __future__ import annotations

import itertools
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.providers.sse import Event, EventTooLarge, SseError, SseReader

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def read(raw: bytes, cuts: list[int] | None = None, **kw: int) -> tuple[list[Event], SseReader]:
    """Feed ``raw`` cut at ``cuts`` (positions; None: whole), return every event."""
    reader = SseReader(**kw)
    bounds = [0, *sorted(cuts or []), len(raw)]
    events: list[Event] = []
    for a, b in itertools.pairwise(bounds):
        events += reader.feed(raw[a:b])
    return events, reader


def test_openai_stream() -> None:
    raw = b'data: {"a": 1}\n\n: keep-alive\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    events, reader = read(raw)
    assert [e.data for e in events] == ['{"a": 1}', '{"b": 2}', "[DONE]"]
    assert [e.done for e in events] == [False, False, True]
    assert {e.event for e in events} == {"message"}
    assert reader.done and not reader.pending


def test_fields_as_whatwg_says() -> None:
    """Multi-line data joined by LF; one leading space dropped; event names; ids kept
    across events, NUL ids ignored; no colon = empty value; retry/unknown ignored;
    an event without data is not dispatched."""
    raw = (
        "event: message_start\ndata: {\ndata:  two spaces\ndata\nid: 7\nretry: 10\nfoo: bar\n\n"
        "event: ping\n\n"
        "data:x\nid: a\0b\n\n"
        "data: é ✓ 😀\n\n"
    ).encode()
    events, _ = read(raw)
    assert events == [
        Event("{\n two spaces\n", "message_start", "7"),
        Event("x", "message", "7"),
        Event("é ✓ 😀", "message", "7"),
    ]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_ends_and_bom(eol: bytes) -> None:
    raw = b"\xef\xbb\xbf" + eol.join([b"data: a", b"data: b", b"", b"data: c", b"", b""])
    events, _ = read(raw)
    assert [e.data for e in events] == ["a\nb", "c"]
    # A BOM later than the very start is data, not a mark.
    later, _ = read(b"data: \xef\xbb\xbfx\n\n")
    assert later[0].data == "\ufeffx"


def test_crlf_split_between_pieces_is_one_line_end() -> None:
    """CR at the end of one piece, LF at the start of the next: one line end, not a blank line."""
    reader = SseReader()
    assert reader.feed(b"data: a\r") == []
    assert reader.feed(b"\ndata: b\r") == []
    assert reader.feed(b"\n\r\n") == [Event("a\nb")]


def test_everything_after_done_is_ignored() -> None:
    events, reader = read(b"data: [DONE]\n\ndata: late\n\n")
    assert [e.data for e in events] == ["[DONE]"]
    assert reader.feed(b"data: later\n\n") == []


def test_a_stream_broken_off_mid_event_leaves_it_pending() -> None:
    events, reader = read(b'data: {"a": 1}\n\ndata: {"b"')
    assert [e.data for e in events] == ['{"a": 1}'] and reader.pending
    _, ended = read(b"data: x\n")
    assert ended.pending
    _, named = read(b"event: x\n")
    assert named.pending


def test_invalid_utf8_becomes_replacement_characters() -> None:
    events, _ = read(b"data: a\xffb\xe2\x82\n\n")
    assert events[0].data == "a\ufffdb\ufffd"


def test_max_event_size() -> None:
    """Data lines and the line being read count; the error names the bound, keeps the
    events before it, and the reader stays failed."""
    ok, _ = read(b"data: " + b"x" * 94 + b"\n\n", max_event_size=100)
    assert len(ok[0].data) == 94
    raw = b"data: a\n\ndata: " + b"x" * 50 + b"\ndata: " + b"y" * 50 + b"\n\n"
    reader = SseReader(max_event_size=100)
    with pytest.raises(EventTooLarge, match="100 characters") as caught:
        reader.feed(raw)
    assert caught.value.events == [Event("a")] and caught.value.limit == 100
    with pytest.raises(EventTooLarge):
        reader.feed(b"data: b\n\n")
    endless = SseReader(max_event_size=100)
    assert endless.feed(b"data: " + b"z" * 60) == []
    with pytest.raises(SseError):
        endless.feed(b"z" * 60)  # no line end yet: the unfinished line counts too
    comment = SseReader(max_event_size=10)
    with pytest.raises(EventTooLarge):
        comment.feed(b": " + b"c" * 20 + b"\n")


# --- any split, same events -----------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """An event as written: its data lines, name and id, and comments before it."""

    lines: list[str]
    name: str | None
    id: str | None
    comments: list[str]


_text = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12
)
_name = st.text(st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)))
_specs = st.lists(
    st.builds(
        Spec,
        lines=st.lists(_text, min_size=1, max_size=4),
        name=st.none() | _name.filter(bool),
        id=st.none() | _name,
        comments=st.lists(_text, max_size=2),
    ),
    max_size=6,
)


def write(specs: list[Spec], eol: str, bom: bool, done: bool) -> bytes:
    out = ["\ufeff" if bom else ""]
    for spec in specs:
        out += [f":{c}{eol}" for c in spec.comments]
        if spec.name is not None:
            out.append(f"event: {spec.name}{eol}")
        if spec.id is not None:
            out.append(f"id: {spec.id}{eol}")
        out += [f"data: {line}{eol}" for line in spec.lines]
        out.append(eol)
    if done:
        out.append(f"data: [DONE]{eol}{eol}data: after{eol}{eol}")
    return "".join(out).encode()


def expected(specs: list[Spec], done: bool) -> list[Event]:
    events, last_id = [], None
    for spec in specs:
        last_id = spec.id if spec.id is not None else last_id
        event = Event("\n".join(spec.lines), spec.name or "message", last_id)
        events.append(event)
        if event.done:
            return events
    if done:
        events.append(Event("[DONE]", "message", last_id))
    return events


@PROPERTY
@given(
    specs=_specs,
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
    done=st.booleans(),
    data=st.data(),
)
def test_any_split_of_a_valid_stream_yields_its_events(
    specs: list[Spec], eol: str, bom: bool, done: bool, data: st.DataObject
) -> None:
    raw = write(specs, eol, bom, done)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    events, reader = read(raw, cuts)
    assert events == expected(specs, done)
    assert not reader.pending or reader.done
    one_byte_at_a_time, _ = read(raw, list(range(len(raw))))
    assert one_byte_at_a_time == events


@PROPERTY
@given(raw=st.binary(max_size=200), data=st.data())
def test_any_split_of_any_bytes_reads_the_same(raw: bytes, data: st.DataObject) -> None:
    """Arbitrary bytes (CR/LF mixes, broken UTF-8, huge lines against a small bound):
    every split gives the events, the error and the state of reading it whole."""
    noise = data.draw(st.sampled_from([b"", b"\r", b"\n", b"\r\n", b":", b"data:"]))
    raw = noise.join(raw[i : i + 7] for i in range(0, len(raw), 7))
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10))

    def outcome(splits: list[int] | None) -> tuple[list[Event], str | None, bool, bool]:
        reader = SseReader(max_event_size=40)
        bounds = [0, *sorted(splits or []), len(raw)]
        events: list[Event] = []
        try:
            for a, b in itertools.pairwise(bounds):
                events += reader.feed(raw[a:b])
        except EventTooLarge as exc:
            return [*events, *exc.events], str(exc), False, False
        return events, None, reader.done, reader.pending

    assert outcome(cuts) == outcome(None)


_block = st.sampled_from(
    [
        *(b"data: a", b"data:b", b"data:  c", b"data", b"data: \xc3\xa9\xff", b"data: [DONE]"),
        *(b": ping", b"event: x\ndata: y", b"id: 7\ndata: z", b"data: 1\ndata: 2"),
        *(b"data: " + b"w" * 45, b"", b"\r", b"data: q\r\n"),
    ]
)


@PROPERTY
@given(blocks=st.lists(_block, max_size=12), data=st.data())
def test_pieces_of_whole_events_read_as_byte_by_byte(
    blocks: list[bytes], data: st.DataObject
) -> None:
    """Pieces cut at blank lines (the shortcut's case: whole ``data:`` events, and
    everything it must leave to the full grammar) read as one byte at a time does."""
    raw = b"".join(block + b"\n\n" for block in blocks)
    ends = [i + 2 for i in range(len(raw)) if raw.startswith(b"\n\n", i)]
    cuts = data.draw(st.lists(st.sampled_from(ends) if ends else st.just(0), max_size=8))
    cuts += data.draw(st.lists(st.integers(0, len(raw)), max_size=2))

    def outcome(splits: list[int]) -> tuple[list[Event], str | None, bool, bool]:
        reader = SseReader(max_event_size=40)
        bounds = [0, *sorted(splits), len(raw)]
        events: list[Event] = []
        try:
            for a, b in itertools.pairwise(bounds):
                events += reader.feed(raw[a:b])
        except EventTooLarge as exc:
            return [*events, *exc.events], str(exc), False, False
        return events, None, reader.done, reader.pending

    assert outcome(cuts) == outcome(list(range(len(raw))))


def test_the_reader_loads_no_http_library() -> None:
    """Pure: importing it (and what it imports) loads neither aiohttp nor httpx."""
    code = (
        "import sys, workers.providers.sse; "
        "print(sorted(m for m in ('aiohttp', 'httpx', 'aio_pika') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
