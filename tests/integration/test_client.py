"""LlmqClient against the real broker and a worker: replies, typed errors, backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import orjson
import pytest
from harness import chat_and_embedding_endpoints, running_fleet

from producers.client import LlmqClient
from producers.errors import (
    Backpressure,
    InvalidRequest,
    TooLarge,
    UnknownModel,
    Unroutable,
    UpstreamError,
)
from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

MESSAGES = [{"role": "user", "content": "hello"}]


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


async def test_complete_returns_the_response_and_raises_typed_errors(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_fleet(
        {"name": "good", "models": ["m1"]}, {"name": "bad", "models": ["m2"], "error_rate": 1.0}
    ) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            response = await client.complete("m1", MESSAGES, sla_ms=5000, max_tokens=8)
            assert response["object"] == "chat.completion"
            assert response["usage"]["completion_tokens"] <= 8
            with pytest.raises(UnknownModel) as unknown:
                await client.complete("nope", MESSAGES)
            assert unknown.value.retriable is False
            with pytest.raises(UpstreamError) as failed:
                await client.complete("m2", MESSAGES, sla_ms=5000)
            assert failed.value.retriable is True
            assert failed.value.reply["routing"]["attempts"] >= 1


async def test_submit_confirms_and_an_unroutable_job_raises(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            channel = await connection.channel()
            replies = await channel.declare_queue("my-replies", exclusive=True)
            ids = await client.submit_many(
                [{"model": "m1", "messages": MESSAGES}] * 20, reply_to="my-replies"
            )
            assert len(set(ids)) == 20
            got: set[str] = set()
            async with asyncio.timeout(20):
                while len(got) < 20:
                    message = await replies.get(fail=False, no_ack=True)
                    if message is None:
                        await asyncio.sleep(0.05)
                        continue
                    got.add(orjson.loads(message.body)["job_id"])
            assert got == set(ids)
            with pytest.raises(Unroutable):
                await client.submit({"model": "m1", "messages": MESSAGES}, sla_class="nope")


async def test_late_duplicate_and_unknown_replies_are_ignored(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings), client_for(settings) as client:
            reply = await client.call({"model": "m1", "messages": MESSAGES}, job_id="j1")
            channel = await connection.channel()
            for correlation_id in ("j1", "never-asked"):  # duplicate, then unknown
                await channel.default_exchange.publish(
                    aio_pika.Message(orjson.dumps(reply), correlation_id=correlation_id),
                    routing_key=client.reply_queue,
                )
            second = await client.call({"model": "m1", "messages": MESSAGES}, job_id="j2")
    assert reply["job_id"] == "j1"
    assert second["job_id"] == "j2"


async def test_full_queue_gives_backpressure_and_keeps_what_it_accepted(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(
            fleet,
            topology={"classes": {"interactive": {"default_sla_ms": 60000, "max_length": 25}}},
        )
        # Declare the topology with a worker, then stop it: nobody consumes.
        async with worker_for(settings):
            pass
        async with client_for(settings) as client:
            results = await asyncio.gather(
                *(client.submit({"model": "m1", "messages": MESSAGES}) for _ in range(100)),
                return_exceptions=True,
            )
            # Quorum queues apply max-length after the fact: a concurrent burst may
            # overshoot it, sometimes by all of it. Once the queue is over its
            # length, every publish is refused: these go one at a time.
            for _ in range(5):
                try:
                    results.append(await client.submit({"model": "m1", "messages": MESSAGES}))
                except Backpressure as exc:
                    results.append(exc)
            accepted = [r for r in results if isinstance(r, str)]
            refused = [r for r in results if isinstance(r, Backpressure)]
            assert len(accepted) >= 25
            assert all(isinstance(r, Backpressure) for r in results[-5:])
            assert len(refused) == 105 - len(accepted)
            # Everything accepted is still there and gets answered.
            async with worker_for(settings) as worker:
                async with asyncio.timeout(20):
                    while worker.stats.ok < len(accepted):  # noqa: ASYNC110 - polling a counter
                        await asyncio.sleep(0.05)
            assert worker.stats.ok == len(accepted)


async def test_publish_cut_by_a_reconnect_is_sent_again(
    make_settings: Callable[..., Settings],
    vhost: str,
    rabbitmqctl: Callable[..., Any],
) -> None:
    """Connections drop while 300 jobs are in flight: every submit returns
    (republished with the same job id) and every job is answered."""
    slow = {"name": "a", "models": ["m1"], "latency_ms": {"median": 1500, "p99": 1500}}
    async with running_fleet(slow) as fleet:
        settings = make_settings(fleet)
        async with worker_for(settings) as worker, client_for(settings) as client:
            jobs = [
                client.call({"model": "m1", "messages": MESSAGES}, timeout_s=60) for _ in range(300)
            ]
            tasks = [asyncio.create_task(j) for j in jobs]
            await asyncio.sleep(0.05)
            await asyncio.to_thread(rabbitmqctl, "close_all_connections", "--vhost", vhost, "test")
            results = await asyncio.gather(*tasks, return_exceptions=True)
    failures = [r for r in results if not isinstance(r, dict)]
    assert failures == []
    assert all(r["status"] == "ok" for r in results if isinstance(r, dict))
    assert worker.stats.reconnects >= 1
    # Redeliveries of jobs still in flight joined them: one upstream call each.
    assert sum(s.requests for s in fleet.stats().values()) == 300


async def test_the_reply_queue_is_legal_on_rabbitmq_4_3_and_expires(
    make_settings: Callable[..., Settings],
    vhost: str,
    rabbitmqctl: Callable[..., Any],
) -> None:
    """RabbitMQ 4.3 refuses a transient queue that is not exclusive: the client's
    reply queue is durable (it must outlive a dropped connection, so not exclusive)
    and expires once unused; a quorum queue, replicated over a cluster's nodes."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        async with client_for(settings) as client:
            listed = rabbitmqctl(
                "list_queues", "-p", vhost, "name", "durable", "exclusive", "arguments", "type"
            )
            rows = [r.split("\t") for r in listed.stdout.splitlines()]
            [row] = [r for r in rows if r[0] == client.reply_queue]
    # RabbitMQ lists no exclusive flag for a quorum queue (it can't be exclusive).
    assert row[1] == "true" and row[2] in ("false", "")
    assert "x-expires" in row[3]
    assert row[4] == "quorum"


