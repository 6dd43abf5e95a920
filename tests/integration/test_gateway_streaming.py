"""``stream: true`` through the gateway on the real broker, a worker and the fake fleet:
the openai SDK (sync and async), a raw SSE reader, errors before and after the first
byte, and a caller that hangs up mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from harness import running_fleet
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from producers.gateway import metrics_port, start_gateway
from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

KEY = "sk-gateway-stream-test-0123456789"
KEYS_ENV = "LLMQ_TEST_GATEWAY_KEYS"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "stream me"}]
PACED = {"latency_ms": 20, "ms_per_token": 2, "token_jitter": 0.0}


@pytest.fixture
def settings_for(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Settings]:
    monkeypatch.setenv(KEYS_ENV, KEY)

    def make(fleet: Any, **sections: Any) -> Settings:
        gateway = {"api_keys_env": KEYS_ENV, "metrics_port": 0}
        return make_settings(fleet, gateway=gateway, **sections)

    return make


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[tuple[str, Worker, str]]:
    """A worker and the gateway on free ports; yields the OpenAI base URL, the worker and
    the gateway's /metrics URL."""
    worker = Worker(settings, name="gw-stream-worker")
    await worker.start()
    runner, port = await start_gateway(settings, host="127.0.0.1", port=0)
    try:
        yield f"http://127.0.0.1:{port}/v1", worker, f"http://127.0.0.1:{metrics_port(runner)}"
    finally:
        await runner.cleanup()
        await worker.stop(grace_s=5)


