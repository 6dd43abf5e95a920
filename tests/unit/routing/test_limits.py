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


def test_aimd_cuts_on_429_and_grows_back_when_busy() -> None:
    limit = AimdLimit(64, 0.9)
    limit.on_rate_limited()
    assert limit.value == 57  # min(63, 57.6)
    limit.on_success(10)  # 10·2 < 57.6: not near the limit, no growth
    assert limit.limit == pytest.approx(57.6)
    limit.on_success(40)
    assert limit.limit == pytest.approx(58.6)
    for _ in range(20):
        limit.on_success(64)
    assert limit.value == 64  # never above the configured ceiling
    assert repr(limit) == "<AimdLimit 64/64>"


def test_aimd_never_below_one() -> None:
    limit = AimdLimit(3, 0.9)
    for _ in range(10):
        limit.on_rate_limited()
    assert limit.value == 1
    assert limit.limit == 1.0
