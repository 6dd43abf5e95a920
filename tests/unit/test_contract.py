"""The pydantic models of the wire contract, the closed error-code set, and
docs/protocol.md kept in step with them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from schemas import (
    CONTENT_TYPE,
    DEAD_HEADERS,
    HEADERS,
    HTTP_STATUS,
    RETRIABLE,
    SCHEMA_VERSION,
    ChatRequest,
    ErrorCode,
    Reply,
    ReplyError,
    Routing,
    SlaClass,
)
from schemas.settings import TopologySettings

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

DOCUMENTED_CODES = {
    "invalid_request",
    "unknown_model",
    "payload_too_large",
    "deadline_exceeded",
    "upstream_error",
    "upstream_rejected",
    "no_healthy_endpoint",
    "over_capacity",
    "over_budget",
    "internal_error",
    "stream_interrupted",
}

MESSAGES = [{"role": "user", "content": "hi"}]


def names(holder: type) -> dict[str, str]:
    """The constant names and values of a HEADERS-style class."""
    return {k: v for k, v in vars(holder).items() if k.isupper()}


@pytest.fixture(scope="module")
def protocol() -> str:
    return PROTOCOL.read_text(encoding="utf-8")


# --- ChatRequest ----------------------------------------------------------------


def test_chat_request_keeps_unknown_fields() -> None:
    """Fields OpenAI adds pass through, at the top level and in messages."""
    raw = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi", "name": "ann", "cache": {"x": 1}}],
        "tools": [{"type": "function"}],
        "reasoning_effort": "low",
    }
    request = ChatRequest.model_validate(raw)
    assert request.model_extra == {"tools": [{"type": "function"}], "reasoning_effort": "low"}
    assert request.messages[0].model_extra == {"name": "ann", "cache": {"x": 1}}
    assert request.model_dump(exclude_none=True) == raw


def test_chat_request_content_not_checked() -> None:
    """Message content may be a string, parts, or null (tool calls)."""
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
        {"role": "tool", "content": "42", "tool_call_id": "1"},
    ]
    assert len(ChatRequest.model_validate({"messages": messages}).messages) == 3


def test_chat_request_model_optional() -> None:
    """The body's model may be left to the ``model`` header."""
    assert ChatRequest.model_validate({"messages": MESSAGES}).model is None


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": None},
        {"messages": "hi"},
        {"messages": [{}]},
        {"messages": [{"role": ""}]},
        {"messages": [{"role": "r" * 65}]},
        {"messages": [{"role": None}]},
        {"max_tokens": 0},
        {"max_tokens": -1},
        {"max_tokens": 10_000_001},
        {"max_tokens": "64"},
        {"max_tokens": 64.0},
        {"max_tokens": True},
        {"max_completion_tokens": 0},
        {"max_completion_tokens": "64"},
        {"temperature": -0.1},
        {"temperature": 2.01},
        {"temperature": "1"},
        {"stream": 0},
        {"stream": 1},
        {"stream_options": {"include_usage": "yes"}},
        {"stream": "false"},
        {"model": ""},
        {"model": "m" * 257},
        {"model": 3},
    ],
)
def test_chat_request_strict_fields(fields: dict[str, Any]) -> None:
    """What routing depends on must already have its JSON type and range."""
    raw = {"model": "m", "messages": MESSAGES, **fields}
    with pytest.raises(ValidationError):
        ChatRequest.model_validate(raw)


def test_chat_request_missing_messages() -> None:
    """messages is required."""
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({"model": "m"})


@pytest.mark.parametrize("stream", [True, False, None])
def test_stream_true_false_or_absent(stream: bool | None) -> None:
    """``stream`` is a JSON boolean or null (``true`` asks for a streamed answer)."""
    assert ChatRequest.model_validate({"messages": MESSAGES, "stream": stream}).stream is stream


def test_temperature_accepts_integers() -> None:
    """A JSON integer is a valid number for temperature."""
    assert ChatRequest.model_validate({"messages": MESSAGES, "temperature": 1}).temperature == 1.0


@pytest.mark.parametrize(
    ("fields", "cap"),
    [
        ({}, None),
        ({"max_tokens": 10}, 10),
        ({"max_completion_tokens": 20}, 20),
        ({"max_tokens": 10, "max_completion_tokens": 20}, 20),
    ],
)
def test_output_cap(fields: dict[str, Any], cap: int | None) -> None:
    """max_completion_tokens wins over max_tokens."""
    assert ChatRequest.model_validate({"messages": MESSAGES, **fields}).output_cap() == cap


# --- Reply ------------------------------------------------------------------------


def test_reply_defaults() -> None:
    """A minimal reply has the current schema version and empty routing."""
    reply = Reply(job_id="j", status="ok", response={})
    assert reply.schema_version == SCHEMA_VERSION
    assert reply.routing == Routing()
    assert reply.routing.attempts == 0
    assert reply.routing.hedged is False


def test_reply_ignores_unknown_fields() -> None:
    """Reply decoding is tolerant: unknown fields are dropped."""
    reply = Reply.model_validate({"job_id": "j", "status": "ok", "shiny": 1})
    assert not hasattr(reply, "shiny")


@pytest.mark.parametrize("status", ["OK", "failed", None, 1])
def test_reply_status_closed(status: object) -> None:
    """status is ok or error."""
    with pytest.raises(ValidationError):
        Reply.model_validate({"job_id": "j", "status": status})


def test_reply_job_id_required_but_nullable() -> None:
    """job_id is always present in the envelope, null when unknown."""
    assert Reply.model_validate({"job_id": None, "status": "error"}).job_id is None
    with pytest.raises(ValidationError):
        Reply.model_validate({"status": "ok"})


