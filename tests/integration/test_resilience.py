"""Poison messages and broker connection loss: every job still ends, none is lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from harness import Caller, chat, running_fleet

from schemas.settings import Settings
from workers.deliveries import Deliveries
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq


class _Bug(RuntimeError):
    pass


async def test_poison_job_ends_in_the_dead_letters_with_an_error_reply(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job that makes the handler raise every time is requeued until its last
    permitted delivery, then answered internal_error and dead-lettered."""
    original = Deliveries.serve

    async def buggy(self: Deliveries, message: Any) -> Any:
        if message.message_id == "poison":
            raise _Bug("a bug that this job triggers")
        return await original(self, message)

    monkeypatch.setattr(Deliveries, "serve", buggy)
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)  # delivery_limit = 3
        worker = Worker(settings, name="w")
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        try:
            await caller.publish(chat(), job_id="poison")
            healthy = await caller.publish(chat())
            await caller.wait_for(lambda: "poison" in caller.replies and len(caller.dead) == 1)
            await caller.wait_for(lambda: healthy in caller.replies)
        finally:
            await worker.stop(grace_s=5)
    [reply] = caller.replies["poison"]
    assert reply["error"]["code"] == "internal_error"
    assert caller.dead_ids() == ["poison"]
    assert caller.dead[0].headers["error-code"] == "internal_error"
    assert worker.stats.requeued == settings.topology.delivery_limit
    assert caller.replies[healthy][0]["status"] == "ok"


async def test_connections_closed_mid_load_lose_no_job(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    vhost: str,
    rabbitmqctl: Callable[..., Any],
    amqp_url: str,
) -> None:
    """The broker drops every connection of the vhost while 100 jobs are in flight:
    the worker reconnects and every job is answered (duplicates allowed)."""
    # Slow answers: rabbitmqctl takes about a second to start, and the jobs must
    # still be in flight when it closes the connections.
    slow = {"name": "a", "models": ["m1"], "latency_ms": {"median": 1500, "p99": 1500}}
    async with running_fleet(slow) as fleet:
        settings = make_settings(fleet)
        worker = Worker(settings, name="w")
        await worker.start()
        # The caller uses a connection of its own that survives: a robust one.
        robust = await aio_pika.connect_robust(amqp_url)
        caller = Caller(robust, settings)
        await caller.start()
        try:
            ids = [await caller.publish(chat()) for _ in range(100)]
            await asyncio.sleep(0.15)
            result = await asyncio.to_thread(
                rabbitmqctl, "close_all_connections", "--vhost", vhost, "fault test"
            )
            assert result.returncode == 0, result.stderr
            await caller.wait_for(lambda: set(ids) <= set(caller.replies), timeout=60)
        finally:
            await worker.stop(grace_s=5)
            await robust.close()
    assert worker.stats.reconnects >= 1  # the fault really hit the worker
    assert all(any(r["status"] == "ok" for r in caller.replies[j]) for j in ids)
    assert caller.dead == []
