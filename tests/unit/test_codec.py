"""decode_job, encode_reply and decode_reply: the codec side of the wire contract."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas import (
    HEADERS,
    RETRIABLE,
    SCHEMA_VERSION,
    Delivery,
    ErrorCode,
    Job,
    Rejected,
    Reply,
    decode_job,
    decode_reply,
    encode_reply,
)
from schemas.codec import MAX_SLA_MS, error_body

NOW = 1_700_000_000_000
DEFAULTS = {"interactive": 30_000, "batch": 3_600_000}
MAX_BODY = 4096
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def body(**fields: Any) -> bytes:
    request: dict[str, Any] = {
        "model": "gpt-4.1-mini",
        "messages": [{"role": "user", "content": "hello"}],
    }
    request.update(fields)
    return orjson.dumps({k: v for k, v in request.items() if v is not ...})


def delivery(**overrides: Any) -> Delivery:
    fields: dict[str, Any] = {
        "body": body(),
        "routing_key": "interactive",
        "message_id": "job-1",
        "correlation_id": "corr-1",
        "reply_to": "replies",
        "headers": {},
    }
    fields.update(overrides)
    return Delivery(**fields)


def decode(d: Delivery, *, max_body_bytes: int = MAX_BODY) -> Job | Rejected:
    return decode_job(d, now_ms=NOW, default_sla_ms=DEFAULTS, max_body_bytes=max_body_bytes)


def job(d: Delivery) -> Job:
    result = decode(d)
    assert isinstance(result, Job), result
    return result


def rejected_large(d: Delivery) -> Rejected:
    result = decode(d, max_body_bytes=1 << 20)
    assert isinstance(result, Rejected), result
    return result


def rejected(d: Delivery) -> Rejected:
    result = decode(d)
    assert isinstance(result, Rejected), result
    assert isinstance(result.code, ErrorCode)
    assert result.message
    assert "\n" not in result.message
    return result


# --- valid jobs -------------------------------------------------------------


def test_minimal_job() -> None:
    """A job with only the required parts decodes with the class defaults."""
    j = job(delivery(correlation_id=None, headers={}))
    assert j.job_id == "job-1"
    assert j.correlation_id == "job-1"
    assert j.reply_to == "replies"
    assert j.sla_class == "interactive"
    assert j.model == "gpt-4.1-mini"
    assert j.published_ms == NOW
    assert j.deadline_ms == NOW + DEFAULTS["interactive"]
    assert j.tenant is None
    assert j.traceparent is None
    assert j.replay_count == 0
    assert j.output_cap is None
    assert j.prompt_chars == len("hello")


def test_correlation_id_kept() -> None:
    """An explicit correlation_id is kept apart from the job id."""
    assert job(delivery()).correlation_id == "corr-1"


def test_reply_to_optional_in_the_codec() -> None:
    """The codec accepts a job without reply_to; the worker decides what to do with it."""
    assert job(delivery(reply_to=None)).reply_to is None


def test_body_passes_through_unchanged() -> None:
    """Fields llmq does not know reach the upstream as they came."""
    raw = {
        "model": "m",
        "messages": [{"role": "user", "content": "x", "name": "bob"}],
        "response_format": {"type": "json_object"},
        "seed": 7,
        "future_field": [1, {"a": None}],
    }
    assert job(delivery(body=orjson.dumps(raw))).body == raw


def test_header_model_overrides_body() -> None:
    """The ``model`` header wins over the body's model for routing."""
    j = job(delivery(headers={HEADERS.MODEL: "gpt-4.1"}))
    assert j.model == "gpt-4.1"
    assert j.body["model"] == "gpt-4.1-mini"


def test_header_model_without_body_model() -> None:
    """The body may leave out the model when the header names it."""
    j = job(delivery(body=body(model=...), headers={HEADERS.MODEL: b"gpt-4.1"}))
    assert j.model == "gpt-4.1"


