"""The fake fleet's streams over real HTTP on loopback, read by the official
``openai`` SDK and by a raw reader: content, usage, faults, pacing, disconnects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from workers.fleet import Fleet, Scenario

KEY = "sk-test"
USER = [{"role": "user", "content": "x" * 40}]
BODY = {"model": "m", "messages": USER, "stream": True}


def fleet(*endpoints: dict[str, Any], seed: int = 0) -> Fleet:
    """A fleet on free ports; endpoints default to one model "m"."""
    scenario = Scenario.model_validate(
        {"api_key": KEY, "endpoints": [{"models": ["m"], **e} for e in endpoints]}
    )
    return Fleet(scenario, seed=seed)


def sdk(f: Fleet, name: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f.url(name), api_key=KEY, max_retries=0)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


async def settled(f: Fleet, name: str, **want: int) -> dict[str, Any]:
    """The endpoint's stats once its counters say ``want`` (they follow the
    client's side by a loop turn or two), at most about 5 s later."""
    for _ in range(500):
        stats = f.stats()[name].as_dict()
        if all(stats[k] == v for k, v in want.items()):
            return stats
        await asyncio.sleep(0.01)
    return f.stats()[name].as_dict()


async def read_cut(http: httpx.AsyncClient, base: str) -> bytes:
    """The bytes of a stream that must end broken (the chunked body never ends)."""
    received = b""
    try:
        async with http.stream("POST", f"{base}/chat/completions", json=BODY) as response:
            assert response.status_code == 200
            async for part in response.aiter_bytes():
                received += part
    except httpx.RemoteProtocolError:
        return received
    raise AssertionError(f"the stream ended whole: {received!r}")


async def test_the_sdk_stream_reassembles_the_unstreamed_answer() -> None:
    """Same seed, same request number: the streamed deltas join to the content of
    the unstreamed answer; the usage chunk comes last and counts the deltas."""
    endpoint = {"name": "a", "output_tokens": {"min": 5, "max": 40}}
    async with fleet(endpoint, seed=4) as f, sdk(f, "a") as client:
        whole = await client.chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    async with fleet(endpoint, seed=4) as f, sdk(f, "a") as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        stats = await settled(f, "a", in_flight=0)
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in middle]
    assert "".join(d or "" for d in deltas) == whole.choices[0].message.content
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason == "stop"
    assert usage.choices == [] and usage.usage == whole.usage
    assert usage.usage is not None and usage.usage.completion_tokens == len(deltas)
    assert {c.id for c in chunks} == {"chatcmpl-a-1"}
    assert (stats["streams"], stats["by_status"], stats["dropped"]) == (1, {"200": 1}, 0)


async def test_the_sync_sdk_streams_too() -> None:
    """openai.OpenAI(stream=True) in a thread (the fleet shares this loop)."""
    async with fleet({"name": "a", "output_tokens": 6, "ms_per_token": 1}) as f:

        def read() -> list[Any]:
            with (
                openai.OpenAI(base_url=f.url("a"), api_key=KEY, max_retries=0) as client,
                client.chat.completions.create(model="m", messages=USER, stream=True) as s,  # type: ignore[arg-type]
            ):
                return list(s)

        chunks = await asyncio.to_thread(read)
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 7 + ["stop"]
    assert all(c.usage is None for c in chunks)


async def test_the_raw_wire(http: httpx.AsyncClient) -> None:
    """OpenAI's headers and lines: text/event-stream, one data line per event, [DONE] last."""
    async with fleet({"name": "a", "output_tokens": 3}) as f:
        response = await http.post(f"{f.url('a')}/chat/completions", json=BODY)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-fleet-endpoint"] == "a"
    events = response.content.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert len(chunks) == 1 + 3 + 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)


