"""When a job's attempts may start: capacity waits, the minimum useful time,
hedge eligibility and Retry-After. Decisions only; the dispatcher sleeps.

=================================================  =============================
situation                                          decision
=================================================  =============================
nothing usable; an endpoint is only busy           wake at a completion, or at
                                                   ``retry_at``, or at the deadline
                                                   (whichever comes first)
nothing usable; usable again at ``retry_at``        wake then, if before the
                                                   deadline − margin; else give up
nothing usable, no known time, none busy           give up (the pick's own code)
less than :data:`MIN_ATTEMPT_S` left (after a       deadline_exceeded: an attempt
wait for capacity)                                 could not finish
the job's first attempt, its class hedges, the     hedge after the endpoint's
endpoint has enough samples                        p95 (``Router.hedge_delay``)
a retry or a class that does not hedge             no hedge
an attempt answered with Retry-After               this job returns to a tried
                                                   endpoint only after it
=================================================  =============================
"""

from __future__ import annotations

from schemas.errors import ErrorCode
from workers.routing.config import Work
from workers.routing.router import Router
from workers.routing.steps import GiveUp, Progress
from workers.routing.values import NoChoice

__all__ = [
    "MIN_ATTEMPT_S",
    "RECHECK_S",
    "after_failure",
    "capacity_wake",
    "hedge_after",
    "too_late",
]

RECHECK_S = 0.001
"""Shortest wait before picking again when the known time has already come."""

MIN_ATTEMPT_S = 0.05
"""Don't start a first attempt with less time than this before the deadline."""


def capacity_wake(
    choice: NoChoice, *, now: float, deadline: float, margin_s: float
) -> float | None:
    """When to pick again after ``choice`` said nothing is usable; None: give up now.

    The dispatcher also wakes early when any attempt ends (a slot frees).
    """
    limit = deadline - margin_s
    if limit <= now:
        return None
    if choice.on_completion:
        # A slot may free on a completion, before any known time.
        wake = limit if choice.retry_at is None else min(choice.retry_at, limit)
    elif choice.retry_at is not None and choice.retry_at < limit:
        wake = choice.retry_at
    else:
        return None
    # ``retry_at`` was read at the pick, ``now`` after it: a time already past (a
    # window entry a few µs from leaving) means it has freed. Pick again, after
    # at least RECHECK_S so that a stale time can never spin the loop.
    return max(wake, now + RECHECK_S)


def too_late(*, now: float, deadline: float, margin_s: float) -> GiveUp | None:
    """Give up if an attempt started now could not finish before the deadline."""
    if deadline - margin_s - now < MIN_ATTEMPT_S:
        # A slot freed only as the deadline came.
        return GiveUp(ErrorCode.DEADLINE_EXCEEDED, "deadline passed waiting for capacity")
    return None


def hedge_after(
    progress: Progress, *, hedges: bool, router: Router, endpoint: str, work: Work, model: str
) -> float | None:
    """Seconds after which the attempt just started at ``endpoint`` may be hedged."""
    if not hedges or progress.attempts != 1:  # only a job's first attempt may hedge
        return None
    return router.hedge_delay(endpoint, work=work, model=model)


def after_failure(progress: Progress, *, retry_after_s: float | None, now: float) -> Progress:
    """The progress after a failed attempt: its Retry-After holds for this job,
    whatever the router decides for the endpoint."""
    if retry_after_s is None:
        return progress
    return progress.told_to_wait(now + retry_after_s)