def test_deadline_header_wins_over_sla() -> None:
    """``deadline-ms`` is absolute and wins over ``sla-ms``."""
    headers = {HEADERS.DEADLINE_MS: NOW + 5, HEADERS.SLA_MS: 60_000}
    assert job(delivery(headers=headers)).deadline_ms == NOW + 5


def test_deadline_in_the_past_still_decodes() -> None:
    """An expired deadline is the worker's business (deadline_exceeded), not the codec's."""
    assert job(delivery(headers={HEADERS.DEADLINE_MS: 1})).deadline_ms == 1


def test_sla_wins_over_class_default() -> None:
    """``sla-ms`` counts from the publish time and wins over the class default."""
    headers = {HEADERS.SLA_MS: 1234, HEADERS.PUBLISHED_MS: NOW - 1000}
    j = job(delivery(headers=headers))
    assert j.published_ms == NOW - 1000
    assert j.deadline_ms == NOW - 1000 + 1234


@pytest.mark.parametrize("sla_class", ["interactive", "batch"])
def test_class_default_sla(sla_class: str) -> None:
    """Without deadline headers the routing key's default budget applies."""
    j = job(delivery(routing_key=sla_class))
    assert j.sla_class == sla_class
    assert j.deadline_ms == NOW + DEFAULTS[sla_class]


def test_published_header_wins_over_timestamp() -> None:
    """``published-ms`` is preferred to the whole-second AMQP timestamp."""
    d = delivery(headers={HEADERS.PUBLISHED_MS: NOW - 7}, timestamp_ms=NOW - 9000)
    assert job(d).published_ms == NOW - 7


def test_timestamp_wins_over_now() -> None:
    """Without ``published-ms`` the AMQP timestamp is the publish time."""
    j = job(delivery(timestamp_ms=NOW - 9000))
    assert j.published_ms == NOW - 9000
    assert j.deadline_ms == NOW - 9000 + DEFAULTS["interactive"]


def test_now_when_no_publish_time() -> None:
    """With neither, the time of decoding is the publish time."""
    assert job(delivery(timestamp_ms=None)).published_ms == NOW


@pytest.mark.parametrize("value", ["2500", b"2500", 2500])
def test_integer_headers_accept_digit_strings(value: object) -> None:
    """Integer headers may arrive as ints, ASCII digit strings or bytes."""
    headers = {
        HEADERS.SLA_MS: value,
        HEADERS.PUBLISHED_MS: value,
        HEADERS.REPLAY_COUNT: value,
    }
    j = job(delivery(headers=headers))
    assert j.published_ms == 2500
    assert j.deadline_ms == 5000
    assert j.replay_count == 2500


def test_string_headers_accept_bytes() -> None:
    """String headers may arrive as UTF-8 bytes (AMQP long strings or byte arrays)."""
    j = job(delivery(headers={HEADERS.TENANT: "acmé".encode(), HEADERS.MODEL: b"gpt-4.1"}))
    assert j.tenant == "acmé"
    assert j.model == "gpt-4.1"


def test_void_headers_are_absent() -> None:
    """A header whose value is AMQP void (None) counts as not set."""
    headers = {value: None for name, value in vars(HEADERS).items() if name.isupper()}
    assert len(headers) == 9
    j = job(delivery(headers=headers))
    assert j.deadline_ms == NOW + DEFAULTS["interactive"]
    assert j.model == "gpt-4.1-mini"


def test_tenant_replay_count_and_schema_version() -> None:
    """Optional headers are carried onto the job."""
    headers = {
        HEADERS.TENANT: "acme",
        HEADERS.REPLAY_COUNT: 2,
        HEADERS.SCHEMA_VERSION: SCHEMA_VERSION,
    }
    j = job(delivery(headers=headers))
    assert j.tenant == "acme"
    assert j.replay_count == 2


def test_unknown_headers_ignored() -> None:
    """Headers the contract does not name (x-delivery-count, custom ones) are ignored."""
    headers = {"x-delivery-count": 3, "x-death": [{"reason": "rejected"}], "app": [1, 2]}
    assert isinstance(decode(delivery(headers=headers)), Job)