@pytest.mark.parametrize("code", list(ErrorCode))
def test_reply_error_of(code: ErrorCode) -> None:
    """ReplyError.of takes the retriable flag from the table."""
    error = ReplyError.of(code, "why")
    assert error.code is code
    assert error.retriable is RETRIABLE[code]
    dumped = Reply(job_id="j", status="error", error=error).model_dump(mode="json")
    assert dumped["error"] == {"code": code.value, "message": "why", "retriable": RETRIABLE[code]}


# --- error codes and names ---------------------------------------------------


def test_error_codes_are_the_documented_set() -> None:
    """The set is closed: adding or removing a code is a contract change."""
    assert {c.value for c in ErrorCode} == DOCUMENTED_CODES


def test_every_code_has_retriable_and_http_status() -> None:
    """Both tables cover exactly the codes, with sane values."""
    assert set(RETRIABLE) == set(ErrorCode)
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert all(isinstance(v, bool) for v in RETRIABLE.values())
    assert all(400 <= v <= 599 for v in HTTP_STATUS.values())


def test_retriable_codes() -> None:
    """Exactly the transient conditions are retriable."""
    retriable = {c.value for c, r in RETRIABLE.items() if r}
    assert retriable == {
        "deadline_exceeded",
        "upstream_error",
        "no_healthy_endpoint",
        "over_capacity",
        "stream_interrupted",
    }


def test_contract_constants() -> None:
    """Schema version, content type, SLA classes and header names."""
    assert SCHEMA_VERSION == 1
    assert CONTENT_TYPE == "application/json"
    assert {c.value for c in SlaClass} == {"interactive", "batch"}
    assert set(names(HEADERS).values()) == {
        "model",
        "sla-ms",
        "deadline-ms",
        "published-ms",
        "tenant",
        "traceparent",
        "replay-count",
        "schema-version",
        "kind",
    }
    assert set(names(DEAD_HEADERS).values()) == {
        "error-code",
        "error",
        "attempts",
        "failed-at",
        "worker",
        "sla-class",
        "reply-error",
        "reply",
        "reply-offset",
        "headers-dropped",
    }


def test_no_header_uses_the_broker_prefix() -> None:
    """x- headers belong to RabbitMQ (3.13+)."""
    for value in [*names(HEADERS).values(), *names(DEAD_HEADERS).values()]:
        assert not value.lower().startswith("x-")


# --- docs/protocol.md follows the code ----------------------------------------


def test_protocol_mentions_every_error_code(protocol: str) -> None:
    """Every error code is documented."""
    missing = [c.value for c in ErrorCode if f"`{c.value}`" not in protocol]
    assert not missing


def test_protocol_error_table_matches_code(protocol: str) -> None:
    """The error table's retriable and HTTP columns are those of schemas/errors.py."""
    rows = re.findall(r"^\| `([a-z_]+)` \| .+? \| (yes|no) \| (\d{3}) \|$", protocol, re.M)
    table = {code: (flag == "yes", int(status)) for code, flag, status in rows}
    assert table == {c.value: (RETRIABLE[c], HTTP_STATUS[c]) for c in ErrorCode}


@pytest.mark.parametrize(
    "header", sorted({*names(HEADERS).values(), *names(DEAD_HEADERS).values()})
)
def test_protocol_mentions_every_header(protocol: str, header: str) -> None:
    """Every job header and dead-letter header is documented in a table row."""
    assert re.search(rf"^\| `{re.escape(header)}` \|", protocol, re.M), header


@pytest.mark.parametrize("field", [*Reply.model_fields, *Routing.model_fields])
def test_protocol_mentions_every_reply_field(protocol: str, field: str) -> None:
    """Every reply envelope and routing field is documented."""
    assert f"`{field}`" in protocol


def test_protocol_names_the_topology(protocol: str) -> None:
    """The default exchange and queue names appear in the protocol."""
    topology = TopologySettings()
    expected = [
        topology.jobs_exchange,
        topology.dead_exchange,
        topology.dead_queue,
        *(topology.queue_name(c.value) for c in SlaClass),
        *(f"`{c.value}`" for c in SlaClass),
    ]
    assert [name for name in expected if name not in protocol] == []


def test_protocol_states_the_limits(protocol: str) -> None:
    """The documented limits are the codec's."""
    from schemas.codec import MAX_SLA_MS
    from schemas.contract import JOB_ID_RE

    assert f"{MAX_SLA_MS:,}".replace(",", " ") in protocol
    assert JOB_ID_RE.pattern.replace("\\Z", "$") in protocol
    assert f"Schema version **{SCHEMA_VERSION}**" in protocol


def test_protocol_reply_examples_parse(protocol: str) -> None:
    """The JSON reply examples are valid envelopes of both statuses."""
    blocks = re.findall(r"```json\n(.*?)```", protocol, re.S)
    replies = [orjson.loads(b) for b in blocks if '"status"' in b]
    statuses = {Reply.model_validate(r).status for r in replies}
    assert statuses == {"ok", "error"}
    for raw in replies:
        reply = Reply.model_validate(raw)
        assert set(raw) == set(Reply.model_fields)
        assert (reply.error is None) == (reply.status == "ok")
        if reply.error is not None:
            assert reply.error.retriable is RETRIABLE[reply.error.code]


def test_protocol_body_example_is_valid(protocol: str) -> None:
    """The request body example is a valid job body."""
    blocks = re.findall(r"```json\n(.*?)```", protocol, re.S)
    bodies = [orjson.loads(b) for b in blocks if '"messages"' in b]
    assert bodies
    for body in bodies:
        assert ChatRequest.model_validate(body).messages
