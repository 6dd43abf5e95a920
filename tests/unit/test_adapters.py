"""The openai and azure adapters: the calls they build and how they read answers.

Answers come from tests/fixtures/providers/{openai,azure}/*.json, written from
the providers' public API references.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from schemas.contract import JobKind
from schemas.settings import EndpointSettings, load_settings
from workers.errors import UpstreamFailure
from workers.providers import Adapter, UpstreamReply, adapter_for
from workers.providers.azure import AzureAdapter
from workers.providers.openai import OpenAIAdapter
from workers.routing import FailureKind

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
KEY = "sk-test-unit-key-0123456789"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.entra-fixture-token"
SECRET = "hdr-secret-value-abcdef"
CHAT = {"model": "gpt4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def fixture(kind: str, name: str) -> Any:
    return json.loads((FIXTURES / kind / f"{name}.json").read_text(encoding="utf-8"))


def answer(adapter: Adapter, kind: JobKind, exchange: dict[str, Any]) -> UpstreamReply:
    return adapter.answer(
        kind,
        exchange["status"],
        exchange["headers"],
        orjson.dumps(exchange["body"]),
        now=time.time(),
    )


def failure(adapter: Adapter, kind: JobKind, exchange: dict[str, Any]) -> UpstreamFailure:
    with pytest.raises(UpstreamFailure) as caught:
        answer(adapter, kind, exchange)
    return caught.value


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Any:
    """An endpoint loaded as the worker loads it (keys from the environment)."""
    monkeypatch.setenv("UNIT_KEY", KEY)
    monkeypatch.setenv("UNIT_TOKEN", TOKEN)
    monkeypatch.setenv("UNIT_SECRET", SECRET)
    monkeypatch.delenv("LLMQ_CONFIG", raising=False)

    def make(**spec: Any) -> EndpointSettings:
        spec = {"name": "e", "models": {"gpt4": "gpt-4o-prod"}, **spec}
        [loaded] = load_settings(None, endpoints=[spec]).endpoints
        return loaded

    return make


def azure(endpoint: Any, **spec: Any) -> Adapter:
    base = {
        "kind": "azure",
        "base_url": "https://res.openai.azure.com",
        "api_version": "2024-10-21",
        "api_key_env": "UNIT_KEY",
    }
    return adapter_for(endpoint(**{**base, **spec}))


# --- the calls ------------------------------------------------------------------------


def test_registry_picks_the_adapter_of_the_kind(endpoint: Any) -> None:
    assert isinstance(adapter_for(endpoint(base_url="https://api.openai.com/v1")), OpenAIAdapter)
    assert isinstance(azure(endpoint), AzureAdapter)


def test_openai_call(endpoint: Any) -> None:
    """Bearer key, the endpoint's headers and query, the model renamed; nothing else changed."""
    adapter = adapter_for(
        endpoint(
            base_url="https://relay.example/v1",
            api_key_env="UNIT_KEY",
            headers={"OpenAI-Organization": "org-1"},
            secret_headers={"X-Relay-Token": "UNIT_SECRET"},
            query={"team": "a b"},
        )
    )
    call = adapter.call(JobKind.CHAT, CHAT, "gpt-4o-prod")
    assert call.url == "https://relay.example/v1/chat/completions?team=a+b"
    assert call.headers["Authorization"] == f"Bearer {KEY}"
    assert call.headers["OpenAI-Organization"] == "org-1"
    assert call.headers["X-Relay-Token"] == SECRET
    assert call.headers["Content-Type"] == "application/json"
    assert orjson.loads(call.body) == {**CHAT, "model": "gpt-4o-prod"}
    embed = adapter.call(JobKind.EMBEDDING, {"input": "x"}, "emb")
    assert embed.url == "https://relay.example/v1/embeddings?team=a+b"
    assert set(adapter.secrets) == {KEY, SECRET}


def test_openai_call_reuses_what_start_up_built(endpoint: Any) -> None:
    """The hot path: headers and URL are built once, not per call."""
    adapter = adapter_for(endpoint(base_url="https://api.openai.com/v1", api_key_env="UNIT_KEY"))
    first = adapter.call(JobKind.CHAT, CHAT, "m")
    second = adapter.call(JobKind.CHAT, CHAT, "m")
    assert first.headers is second.headers and first.url is second.url


