"""Interactive before batch: interactive latency with and without a 20,000-job batch backlog.

Two fake endpoints (constant 200 ms, ``max_concurrency = 48`` each: 96 slots,
~480 jobs/s) saturated by a batch backlog, and interactive jobs at a steady
rate. One run, side by side, for 1 worker and for 3 workers:

1. *no backlog*: interactive jobs alone at ``--rate`` for ``--seconds``: their p50/p99;
2. *batch alone*: the backlog (``--backlog`` batch jobs) published, its drain
   rate over the next ``--seconds`` / 2 with no interactive traffic (the capacity);
3. *with backlog*: interactive jobs at the same rate while the backlog keeps
   draining: interactive p50/p99, and the batch drain rate in that window.

Targets (issue #13): interactive p99 with backlog ≤ 1.25 × its p99 without;
batch drain with interactive ≥ 90 % of (batch-alone rate − interactive rate),
the capacity interactive leaves free. Writes bench/results/priority.json.

    python -m bench.priority [--quick] [--workers 1 3] [--backlog 20000] [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.harness import (
    MODEL,
    Producer,
    declare_llmq_topology,
    fleet_process,
    latency_summary,
    percentile,
    private_vhost,
    quick_results,
    save,
    start_worker,
    stop_process,
    wait_for_consumers,
)

LATENCY_MS = 200
MAX_CONCURRENCY = 48
ENDPOINTS = ("p1", "p2")
BODY = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
)


def scenario(directory: Path) -> Path:
    lines = ["seed = 3"]
    for name in ENDPOINTS:
        lines += [
            "[[endpoints]]",
            f'name = "{name}"',
            "port = 0",
            f'models = ["{MODEL}"]',
            f"latency_ms = {{ median = {LATENCY_MS}, p99 = {LATENCY_MS} }}",
            "output_tokens = { min = 16, max = 16 }",
        ]
    path = directory / "priority.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(directory: Path, amqp_url: str, urls: dict[str, str]) -> Path:
    lines = ["[broker]", f'url = "{amqp_url}"', "[worker]"]
    lines += ['reply_queues = ["llmq.reply.*", "bench.*"]', "state_interval_s = 0.5"]
    for name in ENDPOINTS:
        lines += [
            "[[endpoints]]",
            f'name = "{name}"',
            f'base_url = "{urls[name]}"',
            f'models = ["{MODEL}"]',
            f"max_concurrency = {MAX_CONCURRENCY}",
        ]
    lines += ["[metrics]", "port = 0"]
    path = directory / "priority-llmq.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def steady(producer: Producer, rate: float, seconds: float) -> None:
    """Publish at ``rate`` jobs/s for ``seconds`` (open loop: on a clock, not on replies)."""
    start = time.perf_counter()
    n = int(rate * seconds)
    for k in range(n):
        at = start + k / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await producer.publish(producer.next_id(), time.perf_counter())


def rate_between(producer: Producer, a: float, b: float) -> float:
    return sum(1 for t, _ in producer.done if a <= t < b) / (b - a)


async def one_run(
    url: str, workers: int, backlog: int, rate: float, seconds: float
) -> dict[str, Any]:
    interactive = Producer(url, routing_key="interactive", sla_ms=30_000, body=BODY)
    batch = Producer(url, routing_key="batch", sla_ms=3_600_000, body=BODY)
    async with interactive, batch:
        # 1. Interactive alone (after a short warm-up so every endpoint has samples).
        await steady(interactive, rate, 3)
        await interactive.wait_answered(30)
        interactive.reset()
        await steady(interactive, rate, seconds)
        await interactive.wait_answered(30)
        alone = [lat * 1000 for _, lat in interactive.done]
        interactive.reset()

        # 2. The backlog, and its drain rate with nothing else running.
        publishing = asyncio.create_task(_publish_backlog(batch, backlog))
        await asyncio.sleep(3)  # the backlog reaches the workers and fills the endpoints
        a = time.perf_counter()
        await asyncio.sleep(seconds / 2)
        b = time.perf_counter()
        batch_alone = rate_between(batch, a, b)

        # 3. Interactive again, while the backlog drains.
        c = time.perf_counter()
        await steady(interactive, rate, seconds)
        d = time.perf_counter()
        await interactive.wait_answered(60)
        with_backlog = [lat * 1000 for _, lat in interactive.done]
        batch_with = rate_between(batch, c, d)
        left = batch.unanswered
        await publishing
        await batch.wait_answered(600)
        interactive.check()
        batch.check()
    p99_alone = percentile(alone, 0.99)
    p99_with = percentile(with_backlog, 0.99)
    free = batch_alone - rate
    return {
        "workers": workers,
        "interactive_rate": rate,
        "backlog": backlog,
        "backlog_left_after_window": left,
        "interactive_alone_ms": latency_summary(alone),
        "interactive_with_backlog_ms": latency_summary(with_backlog),
        "p99_ratio": round(p99_with / p99_alone, 3),
        "batch_alone_per_s": round(batch_alone, 1),
        "batch_with_interactive_per_s": round(batch_with, 1),
        "drain_share_of_free": round(batch_with / free, 3) if free > 0 else None,
        "errors": interactive.errors + batch.errors,
        "lost": interactive.unanswered + batch.unanswered,
        "pass_p99": p99_with <= 1.25 * p99_alone,
        "pass_drain": free > 0 and batch_with >= 0.9 * free,
    }


async def _publish_backlog(batch: Producer, backlog: int) -> None:
    for _ in range(backlog):
        await batch.publish(batch.next_id(), time.perf_counter())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp, private_vhost() as url:
            directory = Path(tmp)
            with fleet_process(scenario(directory)) as urls:
                await declare_llmq_topology(url)
                cfg = config(directory, url, urls)
                procs = [start_worker(cfg, f"prio-{k}") for k in range(workers)]
                try:
                    await wait_for_consumers(url, "llmq.q.batch", workers)
                    await asyncio.sleep(1.5)  # the workers hear each other: shares settle
                    result = await one_run(url, workers, args.backlog, args.rate, args.seconds)
                finally:
                    for proc in procs:
                        stop_process(proc)
        runs.append(result)
        print(json.dumps(result, indent=2))
    return {
        "endpoints": {"count": len(ENDPOINTS), "latency_ms": LATENCY_MS},
        "max_concurrency": MAX_CONCURRENCY,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--backlog", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    if args.quick:
        quick_results()
        args.backlog, args.seconds, args.workers = 4000, 6.0, [1]
    logging.basicConfig(level=logging.WARNING)
    data = uvloop.run(run(args))
    save("priority", data)
    for r in data["runs"]:
        print(
            f"priority, {r['workers']} worker(s): interactive p99"
            f" {r['interactive_alone_ms'].get('p99_ms')} ms alone,"
            f" {r['interactive_with_backlog_ms'].get('p99_ms')} ms with the backlog"
            f" (x{r['p99_ratio']}, target <= 1.25); batch {r['batch_with_interactive_per_s']}/s"
            f" = {r['drain_share_of_free']} of the free capacity (target >= 0.9); lost {r['lost']}"
        )


if __name__ == "__main__":
    main()
