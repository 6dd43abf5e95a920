"""An endpoint's limits hold for the fleet: workers split them by the live-worker set."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import aio_pika

from schemas.settings import Settings
from tests.harness import FLEET_KEY, chat, running_fleet, started
from workers.fleet import Fleet

MAX_CONCURRENCY = 4


def settings_for(make_settings: Callable[..., Settings], fleet: Fleet, **worker: Any) -> Settings:
    return make_settings(
        fleet,
        endpoints=[
            {
                "name": "slow",
                "base_url": fleet.url("slow"),
                "api_key_env": "LLMQ_TEST_FLEET_KEY",
                "models": ["m1"],
                "max_concurrency": MAX_CONCURRENCY,
            }
        ],
        topology={"state_exchange": f"t{uuid.uuid4().hex[:8]}.state"},
        worker={"state_interval_s": 0.2, **worker},
    )


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polling state set by gossip callbacks
            await asyncio.sleep(0.02)


async def test_two_workers_never_pass_one_endpoints_max_concurrency(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    assert FLEET_KEY
    async with running_fleet({"name": "slow", "models": ["m1"], "latency_ms": 40}) as fleet:
        settings = settings_for(make_settings, fleet)
        async with AsyncExitStack() as stack:
            a, caller = await stack.enter_async_context(started(settings, connection, name="a"))
            b, _ = await stack.enter_async_context(started(settings, connection, name="b"))
            await until(lambda: a.gossip.share[1] == 2 and b.gossip.share[1] == 2)
            assert {a.gossip.share[0], b.gossip.share[0]} == {0, 1}
            capacities = [w.router.snapshot(now=0.0)[0].capacity for w in (a, b)]
            assert sorted(capacities) == [2, 2]

            ids = [await caller.publish(chat(), routing_key=key) for key in ["interactive"] * 60]
            ids += [await caller.publish(chat(), routing_key="batch") for _ in range(40)]
            await caller.wait_for(lambda: all(i in caller.replies for i in ids), timeout=60)
            errors = [caller.replies[i][0]["error"] for i in ids]
            errors = [e for e in errors if e is not None]
            assert errors == []
            # Each worker alone would send four at once: eight together, before.
            assert fleet.stats()["slow"].max_in_flight <= MAX_CONCURRENCY

            await b.stop(grace_s=5)  # leaves: its share passes to a at once
            await until(lambda: a.gossip.share == (0, 1), timeout=2.0)
            assert a.router.snapshot(now=0.0)[0].capacity == MAX_CONCURRENCY


async def test_a_silent_worker_drops_out_of_the_fleet(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "slow", "models": ["m1"], "latency_ms": 5}) as fleet:
        settings = settings_for(make_settings, fleet)
        async with started(settings, connection, name="a") as (a, _):
            async with started(settings, connection, name="b") as (b, _):
                await until(lambda: a.gossip.share[1] == 2)
                await b.gossip.transport.stop()  # as if killed: no goodbye, only silence
                await until(lambda: a.gossip.share == (0, 1), timeout=3.0)
