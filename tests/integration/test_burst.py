"""Burst buffering: the queue absorbs a burst far larger than the fleet serves at once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import orjson
import pytest
from harness import (
    peak_rss_mb,
    queue_depth,
    running_fleet,
    start_worker_process,
    write_worker_config,
)

from producers.client import LlmqClient
from schemas.settings import Settings

# Publishing 50k jobs while the worker and the in-process fleet share two cores
# takes 1.5-2 min here: the default 120 s per test is too tight for it. Coverage
# tracing (make test measures the pure code) would slow its publisher ~4x and
# make the queue-absorbs-the-burst assertion a race with the drain: not traced.
pytestmark = [
    pytest.mark.rabbitmq,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.no_cover,
]

JOBS = int(os.environ.get("LLMQ_BURST_JOBS", "50000"))
RSS_LIMIT_MB = 300
CONCURRENCY = 128


async def test_a_burst_of_50k_jobs_is_buffered_and_all_complete(
    tmp_path: Path,
    amqp_url: str,
    names: dict[str, str],
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """50k jobs published at once against a fleet that serves far fewer per second:
    the work queue holds them, the worker's memory stays bounded by its prefetch,
    and every job gets exactly its reply (nothing lost)."""
    # The fleet serves at most CONCURRENCY / 0.2 s = 640 jobs/s, well under any
    # publish rate, so the queue must hold the burst however fast the machine is.
    endpoint = {"name": "a", "models": ["m1"], "latency_ms": {"median": 200, "p99": 250}}
    async with running_fleet(endpoint) as fleet:
        settings = make_settings(fleet)
        queue = f"{names['queue_prefix']}interactive"
        config = write_worker_config(
            tmp_path / "llmq.toml", amqp_url, names, {"a": fleet.url("a")}, concurrency=CONCURRENCY
        )
        worker = await start_worker_process(config, connection, queue)
        channel = await connection.channel()
        replies = await channel.declare_queue("burst-replies", exclusive=True)
        answered: set[str] = set()
        errors = 0
        done = asyncio.Event()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal errors
            answered.add(message.correlation_id or "")
            errors += orjson.loads(message.body)["status"] != "ok"
            if len(answered) >= JOBS:
                done.set()

        await replies.consume(on_reply, no_ack=True)
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        started = time.monotonic()
        try:
            async with LlmqClient(
                amqp_url, exchange=settings.topology.jobs_exchange, max_unconfirmed=512
            ) as client:
                ids = await client.submit_many(
                    [body] * JOBS, reply_to="burst-replies", sla_ms=3_600_000
                )
            published_s = time.monotonic() - started
            backlog = await queue_depth(connection, queue)
            await asyncio.wait_for(done.wait(), timeout=900)
            drained_s = time.monotonic() - started
            rss = peak_rss_mb(worker.pid)
        finally:
            worker.send_signal(signal.SIGTERM)
            await asyncio.to_thread(worker.wait, 30)
    lost = len(set(ids) - answered)
    print(
        f"\nburst: {JOBS} jobs published in {published_s:.1f} s ({JOBS / published_s:.0f}/s),"
        f" backlog after publishing {backlog}, all answered in {drained_s:.1f} s,"
        f" worker peak RSS {rss:.0f} MB, errors {errors}, lost {lost}"
    )
    assert lost == 0
    assert errors == 0
    # The queue, not the worker, absorbed the burst: far more waited in it than
    # the worker may hold (its prefetch), however fast this machine drained it.
    assert backlog > 10 * CONCURRENCY
    assert rss < RSS_LIMIT_MB  # prefetch bounds what the worker holds
