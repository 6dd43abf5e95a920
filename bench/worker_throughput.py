"""How many jobs/s one ``llmq worker`` process sustains against a zero-latency endpoint.

Pre-loads N jobs into the work queue, then starts the worker and times the
replies from the first to the last, so start-up is not counted. Reports
jobs/s, CPU ms per job and peak RSS of the worker process.

    python -m bench.worker_throughput --jobs 20000 [--transport aiohttp]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import uvloop

from bench.harness import (
    SCENARIOS,
    cpu_seconds,
    fleet_process,
    private_vhost,
    rss_mb,
    save,
    start_worker,
    write_config,
)
from schemas.broker.topology import apply_topology
from schemas.settings import TopologySettings
from schemas.topology import plan


async def measure(
    amqp_url: str, urls: dict[str, str], jobs: int, transport: str, concurrency: int
) -> dict[str, Any]:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel(publisher_confirms=True)
    await apply_topology(connection, plan(TopologySettings()))
    replies = await channel.declare_queue("bench.replies", exclusive=True)
    exchange = await channel.get_exchange("llmq.jobs")
    body = orjson.dumps(
        {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    )
    sem = asyncio.Semaphore(512)

    async def publish(i: int) -> None:
        async with sem:
            await exchange.publish(
                aio_pika.Message(
                    body, message_id=f"j{i}", reply_to="bench.replies", headers={"sla-ms": 600_000}
                ),
                routing_key="interactive",
            )

    t0 = time.perf_counter()
    await asyncio.gather(*(publish(i) for i in range(jobs)))
    publish_s = time.perf_counter() - t0

    got: list[float] = []
    done = asyncio.Event()
    seen: set[str] = set()
    errors = 0

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal errors
        got.append(time.perf_counter())
        seen.add(message.correlation_id or "")
        errors += orjson.loads(message.body)["status"] != "ok"
        if len(seen) >= jobs:
            done.set()

    await replies.consume(on_reply, no_ack=True)
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(
            Path(tmp) / "llmq.toml",
            amqp_url,
            urls,
            ["gpt-4.1-mini"],
            concurrency=concurrency,
            http_transport=transport,
        )
        worker = start_worker(config, "bench")
        try:
            await asyncio.wait_for(done.wait(), timeout=600)
            cpu = cpu_seconds(worker.pid)
            peak = rss_mb(worker.pid, peak=True)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
    await connection.close()
    # Skip the first 5% of replies: connection set-up and warm-up.
    warm = got[len(got) // 20 :]
    rate = (len(warm) - 1) / (warm[-1] - warm[0])
    return {
        "transport": transport,
        "jobs": jobs,
        "concurrency": concurrency,
        "publish_per_s": round(jobs / publish_s),
        "jobs_per_s": round(rate, 1),
        "worker_cpu_ms_per_job": round(cpu * 1000 / jobs, 3),
        "worker_peak_rss_mb": round(peak, 1),
        "errors": errors,
        "lost": jobs - len(seen),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument(
        "--transport", action="append", choices=["aiohttp", "httpx", "httpx-aiohttp"]
    )
    args = parser.parse_args()
    rows = []
    with fleet_process(SCENARIOS / "zero.toml") as urls:
        for transport in args.transport or ["aiohttp"]:
            with private_vhost() as url:
                rows.append(uvloop.run(measure(url, urls, args.jobs, transport, args.concurrency)))
    print(
        f"{'transport':<14}{'jobs':>8}{'jobs/s':>10}{'cpu ms/job':>12}{'peak RSS MB':>13}{'errors':>8}{'lost':>6}"
    )
    for r in rows:
        print(
            f"{r['transport']:<14}{r['jobs']:>8}{r['jobs_per_s']:>10}{r['worker_cpu_ms_per_job']:>12}{r['worker_peak_rss_mb']:>13}{r['errors']:>8}{r['lost']:>6}"
        )
    print("saved", save("worker_throughput", {"runs": rows}))


if __name__ == "__main__":
    main()
