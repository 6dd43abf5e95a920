"""Run one job's upstream attempts: first try, retries, hedges.

The routing core decides (which endpoint, whether to retry, wait or give up,
whether to hedge); this module only carries the decisions out with asyncio:
starting attempts, timers, cancelling the loser of a hedge.

A streamed job's attempt succeeds at its first token (:class:`Streaming`):
retries and hedges happen before the caller has seen anything. The attempt's
reservation (endpoint slot, rate window) then stays taken until the stream
ends: :meth:`Dispatcher.end_stream` hands it back, once, with the whole
answer's latency sample.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from schemas.codec import Job
from schemas.contract import JobKind, SlaClass
from schemas.errors import ErrorCode
from workers.errors import UpstreamFailure
from workers.events import NOOP, AttemptDone, Hedged, Hook, Retried
from workers.providers import Adapter, UpstreamReply
from workers.routing import (
    Attempt,
    Choice,
    FailureKind,
    GiveUp,
    NoChoice,
    Progress,
    RetryBudget,
    Router,
    Step,
    TryNow,
    Wait,
    Work,
    next_step,
    should_hedge,
)
from workers.routing.pacing import after_failure, capacity_wake, hedge_after, too_late
from workers.upstream import Upstream
from workers.upstream_streams import Opened, open_body

__all__ = ["Abandoned", "Answer", "Dispatcher", "Failed", "Served", "Streaming"]

log = logging.getLogger("llmq.worker")


@dataclass(frozen=True, slots=True)
class Abandoned:
    """An attempt that reached the upstream but whose answer nobody read: a
    hedge's loser, or one that timed out. Providers bill it all the same."""

    endpoint: str
    model: str
    prompt_tokens: int
    elapsed_s: float


@dataclass(slots=True)
class Streaming:
    """A streamed attempt past its first token: the open stream and the
    reservation it holds until :meth:`Dispatcher.end_stream`."""

    opened: Opened
    attempt: Attempt
    choice: Choice
    work: Work
    first_token_s: float
    """From the attempt's start to its first token."""
    ended: bool = False


Answer = UpstreamReply | Streaming


@dataclass(frozen=True, slots=True)
class Served:
    reply: Answer
    endpoint: str
    model: str
    attempts: int
    hedged: bool
    upstream_ms: float
    abandoned: tuple[Abandoned, ...] = ()
    via: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    code: ErrorCode
    message: str
    attempts: int
    hedged: bool
    endpoint: str | None
    model: str | None
    abandoned: tuple[Abandoned, ...] = ()


_Waiters = dict[asyncio.Future[None], None]


@dataclass(slots=True)
class _Running:
    choice: Choice
    task: asyncio.Task[Answer]
    started: float


