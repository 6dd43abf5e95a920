"""The gateway on the real broker, a worker and the fake fleet, called with the real openai SDK."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiohttp
import aiormq
import openai
import orjson
import pytest
from harness import Caller, chat, chat_and_embedding_endpoints, running_fleet
from openai.types.chat import ChatCompletionMessageParam

from producers.gateway import start_gateway
from schemas.broker.topology import apply_topology
from schemas.contract import JobKind
from schemas.settings import Settings
from schemas.topology import plan
from workers.providers import Adapter, Call, UpstreamReply
from workers.service import Worker
from workers.upstream import make_upstream

pytestmark = pytest.mark.rabbitmq

KEY = "sk-gateway-test-0123456789"
KEYS_ENV = "LLMQ_TEST_GATEWAY_KEYS"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture
def settings_for(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    """``make_settings`` with gateway keys (from the environment, as in production)."""
    monkeypatch.setenv(KEYS_ENV, f"sk-other-key, {KEY}")

    def make(fleet: Any, *, gateway: dict[str, Any] | None = None, **sections: Any) -> Settings:
        return make_settings(
            fleet, gateway={"api_keys_env": KEYS_ENV, **(gateway or {})}, **sections
        )

    return make


class Recording:
    """The worker's real upstream adapter, remembering what each call carried."""

    def __init__(self) -> None:
        self.inner = make_upstream("aiohttp")
        self.calls: list[tuple[str | None, dict[str, Any]]] = []

    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        self.calls.append((traceparent, orjson.loads(call.body)))
        return await self.inner.send(
            adapter, kind, call, timeout_s=timeout_s, traceparent=traceparent
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def gateway(
    settings: Settings, *, worker: bool = True, upstream: Recording | None = None
) -> AsyncIterator[str]:
    """A worker (optional) and the gateway on a free port; yields the OpenAI base URL."""
    served = Worker(settings, name="gw-test-worker", upstream=upstream) if worker else None
    if served is not None:
        await served.start()
    runner, port = await start_gateway(settings, host="127.0.0.1", port=0)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
        if served is not None:
            await served.stop(grace_s=5)


def sdk(base_url: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)


def sync_sdk(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)


async def test_sdk_sync_and_async_work_unchanged(
    settings_for: Callable[..., Settings],
) -> None:
    """Completions and the model list through the SDK, with llmq's headers on the side."""
    async with running_fleet(
        {"name": "a", "models": ["m1"], "latency_ms": 5, "output_tokens": 8}
    ) as fleet:
        settings = settings_for(fleet, models={"m1": {"aliases": ["mini"]}})
        upstream = Recording()
        async with gateway(settings, upstream=upstream) as url:
            async with sdk(url) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="mini",
                    messages=USER,
                    max_tokens=8,
                    seed=7,
                    extra_headers={
                        "X-Request-Id": "req-42",
                        "X-LLMQ-Tenant": "team-a",
                        "traceparent": TRACEPARENT,
                    },
                )
                completion = raw.parse()
                models = await client.models.list()
            with sync_sdk(url) as blocking:
                sync_completion = await asyncio.to_thread(
                    blocking.chat.completions.create,
                    model="m1",
                    messages=USER,
                )
                sync_models = await asyncio.to_thread(blocking.models.list)
    assert completion.object == "chat.completion"
    assert (completion.choices[0].message.content or "").startswith("a #")
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    # The caller's id comes back; the job's id is scoped to the caller's key.
    assert raw.headers["x-request-id"] == "req-42"
    assert raw.headers["x-llmq-job-id"].startswith("gw-")
    assert raw.headers["x-llmq-job-id"].endswith("-req-42")
    assert raw.headers["x-llmq-endpoint"] == "a"
    assert raw.headers["x-llmq-attempts"] == "1"
    assert sync_completion.choices[0].message.content
    assert sync_completion.usage is not None and sync_completion.usage.total_tokens > 0
    assert [m.id for m in models.data] == ["m1", "mini"]
    assert [m.id for m in sync_models.data] == ["m1", "mini"]
    # The body went upstream as sent (model resolved), with the caller's trace context.
    traceparent, body = upstream.calls[0]
    assert traceparent == TRACEPARENT
    assert body == {"model": "m1", "messages": USER, "max_tokens": 8, "seed": 7}


