"""What a job does after a failed attempt, and whether to hedge: decide, then do.

:func:`next_step` returns a :class:`Step` the worker carries out:

=========================================  ======================================
situation                                  step
=========================================  ======================================
request rejected (400, 413)                GiveUp(upstream_rejected)
deadline − margin already reached          GiveUp(deadline_exceeded)
``max_attempts`` used                      GiveUp(upstream_error; over_capacity
                                           after a 429; upstream_rejected after
                                           401/403/404)
an untried endpoint usable now             TryNow(it), if the retry budget allows
                                           and its predicted time fits the deadline
only tried endpoints usable now            Wait(full-jitter backoff); after a wait
                                           (``progress.waits`` > 0) TryNow(it), not
                                           before ``progress.not_before`` (the
                                           Retry-After of this job's last 429)
nothing usable; usable again at retry_at   Wait(until retry_at, spread a little)
nothing usable, no known time              Wait(full-jitter backoff)
a retry can't fit before the deadline      GiveUp(over_capacity / no_healthy_endpoint,
(predicted time or the wait too long)      else the failures' code: upstream_error,
                                           over_capacity after a 429)
=========================================  ======================================

After a ``Wait``, call ``next_step`` again with ``progress.waited()`` and the
same failure kind. The retry budget is spent only when a ``TryNow`` is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from schemas.errors import ErrorCode
from workers.routing.backoff import backoff
from workers.routing.config import Work
from workers.routing.failures import FailureKind
from workers.routing.retry_budget import RetryBudget
from workers.routing.router import Router
from workers.routing.values import Choice, NoChoice

__all__ = ["GiveUp", "Progress", "Step", "TryNow", "Wait", "next_step", "should_hedge"]


@dataclass(frozen=True, slots=True)
class Progress:
    """One job's attempts so far."""

    attempts: int
    """Attempts started, hedges included."""
    tried: frozenset[str]
    """Endpoints attempted."""
    deadline: float
    """The job's deadline on the router's clock (``now``)."""
    hedged: bool = False
    waits: int = 0
    """Waits since the job started (each doubles the next backoff's ceiling)."""
    not_before: float = float("-inf")
    """A tried endpoint said (Retry-After) not to send this job again before then."""

    def attempted(self, endpoint: str) -> Progress:
        """The progress after starting an attempt at ``endpoint``."""
        return replace(self, attempts=self.attempts + 1, tried=self.tried | {endpoint})

    def waited(self) -> Progress:
        """The progress after carrying out a ``Wait``."""
        return replace(self, waits=self.waits + 1)

    def told_to_wait(self, until: float) -> Progress:
        """An attempt was answered with a Retry-After ending at ``until``.

        Honoured per job: this job goes to another endpoint at once, and back
        to a tried one only after ``until``; whether the *endpoint* cools down
        for everyone is the router's decision (``Cooldown``, ``AimdLimit``).
        """
        return replace(self, not_before=max(self.not_before, until))