async def test_embed_returns_the_embeddings_and_refuses_the_other_kind(
    make_settings: Callable[..., Settings],
) -> None:
    """LlmqClient.embed runs an embedding job; a chat model cannot take one, nor an
    embedding model a chat job (both invalid_request, before any upstream call)."""
    async with running_fleet(
        {"name": "chat", "models": ["m1"]}, {"name": "emb", "models": ["e1"]}
    ) as fleet:
        settings = make_settings(fleet, endpoints=chat_and_embedding_endpoints(fleet))
        async with worker_for(settings), client_for(settings) as client:
            response = await client.embed("e1", ["one", "two"], sla_ms=5000)
            assert response["object"] == "list"
            assert [d["index"] for d in response["data"]] == [0, 1]
            assert response["usage"]["prompt_tokens"] >= 2
            with pytest.raises(InvalidRequest, match="chat model"):
                await client.embed("m1", "hello", sla_ms=5000)
            with pytest.raises(InvalidRequest, match="embedding model"):
                await client.complete("e1", MESSAGES, sla_ms=5000)
        assert fleet.stats()["chat"].requests == 0


@pytest.mark.broker("4", reason="3.10's max_message_size is 128 MiB; 4.0 lowered it to 16 MiB")
async def test_a_job_over_the_brokers_max_message_size_is_refused_at_once(
    make_settings: Callable[..., Settings],
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        async with client_for(settings) as client:
            huge = [{"role": "user", "content": "x" * (17 * 1024 * 1024)}]
            started = asyncio.get_running_loop().time()
            with pytest.raises(TooLarge, match="larger than configured max size"):
                await client.submit({"model": "m1", "messages": huge})
            # Refused by the broker's answer, not after the 30 s of reconnect retries.
            assert asyncio.get_running_loop().time() - started < 10
            # The client goes on: its publishing channel comes back.
            async with worker_for(settings):
                response = await client.complete("m1", MESSAGES, sla_ms=10_000, max_tokens=8)
            assert response["object"] == "chat.completion"
