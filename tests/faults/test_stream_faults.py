"""Streamed jobs under faults, with the suite's per-job accounting.

A streamed job counts as answered when its last part arrives (``status`` ok
or error) or, failing before its first chunk, its ordinary reply; every
failure must also be a dead letter, and none may be lost. The outcome each
case defines:

- upstream fails before the first token: retried elsewhere, invisible (all ok);
- upstream breaks off after it: ``stream_interrupted`` last part + dead letter;
- the caller leaves mid-stream: the upstream call is dropped, the job is
  dead-lettered (its last part had nowhere to go);
- the worker is SIGKILLed mid-stream: the job is served again from the start
  under a new ``run``, and that run ends it.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from harness import (
    Ledger,
    collecting,
    running_fleet,
    start_worker_process,
    stop_processes,
    write_worker_config,
)

from producers.client import LlmqClient
from producers.errors import StreamInterrupted
from schemas.settings import Settings
from workers.service import Worker

pytestmark = [pytest.mark.faults, pytest.mark.rabbitmq]

MESSAGES = [{"role": "user", "content": "tell me a long story"}]
PACE = {"latency_ms": {"median": 40, "p99": 60}, "ms_per_token": 10, "token_jitter": 0.1}


def streamed(max_tokens: int) -> dict[str, Any]:
    return {"model": "m1", "messages": MESSAGES, "max_tokens": max_tokens, "stream": True}


def streams_into(runs: dict[str, set[str]]) -> Callable[[Ledger, dict[str, Any], str | None], None]:
    """A stream's last part (or a plain reply) answers its job; ``runs`` keeps
    the runs seen per job."""

    def record(ledger: Ledger, data: dict[str, Any], correlation_id: str | None) -> None:
        job_id = data["job_id"] or correlation_id
        if "seq" in data:
            runs.setdefault(job_id, set()).add(data["run"])
            if not data.get("last"):
                return
        ledger.reply(job_id, data)

    return record


async def publish(
    amqp_url: str, settings: Settings, ledger: Ledger, n: int, reply_to: str, max_tokens: int
) -> None:
    async with LlmqClient(amqp_url, exchange=settings.topology.jobs_exchange) as client:
        ids = [f"{ledger.prefix}-{i}" for i in range(n)]
        ledger.published.update(ids)
        await asyncio.gather(
            *(
                client.submit(streamed(max_tokens), job_id=j, reply_to=reply_to, sla_ms=60_000)
                for j in ids
            )
        )


async def settle(ledger: Ledger, timeout: float = 90) -> None:
    async with asyncio.timeout(timeout):
        while not ledger.settled():  # noqa: ASYNC110 - polling the ledger's counts
            await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # late duplicates are counted too


@asynccontextmanager
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    w = Worker(settings, name=f"w-{uuid.uuid4().hex[:4]}")
    await w.start()
    try:
        yield w
    finally:
        await w.stop(grace_s=5)


async def test_stream_upstream_fails_before_the_first_token(
    amqp_url: str, make_settings: Callable[..., Settings], ledger: Ledger
) -> None:
    """streams: half the upstream's calls fail before the first token"""
    async with running_fleet(
        {"name": "flaky", "models": ["m1"], "error_rate": 0.5, **PACE},
        {"name": "good", "models": ["m1"], **PACE},
    ) as fleet:
        settings = make_settings(fleet)
        runs: dict[str, set[str]] = {}
        async with (
            worker(settings),
            collecting(amqp_url, settings, ledger, streams_into(runs)) as to,
        ):
            await publish(amqp_url, settings, ledger, 200, to, max_tokens=20)
            await settle(ledger)
    ledger.check()
    assert all(rs[0]["status"] == "ok" for rs in ledger.replies.values())
    assert all(len(r) == 1 for r in runs.values())


async def test_stream_upstream_breaks_off_after_the_first_token(
    amqp_url: str, make_settings: Callable[..., Settings], ledger: Ledger
) -> None:
    """streams: 30 % of the upstream's streams break off mid-answer"""
    async with running_fleet(
        {"name": "a", "models": ["m1"], "stream_cut_rate": 0.3, **PACE}
    ) as fleet:
        settings = make_settings(fleet)
        runs: dict[str, set[str]] = {}
        async with (
            worker(settings),
            collecting(amqp_url, settings, ledger, streams_into(runs)) as to,
        ):
            await publish(amqp_url, settings, ledger, 200, to, max_tokens=40)
            await settle(ledger)
        cut = fleet.stats()["a"].cut
    ledger.check()
    failed = [rs[0] for rs in ledger.replies.values() if rs[0]["status"] == "error"]
    assert failed and all(r["error"]["code"] == "stream_interrupted" for r in failed)
    assert len(failed) == cut
    assert all(r["seq"] >= 1 for r in failed), "broken after the first part, not before"