@dataclass(frozen=True, slots=True)
class TryNow:
    """Start an attempt at ``choice`` now."""

    choice: Choice


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep ``delay_s``, then call ``next_step`` again with ``progress.waited()``."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """End the job with an error reply (and a dead letter)."""

    code: ErrorCode
    message: str


Step = TryNow | Wait | GiveUp


def _exhausted(kind: FailureKind) -> ErrorCode:
    if kind is FailureKind.RATE_LIMITED:
        return ErrorCode.OVER_CAPACITY
    if kind.marks_unusable:
        return ErrorCode.UPSTREAM_REJECTED
    return ErrorCode.UPSTREAM_ERROR


def next_step(
    progress: Progress,
    kind: FailureKind,
    *,
    router: Router,
    budget: RetryBudget,
    model: str,
    work: Work,
    now: float,
    rand: Callable[[], float],
    max_attempts: int,
    margin_s: float,
) -> Step:
    """The decision after an attempt failed with ``kind`` (see the module table)."""
    if not kind.retriable:
        return GiveUp(ErrorCode.UPSTREAM_REJECTED, f"upstream rejected the request ({kind.value})")
    left = progress.deadline - now - margin_s
    if left <= 0:
        return GiveUp(
            ErrorCode.DEADLINE_EXCEEDED, f"deadline reached after {progress.attempts} attempt(s)"
        )
    if progress.attempts >= max_attempts:
        return GiveUp(
            _exhausted(kind), f"{progress.attempts} attempt(s) failed, last: {kind.value}"
        )
    picked = router.pick(model, work=work, now=now, rand=rand, exclude=progress.tried)
    if isinstance(picked, NoChoice):
        if picked.code is ErrorCode.UNKNOWN_MODEL:
            return GiveUp(picked.code, picked.reason)
        anywhere = router.pick(model, work=work, now=now, rand=rand)
        if isinstance(anywhere, Choice) and progress.waits and now >= progress.not_before:
            picked = anywhere  # backed off already: a tried endpoint will do
        else:
            return _wait(progress, anywhere, kind, now=now, left=left, rand=rand, router=router)
    if picked.predicted_s > left:
        # The deadline has not passed: the failures are the cause, so their code.
        return GiveUp(
            _exhausted(kind),
            f"last: {kind.value}; no retry: {picked.endpoint} needs"
            f" ~{picked.predicted_s:.3g} s, {left:.3g} s left before the deadline",
        )
    if not budget.try_spend(now, batch=work.batch):
        return GiveUp(_exhausted(kind), f"retry budget exhausted, last: {kind.value}")
    return TryNow(picked)


def _wait(
    progress: Progress,
    anywhere: Choice | NoChoice,
    kind: FailureKind,
    *,
    now: float,
    left: float,
    rand: Callable[[], float],
    router: Router,
) -> Step:
    cfg = router.config
    retry = max(progress.attempts - 1, 0) + progress.waits
    backed_off = backoff(
        retry, rand=rand(), base_s=cfg.backoff_base_s, cap_s=cfg.backoff_cap_s, remaining_s=left
    )
    if isinstance(anywhere, NoChoice) and anywhere.retry_at is not None:
        until = max(anywhere.retry_at - now, 0.0)
        # Jobs waiting on the same cooldown would all wake at once; spread them.
        delay = until + rand() * min(until, cfg.backoff_base_s)
        if anywhere.on_completion:
            # A busy slot or a cold probe can free on a completion: look again
            # after a backoff, not only at retry_at.
            delay = min(delay, backed_off)
    elif isinstance(anywhere, Choice) and now < progress.not_before:
        # Only tried endpoints, and this job was told to stay away until not_before:
        # look for an untried one again after a backoff, at the latest by then.
        delay = min(backed_off, progress.not_before - now)
    else:
        delay = backed_off
    if delay >= left:
        if isinstance(anywhere, NoChoice):
            return GiveUp(anywhere.code, f"{anywhere.reason}; not before the deadline")
        return GiveUp(
            _exhausted(kind), f"last: {kind.value}; no time left before the deadline to retry"
        )
    return Wait(delay)


def should_hedge(
    primary: Choice,
    *,
    router: Router,
    budget: RetryBudget,
    model: str,
    work: Work,
    now: float,
    rand: Callable[[], float],
    started: float | None = None,
    deadline: float | None = None,
    margin_s: float = 0.0,
    exclude: frozenset[str] = frozenset(),
) -> Choice | None:
    """A second endpoint for a job whose first attempt is slow, or None.

    Call when ``router.hedge_delay`` (the primary's p95) has passed; with
    ``started`` the delay is checked here too. Hedges go to another endpoint
    of the same model, only when its predicted time fits before ``deadline``
    (if given) and the retry budget allows; the budget is spent on success.
    """
    if started is not None:
        delay = router.hedge_delay(primary.endpoint, work=work, model=primary.model)
        if delay is None or now - started < delay:
            return None
    picked = router.pick(model, work=work, now=now, rand=rand, exclude=exclude | {primary.endpoint})
    if isinstance(picked, NoChoice) or picked.model != primary.model:
        return None
    if deadline is not None and picked.predicted_s > deadline - now - margin_s:
        return None
    if not budget.try_spend(now, batch=work.batch):
        return None
    return picked
