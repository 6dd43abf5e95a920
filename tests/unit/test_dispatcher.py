"""The Dispatcher carrying out the routing core's steps, on an in-process upstream."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any

import pytest

from schemas.codec import Job
from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.attempts import Dispatcher, Served, Streaming
from workers.errors import UpstreamFailure
from workers.events import AttemptDone, Event, Hedged
from workers.providers import Adapter, Call, UpstreamReply, adapter_for
from workers.routing import EndpointSpec, FailureKind, RetryBudget, Router, Work
from workers.upstream_streams import Opened

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


class FakeRest:
    """The rest of an opened stream: records its close."""

    def __init__(self) -> None:
        self.closed = False

    async def next(self, timeout_s: float | None) -> list[Any]:
        return []

    async def aclose(self) -> None:
        self.closed = True


class StreamingUpstream(FakeUpstream):
    """Opens streams after ``latency_s``, the first token included."""

    def __init__(self, latency_s: list[float], fail: frozenset[int] = frozenset()) -> None:
        super().__init__(latency_s, fail)
        self.opened: list[FakeRest] = []

    async def open_stream(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> Opened:
        await self.send(adapter, kind, call, timeout_s=timeout_s, traceparent=traceparent)
        rest = FakeRest()
        self.opened.append(rest)
        return Opened([], rest)


def streamed_job() -> Job:
    return replace(job(), stream=True, sla_class="interactive")


async def test_a_streamed_attempt_keeps_its_reservation_until_the_stream_ends() -> None:
    """At the first token the attempt is served, but the endpoint's slot stays
    taken until end_stream hands it back, once, with the whole answer's sample."""
    upstream = StreamingUpstream([0.001])
    events: list[Event] = []
    d = dispatcher(upstream, events)
    result = await d.run(streamed_job(), "m", deadline=time.monotonic() + 10, hedge=False)
    assert isinstance(result, Served) and isinstance(result.reply, Streaming)
    streaming = result.reply
    status = {s.name: s for s in d.router.snapshot(now=time.monotonic())}
    assert status[result.endpoint].in_flight == 1
    assert not [e for e in events if isinstance(e, AttemptDone)]
    d.end_stream(streaming, output_tokens=12)
    d.end_stream(streaming, cancelled=True)  # a second end is a no-op
    status = {s.name: s for s in d.router.snapshot(now=time.monotonic())}
    assert status[result.endpoint].in_flight == 0
    assert [e.outcome for e in events if isinstance(e, AttemptDone)] == ["ok"]


@pytest.mark.parametrize(
    ("how", "outcome"),
    [({"failure": FailureKind.SERVER_ERROR}, "server_error"), ({"cancelled": True}, "cancelled")],
)
async def test_a_stream_that_ends_badly_hands_its_reservation_back(
    how: dict[str, Any], outcome: str
) -> None:
    upstream = StreamingUpstream([0.001])
    events: list[Event] = []
    d = dispatcher(upstream, events)
    result = await d.run(streamed_job(), "m", deadline=time.monotonic() + 10, hedge=False)
    assert isinstance(result, Served) and isinstance(result.reply, Streaming)
    d.end_stream(result.reply, **how)
    status = {s.name: s for s in d.router.snapshot(now=time.monotonic())}
    assert status[result.endpoint].in_flight == 0
    assert [e.outcome for e in events if isinstance(e, AttemptDone)] == [outcome]


async def test_a_streamed_failure_before_the_first_token_is_retried_elsewhere() -> None:
    upstream = StreamingUpstream([0.001], fail=frozenset({0}))
    events: list[Event] = []
    d = dispatcher(upstream, events)
    result = await d.run(streamed_job(), "m", deadline=time.monotonic() + 10, hedge=False)
    assert isinstance(result, Served) and isinstance(result.reply, Streaming)
    assert result.attempts == 2
    assert [e.outcome for e in events if isinstance(e, AttemptDone)] == ["server_error"]


async def test_a_hedge_loser_that_opened_its_stream_is_closed_and_released() -> None:
    """Two attempts of one streamed job both reached their first token: the one
    not kept has its stream closed and its reservation cancelled."""
    upstream = StreamingUpstream([0.001])
    events: list[Event] = []
    d = dispatcher(upstream, events)
    work = Work(prompt_tokens=1, output_tokens=16, stream=True)
    running = [
        d._start(
            d.router.pick("m", work=work, now=time.monotonic(), rand=lambda: 0.5),
            streamed_job(),
            work,
            time.monotonic() + 10,
            [],
        )
        for _ in range(2)
    ]  # type: ignore[arg-type]
    await asyncio.gather(*(r.task for r in running))
    await d._cancel_all(running, keep=running[0])
    kept, lost = (r.task.result() for r in running)
    assert isinstance(kept, Streaming) and isinstance(lost, Streaming)
    assert lost.ended and not kept.ended
    assert [rest.closed for rest in upstream.opened] == [False, True]
    assert [e.outcome for e in events if isinstance(e, AttemptDone)] == ["cancelled"]
    d.end_stream(kept, output_tokens=3)
    assert sum(s.in_flight for s in d.router.snapshot(now=time.monotonic())) == 0
