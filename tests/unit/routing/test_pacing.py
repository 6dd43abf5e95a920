"""pacing: capacity waits, the minimum useful time, hedge eligibility, Retry-After."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from schemas.errors import ErrorCode
from workers.routing import NoChoice, Progress, RoutingConfig, Work
from workers.routing.pacing import (
    MIN_ATTEMPT_S,
    after_failure,
    capacity_wake,
    hedge_after,
    too_late,
)

Make = Callable[..., Any]
WORK = Work(10, 200)


def busy(retry_at: float | None = None, *, on_completion: bool = False) -> NoChoice:
    return NoChoice(ErrorCode.OVER_CAPACITY, "full", retry_at, on_completion)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (busy(on_completion=True), 19.0),  # a completion, else the deadline − margin
        (busy(12.0, on_completion=True), 12.0),  # or the known time, if sooner
        (busy(25.0, on_completion=True), 19.0),
        (busy(12.0), 12.0),  # usable again by itself before the deadline
        (busy(19.5), None),  # ... after it: give up now
        (busy(None), None),  # nothing will free itself, nothing busy
        # Already past (read at the pick, a few µs before ``now``): it has freed, so
        # pick again at once (after 1 ms: a stale time cannot spin the loop). The
        # worker used to give up here: a job next in line for an rpm window ended
        # over_capacity when the window's oldest entry left it in that instant.
        (busy(9.0), 10.001),
        (busy(9.0, on_completion=True), 10.001),
    ],
)
def test_capacity_wake(choice: NoChoice, expected: float | None) -> None:
    assert capacity_wake(choice, now=10.0, deadline=20.0, margin_s=1.0) == expected


def test_no_wait_past_the_deadline() -> None:
    assert capacity_wake(busy(on_completion=True), now=19.5, deadline=20.0, margin_s=1.0) is None


def test_a_slot_freed_at_the_deadline_is_too_late() -> None:
    assert too_late(now=10.0, deadline=11.0 + MIN_ATTEMPT_S * 2, margin_s=1.0) is None
    late = too_late(now=10.0, deadline=11.0 + MIN_ATTEMPT_S / 2, margin_s=1.0)
    assert late is not None and late.code is ErrorCode.DEADLINE_EXCEEDED


def test_only_a_first_attempt_of_a_hedging_class_hedges(make: Make) -> None:
    h = make(["a"], config=RoutingConfig(hedge_min_samples=20))
    first = Progress(attempts=1, tried=frozenset({"a"}), deadline=100.0)
    kw: dict[str, Any] = {"router": h.router, "endpoint": "a", "work": WORK, "model": "m"}
    assert hedge_after(first, hedges=True, **kw) is None  # no samples yet
    for _ in range(40):
        h.serve("a", 1.0, tokens=200, gap_s=0.001)
    assert hedge_after(first, hedges=True, **kw) == pytest.approx(1.0, rel=0.05)
    assert hedge_after(first, hedges=False, **kw) is None
    retry = first.attempted("b")
    assert hedge_after(retry, hedges=True, **kw) is None


def test_retry_after_holds_for_this_job() -> None:
    progress = Progress(attempts=1, tried=frozenset({"a"}), deadline=100.0)
    assert after_failure(progress, retry_after_s=None, now=10.0) is progress
    told = after_failure(progress, retry_after_s=3.0, now=10.0)
    assert told.not_before == 13.0
    # A shorter one later does not shorten it.
    assert after_failure(told, retry_after_s=1.0, now=11.0).not_before == 13.0
