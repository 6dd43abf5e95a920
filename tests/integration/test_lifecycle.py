"""A real ``llmq worker`` process: SIGTERM drains or requeues, never loses a job."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aio_pika
import pytest
from harness import FLEET_KEY, Caller, chat, running_fleet

from schemas.settings import Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq


def _write_config(
    path: Path, amqp_url: str, names: dict[str, str], url: str, grace_s: float
) -> Path:
    lines = [
        "[broker]",
        f'url = "{amqp_url}"',
        "[topology]",
        *(f'{k} = "{v}"' for k, v in names.items()),
        "delivery_limit = 3",
        "[worker]",
        f"grace_s = {grace_s}",
        "[[endpoints]]",
        'name = "slow"',
        f'base_url = "{url}"',
        'api_key_env = "LLMQ_TEST_FLEET_KEY"',
        'models = ["m1"]',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def _consumers(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count)
    finally:
        await channel.close()


async def _start_worker(
    config: Path, connection: aio_pika.abc.AbstractConnection, queue: str
) -> subprocess.Popen[bytes]:
    with (config.parent / "worker.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a quick spawn; the waiting below is async
            [sys.executable, "-m", "producers", "worker", "--config", str(config)],
            env={**_env(), "LLMQ_TEST_FLEET_KEY": FLEET_KEY},
            stderr=log,
        )
    for _ in range(200):
        if proc.poll() is not None:
            raise AssertionError((config.parent / "worker.log").read_text())
        try:
            if await _consumers(connection, queue) > 0:
                return proc
        except aio_pika.exceptions.ChannelNotFoundEntity:
            pass
        await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("worker did not start consuming")


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}


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
        config = _write_config(tmp_path / "llmq.toml", amqp_url, names, fleet.url("slow"), grace_s)
        proc = await _start_worker(config, connection, f"{names['queue_prefix']}interactive")
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