def test_azure_call(endpoint: Any) -> None:
    """The deployment in the path, api-version and the endpoint's query, api-key."""
    adapter = azure(endpoint, headers={"X-Team": "t1"}, query={"trace": "1"})
    call = adapter.call(JobKind.CHAT, CHAT, "gpt-4o-prod")
    url = urlsplit(call.url)
    assert (url.scheme, url.netloc) == ("https", "res.openai.azure.com")
    assert url.path == "/openai/deployments/gpt-4o-prod/chat/completions"
    assert parse_qs(url.query) == {"api-version": ["2024-10-21"], "trace": ["1"]}
    assert call.headers["api-key"] == KEY and "Authorization" not in call.headers
    assert call.headers["X-Team"] == "t1"
    assert orjson.loads(call.body)["messages"] == CHAT["messages"]
    embed = urlsplit(adapter.call(JobKind.EMBEDDING, {"input": "x"}, "ada").url)
    assert embed.path == "/openai/deployments/ada/embeddings"


def test_azure_request_fixture_goes_as_is(endpoint: Any) -> None:
    """Azure takes OpenAI's body; only ``model`` is set (Azure ignores it)."""
    body = fixture("azure", "chat_request")
    sent = orjson.loads(azure(endpoint).call(JobKind.CHAT, body, "gpt-4o-prod").body)
    assert sent == {**body, "model": "gpt-4o-prod"}
    embed = fixture("azure", "embeddings_request")
    assert (
        orjson.loads(azure(endpoint).call(JobKind.EMBEDDING, embed, "ada").body)["input"]
        == (embed["input"])
    )


def test_azure_base_url_may_end_in_openai(endpoint: Any) -> None:
    adapter = azure(endpoint, base_url="https://res.openai.azure.com/openai/")
    path = urlsplit(adapter.call(JobKind.CHAT, CHAT, "gpt-4o-prod").url).path
    assert path == "/openai/deployments/gpt-4o-prod/chat/completions"


def test_azure_entra_id_token(endpoint: Any) -> None:
    adapter = azure(endpoint, api_key_env=None, azure_ad_token_env="UNIT_TOKEN")
    call = adapter.call(JobKind.CHAT, CHAT, "gpt-4o-prod")
    assert call.headers["Authorization"] == f"Bearer {TOKEN}" and "api-key" not in call.headers
    assert TOKEN in adapter.secrets


def test_azure_deployment_is_quoted(endpoint: Any) -> None:
    """A deployment name cannot step out of its path segment."""
    call = azure(endpoint).call(JobKind.CHAT, CHAT, "a/../b?x")
    assert urlsplit(call.url).path == "/openai/deployments/a%2F..%2Fb%3Fx/chat/completions"


def test_no_secret_in_repr(endpoint: Any) -> None:
    loaded = endpoint(
        kind="azure",
        base_url="https://res.openai.azure.com",
        api_version="2024-10-21",
        azure_ad_token_env="UNIT_TOKEN",
        secret_headers={"X-Relay-Token": "UNIT_SECRET"},
    )
    adapter = adapter_for(loaded)
    call = adapter.call(JobKind.CHAT, CHAT, "gpt-4o-prod")
    for text in (repr(loaded), repr(adapter), repr(call), str(loaded.model_dump())):
        assert TOKEN not in text and SECRET not in text


# --- the answers ----------------------------------------------------------------------


def test_openai_chat_usage_with_cached_tokens(endpoint: Any) -> None:
    adapter = adapter_for(endpoint(base_url="https://api.openai.com/v1"))
    reply = answer(adapter, JobKind.CHAT, fixture("openai", "chat_response_cached"))
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (2048, 3, 1920)


def test_openai_embeddings(endpoint: Any) -> None:
    adapter = adapter_for(endpoint(base_url="https://api.openai.com/v1"))
    exchange = fixture("openai", "embeddings_response")
    reply = answer(adapter, JobKind.EMBEDDING, exchange)
    assert (reply.prompt_tokens, reply.completion_tokens) == (8, 0)
    assert reply.body == exchange["body"]


@pytest.mark.parametrize("drop", ["data", "usage"])
def test_an_embeddings_answer_without_data_or_usage_is_malformed(endpoint: Any, drop: str) -> None:
    """An answer that cannot be charged (or holds nothing) is no answer."""
    adapter = adapter_for(endpoint(base_url="https://api.openai.com/v1"))
    exchange = fixture("openai", "embeddings_response")
    del exchange["body"][drop]
    assert failure(adapter, JobKind.EMBEDDING, exchange).kind is FailureKind.MALFORMED


