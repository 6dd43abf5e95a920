"""Streamed jobs end to end on the real broker: ``LlmqClient.stream`` against a
worker and the fake fleet's paced SSE streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
from harness import running_fleet

from producers.client import LlmqClient
from producers.errors import StreamInterrupted, UnknownModel
from schemas.contract import DEAD_HEADERS
from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

MESSAGES = [{"role": "user", "content": "stream me something"}]
PACED = {"latency_ms": 30, "ms_per_token": 2, "token_jitter": 0.0}


@asynccontextmanager
async def worker_for(settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(settings, name="w")
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop(grace_s=5)


def client_for(settings: Settings, **kw: Any) -> LlmqClient:
    return LlmqClient(
        settings.broker.url.get_secret_value(), exchange=settings.topology.jobs_exchange, **kw
    )


def text(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        c["delta"].get("content") or "" for chunk in chunks for c in chunk.get("choices", [])
    )


async def test_a_stream_arrives_in_parts_with_its_outcome_at_the_end(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings) as worker, client_for(settings) as client:
            chunks = []
            async with client.stream("m1", MESSAGES, max_tokens=60, sla_ms=10_000) as s:
                async for chunk in s:
                    chunks.append(chunk)
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert text(chunks)
            assert s.finish_reason in ("stop", "length")
            assert s.usage is not None and s.usage["completion_tokens"] >= 1
            assert s.routing["endpoint"] == "a"
            # Not asked for: the worker's own usage chunk is not among the chunks.
            assert not any("usage" in c and not c.get("choices") for c in chunks)
            assert worker.stats.ok == 1
            stats = fleet.stats()["a"].as_dict()
            assert stats["streams"] == 1


async def test_include_usage_adds_the_usage_chunk_and_a_whole_answer_streams_too(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            async with client.stream(
                "m1", MESSAGES, max_tokens=20, stream_options={"include_usage": True}
            ) as s:
                chunks = [c async for c in s]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
            # The non-streamed path is unchanged beside it.
            response = await client.complete("m1", MESSAGES, max_tokens=5)
            assert response["object"] == "chat.completion"


async def test_errors_before_the_first_chunk_are_typed_as_for_complete(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            with pytest.raises(UnknownModel):
                async with client.stream("nope", MESSAGES) as s:
                    _ = [c async for c in s]


async def test_an_upstream_that_fails_before_its_first_token_is_retried_invisibly(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_fleet(
        {"name": "bad", "models": ["m1"], "error_rate": 1.0},
        {"name": "good", "models": ["m1"], **PACED},
    ) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            for _ in range(4):
                async with client.stream("m1", MESSAGES, max_tokens=10, sla_ms=10_000) as s:
                    assert text([c async for c in s])
                assert s.routing["endpoint"] == "good"


async def test_a_stream_cut_mid_answer_ends_interrupted_and_dead_lettered(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(
        {"name": "a", "models": ["m1"], "stream_cut_rate": 1.0, **PACED}
    ) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            channel = await connection.channel()
            dead = await channel.declare_queue(exclusive=True)
            await dead.bind(settings.topology.dead_exchange, routing_key="#")
            got: list[dict[str, Any]] = []

            async def read() -> None:
                async with client.stream("m1", MESSAGES, max_tokens=200, sla_ms=10_000) as s:
                    async for chunk in s:
                        got.append(chunk)

            with pytest.raises(StreamInterrupted) as broken:
                await read()
            assert got, "the cut comes after the first token"
            assert broken.value.retriable is True
            letter = await dead.get(timeout=10, fail=False)
            for _ in range(50):
                if letter is not None:
                    break
                await asyncio.sleep(0.1)
                letter = await dead.get(timeout=10, fail=False)
            assert letter is not None
            assert letter.headers[DEAD_HEADERS.ERROR_CODE] == "stream_interrupted"
            assert orjson.loads(letter.body)["stream"] is True


async def test_leaving_a_stream_early_drops_the_upstream_call(
    make_settings: Callable[..., Settings],
) -> None:
    slow = {"latency_ms": 20, "ms_per_token": 20, "token_jitter": 0.0}
    async with running_fleet({"name": "a", "models": ["m1"], **slow}) as fleet:
        settings = make_settings(fleet, worker={"stream_flush_ms": 5})
        async with worker_for(settings) as worker, client_for(settings) as client:
            async with client.stream("m1", MESSAGES, max_tokens=500, sla_ms=30_000) as s:
                async for _ in s:
                    break
            for _ in range(100):  # the worker notices at its next part
                if worker.stats.errors + worker.stats.dead_letters >= 1:
                    break
                await asyncio.sleep(0.1)
            assert worker.stats.by_code == {"stream_interrupted": 1}
            stats = fleet.stats()["a"].as_dict()
            assert stats["streams"] == 1
            # The fleet saw its caller hang up mid-stream: the upstream call was dropped.
            assert stats["dropped"] == 1 and stats["in_flight"] == 0


async def test_stream_queues_are_ready_ahead_and_none_is_left_behind(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """The next streams' queues are declared while the first one runs (off the
    time to first token); leaving the client deletes them all."""
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            async with client.stream("m1", MESSAGES, max_tokens=5) as first:
                _ = [c async for c in first]
            for _ in range(100):
                if len(client.stream_queues.ready) == 4:
                    break
                await asyncio.sleep(0.02)
            spare = client.stream_queues.ready
            assert len(spare) == 4
            async with client.stream("m1", MESSAGES, max_tokens=5) as second:
                _ = [c async for c in second]
            assert second.queue_name in spare
            used = [first.queue_name, second.queue_name]
        for name in [*used, *spare]:
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(name, passive=True)


async def test_a_streamed_job_without_a_reply_to_ends_as_a_dead_letter_not_a_crash(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], **PACED}) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings) as worker:
            channel = await connection.channel()
            dead = await channel.declare_queue(exclusive=True)
            await dead.bind(settings.topology.dead_exchange, routing_key="#")
            body = {"model": "m1", "messages": MESSAGES, "max_tokens": 5, "stream": True}
            exchange = await channel.get_exchange(settings.topology.jobs_exchange)
            await exchange.publish(
                aio_pika.Message(orjson.dumps(body), message_id="no-reply-to"),
                routing_key="interactive",
            )
            letter = None
            for _ in range(100):
                letter = await dead.get(fail=False)
                if letter is not None:
                    break
                await asyncio.sleep(0.05)
            assert letter is not None and letter.message_id == "no-reply-to"
            assert letter.headers[DEAD_HEADERS.ERROR_CODE] == "invalid_request"
            assert worker.stats.requeued == 0
