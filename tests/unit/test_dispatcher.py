"""The Dispatcher carrying out the routing core's steps, on an in-process upstream."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest

from schemas.codec import Job
from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.attempts import Dispatcher, Served
from workers.errors import UpstreamFailure
from workers.events import AttemptDone, Event, Hedged
from workers.providers import Adapter, Call, UpstreamReply, adapter_for
from workers.routing import EndpointSpec, FailureKind, RetryBudget, Router, Work

REPLY = UpstreamReply({"choices": [{"message": {"content": "hi"}}]}, 5, 16)


class FakeUpstream:
    """Answers after ``latency_s[n]`` for the n-th call (the last entry after that);
    ``fail`` lists the calls (0-based) that fail with a server error."""

    def __init__(self, latency_s: list[float], fail: frozenset[int] = frozenset()) -> None:
        self.latency_s = latency_s
        self.fail = fail
        self.calls: list[tuple[str, asyncio.Task[Any] | None]] = []
        self.cancelled: list[str] = []
        self.called = asyncio.Event()

    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        n = len(self.calls)
        self.calls.append((adapter.name, asyncio.current_task()))
        self.called.set()
        try:
            await asyncio.sleep(self.latency_s[min(n, len(self.latency_s) - 1)])
        except asyncio.CancelledError:
            self.cancelled.append(adapter.name)
            raise
        if n in self.fail:
            raise UpstreamFailure(FailureKind.SERVER_ERROR, f"{adapter.name}: 503", status=503)
        return REPLY

    async def aclose(self) -> None:
        pass


def dispatcher(upstream: FakeUpstream, events: list[Event]) -> Dispatcher:
    specs = [EndpointSpec(name=n, models={"m": "m"}, max_concurrency=8) for n in ("a", "b")]
    return Dispatcher(
        router=Router(specs, {}, rand=random.Random(3).random),
        budget=RetryBudget(0.2, 10.0),
        upstream=upstream,
        adapters={
            n: adapter_for(EndpointSettings(name=n, base_url="http://127.0.0.1:9", models=["m"]))
            for n in ("a", "b")
        },
        max_attempts=3,
        margin_s=0.01,
        clock=time.monotonic,
        rand=random.Random(5).random,
        hook=events.append,
    )


def job() -> Job:
    now_ms = int(time.time() * 1000)
    return Job(
        job_id="j1",
        correlation_id="j1",
        reply_to="replies",
        sla_class="batch",
        model="m",
        body={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        output_cap=16,
        prompt_chars=2,
        published_ms=now_ms,
        deadline_ms=now_ms + 10_000,
    )


async def test_attempt_without_a_hedge_runs_in_the_callers_task() -> None:
    """No hedge to race: the attempt is awaited in place, no task of its own."""
    upstream = FakeUpstream([0.001])
    events: list[Event] = []
    result = await dispatcher(upstream, events).run(
        job(), "m", deadline=time.monotonic() + 10, hedge=False
    )
    assert isinstance(result, Served)
    assert (result.attempts, result.hedged) == (1, False)
    [(_, task)] = upstream.calls
    assert task is asyncio.current_task()
    assert [e.outcome for e in events if isinstance(e, AttemptDone)] == ["ok"]


async def test_failed_attempt_is_retried_at_the_other_endpoint() -> None:
    """A 503 is retried elsewhere; the retry, too, runs in the caller's task."""
    upstream = FakeUpstream([0.001], fail=frozenset({0}))
    events: list[Event] = []
    result = await dispatcher(upstream, events).run(
        job(), "m", deadline=time.monotonic() + 10, hedge=True
    )
    assert isinstance(result, Served)
    (first, _), (second, task) = upstream.calls
    assert {first, second} == {"a", "b"} and result.endpoint == second
    assert (result.attempts, result.hedged) == (2, False)
    assert task is asyncio.current_task()


async def test_cancelling_a_job_cancels_its_attempt_and_frees_the_endpoint() -> None:
    """Shutdown cancels the job: the upstream call is cancelled and the router told."""
    upstream = FakeUpstream([30.0])
    events: list[Event] = []
    d = dispatcher(upstream, events)
    running = asyncio.create_task(d.run(job(), "m", deadline=time.monotonic() + 60, hedge=False))
    await asyncio.wait_for(upstream.called.wait(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    [(endpoint, _)] = upstream.calls
    assert upstream.cancelled == [endpoint]
    assert [e.outcome for e in events if isinstance(e, AttemptDone)] == ["cancelled"]
    status = {s.name: s for s in d.router.snapshot(now=time.monotonic())}
    assert status[endpoint].in_flight == 0 and status[endpoint].cancelled == 1


async def test_slow_first_attempt_is_hedged_and_the_loser_cancelled() -> None:
    """Past the first endpoint's p95 a hedge goes to the other one; the first to answer
    wins and the slow attempt is cancelled."""
    upstream = FakeUpstream([30.0, 0.001])
    events: list[Event] = []
    d = dispatcher(upstream, events)
    work = Work(prompt_tokens=1, output_tokens=16)
    at = time.monotonic() - 60
    for _ in range(40):  # a latency history of ~5 ms on both endpoints
        for name in ("a", "b"):
            attempt = d.router.begin(name, work=work, now=at, model="m")
            at += 0.005
            d.router.succeed(attempt, now=at, output_tokens=16)
    assert d.router.hedge_delay("a", work=work, model="m") is not None
    result = await asyncio.wait_for(
        d.run(job(), "m", deadline=time.monotonic() + 10, hedge=True), 5
    )
    assert isinstance(result, Served)
    (slow, _), (fast, _) = upstream.calls
    assert slow != fast and result.endpoint == fast
    assert (result.attempts, result.hedged) == (2, True)
    assert upstream.cancelled == [slow]
    assert [e.endpoint for e in events if isinstance(e, Hedged)] == [fast]
