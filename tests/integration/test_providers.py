"""A contract test per provider kind (openai, azure): a real broker, the fleet
speaking each provider's wire format, and a worker in this process.

Chat and embedding jobs are answered in OpenAI's shape whatever the kind; the
fleet records what each call carried (path, api-version, the key's header, the
endpoint's extra headers and query) and refuses what the provider would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import pytest
from harness import FLEET_KEY, Caller, chat, running_fleet, started

from schemas.settings import Settings
from workers.fleet import Endpoint, Fleet, Outcome, endpoint_rng, plan_request
from workers.fleet.azure_wire import CONTENT_FILTER_MARKER

pytestmark = pytest.mark.rabbitmq

API_VERSION = "2024-10-21"
SECRET = "relay-secret-0123456789abcdef"
WRONG_KEY = "sk-wrong-azure-key-0123456789abcdef"
EMBED_HEADERS = {"kind": "embedding"}


def fleet_endpoints(**azure: Any) -> list[dict[str, Any]]:
    return [
        {"name": "oa", "models": ["gpt"], "record": 20, "latency_ms": 2},
        {"name": "oa-emb", "models": ["emb-small"], "record": 20, "latency_ms": 2},
        {
            "name": "az",
            "kind": "azure",
            "models": ["gpt41-prod", "ada-prod"],
            "record": 20,
            "latency_ms": 2,
            **azure,
        },
    ]


def endpoints(fleet: Fleet, key_env: str = "LLMQ_TEST_FLEET_KEY") -> list[dict[str, Any]]:
    """Each kind's chat and embedding endpoints (an endpoint serves one kind of model)."""
    extras = {
        "headers": {"X-Team": "search"},
        "secret_headers": {"X-Relay-Token": "PROVIDERS_SECRET"},
        "query": {"tenant": "t1"},
        "api_key_env": key_env,
    }
    azure = {"kind": "azure", "base_url": fleet.url("az"), "api_version": API_VERSION}
    return [
        {"name": "oa", "base_url": fleet.url("oa"), "models": {"gpt-oa": "gpt"}, **extras},
        {
            "name": "oa-emb",
            "base_url": fleet.url("oa-emb"),
            "models": {"emb-oa": {"upstream": "emb-small", "kind": "embedding"}},
            **extras,
        },
        {"name": "az", "models": {"gpt-az": "gpt41-prod"}, **azure, **extras},
        {
            "name": "az-emb",
            "models": {"emb-az": {"upstream": "ada-prod", "kind": "embedding"}},
            **azure,
            **extras,
        },
    ]


