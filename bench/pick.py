"""Micro-benchmark: the cost of one routing decision.

``python -m bench.pick`` builds a Router over 8 endpoints with history
(different speeds, some load in flight), then times, for each policy:

* ``pick``: ``Router.pick`` alone, the clock moving 1 ms per pick;
* ``cycle``: ``pick`` + ``begin`` + ``succeed`` (a whole attempt's bookkeeping).

Each figure is the median of several runs, in µs per operation. Results go
to ``bench/results/pick.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections import deque
from pathlib import Path

from workers.routing import (
    Attempt,
    Choice,
    EndpointSpec,
    LatencyPolicy,
    P2CPolicy,
    Policy,
    RandomPolicy,
    RoundRobinPolicy,
    Router,
    Work,
)

ENDPOINTS = 8
RESULTS = Path(__file__).resolve().parent / "results" / "pick.json"


def build(policy: Policy, rng: random.Random) -> tuple[Router, float]:
    """A router with 50 samples of history per endpoint and 4 attempts in flight on each."""
    router = Router(
        [EndpointSpec(f"ep{i}", {"m": "m"}, 64, rpm=1_000_000) for i in range(ENDPOINTS)],
        {},
        policy=policy,
        rand=rng.random,
    )
    now = 0.0
    for _ in range(50):
        for i in range(ENDPOINTS):
            tokens = rng.randint(50, 400)
            attempt = router.begin(f"ep{i}", work=Work(200, 512), now=now, model="m")
            now += 0.001
            latency = (0.1 + 0.05 * i) + (0.005 + 0.001 * i) * tokens
            router.succeed(attempt, now=now + latency, output_tokens=tokens)
    now += 1.0
    for i in range(ENDPOINTS):
        for _ in range(4):
            router.begin(f"ep{i}", work=Work(200, 512), now=now, model="m")
    return router, now


def time_picks(policy: Policy, n: int, seed: int) -> float:
    rng = random.Random(seed)
    router, now = build(policy, rng)
    work = Work(200, 512)
    rand = rng.random
    pick = router.pick
    start = time.perf_counter()
    for i in range(n):
        pick("m", work=work, now=now + i * 0.001, rand=rand)
    return (time.perf_counter() - start) / n * 1e6


def time_cycles(policy: Policy, n: int, seed: int) -> float:
    """pick + begin + succeed, with ~16 attempts kept in flight."""
    rng = random.Random(seed)
    router, now = build(policy, rng)
    work = Work(200, 512)
    rand = rng.random
    running: deque[Attempt] = deque()
    start = time.perf_counter()
    for i in range(n):
        t = now + i * 0.001
        choice = router.pick("m", work=work, now=t, rand=rand)
        if isinstance(choice, Choice):
            running.append(router.begin(choice.endpoint, work=work, now=t, model=choice.model))
        if len(running) > 16:
            router.succeed(running.popleft(), now=t, output_tokens=200)
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--picks", type=int, default=50_000, help="operations per run")
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    policies: list[Policy] = [LatencyPolicy(), P2CPolicy(), RoundRobinPolicy(), RandomPolicy()]
    results: dict[str, dict[str, float]] = {}
    print(f"routing decision cost, {ENDPOINTS} endpoints, median of {args.runs} x {args.picks}")
    print(f"{'policy':<12} {'pick µs':>9} {'pick+begin+succeed µs':>23}")
    for policy in policies:
        picks = [time_picks(policy, args.picks, seed) for seed in range(args.runs)]
        cycles = [time_cycles(policy, args.picks, seed) for seed in range(args.runs)]
        results[policy.name] = {
            "pick_us": round(statistics.median(picks), 3),
            "cycle_us": round(statistics.median(cycles), 3),
        }
        row = results[policy.name]
        print(f"{policy.name:<12} {row['pick_us']:>9.2f} {row['cycle_us']:>23.2f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "endpoints": ENDPOINTS,
        "picks_per_run": args.picks,
        "runs": args.runs,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "policies": results,
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