async def test_callers_are_checked_and_bad_requests_refused(
    settings_for: Callable[..., Settings],
) -> None:
    """401 for a wrong key; 400 for an unknown model, bad JSON or a bad header."""
    async with running_fleet({"name": "a", "models": ["m1"], "latency_ms": 5}) as fleet:
        async with gateway(settings_for(fleet)) as url:
            async with sdk(url, key="sk-wrong") as intruder:
                with pytest.raises(openai.AuthenticationError) as denied:
                    await intruder.chat.completions.create(model="m1", messages=USER)
                with pytest.raises(openai.AuthenticationError):
                    await intruder.models.list()
            with sync_sdk(url, key="sk-wrong") as blocking:
                with pytest.raises(openai.AuthenticationError):
                    await asyncio.to_thread(blocking.models.list)
            async with sdk(url) as client:
                with pytest.raises(openai.BadRequestError) as unknown:
                    await client.chat.completions.create(model="nope", messages=USER)
                with pytest.raises(openai.BadRequestError) as bad_sla:
                    await client.chat.completions.create(
                        model="m1",
                        messages=USER,
                        extra_headers={"X-LLMQ-SLA-Ms": "1.5e3"},
                    )
            async with aiohttp.ClientSession() as http:
                auth = {"Authorization": f"Bearer {KEY}"}
                async with http.post(f"{url}/chat/completions", data=b"{nope", headers=auth) as r:
                    bad_json = (r.status, await r.json())
                async with http.get(f"{url}/models") as r:
                    anonymous = r.status
                async with http.get(url.removesuffix("/v1") + "/healthz") as r:
                    health = r.status
                async with http.get(url.removesuffix("/v1") + "/readyz") as r:
                    ready = r.status
    assert denied.value.status_code == 401 and denied.value.code == "invalid_api_key"
    assert unknown.value.code == "unknown_model"
    assert unknown.value.response.headers["x-should-retry"] == "false"
    assert bad_sla.value.code == "invalid_request" and "X-LLMQ-SLA-Ms" in bad_sla.value.message
    assert bad_json[0] == 400 and bad_json[1]["error"]["type"] == "invalid_request_error"
    assert anonymous == 401
    assert (health, ready) == (200, 200)


async def test_sla_header_decides_the_deadline_and_is_clamped(
    settings_for: Callable[..., Settings],
) -> None:
    """Without the header the default SLA applies; with it, its value up to max_sla_ms: 504."""
    async with running_fleet(
        {"name": "mid", "models": ["m1"], "latency_ms": 400},
        {"name": "slow", "models": ["m2"], "latency_ms": 3000},
    ) as fleet:
        settings = settings_for(fleet, gateway={"default_sla_ms": 200, "max_sla_ms": 1500})
        async with gateway(settings) as url, sdk(url) as client:
            create = client.chat.completions.create
            with pytest.raises(openai.APIStatusError) as default_sla:
                await create(model="m1", messages=USER)
            ok = await create(
                model="m1",
                messages=USER,
                extra_headers={"X-LLMQ-SLA-Ms": "5000"},
            )
            t0 = time.monotonic()
            with pytest.raises(openai.APIStatusError) as clamped:
                await create(
                    model="m2",
                    messages=USER,
                    extra_headers={"X-LLMQ-SLA-Ms": "60000"},
                )
            clamped_s = time.monotonic() - t0
    # 200 ms by default is less than the endpoint's 400 ms; 5000 ms from the header is enough.
    assert default_sla.value.status_code == 504 and default_sla.value.code == "deadline_exceeded"
    assert ok.choices[0].message.content
    # 60 s asked, 1.5 s allowed: answered by the clamped deadline, not by the 3 s upstream.
    assert clamped.value.status_code == 504
    assert 1.0 < clamped_s < 2.8


async def test_failing_upstream_is_502(settings_for: Callable[..., Settings]) -> None:
    """An upstream failing every attempt is a 502 upstream_error, worth retrying."""
    async with running_fleet(
        {"name": "broken", "models": ["m3"], "latency_ms": 5, "error_rate": 1.0}
    ) as fleet:
        async with gateway(settings_for(fleet)) as url, sdk(url) as client:
            with pytest.raises(openai.InternalServerError) as failing:
                await client.chat.completions.create(model="m3", messages=USER)
    assert failing.value.status_code == 502 and failing.value.code == "upstream_error"
    headers = failing.value.response.headers
    assert headers["x-llmq-endpoint"] == "broken" and int(headers["x-llmq-attempts"]) >= 2
    assert headers["x-should-retry"] == "true"


async def test_body_over_the_limit_is_refused(settings_for: Callable[..., Settings]) -> None:
    """413 with a Content-Length over the limit, and for a chunked body that grows past it."""
    async with running_fleet({"name": "a", "models": ["m1"], "latency_ms": 5}) as fleet:
        settings = settings_for(fleet, gateway={"max_body_bytes": 2048})
        async with gateway(settings) as url:
            async with sdk(url) as client:
                with pytest.raises(openai.APIStatusError) as too_large:
                    await client.chat.completions.create(
                        model="m1",
                        messages=[{"role": "user", "content": "x" * 4096}],
                    )
                small = await client.chat.completions.create(model="m1", messages=USER)

            async def chunks() -> AsyncIterator[bytes]:
                yield b'{"model": "m1", "messages": [{"role": "user", "content": "'
                for _ in range(64):
                    yield b"x" * 1024
                yield b'"}]}'

            async with aiohttp.ClientSession() as http:
                async with http.post(
                    f"{url}/chat/completions",
                    data=chunks(),
                    headers={"Authorization": f"Bearer {KEY}"},
                ) as r:
                    chunked = (r.status, await r.json())
    assert too_large.value.status_code == 413 and too_large.value.code == "payload_too_large"
    assert small.choices[0].message.content
    assert chunked[0] == 413 and chunked[1]["error"]["code"] == "payload_too_large"