@pytest.mark.parametrize("value", [TRACEPARENT, TRACEPARENT.encode()])
def test_traceparent_kept(value: object) -> None:
    """A well-formed W3C traceparent is kept, as str or bytes."""
    assert job(delivery(headers={HEADERS.TRACEPARENT: value})).traceparent == TRACEPARENT


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        TRACEPARENT.upper(),
        "01" + TRACEPARENT[2:],
        "ff" + TRACEPARENT[2:],
        TRACEPARENT + "\n",
        TRACEPARENT + "-extra",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        b"\xff\xfe",
        42,
        ["x"],
    ],
)
def test_malformed_traceparent_dropped(value: object) -> None:
    """A malformed traceparent is dropped, never a rejection (W3C trace context)."""
    assert job(delivery(headers={HEADERS.TRACEPARENT: value})).traceparent is None


def test_output_cap_prefers_max_completion_tokens() -> None:
    """``max_completion_tokens`` is the newer name and wins over ``max_tokens``."""
    assert job(delivery(body=body(max_tokens=100))).output_cap == 100
    assert job(delivery(body=body(max_tokens=100, max_completion_tokens=50))).output_cap == 50


def test_prompt_chars_counts_text_parts() -> None:
    """Prompt size counts string contents and text parts of multi-part contents."""
    messages = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    assert job(delivery(body=body(messages=messages))).prompt_chars == 5


@pytest.mark.parametrize("content_type", [None, "", "application/json"])
def test_content_type_accepted(content_type: str | None) -> None:
    """content_type may be absent; when set it is application/json."""
    assert isinstance(decode(delivery(content_type=content_type)), Job)


@pytest.mark.parametrize("encoding", [None, "", "identity", "utf-8"])
def test_content_encoding_accepted(encoding: str | None) -> None:
    """Only identity encodings are accepted."""
    assert isinstance(decode(delivery(content_encoding=encoding)), Job)


def test_body_at_the_limit_accepted() -> None:
    """A body of exactly max_body_bytes is accepted."""
    raw = body()
    assert isinstance(decode(delivery(body=raw), max_body_bytes=len(raw)), Job)


@pytest.mark.parametrize(
    "job_id",
    ["a", "0", "A" * 128, "01HZX3K6Q2Y8", "550e8400-e29b-41d4-a716-446655440000", "a._:@/+=-z"],
)
def test_valid_job_ids(job_id: str) -> None:
    """Job ids: 1–128 characters, a letter or digit first, then ``[A-Za-z0-9._:@/+=-]``."""
    assert job(delivery(message_id=job_id)).job_id == job_id


# --- rejections ---------------------------------------------------------------


def assert_ids_kept(r: Rejected) -> None:
    assert r.job_id == "job-1"
    assert r.correlation_id == "corr-1"
    assert r.reply_to == "replies"


def test_missing_message_id() -> None:
    """No job id: invalid_request, but the correlation id and reply_to are kept."""
    r = rejected(delivery(message_id=None))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert "message_id" in r.message
    assert r.job_id is None
    assert r.correlation_id == "corr-1"
    assert r.reply_to == "replies"


@pytest.mark.parametrize(
    "job_id",
    ["", " ", "job 1", "-job", ".job", "A" * 129, "job-1\n", "jöb", "job\x00", "job#1"],
)
def test_invalid_message_id(job_id: str) -> None:
    """A message_id outside the job id grammar is invalid_request."""
    r = rejected(delivery(message_id=job_id))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert r.job_id is None
    assert r.correlation_id == "corr-1"
    assert r.reply_to == "replies"


def test_invalid_message_id_without_correlation_id() -> None:
    """With neither id readable the rejection has no ids, but keeps reply_to."""
    r = rejected(delivery(message_id="bad id", correlation_id=None))
    assert (r.job_id, r.correlation_id, r.reply_to) == (None, None, "replies")


