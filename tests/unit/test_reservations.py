"""Every reservation an attempt takes is handed back, whatever fails and wherever.

A property test drives the Dispatcher through jobs in which one step of an
attempt fails — the router's own calls, serialising the body, the upstream
call (with an upstream failure, a bug, or a cancellation), the telemetry hook
— and checks that afterwards no endpoint has anything in flight. Before the
fix, a body that parsed but could not be serialised again left its slot taken
for good, and four such jobs wedged a worker.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from schemas.codec import Job
from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.attempts import Dispatcher
from workers.errors import UpstreamFailure
from workers.events import Event
from workers.providers import Adapter, Call, UpstreamReply, adapter_for
from workers.routing import EndpointSpec, FailureKind, RetryBudget, Router, Work

REPLY = UpstreamReply({"choices": [{"message": {"content": "hi"}}]}, 5, 16)
ENDPOINTS = ("a", "b", "c")

# Where an attempt can fail, and how.
STEPS = ("begin", "attempt_timeout", "hedge_delay", "serialise", "upstream", "hook", "none")
RAISES = ("upstream_failure", "bug", "cancel", "bad_request")


class Injected(Exception):
    """The failure a test plants."""


class FaultyRouter(Router):
    """A router whose ``fault`` method raises on its ``at``-th call."""

    fault: str | None = None
    at = 0
    calls: dict[str, int]

    def _maybe(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.fault == name and self.calls[name] == self.at:
            raise Injected(name)

    def begin(self, endpoint: str, **kwargs: Any) -> Any:
        self._maybe("begin")
        return super().begin(endpoint, **kwargs)

    def attempt_timeout(self, endpoint: str, **kwargs: Any) -> float:
        self._maybe("attempt_timeout")
        return super().attempt_timeout(endpoint, **kwargs)

    def hedge_delay(self, endpoint: str, **kwargs: Any) -> float | None:
        self._maybe("hedge_delay")
        delay = super().hedge_delay(endpoint, **kwargs)
        return 0.001 if delay is None else delay  # hedge early: more attempts in flight


class FaultyUpstream:
    def __init__(self, at: int, how: str, enabled: bool) -> None:
        self.at, self.how, self.enabled = at, how, enabled
        self.n = 0

    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        self.n += 1
        await asyncio.sleep(0.002 * (self.n % 3))
        if self.enabled and self.n == self.at:
            if self.how == "upstream_failure":
                raise UpstreamFailure(FailureKind.SERVER_ERROR, "503", status=503)
            if self.how == "bad_request":
                raise UpstreamFailure(FailureKind.BAD_REQUEST, "400", status=400)
            if self.how == "cancel":
                raise asyncio.CancelledError
            raise Injected("upstream")
        return REPLY

    async def aclose(self) -> None:
        pass


def _job(body: dict[str, Any]) -> Job:
    now_ms = int(time.time() * 1000)
    return Job(
        job_id="j1",
        correlation_id="j1",
        reply_to="replies",
        sla_class="interactive",
        model="m",
        body=body,
        output_cap=16,
        prompt_chars=2,
        published_ms=now_ms,
        deadline_ms=now_ms + 10_000,
    )


def _deep(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = [value]
    return value


async def _run(step: str, at: int, how: str, hedge: bool, jobs: int) -> Router:
    specs = [EndpointSpec(name=n, models={"m": "m"}, max_concurrency=2) for n in ENDPOINTS]
    router = FaultyRouter(specs, {}, rand=random.Random(1).random)
    router.calls = {}
    if step in ("begin", "attempt_timeout", "hedge_delay"):
        router.fault, router.at = step, at
    hook_calls = 0

    def hook(event: Event) -> None:
        nonlocal hook_calls
        hook_calls += 1
        if step == "hook" and hook_calls == at:
            raise Injected("hook")

    dispatcher = Dispatcher(
        router=router,
        budget=RetryBudget(10.0, 100.0),
        upstream=FaultyUpstream(at, how, enabled=step == "upstream"),
        adapters={
            n: adapter_for(EndpointSettings(name=n, base_url="http://127.0.0.1:9", models=["m"]))
            for n in ENDPOINTS
        },
        max_attempts=3,
        margin_s=0.01,
        clock=time.monotonic,
        rand=random.Random(2).random,
        hook=hook,
    )
    good = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    # orjson reads 1,024 levels but writes only 255: the body parses, can't be sent.
    bad = {**good, "extra": _deep(400)}

    async def one(i: int) -> None:
        body = bad if step == "serialise" and i == at % jobs else good
        await dispatcher.run(_job(body), "m", deadline=time.monotonic() + 5, hedge=hedge)

    # Warm the latency history so hedges fire, then run the jobs concurrently.
    work = Work(prompt_tokens=1, output_tokens=16)
    t = time.monotonic() - 60
    for _ in range(20):
        for name in ENDPOINTS:
            attempt = Router.begin(router, name, work=work, now=t, model="m")
            t += 0.001
            router.succeed(attempt, now=t, output_tokens=16)
    await asyncio.gather(*(one(i) for i in range(jobs)), return_exceptions=True)
    return router


@hsettings(max_examples=60, deadline=None)
@given(
    step=st.sampled_from(STEPS),
    at=st.integers(1, 6),
    how=st.sampled_from(RAISES),
    hedge=st.booleans(),
    jobs=st.integers(1, 6),
)
def test_a_failure_at_any_step_leaves_nothing_in_flight(
    step: str, at: int, how: str, hedge: bool, jobs: int
) -> None:
    router = asyncio.run(_run(step, at, how, hedge, jobs))
    now = time.monotonic()
    assert {s.name: s.in_flight for s in router.snapshot(now=now)} == dict.fromkeys(ENDPOINTS, 0)


def test_an_unserialisable_body_frees_its_slot() -> None:
    """The issue's case: the body parses but cannot be written again."""
    router = asyncio.run(_run("serialise", 1, "bug", hedge=False, jobs=4))
    assert all(s.in_flight == 0 for s in router.snapshot(now=time.monotonic()))