def text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def events(raw: bytes) -> list[bytes]:
    """The data of each event, asserting OpenAI's framing: ``data: …`` lines, blank-line ends."""
    assert raw.endswith(b"\n\n")
    frames = raw[:-2].split(b"\n\n")
    assert all(f.startswith(b"data: ") and b"\n" not in f for f in frames), frames[:3]
    return [f[len(b"data: ") :] for f in frames]


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for an outcome the worker and the fleet reach on their own (bounded, not a sleep)."""
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - polling the fleet's and the worker's counts
            await asyncio.sleep(0.05)


async def test_the_openai_sdk_streams_sync_and_async_with_and_without_usage(
    settings_for: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        settings = settings_for(fleet, models={"m1": {"aliases": ["mini"]}})
        async with gateway(settings) as (url, _, _):
            async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="mini",
                    messages=USER,
                    max_tokens=12,
                    stream=True,
                    extra_headers={"X-Request-Id": "stream-1"},
                )
                plain = [c async for c in raw.parse()]
                with_usage = [
                    c
                    async for c in await client.chat.completions.create(
                        model="m1",
                        messages=USER,
                        max_tokens=12,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                ]

            def blocking() -> list[ChatCompletionChunk]:
                with openai.OpenAI(base_url=url, api_key=KEY, max_retries=0) as sync:
                    with sync.chat.completions.create(
                        model="m1", messages=USER, max_tokens=12, stream=True
                    ) as stream:
                        return list(stream)

            sync_chunks = await asyncio.to_thread(blocking)
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-request-id"] == "stream-1"
    assert raw.headers["x-llmq-job-id"].startswith("gw-")
    for chunks in (plain, with_usage, sync_chunks):
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert text(chunks).startswith("a #")
        finished = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finished[-1] in ("stop", "length") and not any(finished[:-1])
    # The usage chunk (no choices) only when asked for, and last.
    assert all(c.usage is None for c in plain + sync_chunks)
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens >= 1
    assert fleet.stats()["a"].as_dict()["streams"] == 3


async def test_raw_sse_framing_done_and_a_plain_request_beside_it(
    settings_for: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        async with gateway(settings_for(fleet)) as (url, _, _):
            body = {"model": "m1", "messages": USER, "max_tokens": 20, "stream": True}
            async with aiohttp.ClientSession(headers=AUTH) as http:
                async with http.post(f"{url}/chat/completions", json=body) as r:
                    status, headers, raw = r.status, r.headers, await r.read()
                # The same (kept-alive) connection answers an unstreamed request as before.
                plain = {**body, "stream": False}
                async with http.post(f"{url}/chat/completions", json=plain) as r:
                    unstreamed = (r.status, r.content_type, await r.json())
                # Refused before publishing: streamed embeddings, a body naming the tenant.
                embed = {"model": "m1", "input": "x", "stream": True}
                async with http.post(f"{url}/embeddings", json=embed) as r:
                    embed_refused = (r.status, await r.json())
                async with http.post(f"{url}/chat/completions", json={**body, "tenant": "x"}) as r:
                    tenant_refused = (r.status, await r.json())
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert "Content-Length" not in headers  # chunked: each event leaves as it comes
    data = events(raw)
    assert data[-1] == b"[DONE]"
    chunks = [orjson.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert not any(c.get("usage") for c in chunks)  # not asked for
    assert unstreamed[0] == 200 and unstreamed[1] == "application/json"
    assert unstreamed[2]["object"] == "chat.completion"
    assert embed_refused[0] == 400 and embed_refused[1]["error"]["code"] == "invalid_request"
    assert tenant_refused[0] == 400 and "tenant" in tenant_refused[1]["error"]["message"]


async def test_an_error_before_the_first_chunk_is_an_http_status(
    settings_for: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        async with gateway(settings_for(fleet)) as (url, _, _):
            async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client:
                with pytest.raises(openai.BadRequestError) as unknown:
                    await client.chat.completions.create(model="nope", messages=USER, stream=True)
            body = {"model": "nope", "messages": USER, "stream": True}
            async with aiohttp.ClientSession(headers=AUTH) as http:
                async with http.post(f"{url}/chat/completions", json=body) as r:
                    raw = (r.status, r.content_type, r.headers, await r.json())
    assert unknown.value.code == "unknown_model"
    status, content_type, headers, error = raw
    assert (status, content_type) == (400, "application/json")
    assert error["error"]["code"] == "unknown_model"
    assert error["error"]["type"] == "invalid_request_error"
    assert headers["x-should-retry"] == "false" and headers["x-llmq-job-id"].startswith("gw-")


async def test_an_upstream_cut_mid_stream_ends_with_an_error_event(
    settings_for: Callable[..., Settings],
) -> None:
    async with running_fleet(
        {"name": "a", "models": ["m1"], "stream_cut_rate": 1.0, **PACED}
    ) as fleet:
        async with gateway(settings_for(fleet)) as (url, _, _):
            body = {"model": "m1", "messages": USER, "max_tokens": 200, "stream": True}
            async with aiohttp.ClientSession(headers=AUTH) as http:
                async with http.post(f"{url}/chat/completions", json=body) as r:
                    status, raw = r.status, await r.read()
            got: list[ChatCompletionChunk] = []
            async with openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0) as client:
                stream = await client.chat.completions.create(
                    model="m1", messages=USER, max_tokens=200, stream=True
                )
                with pytest.raises(openai.APIError) as broken:  # noqa: PT012 - mid-iteration
                    async for chunk in stream:
                        got.append(chunk)
    assert status == 200
    data = events(raw)
    assert b"[DONE]" not in data
    error = orjson.loads(data[-1])["error"]
    assert error["code"] == "stream_interrupted" and error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert all(orjson.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])
    assert got, "the cut comes after the first token"
    assert broken.value.code == "stream_interrupted"
    assert not isinstance(broken.value, openai.APIStatusError)  # the status was 200


async def test_a_caller_that_hangs_up_mid_stream_cancels_the_upstream_call(
    settings_for: Callable[..., Settings],
) -> None:
    slow = {"latency_ms": 20, "ms_per_token": 50, "token_jitter": 0.0}
    async with running_fleet({"name": "a", "models": ["m1"], **slow}) as fleet:
        settings = settings_for(fleet, worker={"stream_flush_ms": 5})
        async with gateway(settings) as (url, worker, _):
            body = {"model": "m1", "messages": USER, "max_tokens": 1000, "stream": True}
            async with aiohttp.ClientSession(headers=AUTH) as http:
                r = await http.post(f"{url}/chat/completions", json=body)
                assert r.status == 200
                first = await r.content.readuntil(b"\n\n")
                assert first.startswith(b"data: {")
                r.close()  # drops the connection mid-stream
            # 1000 tokens at 50 ms would take 50 s: these come from the cancel.
            await until(lambda: fleet.stats()["a"].as_dict()["dropped"] == 1)
            await until(lambda: worker.stats.by_code.get("stream_interrupted") == 1)
            stats = fleet.stats()["a"].as_dict()
            assert (stats["streams"], stats["in_flight"]) == (1, 0)


async def test_a_caller_that_hangs_up_before_the_first_chunk_is_let_go_at_once(
    settings_for: Callable[..., Settings],
) -> None:
    """The gateway notices the closed connection while it waits (no write needed): the
    request ends as a 499 long before the first token, and the job is cancelled."""
    late = {"latency_ms": 3000, "ms_per_token": 2, "token_jitter": 0.0}
    async with running_fleet({"name": "a", "models": ["m1"], **late}) as fleet:
        settings = settings_for(fleet, worker={"stream_flush_ms": 5})
        async with gateway(settings) as (url, worker, metrics):
            body = {"model": "m1", "messages": USER, "max_tokens": 1000, "stream": True}
            async with aiohttp.ClientSession(headers=AUTH) as http:
                post = asyncio.create_task(http.post(f"{url}/chat/completions", json=body))
                await until(lambda: fleet.stats()["a"].as_dict()["in_flight"] == 1)
                post.cancel()  # the connection is closed with the request unanswered
                with pytest.raises(asyncio.CancelledError):
                    await post

                async def hung_up() -> bool:
                    async with http.get(f"{metrics}/metrics") as r:
                        text = await r.text()
                    return 'route="/v1/chat/completions",status="499"} 1.0' in text

                async with asyncio.timeout(2):  # the first token is 3 s away
                    while not await hung_up():  # noqa: ASYNC110 - polling the gateway's count
                        await asyncio.sleep(0.05)
            # The worker learns at its first publish to the stream's deleted queue.
            await until(lambda: fleet.stats()["a"].as_dict()["dropped"] == 1)
            await until(lambda: worker.stats.by_code.get("stream_interrupted") == 1)


async def test_the_same_request_id_again_streams_again(
    settings_for: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        async with gateway(settings_for(fleet)) as (url, _, _):
            body = {"model": "m1", "messages": USER, "max_tokens": 30, "stream": True}
            headers = {**AUTH, "X-Request-Id": "again-id"}
            async with aiohttp.ClientSession(headers=headers) as http:
                answers = []
                for _ in range(2):
                    async with http.post(f"{url}/chat/completions", json=body) as r:
                        answers.append((r.status, await r.read()))
    for status, raw in answers:
        assert status == 200, raw
        assert events(raw)[-1] == b"[DONE]", raw[-300:]


async def test_two_streams_with_the_same_request_id_at_once_each_get_a_whole_answer(
    settings_for: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        async with gateway(settings_for(fleet)) as (url, _, _):
            body = {"model": "m1", "messages": USER, "max_tokens": 30, "stream": True}
            headers = {**AUTH, "X-Request-Id": "same-id", "X-LLMQ-SLA-Ms": "3000"}
            async with aiohttp.ClientSession(headers=headers) as http:

                async def one() -> tuple[int, bytes]:
                    async with http.post(f"{url}/chat/completions", json=body) as r:
                        return r.status, await r.read()

                answers = await asyncio.gather(one(), one())
    for status, raw in answers:
        assert status == 200
        assert events(raw)[-1] == b"[DONE]", raw[-300:]
