"""The gateway's streamed answers as bytes: SSE framing, error events, the call's split."""

from __future__ import annotations

import inspect

import orjson
import pytest

from producers.client import LlmqClient
from producers.errors import StreamInterrupted, UnknownModel
from producers.gateway_core import BadRequest, answer_for_error
from producers.gateway_events import (
    DONE,
    RESERVED_PARAMS,
    error_event,
    event,
    stream_call,
    stream_headers,
)
from schemas.codec import error_body
from schemas.errors import ErrorCode


def test_an_event_is_one_data_line_even_when_the_text_has_newlines() -> None:
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "a\nb\r\n"}}]}
    frame = event(chunk)
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert frame.count(b"\n") == 2 and b"\r" not in frame
    assert orjson.loads(frame[len(b"data: ") : -2]) == chunk
    assert DONE == b"data: [DONE]\n\n"


def test_an_error_after_the_first_chunk_is_openais_error_event() -> None:
    reply = {"status": "error", "error": error_body(ErrorCode.STREAM_INTERRUPTED, "cut")}
    exc = StreamInterrupted("cut", job_id="j", reply=reply)
    frame = error_event(answer_for_error(exc, "j"))
    error = orjson.loads(frame[len(b"data: ") : -2])["error"]
    assert error["code"] == "stream_interrupted"
    assert error["type"] == "server_error"
    assert error["message"] == "cut"
    reply = {"status": "error", "error": error_body(ErrorCode.UNKNOWN_MODEL, "no")}
    unknown = UnknownModel("no", job_id="j", reply=reply)
    assert orjson.loads(error_event(answer_for_error(unknown, "j"))[6:-2])["error"]["type"] == (
        "invalid_request_error"
    )


def test_the_body_is_split_as_the_client_takes_it() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 5,
    }
    call = stream_call(body)
    assert call.model == "m" and call.messages == body["messages"]
    assert call.params == {"stream_options": {"include_usage": True}, "max_tokens": 5}
    assert stream_call({"stream": True}).model is None  # the worker says what is missing


@pytest.mark.parametrize("name", sorted(RESERVED_PARAMS))
def test_body_fields_named_like_the_clients_options_are_refused(name: str) -> None:
    # A body "tenant" must never bill another tenant, nor a "job_id" pick the job's id.
    with pytest.raises(BadRequest, match=name):
        stream_call({"model": "m", "messages": [], "stream": True, name: "x"})


def test_reserved_names_are_exactly_the_clients_keyword_options() -> None:
    params = inspect.signature(LlmqClient.stream).parameters
    named = {p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
    assert named - {"model", "messages"} == RESERVED_PARAMS


def test_stream_headers_forbid_caching_and_buffering() -> None:
    headers = stream_headers("gw-k-r", "r")
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert (headers["x-llmq-job-id"], headers["x-request-id"]) == ("gw-k-r", "r")
