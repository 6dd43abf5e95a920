"""Traffic follows health: a discrete-event simulation on a fake clock, no event loop.

Jobs arrive at a steady rate; each is routed, begun, and finished when the
simulated endpoint answers (or fails). Shares are measured per time window.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.routing import (
    Attempt,
    Choice,
    EndpointSpec,
    FailureKind,
    LatencyPolicy,
    P2CPolicy,
    Policy,
    RandomPolicy,
    RoundRobinPolicy,
    Router,
    Work,
)

# endpoint, time -> latency in seconds, or a failure kind (answered after 10 ms)
Behaviour = Callable[[str, float], float | FailureKind]


@dataclass
class Run:
    picks: list[tuple[float, str]] = field(default_factory=list)
    failures: int = 0
    latencies: list[float] = field(default_factory=list)

    def shares(self, start: float, end: float) -> Counter[str]:
        return Counter(e for t, e in self.picks if start <= t < end)


def simulate(
    behaviour: Behaviour,
    *,
    endpoints: tuple[str, ...] = ("a", "b", "c"),
    duration_s: float = 120.0,
    rate_per_s: float = 50.0,
    policy: Policy | None = None,
    seed: int = 1,
) -> Run:
    rng = random.Random(seed)
    router = Router(
        [EndpointSpec(name, {"m": "m"}, 64) for name in endpoints],
        {},
        policy=policy,
        rand=rng.random,
    )
    work = Work(100, 200)
    run = Run()
    done: list[tuple[float, int, Attempt, float | FailureKind]] = []
    seq = 0
    now = 0.0
    while now < duration_s:
        while done and done[0][0] <= now:
            at, _, attempt, outcome = heapq.heappop(done)
            if isinstance(outcome, FailureKind):
                router.fail(attempt, outcome, now=at)
                run.failures += 1
            else:
                router.succeed(attempt, now=at, output_tokens=200)
                run.latencies.append(at - attempt.started)
        choice = router.pick("m", work=work, now=now, rand=rng.random)
        if isinstance(choice, Choice):
            attempt = router.begin(choice.endpoint, work=work, now=now, model=choice.model)
            outcome = behaviour(choice.endpoint, now)
            jitter = 0.9 + 0.2 * rng.random()
            finish = now + (0.01 if isinstance(outcome, FailureKind) else outcome * jitter)
            seq += 1
            heapq.heappush(done, (finish, seq, attempt, outcome))
            run.picks.append((now, choice.endpoint))
        now += 1.0 / rate_per_s
    return run


BASE = {"a": 0.1, "b": 0.15, "c": 0.2}


def slow_a(endpoint: str, t: float) -> float | FailureKind:
    if endpoint == "a" and 20.0 <= t < 50.0:
        return 2.0
    return BASE[endpoint]


def refusing_a(endpoint: str, t: float) -> float | FailureKind:
    # 20 s: ejected at once for 30 s ±20%, so the half-open probe (≥ 44 s) finds it back.
    if endpoint == "a" and 20.0 <= t < 40.0:
        return FailureKind.REFUSED
    return BASE[endpoint]


def hanging_a(endpoint: str, t: float) -> float | FailureKind:
    if endpoint == "a" and 20.0 <= t < 50.0 and int(t * 50) % 4 == 0:
        return 8.0  # a quarter of a's calls hang for 8 s
    return BASE[endpoint]


def test_traffic_prefers_the_fastest_endpoint() -> None:
    run = simulate(lambda e, t: BASE[e], duration_s=30.0)
    shares = run.shares(10.0, 30.0)
    assert shares["a"] > 0.9 * sum(shares.values())


def test_traffic_leaves_a_slow_endpoint_and_comes_back() -> None:
    run = simulate(slow_a)
    during = run.shares(25.0, 50.0)
    assert during["a"] < 0.05 * sum(during.values())
    after = run.shares(100.0, 120.0)
    assert after["a"] > 0.8 * sum(after.values())


def test_traffic_leaves_a_refusing_endpoint_and_comes_back() -> None:
    run = simulate(refusing_a)
    during = run.shares(21.0, 40.0)
    assert during["a"] < 0.01 * sum(during.values())
    assert run.failures <= 10  # ejected after 5 in a row
    after = run.shares(60.0, 120.0)
    assert after["a"] > 0.8 * sum(after.values())


def test_traffic_leaves_an_endpoint_that_sometimes_hangs() -> None:
    run = simulate(hanging_a)
    during = run.shares(30.0, 50.0)
    assert during["a"] < 0.1 * sum(during.values())
    after = run.shares(100.0, 120.0)
    assert after["a"] > 0.8 * sum(after.values())


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


def test_latency_policy_beats_the_baselines_on_tail_latency() -> None:
    """One slow episode: the default keeps p99 far below round robin and random."""
    tails = {
        type(policy).__name__: p99(simulate(slow_a, duration_s=60.0, policy=policy).latencies)
        for policy in (LatencyPolicy(), P2CPolicy(), RoundRobinPolicy(), RandomPolicy())
    }
    assert tails["LatencyPolicy"] < 0.5
    assert tails["RoundRobinPolicy"] >= 1.8
    assert tails["RandomPolicy"] >= 1.8
    assert tails["P2CPolicy"] < tails["RoundRobinPolicy"]
