"""The fleet's fake Anthropic: it takes what Anthropic takes and refuses the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.fleet.anthropic_wire import (
    MAX_OUTPUT_TOKENS,
    MessagesCall,
    check_headers,
    error_body,
    message_body,
    parse_messages,
    tool_input,
)
from workers.fleet.wire import Refusal
from workers.providers.anthropic import AnthropicAdapter

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers" / "anthropic"
MODEL = "claude-sonnet-4-5-20250929"
MODELS = (MODEL,)
REQUESTS = sorted(p.name for p in FIXTURES.glob("request_*.json"))


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def parse(body: dict[str, Any]) -> MessagesCall | Refusal:
    return parse_messages(orjson.dumps(body), MODELS)


def refused(body: dict[str, Any], status: int = 400) -> str:
    answer = parse(body)
    assert isinstance(answer, Refusal), answer
    assert answer.status == status
    error = orjson.loads(answer.body)
    assert error["type"] == "error"
    message: str = error["error"]["message"]
    return message


def minimal(**extra: Any) -> dict[str, Any]:
    return {**fixture("request_minimal.json")["anthropic"], **extra}


@pytest.mark.parametrize("name", REQUESTS)
def test_every_translated_fixture_is_a_valid_messages_request(name: str) -> None:
    assert isinstance(parse(fixture(name)["anthropic"]), MessagesCall)


@pytest.mark.parametrize("name", REQUESTS)
def test_the_openai_originals_are_refused(name: str) -> None:
    """What an untranslated (or half-translated) request gets: a 400."""
    body = {**fixture(name)["openai"], "model": MODEL}
    refused(body)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (minimal(max_completion_tokens=5), "max_completion_tokens: Extra inputs"),
        (minimal(stop=["x"]), "stop: Extra inputs"),
        ({k: v for k, v in minimal().items() if k != "max_tokens"}, "max_tokens: Field required"),
        (minimal(max_tokens=MAX_OUTPUT_TOKENS + 1), "maximum allowed number of output tokens"),
        (minimal(temperature=1.5), "temperature"),
        (minimal(messages=[]), "messages: Field required"),
        (minimal(messages=[{"role": "system", "content": "s"}]), "'user' or 'assistant'"),
        (minimal(messages=[{"role": "assistant", "content": "hi"}]), "starting with user"),
        (
            minimal(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            "must alternate",
        ),
        (minimal(messages=[{"role": "user", "content": ""}]), "non-empty"),
        (minimal(messages=[{"role": "user", "content": "a", "name": "bob"}]), "Extra inputs"),
        (
            minimal(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
            ),
            "'image_url' is not a user content block",
        ),
        (
            minimal(
                messages=[
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                    },
                    {"role": "user", "content": "and?"},
                ]
            ),
            "without tool_result",
        ),
        (
            minimal(
                messages=[
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "here"},
                            {"type": "tool_result", "tool_use_id": "t1", "content": "x"},
                        ],
                    },
                ]
            ),
            "without tool_result",
        ),
        (
            minimal(
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            ),
            "tools.0.function: Extra inputs",
        ),
        (minimal(tool_choice="auto"), "tool_choice"),
        (minimal(tool_choice={"type": "any"}), "while providing tools"),
        (minimal(system=[{"type": "text", "text": ""}]), "non-empty"),
        (minimal(metadata={"user": "u"}), "user_id"),
    ],
)
def test_what_anthropic_refuses_the_fake_refuses(body: dict[str, Any], says: str) -> None:
    assert says in refused(body)


def test_an_unknown_model_is_a_404_not_found_error() -> None:
    answer = parse(minimal(model="claude-nonexistent"))
    assert isinstance(answer, Refusal) and answer.status == 404
    assert orjson.loads(answer.body)["error"]["type"] == "not_found_error"


def test_headers_need_the_key_and_a_version() -> None:
    good = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    assert check_headers(good, "k") is None
    assert check_headers({"anthropic-version": "2023-06-01"}, None) is None
    bad_key = check_headers({**good, "x-api-key": "other"}, "k")
    assert bad_key is not None and bad_key.status == 401
    assert orjson.loads(bad_key.body)["error"]["type"] == "authentication_error"
    echoed = check_headers({**good, "x-api-key": "sk-ant-given-1234"}, "k", echo="full")
    assert echoed is not None and b"sk-ant-given-1234" in echoed.body
    masked = check_headers({**good, "x-api-key": "sk-ant-given-1234"}, "k", echo="masked")
    assert masked is not None and b"sk-ant-***1234" in masked.body
    bearer = check_headers({"Authorization": "Bearer k", "anthropic-version": "v"}, "k")
    assert bearer is not None and bearer.status == 401
    no_version = check_headers({"x-api-key": "k"}, "k")
    assert no_version is not None and no_version.status == 400


@pytest.mark.parametrize(
    ("status", "type_"), [(429, "rate_limit_error"), (500, "api_error"), (529, "overloaded_error")]
)
def test_error_bodies_have_anthropics_shape(status: int, type_: str) -> None:
    body = orjson.loads(error_body(status, "x"))
    assert body == {
        "type": "error",
        "error": {"type": type_, "message": "x"},
        "request_id": "req_fleet",
    }


def adapter() -> AnthropicAdapter:
    endpoint = EndpointSettings(
        name="fake", kind="anthropic", base_url="http://127.0.0.1:1", models={"c": MODEL}
    )
    return AnthropicAdapter(endpoint)


def raw_answer(call: MessagesCall, *, truncated: bool = False, cache_read: int = 0) -> bytes:
    return message_body(
        call,
        endpoint="e",
        seq=1,
        output_tokens=8,
        truncated=truncated,
        usage=True,
        cache_read=cache_read,
    )


def answer(call: MessagesCall, *, truncated: bool = False, cache_read: int = 0) -> dict[str, Any]:
    """The fake's answer as the adapter reads it: the fake and adapter agree."""
    raw = raw_answer(call, truncated=truncated, cache_read=cache_read)
    body: dict[str, Any] = adapter().answer(JobKind.CHAT, 200, {}, raw, now=0.0).body
    return body