async def fill(caller: Caller) -> int:
    """Publish until the broker nacks; returns how many jobs it accepted.

    A quorum queue checks its length before each enqueue, so max_length 1 may
    hold a second job.
    """
    for accepted in range(10):
        try:
            await caller.publish(chat())
        except aiormq.exceptions.DeliveryError:
            return accepted
    raise AssertionError("the queue never filled up")


async def test_full_queue_is_429_with_retry_after(
    settings_for: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """With the queue at its max-length and nobody consuming, the broker's nack is a 429."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = settings_for(
            fleet, topology={"classes": {"interactive": {"default_sla_ms": 5000, "max_length": 1}}}
        )
        await apply_topology(connection, plan(settings.topology))
        caller = Caller(connection, settings)
        await caller.start()
        accepted = await fill(caller)
        async with gateway(settings, worker=False) as url, sdk(url) as client:
            with pytest.raises(openai.RateLimitError) as full:
                await client.chat.completions.create(model="m1", messages=USER)
            with sync_sdk(url) as blocking:
                with pytest.raises(openai.RateLimitError):
                    await asyncio.to_thread(
                        blocking.chat.completions.create,
                        model="m1",
                        messages=USER,
                    )
    assert full.value.status_code == 429 and full.value.code == "over_capacity"
    assert full.value.response.headers["Retry-After"] == "1"
    queue = await caller.channel.get_queue(settings.topology.queue_name("interactive"))
    assert queue.declaration_result.message_count == accepted  # nothing accepted was lost


async def test_broker_outage_is_503_and_readyz_follows_the_connection(
    settings_for: Callable[..., Settings], vhost: str, rabbitmqctl: Callable[..., Any]
) -> None:
    """While the broker connection is down: readyz 503, requests 503 at once; then back."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = settings_for(fleet)
        async with gateway(settings) as url, sdk(url) as client:
            ready = url.removesuffix("/v1") + "/readyz"
            async with aiohttp.ClientSession() as http:

                async def readyz() -> int:
                    async with http.get(ready) as r:
                        return r.status

                async def until(status: int, timeout: float) -> None:
                    for _ in range(int(timeout / 0.05)):
                        if await readyz() == status:
                            return
                        await asyncio.sleep(0.05)
                    pytest.fail(f"readyz did not answer {status} within {timeout} s")

                assert await readyz() == 200
                # An outage that lasts: the client reconnects within a second, so
                # the broker also refuses it until guest may use the vhost again.
                # Only this test's connections live in the module's vhost now.
                rabbitmqctl("clear_permissions", "-p", vhost, "guest")
                try:
                    rabbitmqctl("close_all_connections", "--vhost", vhost, "gateway test")
                    await until(503, timeout=5)
                    with pytest.raises(openai.InternalServerError) as down:
                        await client.chat.completions.create(model="m1", messages=USER)
                finally:
                    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
                await until(200, timeout=15)  # the robust connection comes back
                after = await client.chat.completions.create(model="m1", messages=USER)
    assert down.value.status_code == 503 and down.value.code == "broker_unavailable"
    assert down.value.response.headers["Retry-After"] == "1"
    assert after.choices[0].message.content


async def test_embeddings_through_the_sdk(settings_for: Callable[..., Settings]) -> None:
    """POST /v1/embeddings is a job of kind embedding: the SDK (sync and async) gets
    OpenAI's list; a chat model asked for embeddings is a 400, nothing is called."""
    async with running_fleet(
        {"name": "chat", "models": ["m1"]}, {"name": "emb", "models": ["e1"]}
    ) as fleet:
        settings = settings_for(fleet, endpoints=chat_and_embedding_endpoints(fleet))
        async with gateway(settings) as url:
            async with sdk(url) as client:
                result = await client.embeddings.create(model="e1", input=["a b", "c"])
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.embeddings.create(model="m1", input="hello")
            with sync_sdk(url) as blocking:
                one = await asyncio.to_thread(
                    blocking.embeddings.create, model="e1", input="hello", dimensions=8
                )
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    assert result.usage.prompt_tokens >= 2
    assert len(one.data) == 1
    assert refused.value.code == "invalid_request"
    assert fleet.stats()["chat"].requests == 0
