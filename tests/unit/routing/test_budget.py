"""RetryBudget: 20% of requests plus a floor, over a 10 s window."""

from __future__ import annotations

import pytest

from workers.routing import RetryBudget, RoutingConfig


def spend_all(budget: RetryBudget, now: float) -> int:
    spent = 0
    while budget.try_spend(now):
        spent += 1
    return spent


def test_floor_allows_min_per_s_times_ttl_without_traffic() -> None:
    budget = RetryBudget(0.2, 10.0, ttl_s=10.0)
    assert spend_all(budget, 0.0) == 100
    assert not budget.try_spend(5.0)


def test_withdrawals_expire_after_the_ttl() -> None:
    budget = RetryBudget(0.2, 1.0, ttl_s=10.0)
    assert spend_all(budget, 0.0) == 10
    assert spend_all(budget, 9.0) == 0
    assert spend_all(budget, 10.5) == 10


def test_requests_deposit_the_ratio() -> None:
    budget = RetryBudget(0.2, 0.0)
    for _ in range(100):
        budget.record_request(1.0)
    assert budget.balance(1.0) == pytest.approx(20.0)
    assert spend_all(budget, 1.0) == 20
    assert budget.balance(12.0) == pytest.approx(0.0)  # all of it expired


def test_outage_does_not_become_a_storm() -> None:
    """100 jobs/s against a dead upstream, 3 attempts each: retries stay ≈ 20% + floor."""
    budget = RetryBudget(0.2, 10.0)
    jobs = retries = 0
    for tick in range(6000):  # 60 s in 10 ms steps, one job per step
        now = tick / 100
        budget.record_request(now)
        jobs += 1
        for _ in range(2):  # the job would like two retries
            if budget.try_spend(now):
                retries += 1
    assert retries / jobs <= 0.2 + 10.0 / 100 + 0.02
    assert retries / jobs >= 0.2


def test_zero_budget_never_retries() -> None:
    budget = RetryBudget(0.0, 0.0)
    budget.record_request(0.0)
    assert not budget.try_spend(0.0)


def test_clock_going_backwards_is_harmless() -> None:
    budget = RetryBudget(1.0, 0.0)
    budget.record_request(100.0)
    assert budget.try_spend(50.0)
    assert not budget.try_spend(100.0)
    assert "balance=0.0" in repr(budget)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="RetryBudget"):
        RetryBudget(-0.1, 1.0)
    with pytest.raises(ValueError, match="RetryBudget"):
        RetryBudget(0.1, 1.0, ttl_s=0)


def test_from_config_uses_the_routing_defaults() -> None:
    budget = RetryBudget.from_config(RoutingConfig())
    assert budget.balance(0.0) == pytest.approx(100.0)  # 10/s · 10 s
    assert repr(budget) == "<RetryBudget balance=100.0 ratio=0.2>"
