"""Interactive before batch, through the broker: a batch backlog does not delay interactive."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aio_pika

from schemas.settings import Settings
from tests.harness import chat, running_fleet, started
from workers.fleet import Fleet


def one_endpoint(
    make_settings: Callable[..., Settings], fleet: Fleet, *, slots: int, **sections: Any
) -> Settings:
    """Settings for one endpoint "ep" serving m1 with ``slots`` slots."""
    endpoint = {
        "name": "ep",
        "base_url": fleet.url("ep"),
        "api_key_env": "LLMQ_TEST_FLEET_KEY",
        "models": ["m1"],
        "max_concurrency": slots,
    }
    return make_settings(fleet, endpoints=[endpoint], **sections)


async def test_an_interactive_job_overtakes_a_batch_backlog(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """80 batch jobs, then one interactive job, on an endpoint of 4 slots at 150 ms:
    the interactive job takes the first slot that frees (or was kept for it).

    150 ms a job (a 3 s backlog): long against the broker's own delivery time,
    which on a slow disk (quorum queues fsync) reached tens of ms and let 50 ms
    jobs finish by the dozen before the interactive one had even arrived."""
    async with running_fleet({"name": "ep", "models": ["m1"], "latency_ms": 150}) as fleet:
        settings = one_endpoint(make_settings, fleet, slots=4)
        async with started(settings, connection) as (_, caller):
            warm = await caller.publish(chat())  # a sample: no cold-probe rule in the way
            await caller.wait_for(lambda: warm in caller.replies)
            arrived: dict[str, float] = {}
            batch = [await caller.publish(chat(), routing_key="batch") for _ in range(80)]
            await asyncio.sleep(0.1)  # the backlog holds every slot, more are waiting
            sent = time.monotonic()
            urgent = await caller.publish(chat())

            def note() -> bool:
                for job in [*batch, urgent]:
                    if job in caller.replies and job not in arrived:
                        arrived[job] = time.monotonic()
                return len(arrived) == 81

            await caller.wait_for(note, timeout=30)
            assert caller.replies[urgent][0]["error"] is None
            overtaken = sum(1 for job in batch if arrived[job] > arrived[urgent])
            assert overtaken >= 60, f"only {overtaken} batch jobs finished after it"
            assert arrived[urgent] - sent < 0.75  # a slot's wait and its own call, not 3 s


async def test_batch_alone_leaves_the_headroom_free(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """A batch backlog on an endpoint of 20 slots holds at most 19 of them: the
    last is kept for interactive arrivals (before: all 20)."""
    async with running_fleet({"name": "ep", "models": ["m1"], "latency_ms": 200}) as fleet:
        settings = one_endpoint(make_settings, fleet, slots=20)
        async with started(settings, connection) as (_, caller):
            warm = await caller.publish(chat(), routing_key="batch")
            await caller.wait_for(lambda: warm in caller.replies)
            batch = [await caller.publish(chat(), routing_key="batch") for _ in range(100)]
            await caller.wait_for(lambda: all(j in caller.replies for j in batch), timeout=30)
            assert fleet.stats()["ep"].max_in_flight == 19


async def test_interactive_alone_fills_the_whole_concurrency_and_batch_its_share(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """``worker.concurrency = 8``, on an endpoint with room for 64: 20 interactive
    jobs run 8 at a time (before: 4, the rest of a split with batch), then 20 batch
    jobs run ``batch_share`` of that, 4 at a time."""
    async with running_fleet({"name": "ep", "models": ["m1"], "latency_ms": 500}) as fleet:
        settings = one_endpoint(
            make_settings, fleet, slots=64, worker={"concurrency": 8, "batch_share": 0.5}
        )
        async with started(settings, connection) as (_, caller):
            warm = await caller.publish(chat())
            await caller.wait_for(lambda: warm in caller.replies)
            for key, held in (("interactive", 8), ("batch", 4)):
                fleet.reset()
                jobs = [await caller.publish(chat(), routing_key=key) for _ in range(20)]
                await caller.wait_for(
                    lambda js=jobs: all(j in caller.replies for j in js),  # type: ignore[misc]
                    timeout=30,
                )
                assert fleet.stats()["ep"].max_in_flight == held, key