def test_a_chat_answer_to_an_embedding_job_is_malformed(endpoint: Any) -> None:
    adapter = adapter_for(endpoint(base_url="https://api.openai.com/v1"))
    exchange = fixture("openai", "chat_response_cached")
    assert failure(adapter, JobKind.EMBEDDING, exchange).kind is FailureKind.MALFORMED


def test_openai_429_waits_as_told(endpoint: Any) -> None:
    adapter = adapter_for(endpoint(base_url="https://api.openai.com/v1"))
    error = failure(adapter, JobKind.CHAT, fixture("openai", "error_429"))
    assert error.kind is FailureKind.RATE_LIMITED and error.retry_after_s == 1.5
    assert "rate_limit_exceeded" in str(error)


def test_an_echoed_key_is_redacted(endpoint: Any) -> None:
    adapter = adapter_for(endpoint(base_url="https://api.openai.com/v1", api_key_env="UNIT_KEY"))
    error = failure(adapter, JobKind.CHAT, fixture("openai", "error_401_echoes_key"))
    assert error.kind is FailureKind.AUTH
    assert KEY not in str(error) and KEY[-4:] not in str(error) and "HTTP 401" in str(error)


def test_azure_chat_answer_keeps_its_annotations(endpoint: Any) -> None:
    exchange = fixture("azure", "chat_response")
    reply = answer(azure(endpoint), JobKind.CHAT, exchange)
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (1536, 9, 1024)
    assert reply.body["prompt_filter_results"] == exchange["body"]["prompt_filter_results"]


def test_azure_filtered_output_is_an_answer(endpoint: Any) -> None:
    """finish_reason content_filter on a 200: the tokens were generated and billed."""
    reply = answer(azure(endpoint), JobKind.CHAT, fixture("azure", "chat_response_filtered_output"))
    assert reply.body["choices"][0]["finish_reason"] == "content_filter"
    assert (reply.prompt_tokens, reply.completion_tokens) == (25, 12)


def test_azure_embeddings(endpoint: Any) -> None:
    reply = answer(azure(endpoint), JobKind.EMBEDDING, fixture("azure", "embeddings_response"))
    assert (reply.prompt_tokens, reply.completion_tokens) == (17, 0)
    assert len(reply.body["data"]) == 2


@pytest.mark.parametrize(
    ("name", "kind", "says"),
    [
        ("error_content_filter", FailureKind.BAD_REQUEST, "HTTP 400: content_filter: "),
        ("error_401", FailureKind.AUTH, "HTTP 401: Access denied"),
        ("error_deployment_not_found", FailureKind.NOT_FOUND, "HTTP 404: DeploymentNotFound: "),
        ("error_500", FailureKind.SERVER_ERROR, "HTTP 500: The server had an error"),
    ],
)
def test_azure_errors(endpoint: Any, name: str, kind: FailureKind, says: str) -> None:
    """Each error's kind drives routing; its code and text are in the message."""
    error = failure(azure(endpoint), JobKind.CHAT, fixture("azure", name))
    assert error.kind is kind and says in str(error)
    assert error.status == fixture("azure", name)["status"]


def test_azure_429_retry_after_ms(endpoint: Any) -> None:
    error = failure(azure(endpoint), JobKind.CHAT, fixture("azure", "error_429"))
    assert error.kind is FailureKind.RATE_LIMITED and error.retry_after_s == 5.75
    assert "HTTP 429: Requests to the ChatCompletions_Create" in str(error)


def test_azure_429_without_headers_reads_its_text(endpoint: Any) -> None:
    """A proxy dropped retry-after: "Please retry after 12 seconds" still counts."""
    error = failure(azure(endpoint), JobKind.EMBEDDING, fixture("azure", "error_429_no_headers"))
    assert error.kind is FailureKind.RATE_LIMITED and error.retry_after_s == 12


def test_azure_error_echoing_secrets_is_redacted(endpoint: Any) -> None:
    adapter = azure(endpoint, secret_headers={"X-Relay-Token": "UNIT_SECRET"})
    exchange = fixture("azure", "error_401")
    exchange["body"]["error"]["message"] = f"bad key {KEY} with header {SECRET}"
    text = str(failure(adapter, JobKind.CHAT, exchange))
    assert KEY not in text and SECRET not in text and "[redacted]" in text
