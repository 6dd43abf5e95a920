"""The anthropic adapter: the call it builds, the answers and errors it reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.errors import UpstreamFailure
from workers.providers.anthropic import ANTHROPIC_VERSION, FINISH_REASONS, AnthropicAdapter
from workers.routing import FailureKind

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers" / "anthropic"
KEY = "sk-ant-api03-test-key-0123456789abcdef"
NOW = 1_760_000_000.0


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return data


def adapter(base_url: str = "https://api.anthropic.com", **fields: Any) -> AnthropicAdapter:
    secrets = fields.pop("secret_header_values", {})
    endpoint = EndpointSettings(
        name="claude-direct",
        kind="anthropic",
        base_url=base_url,
        models={"claude": "claude-sonnet-4-5-20250929"},
        **fields,
    )
    update = {"api_key": SecretStr(KEY), "secret_header_values": secrets}
    return AnthropicAdapter(endpoint.model_copy(update=update))


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "claude", "messages": [{"role": "user", "content": "Hello"}], **extra}


def failure(status: int, body: Any, headers: dict[str, str] | None = None) -> UpstreamFailure:
    raw = body.encode() if isinstance(body, str) else orjson.dumps(body)
    with pytest.raises(UpstreamFailure) as caught:
        adapter().answer(JobKind.CHAT, status, headers or {}, raw, now=NOW)
    return caught.value


@pytest.mark.parametrize(
    "base_url",
    ["https://api.anthropic.com", "https://api.anthropic.com/", "https://api.anthropic.com/v1"],
)
def test_the_call_goes_to_v1_messages_with_base_url_with_or_without_v1(base_url: str) -> None:
    call = adapter(base_url).call(JobKind.CHAT, chat(), "claude-sonnet-4-5-20250929")
    assert call.url == "https://api.anthropic.com/v1/messages"


def test_a_proxy_path_is_kept_and_query_appended() -> None:
    call = adapter("http://relay.local:8080/anthropic", query={"team": "a b"}).call(
        JobKind.CHAT, chat(), "m"
    )
    assert call.url == "http://relay.local:8080/anthropic/v1/messages?team=a+b"


def test_headers_carry_the_key_the_version_and_the_endpoints_extras() -> None:
    call = adapter(
        headers={"anthropic-beta": "prompt-caching-2024-07-31"},
        secret_header_values={"X-Gateway-Token": SecretStr("gw-secret-token-value")},
    ).call(JobKind.CHAT, chat(), "claude-sonnet-4-5-20250929")
    assert call.headers["x-api-key"] == KEY
    assert call.headers["anthropic-version"] == ANTHROPIC_VERSION == "2023-06-01"
    assert call.headers["content-type"] == "application/json"
    assert call.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert call.headers["x-gateway-token"] == "gw-secret-token-value"
    assert "authorization" not in {h.lower() for h in call.headers}
    body = orjson.loads(call.body)
    assert body["model"] == "claude-sonnet-4-5-20250929" and body["max_tokens"] == 4096


def test_an_endpoint_may_pin_another_anthropic_version() -> None:
    call = adapter(headers={"Anthropic-Version": "2099-01-01"}).call(JobKind.CHAT, chat(), "m")
    assert call.headers["anthropic-version"] == "2099-01-01"
    assert sum(h.lower() == "anthropic-version" for h in call.headers) == 1


def test_secrets_stay_out_of_repr_and_are_known_for_redaction() -> None:
    a = adapter(secret_header_values={"x-gw": SecretStr("gw-secret-token-value")})
    assert KEY in a.secrets and "gw-secret-token-value" in a.secrets
    call = a.call(JobKind.CHAT, chat(), "m")
    assert KEY not in repr(a) and KEY not in repr(call)


def test_untranslatable_requests_fail_as_bad_request_naming_the_endpoint() -> None:
    with pytest.raises(UpstreamFailure) as caught:
        adapter().call(JobKind.CHAT, chat(n=3), "m")
    assert caught.value.kind is FailureKind.BAD_REQUEST
    assert str(caught.value).startswith("claude-direct: not translatable to Anthropic: n > 1")


def test_embedding_jobs_are_refused() -> None:
    with pytest.raises(UpstreamFailure) as caught:
        adapter().call(JobKind.EMBEDDING, {"model": "e", "input": "x"}, "m")
    assert caught.value.kind is FailureKind.BAD_REQUEST
    assert "no embeddings API" in str(caught.value)


@pytest.mark.parametrize(
    "name", ["response_text.json", "response_tool_use.json", "response_cache_usage.json"]
)
def test_fixture_answers_become_chat_completions(name: str) -> None:
    case = fixture(name)
    raw = orjson.dumps(case["anthropic"])
    reply = adapter().answer(JobKind.CHAT, 200, {}, raw, now=NOW)
    assert reply.body == case["openai"]
    tokens = case["tokens"]
    assert (reply.prompt_tokens, reply.completion_tokens) == (
        tokens["prompt"],
        tokens["completion"],
    )
    assert (reply.cached_tokens, reply.cache_write_tokens) == (
        tokens["cached"],
        tokens["cache_write"],
    )


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("something_new", "stop"),
        (None, "stop"),
    ],
)
def test_each_stop_reason_maps_to_a_finish_reason(
    stop_reason: str | None, finish_reason: str
) -> None:
    message = {**fixture("response_text.json")["anthropic"], "stop_reason": stop_reason}
    reply = adapter().answer(JobKind.CHAT, 200, {}, orjson.dumps(message), now=NOW)
    assert reply.body["choices"][0]["finish_reason"] == finish_reason
    assert stop_reason not in FINISH_REASONS or FINISH_REASONS[stop_reason] == finish_reason


def test_text_blocks_join_and_unrequested_blocks_are_skipped() -> None:
    message = {
        **fixture("response_text.json")["anthropic"],
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Hello, "},
            {"type": "text", "text": "world"},
        ],
    }
    reply = adapter().answer(JobKind.CHAT, 200, {}, orjson.dumps(message), now=NOW)
    assert reply.body["choices"][0]["message"]["content"] == "Hello, world"


def test_an_answer_without_usage_has_no_token_counts() -> None:
    message = {k: v for k, v in fixture("response_text.json")["anthropic"].items() if k != "usage"}
    reply = adapter().answer(JobKind.CHAT, 200, {}, orjson.dumps(message), now=NOW)
    assert reply.prompt_tokens is None and reply.completion_tokens is None
    assert "usage" not in reply.body


@pytest.mark.parametrize(
    "raw",
    [
        b'{"id": "msg_1", "type": "message", "content": [{"type": "te',
        b"[]",
        b'{"type": "error", "error": {"type": "api_error", "message": "x"}}',
        b'{"type": "message", "content": "Hello"}',
        b'{"type": "message", "content": [{"type": "text"}]}',
        b'{"type": "message", "content": [{"type": "tool_use", "id": "t", "input": {}}]}',
        b'{"type": "message", "content": ["Hello"]}',
    ],
)
def test_a_200_without_a_valid_message_is_malformed(raw: bytes) -> None:
    with pytest.raises(UpstreamFailure) as caught:
        adapter().answer(JobKind.CHAT, 200, {}, raw, now=NOW)
    assert caught.value.kind is FailureKind.MALFORMED and caught.value.status == 200


@pytest.mark.parametrize("case", fixture("errors.json")["cases"], ids=lambda c: f"{c['status']}")
def test_each_error_class_maps_to_its_failure_kind(case: dict[str, Any]) -> None:
    err = failure(case["status"], case["body"], case["headers"])
    assert err.kind is FailureKind(case["kind"])
    assert err.status == case["status"]
    assert err.retry_after_s == case["retry_after_s"]
    if isinstance(case["body"], dict):
        error = case["body"]["error"]
        assert f"HTTP {case['status']}: {error['type']}: " in str(err)


def test_the_529_is_retried_elsewhere_and_the_400_is_not() -> None:
    overloaded = failure(
        529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    )
    assert overloaded.kind.retriable and overloaded.kind.endpoint_failure
    invalid = failure(
        400, {"type": "error", "error": {"type": "invalid_request_error", "message": "x"}}
    )
    assert not invalid.kind.retriable


def test_error_messages_never_carry_the_key() -> None:
    body = {
        "type": "error",
        "error": {"type": "authentication_error", "message": f"invalid x-api-key: {KEY}"},
    }
    err = failure(401, body)
    assert KEY not in str(err) and KEY[-8:] not in str(err) and "[redacted]" in str(err)
    assert KEY not in repr(err)
