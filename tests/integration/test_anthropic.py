"""Contract test of kind anthropic: a worker on the real broker, the fleet's fake Anthropic.

The fake checks requests as strictly as Anthropic's reference describes the
Messages API (workers/fleet/anthropic_wire.py), so a job answered here was
translated into a request Anthropic would take; the fake records what it
received, so the test also reads the wire itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import pytest
from harness import FLEET_KEY, Caller, running_fleet, started

from producers.client import LlmqClient
from schemas.settings import Settings
from workers.fleet import Fleet
from workers.fleet.anthropic_wire import MAX_OUTPUT_TOKENS

pytestmark = pytest.mark.rabbitmq

UPSTREAM = "claude-sonnet-4-5-20250929"
NO_HEDGE = {"classes": {"interactive": {"default_sla_ms": 20_000, "hedge": False}}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}},
            "required": ["location"],
        },
    },
}


def claude(name: str, **spec: Any) -> dict[str, Any]:
    """A fake Anthropic endpoint serving ``UPSTREAM``."""
    return {"name": name, "kind": "anthropic", "models": [UPSTREAM], "record": 20, **spec}


def settings_for(make_settings: Callable[..., Settings], fleet: Fleet) -> Settings:
    """A worker whose model ``claude`` is served by every fleet endpoint, as kind anthropic."""
    endpoints = [
        {
            "name": name,
            "kind": "anthropic",
            "base_url": info.url,
            "api_key_env": "LLMQ_TEST_FLEET_KEY",
            "models": {"claude": UPSTREAM},
            "max_concurrency": 64,
            "input_per_mtok": 3.0,
            "output_per_mtok": 15.0,
        }
        for name, info in fleet.endpoints.items()
    ]
    return make_settings(fleet, endpoints=endpoints, topology=NO_HEDGE)


async def ask(caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    job = await caller.publish({"model": "claude", **body})
    await caller.wait_for(lambda: job in caller.replies)
    [reply] = caller.replies[job]
    assert FLEET_KEY not in json.dumps(reply)
    return reply


def sent(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    """The Messages request bodies endpoint ``name`` received, oldest first."""
    return [orjson.loads(seen.body) for seen in fleet.seen(name)]


async def test_a_chat_job_with_a_system_prompt_and_tools_round_trips(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You answer weather questions."},
        {"role": "user", "content": "What's the weather in Paris?"},
    ]
    async with running_fleet(claude("anthropic-a")) as fleet:
        async with started(settings_for(make_settings, fleet), connection) as (_, caller):
            first = await ask(caller, {"messages": messages, "tools": [WEATHER], "max_tokens": 200})
            call = first["response"]["choices"][0]["message"]["tool_calls"][0]
            messages += [
                first["response"]["choices"][0]["message"],
                {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees, clear"},
            ]
            second = await ask(caller, {"messages": messages, "tools": [WEATHER], "stop": "END"})
        wire = sent(fleet, "anthropic-a")
        [seen, _] = fleet.seen("anthropic-a")

    assert first["status"] == "ok", first
    response = first["response"]
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["finish_reason"] == "tool_calls"
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"location": "fleet"}
    assert response["usage"]["prompt_tokens"] == first["routing"]["prompt_tokens"] > 0
    assert first["routing"]["cost_usd"] > 0

    assert second["status"] == "ok", second
    assert second["response"]["choices"][0]["finish_reason"] == "stop"
    assert second["response"]["choices"][0]["message"]["content"]

    # What went over the wire: Anthropic's headers and shapes, nothing of OpenAI's.
    assert seen.path == "/v1/messages"
    headers = {k.lower(): v for k, v in seen.headers.items()}
    assert headers["x-api-key"] == FLEET_KEY and "authorization" not in headers
    assert headers["anthropic-version"] == "2023-06-01"
    assert wire[0]["system"] == "You answer weather questions."
    assert wire[0]["model"] == UPSTREAM and wire[0]["max_tokens"] == 200
    assert wire[0]["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]  # type: ignore[index]
    assert [m["role"] for m in wire[1]["messages"]] == ["user", "assistant", "user"]
    assert wire[1]["messages"][2]["content"][0]["type"] == "tool_result"
    assert wire[1]["max_tokens"] == 4096 and wire[1]["stop_sequences"] == ["END"]


async def test_cached_prompt_tokens_are_counted(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    book = {
        "type": "text",
        "text": "A long shared context. " * 200,
        "cache_control": {"type": "ephemeral"},
    }
    body = {
        "messages": [
            {"role": "system", "content": [book]},
            {"role": "user", "content": "Summarise it."},
        ],
        "max_tokens": 50,
    }
    async with running_fleet(claude("anthropic-a")) as fleet:
        async with started(settings_for(make_settings, fleet), connection) as (_, caller):
            write = await ask(caller, body)
            read = await ask(caller, body)
    assert write["status"] == read["status"] == "ok"
    first, second = write["response"]["usage"], read["response"]["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0  # written, not read
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0.9 * second["prompt_tokens"]
    # Cache reads and writes are input: the same prompt counts the same tokens.
    assert (
        write["routing"]["prompt_tokens"]
        == read["routing"]["prompt_tokens"]
        == second["prompt_tokens"]
    )


async def test_an_overloaded_529_is_retried_on_another_endpoint(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(
        claude("overloaded", error_rate=1.0, error_status=529),
        claude("healthy", latency_ms=20),
    ) as fleet:
        async with started(settings_for(make_settings, fleet), connection) as (_, caller):
            replies = []
            for _ in range(40):  # until the router has tried the overloaded one
                replies.append(await ask(caller, {"messages": [{"role": "user", "content": "hi"}]}))
                if fleet.stats()["overloaded"].requests:
                    break
            stats = fleet.stats()
    assert stats["overloaded"].by_status == {529: stats["overloaded"].requests} != {}
    assert all(r["status"] == "ok" and r["routing"]["endpoint"] == "healthy" for r in replies)
    assert replies[-1]["routing"]["attempts"] == 2
    assert caller.dead == []


async def test_a_request_anthropic_refuses_ends_upstream_rejected_without_a_retry(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(claude("anthropic-a"), claude("anthropic-b")) as fleet:
        async with started(settings_for(make_settings, fleet), connection) as (_, caller):
            too_long = await ask(
                caller,
                {
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": MAX_OUTPUT_TOKENS + 1,
                },
            )
            tried = sum(s.requests for s in fleet.stats().values())
            untranslatable = await ask(
                caller, {"messages": [{"role": "user", "content": "hi"}], "n": 2}
            )
            await caller.wait_for(lambda: len(caller.dead) == 2)
            after = sum(s.requests for s in fleet.stats().values())
    assert too_long["status"] == "error"
    assert too_long["error"]["code"] == "upstream_rejected" and not too_long["error"]["retriable"]
    assert "invalid_request_error" in too_long["error"]["message"]
    assert tried == 1  # the 400 is the request's fault: no other endpoint is asked
    assert untranslatable["error"]["code"] == "upstream_rejected"
    assert "n > 1" in untranslatable["error"]["message"]
    assert after == tried  # refused before any call


async def test_the_key_never_reaches_replies_or_dead_letters(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """The fake answers 401 quoting the key it got in full, as a careless relay would."""
    async with running_fleet(
        claude("echo", api_key="sk-ant-other-key-000000000", echo_key="full")
    ) as fleet:
        async with started(settings_for(make_settings, fleet), connection) as (_, caller):
            reply = await ask(caller, {"messages": [{"role": "user", "content": "hi"}]})
            await caller.wait_for(lambda: len(caller.dead) == 1)
            stats = fleet.stats()
    assert stats["echo"].by_status == {401: 1}
    assert reply["error"]["code"] == "upstream_rejected"
    assert "authentication_error" in reply["error"]["message"]
    [dead] = caller.dead
    for text in (json.dumps(reply), dead.body.decode(), str(dead.headers), str(dead.properties)):
        assert FLEET_KEY not in text and FLEET_KEY[-8:] not in text


async def test_a_streamed_job_on_anthropic_arrives_as_the_chunks_of_its_answer(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """Kind anthropic is called whole (no ``stream`` on the wire): the answer comes
    as one part of chunks, then the last part with the usage, cost and routing."""
    async with running_fleet(claude("anthropic-a")) as fleet:
        settings = settings_for(make_settings, fleet)
        async with (
            started(settings, connection),
            LlmqClient(
                settings.broker.url.get_secret_value(), exchange=settings.topology.jobs_exchange
            ) as client,
        ):
            async with client.stream(
                "claude", [{"role": "user", "content": "hi"}], max_tokens=50
            ) as s:
                chunks = [c async for c in s]
        [wire] = sent(fleet, "anthropic-a")
    assert "stream" not in wire and "stream_options" not in wire
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["content"]
    assert s.finish_reason in ("stop", "length")
    assert s.usage is not None and s.usage["completion_tokens"] > 0
    assert s.routing["cost_usd"] > 0 and s.routing["endpoint"] == "anthropic-a"
    assert s.messages == 2  # the answer's part, then the last one
