"""Spend that survives restarts, on the real broker: the hard cap holds across deploys."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from harness import Caller, chat, running_fleet
from ops_helpers import priced

from schemas.broker.topology import apply_topology
from schemas.settings import Settings
from schemas.topology import plan
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

CAPPED = {"models": {"m1": {"monthly_usd": 100, "hard_cap": True}}}
"""10 USD a job (10 completion tokens at 1 USD): the 11th job is over budget."""


def spent(worker: Worker) -> float:
    return worker.telemetry.spend_limits.ledger.spent("model:m1")


def own_topology() -> dict[str, Any]:
    """This test's state exchange and spend stream (the vhost is the module's)."""
    p = uuid.uuid4().hex[:8]
    return {"state_exchange": f"state.{p}", "spend_stream": f"spend.{p}"}


async def jobs(caller: Caller, n: int) -> list[dict[str, Any]]:
    """Run ``n`` jobs one after the other; their replies."""
    replies = []
    for _ in range(n):
        job_id = await caller.publish(chat(max_tokens=10))
        await caller.wait_for(lambda j=job_id: j in caller.replies)  # type: ignore[misc]
        replies.append(caller.replies[job_id][0])
    return replies


async def test_the_hard_cap_survives_a_restart_of_one_worker_and_of_all_of_them(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"], "output_tokens": 10}) as fleet:
        settings = make_settings(
            fleet,
            endpoints=priced(fleet),
            budgets=CAPPED,
            topology=own_topology(),
            worker={"state_interval_s": 0.2},
            metrics={"enabled": False},
        )
        caller = Caller(connection, settings)
        first = Worker(settings, name="first")
        await first.start()
        await caller.start()
        try:
            done = await jobs(caller, 5)
        finally:
            await first.stop(grace_s=5)
        # No worker is running: a new one (a new origin) learns the month from
        # the broker before its first job.
        second = Worker(settings, name="second")
        await second.start()
        after_one_restart = spent(second)
        third = Worker(settings, name="third")
        try:
            await third.start()
            done += await jobs(caller, 3)
        finally:
            for w in (second, third):
                await w.stop(grace_s=5)
        # Every worker stopped (a deploy): the fleet starts again from the stream.
        last = Worker(settings, name="after-the-deploy")
        await last.start()
        try:
            after_all_restarted = spent(last)
            done += await jobs(caller, 2)
            over = await caller.publish(chat(max_tokens=10))
            await caller.wait_for(lambda: over in caller.replies)
            requests = fleet.stats()["a"].requests
        finally:
            await last.stop(grace_s=5)
    assert [r["routing"]["cost_usd"] for r in done] == [10.0] * 10
    assert after_one_restart == 50
    assert after_all_restarted == 80
    assert caller.replies[over][0]["error"]["code"] == "over_budget"
    assert requests == 10  # the job over the cap never reached the upstream


async def test_without_the_stream_a_worker_warns_and_keeps_spend_in_memory(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``--no-declare`` against a broker where `llmq topology apply` has not made the
    stream: a warning, then today's behaviour (memory and gossip), never a crash."""
    async with running_fleet({"name": "a", "models": ["m1"], "output_tokens": 10}) as fleet:
        topology = own_topology()
        declared = make_settings(fleet, endpoints=priced(fleet), topology=topology)
        await apply_topology(connection, plan(declared.topology))
        settings = make_settings(
            fleet,
            endpoints=priced(fleet),
            budgets=CAPPED,
            topology={**topology, "spend_stream": "not.declared"},
            metrics={"enabled": False},
        )
        caplog.set_level(logging.WARNING, logger="llmq.worker")
        worker = Worker(settings, name="no-stream", declare_topology=False)
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        try:
            replies = await jobs(caller, 2)
            in_memory = spent(worker)
        finally:
            await worker.stop(grace_s=5)
    assert [r["status"] for r in replies] == ["ok", "ok"]
    assert in_memory == 20
    warnings = [r.getMessage() for r in caplog.records if "spend stream" in r.getMessage()]
    assert warnings == [
        "no spend stream 'not.declared' (Returned): spend is not kept across restarts"
        " (run `llmq topology apply`, or grant the worker the stream)"
    ]