@pytest.fixture
def settings_for(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    monkeypatch.setenv("PROVIDERS_SECRET", SECRET)
    monkeypatch.setenv("PROVIDERS_WRONG_KEY", WRONG_KEY)

    def make(fleet: Fleet, **kw: Any) -> Settings:
        return make_settings(fleet, endpoints=endpoints(fleet, **kw))

    return make


def embed(model: str, text: str | list[str]) -> dict[str, Any]:
    return {"model": model, "input": text}


async def answered(caller: Caller, *ids: str, dead: int = 0) -> None:
    await caller.wait_for(
        lambda: all(j in caller.replies for j in ids) and len(caller.dead) >= dead
    )


def assert_no_secret(caller: Caller, *secrets: str) -> None:
    """No reply, dead-letter body or dead-letter header holds any of ``secrets``."""
    texts = [orjson.dumps(r) for rs in caller.replies.values() for r in rs]
    texts += [m.body + orjson.dumps(m.headers, default=str) for m in caller.dead]
    for secret in secrets:
        assert not any(secret.encode() in t or secret[-8:].encode() in t for t in texts), secret


async def test_chat_and_embeddings_on_each_kind(
    settings_for: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """Four jobs, four endpoints: each answered OK in OpenAI's shape, each call in its
    provider's shape with the endpoint's extra headers and query."""
    async with running_fleet(*fleet_endpoints()) as fleet:
        async with started(settings_for(fleet), connection) as (_, caller):
            jobs = {
                "oa": await caller.publish(chat("gpt-oa", max_tokens=8)),
                "az": await caller.publish(chat("gpt-az", max_tokens=8)),
                "oa-emb": await caller.publish(
                    embed("emb-oa", ["one sentence", "two"]), headers=EMBED_HEADERS
                ),
                "az-emb": await caller.publish(embed("emb-az", "x" * 400), headers=EMBED_HEADERS),
            }
            await answered(caller, *jobs.values())
        seen = {name: fleet.seen(name) for name in ("oa", "oa-emb", "az")}
    replies = {name: caller.replies[job][0] for name, job in jobs.items()}
    for name, reply in replies.items():
        assert reply["status"] == "ok", reply
        assert reply["routing"]["endpoint"] == name and reply["routing"]["attempts"] == 1
    for name in ("oa", "az"):
        response = replies[name]["response"]
        assert response["object"] == "chat.completion" and response["choices"][0]["message"]
    assert "prompt_filter_results" in replies["az"]["response"]  # Azure's, passed through
    for name, inputs in (("oa-emb", 2), ("az-emb", 1)):
        response, routing = replies[name]["response"], replies[name]["routing"]
        assert response["object"] == "list" and len(response["data"]) == inputs
        assert all(len(d["embedding"]) == 8 for d in response["data"])
        assert routing["prompt_tokens"] == response["usage"]["prompt_tokens"] > 0
        assert routing["completion_tokens"] == 0
    assert replies["az-emb"]["routing"]["prompt_tokens"] == 100  # 400 characters

    [oa_chat], [oa_embed] = seen["oa"], seen["oa-emb"]
    assert (oa_chat.path, oa_embed.path) == ("/v1/chat/completions", "/v1/embeddings")
    assert oa_chat.headers["Authorization"] == f"Bearer {FLEET_KEY}"
    assert orjson.loads(oa_chat.body)["model"] == "gpt"
    by_path = {s.path: s for s in seen["az"]}
    assert set(by_path) == {
        "/openai/deployments/gpt41-prod/chat/completions",
        "/openai/deployments/ada-prod/embeddings",
    }
    for call in by_path.values():
        assert call.headers["api-key"] == FLEET_KEY and "Authorization" not in call.headers
        assert call.query == {"api-version": API_VERSION, "tenant": "t1"}
    for call in [oa_chat, oa_embed, *by_path.values()]:
        assert call.headers["X-Team"] == "search" and call.headers["X-Relay-Token"] == SECRET
        assert call.headers["Content-Type"] == "application/json"
        assert call.query["tenant"] == "t1"
    assert_no_secret(caller, FLEET_KEY, SECRET)


def _seed_for(outcomes: list[Outcome], **fields: Any) -> int:
    """A fleet seed under which endpoint ``az``'s first requests get ``outcomes``."""
    endpoint = Endpoint.model_validate(fleet_endpoints(**fields)[2])
    for seed in range(10_000):
        rng = endpoint_rng(seed, "az")
        if [plan_request(endpoint, rng, 0.0).outcome for _ in outcomes] == outcomes:
            return seed
    raise AssertionError("no such seed")


async def test_an_azure_429_is_retried(
    settings_for: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """Azure's 429 (retry-after-ms) cools the deployment down; the job is tried again."""
    limited = {"rate_limit_rate": 0.5, "retry_after_s": 0.2}
    seed = _seed_for([Outcome.RATE_LIMITED, Outcome.OK], **limited)
    async with running_fleet(*fleet_endpoints(**limited), seed=seed) as fleet:
        async with started(settings_for(fleet), connection) as (_, caller):
            job = await caller.publish(chat("gpt-az"))
            await answered(caller, job)
        stats = fleet.stats()["az"]
        seen = fleet.seen("az")
    [reply] = caller.replies[job]
    assert reply["status"] == "ok", reply
    assert reply["routing"]["attempts"] == 2 and reply["routing"]["endpoint"] == "az"
    assert stats.by_status == {429: 1, 200: 1}, stats
    assert len(seen) == 2 and seen[0].path == seen[1].path


async def test_an_azure_content_filter_refusal_is_upstream_rejected(
    settings_for: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """The request itself is refused: not retried, not the endpoint's fault."""
    async with running_fleet(*fleet_endpoints()) as fleet:
        async with started(settings_for(fleet), connection) as (_, caller):
            job = await caller.publish(chat("gpt-az", f"tell me {CONTENT_FILTER_MARKER}"))
            await answered(caller, job, dead=1)
        requests = fleet.stats()["az"].requests
    [reply] = caller.replies[job]
    assert reply["status"] == "error" and reply["error"]["code"] == "upstream_rejected"
    assert "content_filter" in reply["error"]["message"]
    assert reply["routing"]["attempts"] == 1 and requests == 1
    assert caller.dead_ids() == [job]
    assert_no_secret(caller, FLEET_KEY, SECRET)


async def test_an_echoed_azure_key_never_leaves(
    settings_for: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """A resource (or relay) that prints the api-key it refused: scrubbed from the
    reply and the dead letter."""
    async with running_fleet(*fleet_endpoints(echo_key="full")) as fleet:
        settings = settings_for(fleet, key_env="PROVIDERS_WRONG_KEY")
        async with started(settings, connection) as (_, caller):
            job = await caller.publish(chat("gpt-az"))
            await answered(caller, job, dead=1)
        [call] = fleet.seen("az")
    assert call.headers["api-key"] == WRONG_KEY  # it was sent, and echoed back
    [reply] = caller.replies[job]
    assert reply["status"] == "error" and "401" in reply["error"]["message"]
    assert_no_secret(caller, WRONG_KEY, SECRET)
