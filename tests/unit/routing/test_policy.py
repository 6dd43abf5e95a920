"""Selection policies: lowest cost, power of two choices, baselines."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from workers.routing import LatencyPolicy, P2CPolicy, Policy, RandomPolicy, RoundRobinPolicy


def test_latency_policy_takes_the_lowest_cost() -> None:
    rand = random.Random(1).random
    assert LatencyPolicy().choose([3.0, 1.0, 2.0], rand) == 1
    assert LatencyPolicy().choose([5.0], rand) == 0


def test_latency_policy_breaks_ties_at_random() -> None:
    """Three equal lowest costs share the picks about evenly; the higher one gets none."""
    rand = random.Random(2).random
    policy = LatencyPolicy()
    counts = Counter(policy.choose([1.0, 2.0, 1.0, 1.0], rand) for _ in range(3000))
    assert set(counts) == {0, 2, 3}
    assert all(800 < n < 1200 for n in counts.values())


def test_p2c_compares_two_distinct_endpoints() -> None:
    """Draws 0 and 0 still give two different indices; the cheaper one wins."""
    draws = iter([0.0, 0.0])
    assert P2CPolicy().choose([5.0, 1.0, 9.0], lambda: next(draws)) == 1
    draws = iter([0.99, 0.99])
    assert P2CPolicy().choose([5.0, 1.0, 9.0], lambda: next(draws)) == 1  # 2 vs 1
    draws = iter([0.99, 0.0])
    assert P2CPolicy().choose([5.0, 1.0, 9.0], lambda: next(draws)) == 0  # 2 vs 0


def test_p2c_single_and_pair() -> None:
    rand = random.Random(3).random
    assert P2CPolicy().choose([4.0], rand) == 0
    assert all(P2CPolicy().choose([4.0, 1.0], rand) == 1 for _ in range(50))


def test_p2c_never_picks_the_worst_of_three() -> None:
    rand = random.Random(4).random
    picks = Counter(P2CPolicy().choose([1.0, 2.0, 3.0], rand) for _ in range(3000))
    assert 2 not in picks
    assert picks[0] > picks[1]


def test_round_robin_cycles_and_adapts_to_the_eligible_count() -> None:
    policy = RoundRobinPolicy()
    rand = random.Random(5).random
    assert [policy.choose([1.0, 1.0, 1.0], rand) for _ in range(4)] == [0, 1, 2, 0]
    assert policy.choose([1.0], rand) == 0


def test_random_policy_is_uniform_and_safe_at_one() -> None:
    rand = random.Random(6).random
    counts = Counter(RandomPolicy().choose([9.0, 1.0], rand) for _ in range(2000))
    assert 800 < counts[0] < 1200
    assert RandomPolicy().choose([1.0, 2.0], lambda: 1.0) == 1


@pytest.mark.parametrize(
    "policy", [LatencyPolicy(), P2CPolicy(), RoundRobinPolicy(), RandomPolicy()]
)
def test_every_policy_has_a_name_and_fits_the_protocol(policy: Policy) -> None:
    assert policy.name
    assert 0 <= policy.choose([1.0, 2.0, 3.0], random.Random(0).random) < 3