@pytest.mark.parametrize("correlation_id", ["", "a b", "x" * 129, "c\n"])
def test_invalid_correlation_id(correlation_id: str) -> None:
    """A bad correlation_id is invalid_request; the job id stands in for it."""
    r = rejected(delivery(correlation_id=correlation_id))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert "correlation_id" in r.message
    assert r.job_id == "job-1"
    assert r.correlation_id == "job-1"


@pytest.mark.parametrize("reply_to", ["", "q\x00", "q\n", "q" * 256])
def test_invalid_reply_to(reply_to: str) -> None:
    """A reply_to that is not a usable queue name is invalid_request; nothing to reply to."""
    r = rejected(delivery(reply_to=reply_to))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert "reply_to" in r.message
    assert r.reply_to is None
    assert r.job_id == "job-1"


def test_body_too_large() -> None:
    """A body over max_body_bytes is payload_too_large, ids kept."""
    raw = body()
    r = decode(delivery(body=raw), max_body_bytes=len(raw) - 1)
    assert isinstance(r, Rejected)
    assert r.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert str(len(raw)) in r.message
    assert_ids_kept(r)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"content_type": "text/plain"}, "content_type"),
        ({"content_type": "application/json; charset=utf-8"}, "content_type"),
        ({"content_encoding": "gzip"}, "content_encoding"),
        ({"routing_key": "urgent"}, "SLA class"),
        ({"routing_key": ""}, "SLA class"),
    ],
)
def test_invalid_properties(overrides: dict[str, Any], fragment: str) -> None:
    """Unsupported content types, encodings and routing keys are invalid_request."""
    r = rejected(delivery(**overrides))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert fragment in r.message
    assert_ids_kept(r)


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({HEADERS.SLA_MS: 0}, "sla-ms"),
        ({HEADERS.SLA_MS: -5}, "sla-ms"),
        ({HEADERS.SLA_MS: MAX_SLA_MS + 1}, "sla-ms"),
        ({HEADERS.SLA_MS: 1.5}, "sla-ms"),
        ({HEADERS.SLA_MS: 1000.0}, "sla-ms"),
        ({HEADERS.SLA_MS: True}, "sla-ms"),
        ({HEADERS.SLA_MS: "-5"}, "sla-ms"),
        ({HEADERS.SLA_MS: "1e3"}, "sla-ms"),
        ({HEADERS.SLA_MS: " 100"}, "sla-ms"),
        ({HEADERS.SLA_MS: "1" * 21}, "sla-ms"),
        ({HEADERS.SLA_MS: "١٢٣"}, "sla-ms"),
        ({HEADERS.SLA_MS: [100]}, "sla-ms"),
        ({HEADERS.DEADLINE_MS: 0}, "deadline-ms"),
        ({HEADERS.DEADLINE_MS: 2**53 + 1}, "deadline-ms"),
        ({HEADERS.DEADLINE_MS: 2**64}, "deadline-ms"),
        ({HEADERS.PUBLISHED_MS: -1}, "published-ms"),
        ({HEADERS.PUBLISHED_MS: {"ms": 1}}, "published-ms"),
        ({HEADERS.REPLAY_COUNT: -1}, "replay-count"),
        ({HEADERS.REPLAY_COUNT: 1_000_001}, "replay-count"),
        ({HEADERS.SCHEMA_VERSION: SCHEMA_VERSION + 1}, "schema-version"),
        ({HEADERS.SCHEMA_VERSION: 0}, "schema-version"),
        ({HEADERS.MODEL: ""}, "model"),
        ({HEADERS.MODEL: "m" * 257}, "model"),
        ({HEADERS.MODEL: b"\xff\xfe"}, "model"),
        ({HEADERS.MODEL: 4}, "model"),
        ({HEADERS.MODEL: ["gpt-4.1"]}, "model"),
        ({HEADERS.TENANT: 7}, "tenant"),
        ({HEADERS.TENANT: ""}, "tenant"),
    ],
)
def test_invalid_headers(headers: dict[str, Any], fragment: str) -> None:
    """Each malformed contract header is invalid_request naming the header; ids kept."""
    r = rejected(delivery(headers=headers))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert fragment in r.message
    assert_ids_kept(r)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "JSON"),
        (b"not json", "JSON"),
        (b'{"model": "m", "messages": [', "JSON"),
        (b'{"model": "\xff"}', "JSON"),
        (b"NaN", "JSON"),
        (b"[1, 2]", "object"),
        (b'"a string"', "object"),
        (b"null", "object"),
        (b"[" * 2000 + b"]" * 2000, "JSON"),
    ],
)
def test_body_not_a_json_object(raw: bytes, fragment: str) -> None:
    """A body that is not a JSON object is invalid_request; ids kept."""
    r = rejected(delivery(body=raw))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert fragment in r.message
    assert_ids_kept(r)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"messages": ...}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": ["hello"]}, "messages.0"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": ""}]}, "messages.0.role"),
        ({"messages": [{"role": 3}]}, "messages.0.role"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"max_tokens": 100.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 10_000_001}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"stream": 0}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stream_options": "yes"}, "stream_options"),
        ({"model": ""}, "model"),
        ({"model": 5}, "model"),
    ],
)
def test_body_schema_violations(fields: dict[str, Any], fragment: str) -> None:
    """Fields routing depends on are checked strictly, with the field's path; ids kept."""
    r = rejected(delivery(body=body(**fields)))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert r.message.startswith(fragment), r.message
    assert_ids_kept(r)


