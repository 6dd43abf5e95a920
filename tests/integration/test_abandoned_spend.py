"""Attempts the provider bills but llmq never reads the answer of, charged on the broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from harness import Caller, chat, running_fleet
from ops_helpers import eventually, priced

from schemas.settings import Settings
from workers.attempts import Abandoned
from workers.routing import Router, Work
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

PROMPT = "x" * 400
"""100 prompt tokens as the dispatcher counts them (characters ÷ 4)."""
PRICES = {"input_per_mtok": 1e4}  # 0.01 USD an input token: an abandoned attempt costs 1 USD
BUDGET = {"models": {"m1": {"monthly_usd": 10_000}}}


def own_topology(**more: Any) -> dict[str, Any]:
    """This test's spend stream (the vhost, and so the default stream, is the module's)."""
    return {"spend_stream": f"spend.{uuid.uuid4().hex[:8]}", **more}


def spent(worker: Worker) -> float:
    return worker.telemetry.spend_limits.ledger.spent("model:m1")


def teach(router: Router, latency_s: dict[str, float]) -> None:
    """A latency history per endpoint, as if 40 jobs like this test's had run each."""
    work = Work(prompt_tokens=100, output_tokens=10)
    at = time.monotonic() - 60
    for _ in range(40):
        for name, seconds in latency_s.items():
            attempt = router.begin(name, work=work, now=at, model="m1")
            router.succeed(attempt, now=at + seconds, output_tokens=10)
        at += 0.1


async def test_a_hedge_loser_is_charged_its_prompt_estimate(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """The first pick (fast so far) hangs; past its p95 the hedge goes to the other
    endpoint and wins; the loser, cancelled after it was sent, is charged 1 USD."""
    async with running_fleet(
        {"name": "slow", "models": ["m1"], "output_tokens": 10, "latency_ms": 5_000},
        {"name": "fast", "models": ["m1"], "output_tokens": 10, "latency_ms": 5},
    ) as fleet:
        settings = make_settings(
            fleet,
            endpoints=priced(fleet, **PRICES),
            budgets=BUDGET,
            topology=own_topology(),
            metrics={"enabled": False},
        )
        worker = Worker(settings, name="hedger")
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        try:
            teach(worker.router, {"slow": 0.005, "fast": 0.05})  # so "slow" is picked first
            job_id = await caller.publish(chat(content=PROMPT, max_tokens=10))
            await caller.wait_for(lambda: job_id in caller.replies)
            await eventually(lambda: fleet.stats()["slow"].dropped == 1)
            total = spent(worker)
            estimate = worker.spend.estimate_usd(Abandoned("slow", "m1", 100, 0.0))
        finally:
            await worker.stop(grace_s=5)
    routing = caller.replies[job_id][0]["routing"]
    assert (routing["endpoint"], routing["hedged"], routing["attempts"]) == ("fast", True, 2)
    assert fleet.stats()["slow"].requests == 1  # sent, so billed, though never read
    assert estimate == pytest.approx(1.0)
    assert total == pytest.approx(routing["cost_usd"] + 1.0)  # the winner once, the loser once


async def test_a_job_that_times_out_is_charged_for_its_attempts(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """No answer at all: the failed job still costs each timed-out attempt's estimate."""
    async with running_fleet(
        {"name": "a", "models": ["m1"], "hang_rate": 1.0},
        {"name": "b", "models": ["m1"], "hang_rate": 1.0},
    ) as fleet:
        settings = make_settings(
            fleet,
            endpoints=priced(fleet, timeout_s=0.3, **PRICES),
            budgets=BUDGET,
            worker={"max_attempts": 2},
            topology=own_topology(classes={"interactive": {"hedge": False}}),
            metrics={"enabled": False},
        )
        worker = Worker(settings, name="timeouts")
        await worker.start()
        caller = Caller(connection, settings)
        await caller.start()
        try:
            job_id = await caller.publish(chat(content=PROMPT, max_tokens=10))
            await caller.wait_for(lambda: job_id in caller.replies)
            total = spent(worker)
            holds = worker.telemetry.spend_limits.ledger.holds
        finally:
            await worker.stop(grace_s=5)
    reply = caller.replies[job_id][0]
    assert reply["status"] == "error" and reply["routing"]["attempts"] == 2
    assert {name: s.requests for name, s in fleet.stats().items()} == {"a": 1, "b": 1}
    assert total == pytest.approx(2 * 1.0)
    assert holds == 0