async def test_stream_caller_leaves_mid_stream(
    make_settings: Callable[..., Settings], ledger: Ledger, amqp_url: str
) -> None:
    """streams: 50 callers leave after their first chunk"""
    slow = {"latency_ms": 20, "ms_per_token": 25, "token_jitter": 0.0}
    async with running_fleet({"name": "a", "models": ["m1"], **slow}) as fleet:
        settings = make_settings(fleet, worker={"stream_flush_ms": 5})
        runs: dict[str, set[str]] = {}
        async with (
            worker(settings),
            collecting(amqp_url, settings, ledger, streams_into(runs)),
            LlmqClient(amqp_url, exchange=settings.topology.jobs_exchange) as client,
        ):

            async def leave(i: int) -> None:
                job_id = f"{ledger.prefix}-{i}"
                ledger.published.add(job_id)
                ledger.dead_only.add(job_id)  # its stream queue is gone: nowhere to reply
                async with client.stream("m1", MESSAGES, max_tokens=400, job_id=job_id) as s:
                    async for _ in s:
                        break

            await asyncio.gather(*(leave(i) for i in range(50)))
            await settle(ledger)
        stats = fleet.stats()["a"].as_dict()
    ledger.check()
    assert stats["dropped"] == 50 and stats["in_flight"] == 0


async def test_stream_worker_sigkill_mid_stream(
    tmp_path: Path,
    amqp_url: str,
    names: dict[str, str],
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    ledger: Ledger,
) -> None:
    """streams: SIGKILL one of two workers with 100 streams mid-answer"""
    endpoint = {"name": "a", "models": ["m1"], **PACE, "ms_per_token": 20}
    async with running_fleet(endpoint) as fleet:
        settings = make_settings(fleet)
        queue = f"{names['queue_prefix']}interactive"
        config = write_worker_config(tmp_path / "llmq.toml", amqp_url, names, {"a": fleet.url("a")})
        victim = await start_worker_process(config, connection, queue)
        runs: dict[str, set[str]] = {}
        survivor = None
        try:
            async with collecting(amqp_url, settings, ledger, streams_into(runs)) as to:
                await publish(amqp_url, settings, ledger, 100, to, max_tokens=150)
                async with asyncio.timeout(30):
                    while len(runs) < 100:  # noqa: ASYNC110 - every stream has begun
                        await asyncio.sleep(0.05)
                survivor = await start_worker_process(config, connection, queue)
                victim.send_signal(signal.SIGKILL)
                await settle(ledger)
        finally:
            await stop_processes(victim, survivor)
    ledger.check()
    restarted = [j for j, r in runs.items() if len(r) > 1]
    assert all(rs[-1]["status"] == "ok" for rs in ledger.replies.values())
    assert restarted, "the killed worker's streams were served again under a new run"


async def test_client_stream_sees_a_restart_after_chunks_as_interrupted(
    tmp_path: Path,
    amqp_url: str,
    names: dict[str, str],
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """LlmqClient.stream across a worker's SIGKILL: never a spliced answer."""
    endpoint = {"name": "a", "models": ["m1"], **PACE, "ms_per_token": 20}
    async with running_fleet(endpoint) as fleet:
        settings = make_settings(fleet)
        queue = f"{names['queue_prefix']}interactive"
        config = write_worker_config(tmp_path / "llmq.toml", amqp_url, names, {"a": fleet.url("a")})
        victim = await start_worker_process(config, connection, queue)
        survivor = None
        try:
            async with LlmqClient(amqp_url, exchange=settings.topology.jobs_exchange) as client:
                got: list[dict[str, Any]] = []

                async def read() -> None:
                    async with client.stream("m1", MESSAGES, max_tokens=150, sla_ms=60_000) as s:
                        async for chunk in s:
                            got.append(chunk)
                            if len(got) == 1:
                                nonlocal survivor
                                survivor = await start_worker_process(config, connection, queue)
                                victim.send_signal(signal.SIGKILL)

                with pytest.raises(StreamInterrupted, match="again"):
                    await read()
        finally:
            await stop_processes(victim, survivor)