class Dispatcher:
    """Routes jobs over the endpoints with retries and hedging.

    Every attempt takes its endpoint slot (``Router.begin``) in the same step
    as the pick that chose it, before any ``await``: a waiter woken with the
    others cannot pass the limit check on a slot another waiter is about to
    take. Waiters for a slot are woken interactive first (their picks run
    before any batch waiter's), and the core keeps batch off the last slots
    of an endpoint (``EndpointState.blocked``).
    """

    def __init__(
        self,
        *,
        router: Router,
        budget: RetryBudget,
        upstream: Upstream,
        adapters: Mapping[str, Adapter],
        max_attempts: int,
        margin_s: float,
        clock: Callable[[], float],
        rand: Callable[[], float],
        hook: Hook = NOOP,
    ) -> None:
        self.router = router
        self.retry_budget = budget
        self._upstream = upstream
        self._adapters = adapters
        self._max_attempts = max_attempts
        self._margin_s = margin_s
        self._clock = clock
        self._rand = rand
        self._hook = hook
        self._waiting: tuple[_Waiters, _Waiters] = ({}, {})
        """Jobs waiting for a slot: (interactive, batch), each an ordered set."""

    async def run(self, job: Job, model: str, *, deadline: float, hedge: bool) -> Served | Failed:
        """Serve ``job`` (``model`` is canonical) before ``deadline`` (monotonic seconds)."""
        work = Work(
            prompt_tokens=max(1, job.prompt_chars // 4),
            output_tokens=job.output_cap,
            by_input=job.kind is JobKind.EMBEDDING,
            batch=job.sla_class == SlaClass.BATCH,
            stream=job.stream,
        )
        self.retry_budget.record_request(self._clock())
        choice = await self._first_choice(model, work, deadline)
        if isinstance(choice, NoChoice):
            return Failed(choice.code, choice.reason, 0, False, None, None)
        late = too_late(now=self._clock(), deadline=deadline, margin_s=self._margin_s)
        if late is not None:
            return Failed(late.code, late.message, 0, False, None, None)
        if log.isEnabledFor(logging.DEBUG):
            self._explain(job, model, work)

        progress = Progress(attempts=0, tried=frozenset(), deadline=deadline)
        running: list[_Running] = []
        lost: list[Abandoned] = []
        winner: _Running | None = None
        try:
            while True:
                progress = progress.attempted(choice.endpoint)
                delay = hedge_after(
                    progress,
                    hedges=hedge,
                    router=self.router,
                    endpoint=choice.endpoint,
                    work=work,
                    model=model,
                )
                if delay is None:
                    # Nothing to race: the attempt runs in this task, no task or timer of
                    # its own (its timeout is the upstream call's, as in a task).
                    started = self._clock()
                    attempt = self._begin(choice, work, started)
                    try:
                        reply = await self._attempt(choice, attempt, job, work, deadline, lost)
                    except UpstreamFailure as exc:
                        failure, last = exc, choice
                    else:
                        return self._served(reply, choice, started, progress, lost)
                else:
                    running.append(self._start(choice, job, work, deadline, lost))
                    done, progress = await self._raced(
                        running, job, model, work, deadline, progress, delay, lost
                    )
                    error = done.task.exception()
                    if error is None:
                        winner = done
                        await self._cancel_all(running, keep=done)  # losers go in lost
                        result = done.task.result()
                        return self._served(result, done.choice, done.started, progress, lost)
                    assert isinstance(error, UpstreamFailure)
                    failure, last = error, done.choice
                step, progress = await self._decided(progress, failure, model, work)
                if isinstance(step, GiveUp):
                    return Failed(
                        step.code,
                        f"{step.message}; last: {failure}",
                        progress.attempts,
                        progress.hedged,
                        last.endpoint,
                        last.model,
                        tuple(lost),
                    )
                choice = step.choice
                self._hook(Retried(choice.endpoint, failure.kind.value))
        finally:
            await self._cancel_all(running, keep=winner)  # on shutdown, or a bug

    async def _raced(
        self,
        running: list[_Running],
        job: Job,
        model: str,
        work: Work,
        deadline: float,
        progress: Progress,
        delay: float,
        lost: list[Abandoned],
    ) -> tuple[_Running, Progress]:
        """Race the first attempt (``running[-1]``) against its hedge timer; a
        hedge joins when the timer fires and the core agrees. The first
        success, or the last to fail."""
        hedge_at = running[-1].started + delay
        done = await self._race(running, model, work, deadline, progress, hedge_at)
        if isinstance(done, Choice):  # the hedge timer fired and the core agreed
            progress = replace(progress.attempted(done.endpoint), hedged=True)
            self._hook(Hedged(done.endpoint))
            running.append(self._start(done, job, work, deadline, lost))
            done = await self._race(running, model, work, deadline, progress, None)
        assert isinstance(done, _Running)
        return done, progress

    async def _decided(
        self, progress: Progress, failure: UpstreamFailure, model: str, work: Work
    ) -> tuple[TryNow | GiveUp, Progress]:
        """The core's next step after ``failure``, its waits carried out."""
        progress = after_failure(progress, retry_after_s=failure.retry_after_s, now=self._clock())
        step = self._next(progress, failure, model, work)
        while isinstance(step, Wait):
            await asyncio.sleep(step.delay_s)
            progress = progress.waited()
            step = self._next(progress, failure, model, work)
        return step, progress

    def _served(
        self,
        reply: Answer,
        choice: Choice,
        started: float,
        progress: Progress,
        lost: list[Abandoned],
    ) -> Served:
        return Served(
            reply,
            choice.endpoint,
            choice.model,
            progress.attempts,
            progress.hedged,
            (self._clock() - started) * 1000,
            tuple(lost),
            choice.via,
        )

    def _next(self, progress: Progress, failure: UpstreamFailure, model: str, work: Work) -> Step:
        return next_step(
            progress,
            failure.kind,
            router=self.router,
            budget=self.retry_budget,
            model=model,
            work=work,
            now=self._clock(),
            rand=self._rand,
            max_attempts=self._max_attempts,
            margin_s=self._margin_s,
        )

    async def _first_choice(self, model: str, work: Work, deadline: float) -> Choice | NoChoice:
        """Pick; when nothing is usable yet, wait for it within the deadline.

        A cooldown or ejection ends at a known time (``retry_at``); a busy
        endpoint frees a slot when one of its attempts ends, so wait for that.
        """
        choice = self.router.pick(model, work=work, now=self._clock(), rand=self._rand)
        while isinstance(choice, NoChoice):
            now = self._clock()
            wake = capacity_wake(choice, now=now, deadline=deadline, margin_s=self._margin_s)
            if wake is None:
                return choice
            await self._released(wake - now, batch=work.batch)
            choice = self.router.pick(model, work=work, now=self._clock(), rand=self._rand)
        return choice

    async def _released(self, timeout_s: float, *, batch: bool) -> None:
        """Sleep until some attempt ends (a slot frees) or ``timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting[batch][waiter] = None
        timer = loop.call_later(timeout_s, _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            # Woken by a release, it is no longer in the current set; by its timer or
            # a cancellation, it still is.
            self._waiting[batch].pop(waiter, None)

    def _attempt_ended(self) -> None:
        """A slot may have freed: wake the interactive waiters now and the batch
        waiters one loop turn later, so every interactive pick runs first."""
        interactive, batch = self._waiting
        if not interactive and not batch:
            return
        self._waiting = ({}, {})
        for waiter in interactive:
            _wake(waiter)
        if batch:
            asyncio.get_running_loop().call_soon(_wake_all, batch)

    def _begin(self, choice: Choice, work: Work, now: float) -> Attempt:
        return self.router.begin(choice.endpoint, work=work, now=now, model=choice.model)

    def _start(
        self, choice: Choice, job: Job, work: Work, deadline: float, lost: list[Abandoned]
    ) -> _Running:
        started = self._clock()
        attempt = self._begin(choice, work, started)
        task = asyncio.create_task(self._attempt(choice, attempt, job, work, deadline, lost))
        return _Running(choice, task, started)

    async def _race(
        self,
        running: list[_Running],
        model: str,
        work: Work,
        deadline: float,
        progress: Progress,
        hedge_at: float | None,
    ) -> _Running | Choice:
        """Wait for the first success, or for every attempt to fail.

        With ``hedge_at`` (the job's first attempt, on a class that hedges) a
        timer runs beside it; when it fires and the core agrees, the hedge's
        choice is returned.
        """
        while True:
            pending = [r.task for r in running if not r.task.done()]
            if not pending:
                return running[-1]  # all failed: report the last to start
            timeout = None if hedge_at is None else max(0.0, hedge_at - self._clock())
            done, _ = await asyncio.wait(
                pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for r in running:
                if r.task in done and r.task.exception() is None:
                    return r
            if done:
                continue
            if hedge_at is not None and self._clock() < hedge_at:
                continue  # the loop's timer fired a hair early (uvloop): wait again
            hedge_at = None
            first = running[0]
            second = should_hedge(
                first.choice,
                router=self.router,
                budget=self.retry_budget,
                model=model,
                work=work,
                now=self._clock(),
                rand=self._rand,
                started=first.started,
                deadline=deadline,
                margin_s=self._margin_s,
                exclude=progress.tried,
            )
            if second is not None:
                return second
            # Declined. If only because the delay grew with newer samples, re-arm.
            later = self.router.hedge_delay(first.choice.endpoint, work=work, model=model)
            if later is not None and first.started + later > self._clock():
                hedge_at = first.started + later

    async def _attempt(
        self,
        choice: Choice,
        attempt: Attempt,
        job: Job,
        work: Work,
        deadline: float,
        lost: list[Abandoned],
    ) -> Answer:
        """One upstream call on the reservation ``attempt`` (slot, rate window,
        probe), which every path below hands back exactly once: success, an
        upstream failure, or anything else (cancellation, a bug) as a cancel.
        A stream past its first token takes the reservation with it."""
        router = self.router
        now = attempt.started
        try:
            timeout = router.attempt_timeout(choice.endpoint, work=work, remaining_s=deadline - now)
            adapter = self._adapters[choice.endpoint]
            if work.stream:
                opened = await self._upstream.open_stream(
                    adapter,
                    job.kind,
                    adapter.call(job.kind, open_body(job.body, adapter), choice.upstream_model),
                    timeout_s=max(timeout, 0.001),
                    traceparent=job.traceparent,
                )
                return Streaming(opened, attempt, choice, work, self._clock() - now)
            reply = await self._upstream.send(
                adapter,
                job.kind,
                adapter.call(job.kind, job.body, choice.upstream_model),
                timeout_s=max(timeout, 0.001),
                traceparent=job.traceparent,
            )
        except UpstreamFailure as failure:
            self._attempt_ended()
            end = self._clock()
            router.fail(attempt, failure.kind, now=end, retry_after_s=failure.retry_after_s)
            self._hook(AttemptDone(choice.endpoint, choice.model, failure.kind.value, end - now))
            if failure.kind is FailureKind.TIMEOUT:
                lost.append(Abandoned(choice.endpoint, choice.model, work.prompt_tokens, end - now))
            raise
        except BaseException:
            self._attempt_ended()
            end = self._clock()
            router.cancel(attempt, now=end)
            self._hook(AttemptDone(choice.endpoint, choice.model, "cancelled", end - now))
            lost.append(Abandoned(choice.endpoint, choice.model, work.prompt_tokens, end - now))
            raise
        self._attempt_ended()
        end = self._clock()
        router.succeed(attempt, now=end, output_tokens=reply.completion_tokens)
        self._hook(AttemptDone(choice.endpoint, choice.model, "ok", end - now))
        return reply

    def end_stream(
        self,
        streaming: Streaming,
        *,
        output_tokens: int | None = None,
        failure: FailureKind | None = None,
        cancelled: bool = False,
    ) -> None:
        """Hand a stream's reservation back, once: the whole answer's latency
        sample on success, the failure, or a cancel (no sample)."""
        if streaming.ended:
            return
        streaming.ended = True
        self._attempt_ended()
        end = self._clock()
        attempt, choice = streaming.attempt, streaming.choice
        if cancelled:
            self.router.cancel(attempt, now=end)
            outcome = "cancelled"
        elif failure is not None:
            self.router.fail(attempt, failure, now=end)
            outcome = failure.value
        else:
            self.router.succeed(attempt, now=end, output_tokens=output_tokens)
            outcome = "ok"
        self._hook(AttemptDone(choice.endpoint, choice.model, outcome, end - attempt.started))

    async def _cancel_all(self, running: list[_Running], keep: _Running | None = None) -> None:
        """Cancel attempts still running (a hedge's loser, or all on shutdown) and
        wait; close the streams of attempts that reached their first token but lost."""
        for r in running:
            if not r.task.done():
                r.task.cancel()
        for r in running:
            if not r.task.done():
                with contextlib.suppress(asyncio.CancelledError, UpstreamFailure):
                    await r.task
            if r is keep or r.task.cancelled() or r.task.exception() is not None:
                continue
            answer = r.task.result()
            if isinstance(answer, Streaming) and not answer.ended:
                self.end_stream(answer, cancelled=True)
                await answer.opened.rest.aclose()

    def _explain(self, job: Job, model: str, work: Work) -> None:
        candidates = self.router.explain(model, work=work, now=self._clock())
        log.debug(
            "job %s candidates: %s",
            job.job_id,
            "; ".join(
                f"{c.name} cost={c.cost:.4f}" + (f" skipped={c.skip}" if c.skip else "")
                for c in candidates
            ),
        )


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _wake_all(waiters: _Waiters) -> None:
    for waiter in waiters:
        _wake(waiter)