def test_offered_tools_are_called_with_an_input_that_fits_the_schema() -> None:
    call = parse(fixture("request_tools_round_trip.json")["anthropic"])
    assert isinstance(call, MessagesCall)
    assert call.answers_tools  # the last user turn answers earlier calls: text now
    assert answer(call)["choices"][0]["finish_reason"] == "stop"
    fresh = parse(minimal(tools=call.tools, tool_choice={"type": "tool", "name": "get_weather"}))
    assert isinstance(fresh, MessagesCall)
    choice = answer(fresh)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"location": "fleet"}


def test_stop_reasons_follow_the_request_and_the_plan() -> None:
    plain = parse(minimal())
    stops = parse(minimal(stop_sequences=["END"]))
    assert isinstance(plain, MessagesCall) and isinstance(stops, MessagesCall)
    assert answer(plain)["choices"][0]["finish_reason"] == "stop"
    assert answer(plain, truncated=True)["choices"][0]["finish_reason"] == "length"
    sent = orjson.loads(raw_answer(stops))
    assert (sent["stop_reason"], sent["stop_sequence"]) == ("stop_sequence", "END")
    assert answer(stops)["choices"][0]["finish_reason"] == "stop"


def test_a_cache_breakpoint_makes_a_prefix_read_on_the_second_request() -> None:
    first = parse(fixture("request_prompt_cache.json")["anthropic"])
    again = parse(fixture("request_prompt_cache.json")["anthropic"])
    other = parse(minimal())
    assert isinstance(first, MessagesCall) and isinstance(again, MessagesCall)
    assert isinstance(other, MessagesCall) and other.cache_prefix is None
    assert first.cache_prefix == again.cache_prefix is not None
    assert 0 < first.cache_tokens < first.input_tokens
    body = answer(again, cache_read=again.cache_tokens)
    assert body["usage"]["prompt_tokens"] == again.input_tokens
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == again.cache_tokens


def test_tool_input_fills_required_properties_by_type() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "integer"}, "c": {"type": "array"}},
        "required": ["a", "b", "c"],
    }
    assert tool_input(schema) == {"a": "fleet", "b": 1, "c": None}
    assert tool_input({"type": "object"}) == {}