def test_no_model_anywhere() -> None:
    """No model in the body nor the header: invalid_request."""
    r = rejected(delivery(body=body(model=...)))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert "model" in r.message
    assert_ids_kept(r)


def test_checks_run_in_order() -> None:
    """Id problems are reported before size, size before the body."""
    assert "message_id" in rejected(delivery(message_id=None, body=b"x" * 10_000)).message
    too_big = rejected(delivery(body=b"x" * 10_000))
    assert too_big.code is ErrorCode.PAYLOAD_TOO_LARGE


# --- replies ------------------------------------------------------------------


ROUTING = {
    "model": "gpt-4.1",
    "endpoint": "fleet-1",
    "attempts": 2,
    "hedged": True,
    "queue_ms": 12.5,
    "upstream_ms": 840.25,
    "total_ms": 860.0,
    "prompt_tokens": 21,
    "completion_tokens": 7,
    "cost_usd": 0.0001,
    "via": "fallback",
}


def test_ok_reply_round_trip() -> None:
    """An ok reply carries the upstream response and the routing facts."""
    response = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": {}}
    raw = encode_reply("job-1", response=response, routing=ROUTING)
    data = decode_reply(raw)
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["status"] == "ok"
    assert data["error"] is None
    reply = Reply.model_validate(data)
    assert reply.job_id == "job-1"
    assert reply.status == "ok"
    assert reply.response == response
    assert reply.error is None
    assert reply.routing.model_dump() == ROUTING


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_reply_shape(code: ErrorCode) -> None:
    """Every error code makes an error reply with its retriable flag."""
    raw = encode_reply("job-1", error=error_body(code, f"because {code}"), routing={"attempts": 1})
    data = decode_reply(raw)
    assert data["status"] == "error"
    assert data["response"] is None
    assert data["error"] == {
        "code": code.value,
        "message": f"because {code}",
        "retriable": RETRIABLE[code],
    }
    reply = Reply.model_validate(data)
    assert reply.status == "error"
    assert reply.error is not None
    assert reply.error.code is code
    assert reply.error.retriable is RETRIABLE[code]
    assert reply.routing.attempts == 1


def test_error_reply_without_job_id() -> None:
    """A delivery without a readable id still gets a reply, with job_id null."""
    data = decode_reply(encode_reply(None, error=error_body(ErrorCode.INVALID_REQUEST, "no id")))
    assert data["job_id"] is None
    assert Reply.model_validate(data).job_id is None