async def test_faults_before_the_first_byte_are_statuses(http: httpx.AsyncClient) -> None:
    """error_rate, rate_limit_rate and the request checks answer a stream with a status."""
    async with fleet(
        {"name": "e", "error_rate": 1.0, "error_status": 503},
        {"name": "r", "rate_limit_rate": 1.0},
    ) as f:
        error = await http.post(f"{f.url('e')}/chat/completions", json=BODY)
        limited = await http.post(f"{f.url('r')}/chat/completions", json=BODY)
        bad = await http.post(
            f"{f.url('e')}/chat/completions", json={**BODY, "stream": False, "stream_options": {}}
        )
        async with sdk(f, "e") as client:
            with pytest.raises(openai.InternalServerError):
                await client.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[arg-type]
    assert (error.status_code, limited.status_code, bad.status_code) == (503, 429, 400)
    assert error.headers["content-type"] == "application/json"
    assert error.json()["error"]["type"] == "server_error"
    assert bad.json()["error"]["param"] == "stream_options"


async def test_a_cut_stream_ends_without_done(http: httpx.AsyncClient) -> None:
    """stream_cut_rate closes the connection mid-body: some deltas, a prefix of the
    answer, no finish chunk, no [DONE]; the SDK sees a broken connection."""
    async with fleet({"name": "c", "output_tokens": 20, "stream_cut_rate": 1.0}) as f:
        received = await read_cut(http, f.url("c"))
        async with sdk(f, "c") as client:
            with pytest.raises(openai.APIConnectionError):
                async for _ in await client.chat.completions.create(
                    model="m",
                    messages=USER,  # type: ignore[arg-type]
                    stream=True,
                ):
                    pass
        stats = await settled(f, "c", in_flight=0)
    assert b"[DONE]" not in received and b'"finish_reason":"stop"' not in received
    events = [orjson.loads(e.removeprefix(b"data: ")) for e in received.split(b"\n\n") if e]
    text = "".join(e["choices"][0]["delta"]["content"] for e in events)
    assert text.startswith("c #1: ") and 1 <= len(events) - 1 < 20
    assert (stats["streams"], stats["cut"], stats["dropped"]) == (2, 2, 0)


async def test_a_malformed_stream(http: httpx.AsyncClient) -> None:
    """malformed_rate: a 200 stream whose second event is cut mid-JSON, then the end."""
    async with fleet({"name": "m", "malformed_rate": 1.0}) as f:
        received = await read_cut(http, f.url("m"))
    first, second = received.split(b"\n\n")[:2]
    assert orjson.loads(first.removeprefix(b"data: "))["choices"][0]["delta"]["role"]
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(second.removeprefix(b"data: "))


async def test_a_client_gone_mid_stream_ends_it(http: httpx.AsyncClient) -> None:
    """The reader leaves after the first token of a 10 s stream: the stream's
    task ends (no task left behind), the slot is freed, the drop counted."""
    async with fleet({"name": "s", "output_tokens": 200, "ms_per_token": 50, "capacity": 1}) as f:
        before = asyncio.all_tasks()
        async with http.stream("POST", f"{f.url('s')}/chat/completions", json=BODY) as r:
            async for _ in r.aiter_bytes():
                break
        await http.aclose()  # the pooled connection goes with the client
        stats = await settled(f, "s", in_flight=0, dropped=1)
        for _ in range(100):
            left = asyncio.all_tasks() - before - {asyncio.current_task()}
            if not left:
                break
            await asyncio.sleep(0.01)
    assert (stats["in_flight"], stats["dropped"], stats["streams"]) == (0, 1, 1)
    assert not left


async def test_pacing_follows_the_scenario() -> None:
    """Time to first token >= the latency, the rest >= the jittered per-token gaps
    (lower bounds only: a busy machine only makes a stream slower)."""
    endpoint = {"name": "p", "latency_ms": 100, "ms_per_token": 10, "output_tokens": 30}
    async with fleet(endpoint) as f, sdk(f, "p") as client:
        await client.models.list()  # connect first: measure the stream, not the handshake
        start = time.perf_counter()
        stamps = []
        async for chunk in await client.chat.completions.create(
            model="m",
            messages=USER,  # type: ignore[arg-type]
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                stamps.append(time.perf_counter() - start)
    ttft, total = stamps[0], stamps[-1]
    assert len(stamps) == 30
    assert ttft >= 0.095
    assert total - ttft >= 29 * 0.010 * 0.75 - 0.005  # token_jitter 0.25 by default
    assert stamps == sorted(stamps)
