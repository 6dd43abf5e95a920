"""TokenBucket (rpm/tpm) and AimdLimit (concurrency learned from 429s)."""

from __future__ import annotations

import pytest

from workers.routing.limits import AimdLimit, TokenBucket


def test_bucket_starts_full_and_refills_continuously() -> None:
    bucket = TokenBucket(60)  # one per second
    assert bucket.can_take(60, 0.0)
    bucket.take(60, 0.0)
    assert not bucket.can_take(1, 0.5)
    assert bucket.can_take(1, 1.0)
    assert bucket.ready_at(10, 1.0) == pytest.approx(10.0)
    bucket.take(1, 100.0)
    assert bucket.tokens == pytest.approx(59.0)  # refill never exceeds the capacity
    assert "59.0/60" in repr(bucket)


def test_bucket_ready_now_when_enough() -> None:
    bucket = TokenBucket(600)
    assert bucket.ready_at(5, 3.0) == 3.0


def test_oversized_need_waits_for_a_full_bucket_not_forever() -> None:
    bucket = TokenBucket(1000)
    assert bucket.can_take(50_000, 0.0)
    bucket.take(50_000, 0.0)
    assert bucket.tokens == 0.0
    assert bucket.ready_at(50_000, 0.0) == pytest.approx(60.0)


def test_bucket_debt_and_refund() -> None:
    """take() without a check may go negative; give() returns unused tokens up to the cap."""
    bucket = TokenBucket(60)
    bucket.take(60, 0.0)
    bucket.take(30, 0.0)
    assert bucket.tokens == -30.0
    bucket.give(50)
    bucket.give(-5)
    assert bucket.tokens == 20.0
    bucket.give(1000)
    assert bucket.tokens == 60.0


def test_bucket_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(60)
    bucket.take(60, 10.0)
    assert not bucket.can_take(1, 5.0)
    assert bucket.stamp == 10.0


def test_a_429_beside_others_cuts_toward_what_was_in_flight() -> None:
    """Refused at 9 in flight: the endpoint takes 8. Halving at most per 429 finds it in three."""
    limit = AimdLimit(64, 0.5)
    limit.on_rate_limited(9)
    assert limit.value == 32
    limit.on_rate_limited(9)
    assert limit.value == 16
    limit.on_rate_limited(9)
    assert limit.value == 8
    limit.on_rate_limited(30)  # more in flight than the limit (a race): still one less
    assert limit.value == 7


def test_aimd_grows_back_by_one_per_window_and_only_when_busy() -> None:
    """+1/limit per success while at least half of it is in use (TCP Reno)."""
    limit = AimdLimit(16, 0.5)
    limit.on_rate_limited(9)
    assert limit.limit == 8.0
    limit.on_success(3)  # 3·2 < 8: not near the limit, no growth
    assert limit.limit == 8.0
    for _ in range(9):
        limit.on_success(8)
    assert limit.value == 9  # about one window of successes, one more slot
    for _ in range(500):
        limit.on_success(16)
    assert limit.value == 16  # never above the configured ceiling
    assert repr(limit) == "<AimdLimit 16/16 proven=16>"


def test_a_429_at_an_in_flight_count_that_recently_succeeded_is_not_a_concurrency_limit() -> None:
    """Served 5 at once a moment ago, refused at 3: a shed or a rate limit, not capacity."""
    limit = AimdLimit(64, 0.5)
    limit.on_success(5)
    assert limit.proven == 5
    assert limit.on_rate_limited(3) is False
    assert (limit.value, limit.proven) == (64, 4)  # unchanged, and a little less sure
    assert limit.on_rate_limited(4) is False
    assert limit.on_rate_limited(4) is True  # proven fell to 3: now it is capacity
    assert limit.value == 32


def test_aimd_never_below_one() -> None:
    limit = AimdLimit(3, 0.9)
    for _ in range(10):
        limit.on_rate_limited(2)
    assert limit.value == 1
    assert limit.limit == 1.0
