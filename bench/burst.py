"""100,000 jobs published at once: publish rate, drain time, worker RSS, nothing lost.

The workers (real ``llmq worker`` processes, ``concurrency = 256``) are up
and idle on a zero-latency fake endpoint, so the drain is limited by llmq
and the broker, not by the fleet (bench/fleet_ceiling.py: ~15k req/s on one
core). The producer then publishes every job as fast as publisher confirms
allow (1,024 unconfirmed), persistent, into llmq's quorum queue (its
``max-length`` is 100,000: a bigger burst is refused with nacks, and counted).
Every 0.25 s: replies so far, work-queue depth, workers' RSS.

Reports: publish rate with confirms, drain time (first publish to last
reply) and rate, peak queue depth, peak worker RSS, errors, duplicates and
lost (published and confirmed but no reply, counted by distinct correlation
id): the target is lost = 0. Writes bench/results/burst.json and burst.png.

    python -m bench.burst [--quick] [--jobs 100000] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiormq
import uvloop

from bench.harness import (
    MODEL,
    SCENARIOS,
    WORK_QUEUE,
    Producer,
    declare_llmq_topology,
    ephemeral_scenario,
    fleet_process,
    latency_summary,
    llmq_config,
    private_vhost,
    quick_results,
    result_path,
    rss_mb,
    save,
    start_worker,
    stop_process,
    wait_for_consumers,
)

CONCURRENCY = 256


async def _burst(
    url: str, workers: list[subprocess.Popen[bytes]], jobs: int, timeout_s: float
) -> dict[str, Any]:
    await wait_for_consumers(url, WORK_QUEUE, len(workers))
    timeline: list[tuple[float, int, int, float]] = []
    monitor_conn = await aiormq.connect(url)
    monitor = await monitor_conn.channel()
    async with Producer(url, max_unconfirmed=1024) as producer:
        t0 = time.perf_counter()

        async def sample() -> None:
            while True:
                ok = await monitor.queue_declare(WORK_QUEUE, passive=True)
                rss = 0.0
                for w in workers:
                    with contextlib.suppress(OSError):
                        rss += rss_mb(w.pid)
                timeline.append(
                    (time.perf_counter() - t0, len(producer.done), ok.message_count or 0, rss)
                )
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        try:
            pub = await producer.burst(jobs)
            print(
                f"published {jobs} in {pub['publish_s']:.1f} s ({pub['publish_per_s']:.0f}/s),"
                f" nacked {pub['nacked']}; draining"
            )
            drained = await producer.wait_answered(timeout_s)
            producer.check()
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await asyncio.sleep(1.0)  # late duplicates, if any
        await monitor_conn.close()
        done = producer.done
        first = min((t - lat for t, lat in done), default=t0)
        last = max((t for t, _ in done), default=t0)
        confirmed = producer.published
        return {
            "jobs": jobs,
            "workers": len(workers),
            "concurrency": CONCURRENCY,
            "publish_s": pub["publish_s"],
            "publish_per_s": pub["publish_per_s"],
            "nacked": pub["nacked"],
            "unroutable": pub["unroutable"],
            "confirmed": confirmed,
            "replies": len(done),
            "ok": producer.ok,
            "errors": producer.errors,
            "duplicates": producer.duplicates,
            "lost": confirmed - len(done),
            "drained": drained,
            "drain_s": round(last - first, 2),
            "drain_per_s": round(len(done) / max(last - first, 1e-9), 1),
            "time_to_first_reply_s": round(min((t for t, _ in done), default=t0) - t0, 3),
            "peak_queue_depth": max((x[2] for x in timeline), default=0),
            "latency": latency_summary([lat * 1000 for _, lat in done]),
            "timeline": [[round(a, 2), b, c, round(d, 1)] for a, b, c, d in timeline],
        }


def run(jobs: int, workers: int, timeout_s: float) -> dict[str, Any]:
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        scenario = ephemeral_scenario(SCENARIOS / "zero.toml", Path(tmp))
        with fleet_process(scenario) as urls, private_vhost() as url:
            uvloop.run(declare_llmq_topology(url))
            config = llmq_config(
                Path(tmp) / "llmq.toml", url, urls, [MODEL], concurrency=CONCURRENCY
            )
            procs = [start_worker(config, f"bench-burst-{i}") for i in range(workers)]
            try:
                result = uvloop.run(_burst(url, procs, jobs, timeout_s))
                result["worker_peak_rss_mb"] = [round(rss_mb(p.pid, peak=True), 1) for p in procs]
            finally:
                for p in procs:
                    stop_process(p)
    try:
        from bench.plots import burst_timeline

        tl = result["timeline"]
        path = burst_timeline(
            [x[0] for x in tl],
            [x[1] for x in tl],
            [x[2] for x in tl],
            [x[3] for x in tl],
            result_path("burst", "png"),
            title=f"{jobs:,} jobs at once, {workers} worker(s), zero-latency endpoint",
        )
        print("plot", path)
    except ImportError as exc:
        print(f"no plot ({exc})")
    return result


def print_table(r: dict[str, Any]) -> None:
    lat = r["latency"]
    rows = [
        ("jobs / workers", f"{r['jobs']:,} / {r['workers']} (concurrency {r['concurrency']})"),
        ("publish (confirmed)", f"{r['publish_s']:.1f} s, {r['publish_per_s']:,.0f} jobs/s"),
        (
            "drain (first publish to last reply)",
            f"{r['drain_s']:.1f} s, {r['drain_per_s']:,.0f} jobs/s",
        ),
        ("peak queue depth", f"{r['peak_queue_depth']:,}"),
        ("peak worker RSS", " + ".join(f"{x:.1f}" for x in r["worker_peak_rss_mb"]) + " MB"),
        (
            "job latency p50 / p99 / max",
            f"{lat.get('p50_ms', 0) / 1000:.1f} / {lat.get('p99_ms', 0) / 1000:.1f} / {lat.get('max_ms', 0) / 1000:.1f} s",
        ),
        ("nacked / errors / duplicates", f"{r['nacked']} / {r['errors']} / {r['duplicates']}"),
        ("lost (target 0)", f"{r['lost']} {'met' if r['lost'] == 0 else 'MISSED'}"),
    ]
    for k, v in rows:
        print(f"  {k:<38}{v}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.burst",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="10,000 jobs")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=420.0, help="drain bound, seconds")
    args = parser.parse_args(argv)
    if args.quick:
        quick_results()
    jobs = args.jobs or (10_000 if args.quick else 100_000)
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    result = run(jobs, args.workers, args.timeout)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    result["load_average_before"] = load_before
    print_table(result)
    print("saved", save("burst", result))


if __name__ == "__main__":
    main()
