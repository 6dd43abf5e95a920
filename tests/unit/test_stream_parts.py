"""Streamed replies without a broker: the part envelope, the worker's chunk
reader, and the client's rules for runs, order and endings."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from producers.errors import JobFailed, PublishFailed, StreamInterrupted, UnknownModel
from producers.stream import ChatStream
from schemas.codec import encode_reply, error_body
from schemas.errors import ErrorCode
from schemas.stream import chunks_of_completion, decode_part, encode_part, is_part
from workers.errors import UpstreamFailure
from workers.providers.base import UpstreamReply
from workers.providers.chunks import ChunkReader, chunks_of, read_chunk, usage_counts
from workers.providers.sse import Event
from workers.routing import FailureKind


def chunk(text: str | None = "a", finish: str | None = None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


# --- the envelope ------------------------------------------------------------------


def test_a_part_round_trips_and_only_the_last_carries_the_outcome() -> None:
    middle = orjson.loads(encode_part("j", "r1", 3, [chunk()]))
    assert is_part(middle) and "status" not in middle and "last" not in middle
    part = decode_part(middle)
    assert (part.run, part.seq, part.last, part.status) == ("r1", 3, False, None)
    last = orjson.loads(
        encode_part("j", "r1", 4, [], last=True, finish_reason="stop", usage={"x": 1})
    )
    part = decode_part(last)
    assert part.last and part.status == "ok" and part.finish_reason == "stop"
    assert part.usage == {"x": 1} and part.routing == {}
    broken = decode_part(
        orjson.loads(encode_part("j", "r1", 5, [], last=True, error={"code": "x"}))
    )
    assert broken.status == "error" and broken.error == {"code": "x"}
    assert not is_part(orjson.loads(encode_reply("j", response={})))


@pytest.mark.parametrize(
    "data",
    [
        {"run": "", "seq": 0, "chunks": []},
        {"run": "r" * 65, "seq": 0, "chunks": []},
        {"run": 5, "seq": 0, "chunks": []},
        {"run": "r", "seq": -1, "chunks": []},
        {"run": "r", "seq": True, "chunks": []},
        {"run": "r", "seq": "0", "chunks": []},
        {"run": "r", "seq": 0, "chunks": {}},
        {"run": "r", "seq": 0, "chunks": [1]},
        {"run": "r", "seq": 0, "chunks": [], "last": True, "status": "maybe"},
    ],
)
def test_a_malformed_part_is_refused(data: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="stream part"):
        decode_part(data)


def test_a_whole_answer_becomes_the_chunks_of_its_stream() -> None:
    body: dict[str, Any] = {
        "id": "c1",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "tool_calls": [{"id": "t", "type": "function"}]},
                "finish_reason": "tool_calls",
            },
            "junk",
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }
    first, usage = chunks_of_completion(body)
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "t", "type": "function"}
    ]
    assert body["choices"][0]["message"]["tool_calls"] == [{"id": "t", "type": "function"}]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    worker = chunks_of(UpstreamReply(body, 3, 2))
    assert [c.tokens for c in worker] == [1, 0]
    assert worker[0].finish_reason == "tool_calls" and worker[1].usage_only
    assert chunks_of_completion({"choices": "x"})[0]["choices"] == []


# --- the worker's chunk reader ----------------------------------------------------------


def event(data: str, name: str = "message") -> Event:
    return Event(data=data, event=name)


def test_chunks_count_tokens_and_keep_the_outcome() -> None:
    c = read_chunk("e", (), event(orjson.dumps(chunk("hi")).decode()))
    assert c.tokens == 1 and c.finish_reason is None and not c.usage_only
    role = read_chunk("e", (), event(orjson.dumps(chunk(None)).decode()))
    assert role.tokens == 0
    end = read_chunk("e", (), event(orjson.dumps(chunk("", "stop")).decode()))
    assert end.tokens == 0 and end.finish_reason == "stop"
    usage = read_chunk("e", (), event('{"choices":[],"usage":{"prompt_tokens":2}}'))
    assert usage.usage_only and usage_counts(usage.usage) == (2, None, None)
    details = {
        "prompt_tokens": 5,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    assert usage_counts(details) == (5, 1, 4)
    assert usage_counts(None) == (None, None, None)
    assert read_chunk("e", (), event('{"id": 1}')).tokens == 0  # no choices at all


@pytest.mark.parametrize(
    ("data", "name", "kind"),
    [
        ("not json", "message", FailureKind.MALFORMED),
        ("[1]", "message", FailureKind.MALFORMED),
        ('{"choices": {}}', "message", FailureKind.MALFORMED),
        ('{"error": {"message": "overloaded sk-secret"}}', "message", FailureKind.SERVER_ERROR),
        ('{"message": "x"}', "error", FailureKind.SERVER_ERROR),
    ],
)
def test_an_error_event_or_a_bad_chunk_is_an_upstream_failure(
    data: str, name: str, kind: FailureKind
) -> None:
    with pytest.raises(UpstreamFailure) as failed:
        read_chunk("e", ("sk-secret",), event(data, name))
    assert failed.value.kind is kind
    assert "sk-secret" not in str(failed.value)


def test_a_stream_must_end_with_done_or_a_finish_reason() -> None:
    reader = ChunkReader("e", ())
    assert len(reader.feed(b"data: " + orjson.dumps(chunk("a")) + b"\n\n")) == 1
    with pytest.raises(UpstreamFailure, match="broke off"):
        reader.end()
    reader.feed(b"data: " + orjson.dumps(chunk("", "stop")) + b"\n\n")
    reader.end()
    reader.feed(b"data: [DONE]\n\n")
    assert reader.done
    with pytest.raises(UpstreamFailure) as failed:
        ChunkReader("e", ()).feed(b"data: " + b"x" * (2 << 20))
    assert failed.value.kind is FailureKind.MALFORMED


# --- the client's rules -------------------------------------------------------------------


async def read(*messages: bytes) -> tuple[list[dict[str, Any]], ChatStream]:
    stream = ChatStream(None, _never, wait_s=1.0)  # type: ignore[arg-type]
    stream._started = True
    for m in messages:
        stream._inbox.put_nowait(m)
    got = [c async for c in stream._read()]
    return got, stream


async def _never(queue: str) -> str:
    raise AssertionError("not published in these tests")


def part(run: str, seq: int, *chunks: dict[str, Any], **last: Any) -> bytes:
    return encode_part("j", run, seq, list(chunks), last=bool(last), **last)


async def test_parts_in_order_make_the_stream() -> None:
    got, s = await read(
        part("r", 0, chunk("a")),
        part("r", 0, chunk("a")),  # a duplicate
        part("r", 1, chunk("b")),
        part("r", 2, finish_reason="stop", usage={"completion_tokens": 2}, routing={"e": 1}),
    )
    assert [c["choices"][0]["delta"]["content"] for c in got] == ["a", "b"]
    assert s.finish_reason == "stop" and s.usage == {"completion_tokens": 2}
    assert s.routing == {"e": 1}


async def test_a_lost_part_or_a_restart_after_chunks_interrupts_the_stream() -> None:
    with pytest.raises(StreamInterrupted, match="lost"):
        await read(part("r", 0, chunk()), part("r", 2, chunk()))
    with pytest.raises(StreamInterrupted, match="again"):
        await read(part("r", 0, chunk()), part("s", 0, chunk()))


async def test_a_restart_before_any_chunk_is_followed() -> None:
    got, s = await read(
        part("r", 0),  # a run that showed nothing (an empty part)
        part("s", 0, chunk("x")),
        part("s", 1, finish_reason="stop"),
    )
    assert len(got) == 1 and s.finish_reason == "stop"


async def test_errors_before_and_after_the_first_chunk() -> None:
    unknown = encode_reply("j", error=error_body(ErrorCode.UNKNOWN_MODEL, "no"))
    with pytest.raises(UnknownModel):
        await read(unknown)
    with pytest.raises(StreamInterrupted):
        await read(part("r", 0, chunk()), unknown)
    broken = part("r", 1, error=error_body(ErrorCode.STREAM_INTERRUPTED, "cut"))
    with pytest.raises(StreamInterrupted, match="cut"):
        await read(part("r", 0, chunk()), broken)
    with pytest.raises(PublishFailed):
        await read(b"not json")
    with pytest.raises(PublishFailed):
        await read(b"[1]")
    with pytest.raises(PublishFailed):
        await read(orjson.dumps({"run": "r", "seq": -1, "chunks": []}))


async def test_a_whole_reply_streams_as_its_chunks() -> None:
    whole = encode_reply(
        "j",
        response={"choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}]},
        routing={"endpoint": "e"},
    )
    got, s = await read(whole)
    assert got[0]["choices"][0]["delta"] == {"content": "hi"}
    assert s.routing == {"endpoint": "e"}


async def test_a_silent_stream_ends_with_a_deadline() -> None:
    stream = ChatStream(None, _never, wait_s=0.05)  # type: ignore[arg-type]
    stream._started = True
    with pytest.raises(JobFailed) as failed:
        _ = [c async for c in stream._read()]
    assert failed.value.code is ErrorCode.DEADLINE_EXCEEDED
