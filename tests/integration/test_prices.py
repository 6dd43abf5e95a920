"""A reply's ``cost_usd`` is the catalogue's list price times the usage the
upstream reported, cache reads and writes included; the worker logs each
price and its source at start-up. A worker on the real broker, the fleet's
fakes as upstreams (the Anthropic one reports prompt-cache writes and reads).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, get_args

import aio_pika
import pytest
from harness import Caller, chat, running_fleet, started

from schemas.settings import Settings
from workers.fleet.scenario import Endpoint

pytestmark = pytest.mark.rabbitmq

FLEET_SPEAKS_ANTHROPIC = "anthropic" in get_args(Endpoint.model_fields["kind"].annotation)

NO_HEDGE = {"classes": {"interactive": {"default_sla_ms": 20_000, "hedge": False}}}

# claude-haiku-4-5 in genai-prices 0.2.5, USD per million tokens.
HAIKU = {"input": 1.0, "cache_read": 0.1, "cache_write": 1.25, "output": 5.0}
# gpt-4.1-mini in genai-prices 0.2.5.
MINI = {"input": 0.4, "output": 1.6}


async def ask(caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    job = await caller.publish(body)
    await caller.wait_for(lambda: job in caller.replies)
    reply: dict[str, Any] = caller.replies[job][0]
    assert reply["status"] == "ok", reply
    return reply


@pytest.mark.skipif(
    not FLEET_SPEAKS_ANTHROPIC,
    reason="the fleet's Anthropic fake (cache writes and reads) is not wired into scenarios yet",
)
async def test_cost_usd_is_the_catalogue_price_of_uncached_cached_and_written_tokens(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llmq.worker")
    spec = {"name": "claude", "kind": "anthropic", "models": ["claude-haiku-4-5"]}
    context = {
        "type": "text",
        "text": "Shared context. " * 300,
        "cache_control": {"type": "ephemeral"},
    }
    body = {
        "model": "haiku",
        "messages": [
            {"role": "system", "content": [context]},
            {"role": "user", "content": "Summarise it."},
        ],
        "max_tokens": 50,
    }
    async with running_fleet(spec) as fleet:
        endpoint = {
            "name": "claude",
            "kind": "anthropic",
            "base_url": fleet.endpoints["claude"].url,
            "api_key_env": "LLMQ_TEST_FLEET_KEY",
            "models": {"haiku": "claude-haiku-4-5"},  # no price: the catalogue's
        }
        settings = make_settings(fleet, endpoints=[endpoint], topology=NO_HEDGE)
        async with started(settings, connection) as (_, caller):
            write = await ask(caller, body)
            read = await ask(caller, body)

    assert (
        "price claude/haiku: input 1, cached input 0.1, cache write 1.25, output 5 USD/Mtok;"
        " source: catalogue genai-prices 0.2.5: anthropic claude-haiku-4-5"
    ) in caplog.messages
    # The same prompt: written to the cache by the first job, read by the second.
    prompt = write["routing"]["prompt_tokens"]
    cached = read["response"]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert read["routing"]["prompt_tokens"] == prompt and 0 < cached < prompt
    assert write["response"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    out_w, out_r = write["routing"]["completion_tokens"], read["routing"]["completion_tokens"]
    by_hand_write = (
        (prompt - cached) * HAIKU["input"] + cached * HAIKU["cache_write"] + out_w * HAIKU["output"]
    ) / 1e6
    by_hand_read = (
        (prompt - cached) * HAIKU["input"] + cached * HAIKU["cache_read"] + out_r * HAIKU["output"]
    ) / 1e6
    assert write["routing"]["cost_usd"] == pytest.approx(by_hand_write, abs=1e-8)
    assert read["routing"]["cost_usd"] == pytest.approx(by_hand_read, abs=1e-8)
    assert read["routing"]["cost_usd"] < write["routing"]["cost_usd"]


async def test_a_listed_model_is_priced_and_a_self_hosted_one_costs_0_with_a_warning(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="llmq.worker")
    async with running_fleet(
        {"name": "relay", "models": ["gpt-4.1-mini"]},
        {"name": "vllm", "models": ["llama-3.3-70b"]},
    ) as fleet:
        endpoints = [
            {
                "name": name,
                "base_url": fleet.endpoints[name].url,
                "api_key_env": "LLMQ_TEST_FLEET_KEY",
                "models": [model],
                **extra,
            }
            for name, model, extra in (
                ("relay", "gpt-4.1-mini", {"price_provider": "openai"}),
                ("vllm", "llama-3.3-70b", {}),
            )
        ]
        settings = make_settings(fleet, endpoints=endpoints, topology=NO_HEDGE)
        async with started(settings, connection) as (_, caller):
            mini = await ask(caller, chat("gpt-4.1-mini", max_tokens=40))
            llama = await ask(caller, chat("llama-3.3-70b", max_tokens=40))

    routing = mini["routing"]
    by_hand = (
        routing["prompt_tokens"] * MINI["input"] + routing["completion_tokens"] * MINI["output"]
    ) / 1e6
    assert routing["cost_usd"] == pytest.approx(by_hand, abs=1e-8) and by_hand > 0
    assert llama["routing"]["cost_usd"] == 0 and llama["routing"]["prompt_tokens"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        w.startswith(
            "no price for model llama-3.3-70b at endpoint vllm: cost counted as 0"
            " (set input_per_mtok/output_per_mtok"
        )
        for w in warnings
    ), warnings