def test_routing_defaults_to_empty() -> None:
    """Without routing facts the envelope still has a routing object."""
    data = decode_reply(encode_reply("j", response={}))
    assert data["routing"] == {}
    assert Reply.model_validate(data).routing.attempts == 0


def test_decode_reply_is_tolerant() -> None:
    """Fields a newer worker adds are ignored by decoders."""
    raw = orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION + 1,
            "job_id": "j",
            "status": "ok",
            "response": {},
            "routing": {"endpoint": "e", "new_fact": 1},
            "new_top_level": True,
        }
    )
    reply = Reply.model_validate(decode_reply(raw))
    assert reply.routing.endpoint == "e"


@pytest.mark.parametrize(
    "raw", [b"", b"not json", b"[]", b"{}", b'{"status": "maybe"}', b'"ok"', b"\xff"]
)
def test_decode_reply_rejects_non_envelopes(raw: bytes) -> None:
    """Anything that is not a reply envelope raises ValueError."""
    with pytest.raises(ValueError):
        decode_reply(raw)


# --- job kinds --------------------------------------------------------------


def embedding_body(**fields: Any) -> bytes:
    request: dict[str, Any] = {"model": "text-embedding-3-small", "input": ["a", "bb"]}
    request.update(fields)
    return orjson.dumps(request)


def test_a_job_without_kind_is_a_chat_job() -> None:
    assert job(delivery()).kind == "chat"


def test_an_embedding_job_is_read_as_an_embeddings_request() -> None:
    d = job(delivery(body=embedding_body(), headers={HEADERS.KIND: "embedding"}))
    assert d.kind == "embedding"
    assert d.model == "text-embedding-3-small"
    assert d.output_cap is None and d.n == 1
    assert d.prompt_chars == 3


@pytest.mark.parametrize(
    "request_body",
    [
        embedding_body(input=""),
        embedding_body(input=[]),
        embedding_body(input=["ok", ""]),
        embedding_body(input=42),
        embedding_body(input=["x"] * 2049),
        embedding_body(dimensions=0),
        embedding_body(encoding_format="hex"),
        body(),  # a chat body sent as an embedding job has no input
    ],
)
def test_a_bad_embeddings_request_is_invalid(request_body: bytes) -> None:
    d = delivery(body=request_body, headers={HEADERS.KIND: "embedding"})
    r = rejected(d) if len(request_body) <= MAX_BODY else rejected_large(d)
    assert r.code is ErrorCode.INVALID_REQUEST


def test_an_embeddings_body_sent_as_a_chat_job_is_invalid() -> None:
    r = rejected(delivery(body=embedding_body()))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert "messages" in r.message


@pytest.mark.parametrize("kind", ["image", "", "Chat", 7, b"\xff"])
def test_an_unknown_kind_is_invalid(kind: object) -> None:
    r = rejected(delivery(headers={HEADERS.KIND: kind}))
    assert r.code is ErrorCode.INVALID_REQUEST
    assert "kind" in r.message


def test_token_arrays_count_four_characters_a_token() -> None:
    d = job(
        delivery(body=embedding_body(input=[[1, 2, 3], [4]]), headers={HEADERS.KIND: "embedding"})
    )
    assert d.prompt_chars == 16


def test_a_streamed_chat_job_is_a_job_that_says_so() -> None:
    job = decode(delivery(body=body(stream=True, stream_options={"include_usage": True})))
    assert isinstance(job, Job) and job.stream is True
    plain = decode(delivery(body=body(stream=False)))
    assert isinstance(plain, Job) and plain.stream is False


def test_an_embedding_job_does_not_stream() -> None:
    r = rejected(
        delivery(
            body=orjson.dumps({"model": "e", "input": "x", "stream": True}),
            headers={HEADERS.KIND: "embedding"},
        )
    )
    assert r.code is ErrorCode.INVALID_REQUEST and r.message.startswith("stream")
