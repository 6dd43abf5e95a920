"""Endpoint slots under a crowd of waiters: the limit holds, interactive goes first."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any

from schemas.codec import Job
from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from tests.unit.test_dispatcher import REPLY, job
from workers.attempts import Dispatcher, Failed, Served
from workers.errors import UpstreamFailure
from workers.providers import Adapter, Call, UpstreamReply, adapter_for
from workers.routing import EndpointSpec, FailureKind, RetryBudget, Router


class CountingUpstream:
    """Answers after ``latency_s``; counts calls in flight per endpoint and their peak."""

    def __init__(self, latency_s: float, slow: dict[str, float] | None = None) -> None:
        self.latency_s = latency_s
        self.slow = slow or {}
        self.in_flight: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.order: list[str] = []

    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        name = adapter.name
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        self.peak[name] = max(self.peak.get(name, 0), self.in_flight[name])
        try:
            delay = self.slow.get(name, self.latency_s)
            if delay > timeout_s:
                await asyncio.sleep(timeout_s)
                raise UpstreamFailure(FailureKind.TIMEOUT, f"{name}: timed out")
            await asyncio.sleep(delay)
        finally:
            self.in_flight[name] -= 1
        return REPLY

    async def aclose(self) -> None:
        pass


def dispatcher(upstream: Any, names: tuple[str, ...], max_concurrency: int) -> Dispatcher:
    specs = [
        EndpointSpec(name=n, models={"m": "m"}, max_concurrency=max_concurrency) for n in names
    ]
    return Dispatcher(
        router=Router(specs, {}, rand=random.Random(3).random),
        budget=RetryBudget(0.2, 10.0),
        upstream=upstream,
        adapters={
            n: adapter_for(EndpointSettings(name=n, base_url="http://127.0.0.1:9", models=["m"]))
            for n in names
        },
        max_attempts=3,
        margin_s=0.01,
        clock=time.monotonic,
        rand=random.Random(5).random,
        hook=lambda _: None,
    )


def as_class(sla_class: str, n: int) -> Job:
    return replace(job(), job_id=f"{sla_class}-{n}", sla_class=sla_class)


async def test_hedging_jobs_woken_together_never_pass_max_concurrency() -> None:
    """Interactive jobs race a hedge timer, so each attempt runs in a task of its
    own; the slot is taken when the job picks, so a crowd of waiters woken by one
    completion cannot all pass the limit check (256 got through a limit of 16)."""
    upstream = CountingUpstream(0.005)
    d = dispatcher(upstream, ("a",), 4)
    for n in range(40):  # samples, so that the hedge delay is known and attempts race
        assert isinstance(await d.run(as_class("interactive", n), "m", **_hedged()), Served)
    assert d.router.hedge_delay("a", work=_work()) is not None
    results = await asyncio.gather(
        *(d.run(as_class("interactive", n), "m", **_hedged()) for n in range(200))
    )
    assert all(isinstance(r, Served) for r in results)
    assert upstream.peak["a"] <= 4


async def test_interactive_job_takes_the_next_slot_before_a_batch_backlog() -> None:
    upstream = CountingUpstream(0.01)
    d = dispatcher(upstream, ("a",), 4)
    done: list[str] = []

    async def one(j: Job) -> None:
        result = await d.run(j, "m", deadline=time.monotonic() + 30, hedge=False)
        assert isinstance(result, Served)
        done.append(j.job_id)

    batch = [asyncio.create_task(one(as_class("batch", n))) for n in range(40)]
    await asyncio.sleep(0.015)  # the backlog holds every slot and has waiters
    urgent = asyncio.create_task(one(as_class("interactive", 0)))
    await asyncio.gather(urgent, *batch)
    # Four batch jobs were in flight; the interactive job takes the first slot freed.
    assert done.index("interactive-0") <= 8


async def test_hedge_loser_and_timeouts_are_reported_as_abandoned() -> None:
    upstream = CountingUpstream(0.002)
    d = dispatcher(upstream, ("a", "b"), 8)
    for n in range(40):  # learn both endpoints fast
        await d.run(as_class("interactive", n), "m", **_hedged())
    upstream.slow = {"a": 0.05, "b": 0.05}  # whichever goes first is raced by a hedge
    losers = []
    for n in range(5):
        result = await d.run(as_class("interactive", 100 + n), "m", **_hedged())
        assert isinstance(result, Served | Failed)
        losers.extend(result.abandoned)
    assert losers and all(a.prompt_tokens >= 1 and a.elapsed_s > 0 for a in losers)


def _hedged() -> dict[str, Any]:
    return {"deadline": time.monotonic() + 30, "hedge": True}


def _work() -> Any:
    from workers.routing import Work

    return Work(1, 16)
