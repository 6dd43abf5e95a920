"""A real ``llmq worker`` process: SIGTERM drains or requeues, never loses a job."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import aio_pika
import pytest
from harness import Caller, chat, running_fleet, start_worker_process, write_worker_config

from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq


@pytest.mark.parametrize("grace_s", [10.0, 0.2], ids=["drains", "requeues"])
async def test_sigterm_with_jobs_in_flight_loses_none(
    tmp_path: Path,
    amqp_url: str,
    names: dict[str, str],
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    grace_s: float,
) -> None:
    async with running_fleet(
        {"name": "slow", "models": ["m1"], "latency_ms": {"median": 1500, "p99": 1500}}
    ) as fleet:
        config = write_worker_config(
            tmp_path / "llmq.toml", amqp_url, names, {"slow": fleet.url("slow")}, grace_s=grace_s
        )
        proc = await start_worker_process(config, connection, f"{names['queue_prefix']}interactive")
        settings = make_settings(fleet)
        caller = Caller(connection, settings)
        await caller.start()
        ids = [await caller.publish(chat()) for _ in range(20)]
        await asyncio.sleep(0.5)  # all 20 are now in flight upstream
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0
        # Whatever the first worker did not finish, a second one does.
        second = Worker(settings, name="second")
        await second.start()
        try:
            await caller.wait_for(lambda: set(ids) <= set(caller.replies), timeout=30)
        finally:
            await second.stop(grace_s=5)
    assert all(caller.replies[j][0]["status"] == "ok" for j in ids)
    assert caller.dead == []
    if grace_s >= 10:
        assert second.stats.ok == 0  # the first worker drained everything itself
    else:
        assert second.stats.ok == 20  # everything in flight was requeued
