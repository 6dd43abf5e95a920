"""Reproductions behind the llmq findings in docs/benchmarks-routing.md.

    python -m bench.routing_repro hedge   # dropped hedges under uvloop (workers/attempts.py)
    python -m bench.routing_repro level   # routing-core simulation: the latency level

``hedge``: a Dispatcher with two endpoints that have history, the primary stuck
(2 s) and the other answering in 0.1 s; 100 jobs with hedging on, each on a
fresh Router. Under uvloop (which ``llmq worker`` runs) ``asyncio.wait(timeout=d)``
often wakes a hair before ``time.monotonic()`` has advanced by ``d`` and
``should_hedge`` says "not yet"; ``Dispatcher._race`` used to drop the timer for
good (76–84 of 100 hedged under uvloop), and now re-arms it (100 of 100).

``level``: a discrete-event simulation of the pure routing core (no broker, no
HTTP, no hedging, virtual clock) on bench/scenarios/routing_steady.toml and
routing_spike.toml, 12 s at 50 jobs/s, three seeds: the level as first shipped
(Finagle's Peak-EWMA, idle decay toward 0; ``FINAGLE``, expressed as a
RoutingConfig) against the shipped defaults (partial rise, per-sample floor on
the fall, idle reversion toward 1).
"""

from __future__ import annotations

import asyncio
import heapq
import random
import sys
import time
import types
from pathlib import Path
from typing import Any

import uvloop

from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.attempts import Dispatcher
from workers.errors import UpstreamFailure
from workers.fleet import load_scenario
from workers.fleet.plan import effective, latency_s
from workers.providers import Adapter, Call, UpstreamReply, adapter_for
from workers.routing import (
    EndpointSpec,
    FailureKind,
    RetryBudget,
    Router,
    RoutingConfig,
    Work,
)

SCENARIOS = Path(__file__).resolve().parent / "scenarios"


# --- dropped hedges ---------------------------------------------------------------------


class _StuckPrimary:
    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        delay = 2.0 if adapter.name == "primary" else 0.1
        if delay > timeout_s:
            await asyncio.sleep(timeout_s)
            raise UpstreamFailure(FailureKind.TIMEOUT, "timeout")
        await asyncio.sleep(delay)
        return UpstreamReply({}, 10, 32)

    async def aclose(self) -> None:
        pass


async def _hedge_trial(job: Any) -> bool:
    config = RoutingConfig()
    names = ("primary", "other")
    router = Router([EndpointSpec(n, {"m": "m"}, 64) for n in names], {}, config)
    now = time.monotonic()
    for name, latency in (("primary", 0.05), ("other", 0.1)):  # 30 samples each
        for i in range(30):
            attempt = router.begin(name, work=Work(10, 64), now=now - 10 + i * 0.2, model="m")
            done = now - 10 + i * 0.2 + latency * random.uniform(0.9, 1.1)
            router.succeed(attempt, now=done, output_tokens=32)
    dispatcher = Dispatcher(
        router=router,
        budget=RetryBudget.from_config(config),
        upstream=_StuckPrimary(),
        adapters={
            n: adapter_for(EndpointSettings(name=n, base_url="http://127.0.0.1:9", models=["m"]))
            for n in names
        },
        max_attempts=3,
        margin_s=0.3,
        clock=time.monotonic,
        rand=random.random,
    )
    result = await dispatcher.run(job, "m", deadline=time.monotonic() + 5, hedge=True)
    return bool(result.hedged)


async def _hedges(trials: int) -> str:
    job = types.SimpleNamespace(
        prompt_chars=40, output_cap=64, body={"model": "m"}, traceparent=None, job_id="j"
    )
    hedged = [await _hedge_trial(job) for _ in range(trials)]
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return f"{loop:8} stuck primaries hedged: {sum(hedged)}/{trials}"


# --- the latency level ------------------------------------------------------------------

FINAGLE = RoutingConfig(level_rise=1.0, level_alpha=1e-9, revert_s=1e9, explore_s=10.0)
"""The level as first shipped: Finagle's Peak-EWMA, idle decay toward 0 with τ = 10 s."""


def simulate(
    name: str, seed: int, config: RoutingConfig, rate: float = 50.0, span: float = 12.0
) -> str:
    scenario = load_scenario(SCENARIOS / f"routing_{name}.toml")
    eps = {e.name: e for e in scenario.endpoints}
    rng = random.Random(seed)
    router = Router([EndpointSpec(n, {"m": "m"}, 64) for n in eps], {}, config, rand=rng.random)
    pending: list[tuple[float, int, Any, int]] = []
    latencies: list[float] = []
    share = dict.fromkeys(eps, 0)
    t = 0.0
    while t < span:
        t += rng.expovariate(rate)
        cap = rng.choice((64, 64, 64, 128, 128, 128, 256, 256, 256, 512))
        arrived = t
        while True:
            while pending and pending[0][0] <= t:
                done, _, attempt, tokens = heapq.heappop(pending)
                router.succeed(attempt, now=done, output_tokens=tokens)
            choice = router.pick("m", work=Work(20, cap), now=t, rand=rng.random)
            if hasattr(choice, "endpoint"):
                break
            t = max(t, pending[0][0])  # cold probes out: wait for one to answer
        e = eps[choice.endpoint]
        tokens = min(rng.randint(e.output_tokens.min, e.output_tokens.max), cap)
        slow = effective(e, 0.5 + t).latency_x
        took = (
            latency_s(e.latency_ms, rng.normalvariate(0, 1)) + tokens * e.ms_per_token / 1e3
        ) * slow
        attempt = router.begin(choice.endpoint, work=Work(20, cap), now=t, model="m")
        heapq.heappush(pending, (t + took, id(attempt), attempt, tokens))
        share[choice.endpoint] += 1
        latencies.append(t + took - arrived)
    latencies.sort()
    n = len(latencies)
    shares = "/".join(f"{100 * v / n:.0f}" for v in share.values())
    return f"p50 {latencies[n // 2] * 1e3:4.0f}  p99 {latencies[int(n * 0.99)] * 1e3:5.0f} ms  share {shares}"


def _levels() -> None:
    for name in ("steady", "spike"):
        for label, config in (("finagle", FINAGLE), ("shipped", RoutingConfig())):
            for seed in (1, 2, 3):
                print(f"{name:7} {label:8} seed {seed}: {simulate(name, seed, config)}")


def main(argv: list[str] | None = None) -> None:
    what = (argv if argv is not None else sys.argv[1:]) or ["hedge", "level"]
    if "hedge" in what:
        print(asyncio.run(_hedges(100)))
        print(uvloop.run(_hedges(100)))
    if "level" in what:
        _levels()


if __name__ == "__main__":
    main()
