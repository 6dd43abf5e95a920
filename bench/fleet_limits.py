"""Limits configured once, held by the fleet: 4 workers, one endpoint, a join and a kill.

One fake endpoint (latency median 1.2 s, p99 4 s) configured in llmq with
``max_concurrency = 16, rpm = 600``; four ``llmq worker`` processes and a
backlog of interactive jobs (long deadlines) that keeps them all wanting
more. At ``--join-at`` a fifth worker starts; at ``--kill-at`` one of the
first four is SIGKILLed (no goodbye: the others notice its silence). The
fleet counts, on its own side of the socket, the most requests in flight at
once and the most that arrived within any 60 seconds.

Targets (issue #13): peak concurrency ≤ 16 (plus the documented bound while a
worker joins or leaves: docs/operations.md), no 60 s window over 600 requests,
nothing lost. Writes bench/results/fleet_limits.json.

    python -m bench.fleet_limits [--quick] [--seconds 150]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.harness import (
    MODEL,
    Producer,
    declare_llmq_topology,
    fleet_process,
    private_vhost,
    quick_results,
    save,
    start_worker,
    stop_process,
    wait_for_consumers,
)

MAX_CONCURRENCY = 16
RPM = 600
BODY = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
)


class CodedProducer(Producer):
    """A producer that also counts its error replies by code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.codes: dict[str, int] = {}
        self.messages: list[str] = []

    async def _on_reply(self, message: Any) -> None:
        if b'"status":"ok"' not in message.body:
            error = orjson.loads(message.body).get("error") or {}
            code = str(error.get("code")) if isinstance(error, dict) else "?"
            self.codes[code] = self.codes.get(code, 0) + 1
            if len(self.messages) < 5 and isinstance(error, dict):
                self.messages.append(str(error.get("message"))[:300])
        await super()._on_reply(message)


def scenario(directory: Path) -> Path:
    text = f"""seed = 5
[[endpoints]]
name = "limited"
port = 0
models = ["{MODEL}"]
latency_ms = {{ median = 1200, p99 = 4000 }}
output_tokens = {{ min = 16, max = 16 }}
"""
    path = directory / "limits.toml"
    path.write_text(text)
    return path


def config(directory: Path, amqp_url: str, url: str) -> Path:
    text = f"""[broker]
url = "{amqp_url}"
[worker]
reply_queues = ["llmq.reply.*", "bench.*"]
state_interval_s = 1.0
[[endpoints]]
name = "limited"
base_url = "{url}"
models = ["{MODEL}"]
max_concurrency = {MAX_CONCURRENCY}
rpm = {RPM}
[metrics]
port = 0
"""
    path = directory / "limits-llmq.toml"
    path.write_text(text)
    return path


async def fleet_stats(session: aiohttp.ClientSession, stats_url: str) -> dict[str, Any]:
    async with session.get(stats_url) as response:
        data: dict[str, Any] = await response.json()
    return data


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp, private_vhost() as url:
        directory = Path(tmp)
        with fleet_process(scenario(directory)) as urls:
            base = urls["limited"]
            stats_url = base.rsplit("/v1", 1)[0] + "/fleet/stats"
            await declare_llmq_topology(url)
            cfg = config(directory, url, base)
            procs = [start_worker(cfg, f"limits-{k}") for k in range(4)]
            events: list[dict[str, Any]] = []
            samples: list[dict[str, Any]] = []
            try:
                await wait_for_consumers(url, "llmq.q.interactive", 4)
                await asyncio.sleep(2.0)  # the four hear each other: shares of 4
                producer = CodedProducer(url, routing_key="interactive", sla_ms=900_000, body=BODY)
                async with producer, aiohttp.ClientSession() as session:
                    jobs = int(args.seconds * RPM / 60 * 1.5)  # more than the limit allows
                    for _ in range(jobs):
                        await producer.publish(producer.next_id(), time.perf_counter())
                    start = time.monotonic()
                    joined = killed = False
                    while time.monotonic() - start < args.seconds:
                        t = time.monotonic() - start
                        if not joined and t >= args.join_at:
                            procs.append(start_worker(cfg, "limits-joiner"))
                            events.append({"at_s": round(t, 1), "event": "a fifth worker starts"})
                            joined = True
                        if not killed and t >= args.kill_at:
                            os.kill(procs[0].pid, signal.SIGKILL)
                            events.append({"at_s": round(t, 1), "event": "worker 0 SIGKILLed"})
                            killed = True
                        stats = (await fleet_stats(session, stats_url))["endpoints"]["limited"]
                        samples.append(
                            {
                                "at_s": round(t, 2),
                                "in_flight": stats["in_flight"],
                                "requests": stats["requests"],
                            }
                        )
                        await asyncio.sleep(0.1)
                    final = (await fleet_stats(session, stats_url))["endpoints"]["limited"]
                    answered = producer.ok + producer.errors
                    producer.check()
            finally:
                for proc in procs:
                    stop_process(proc)
    peak = final["max_in_flight"]
    per_minute = final["max_per_minute"]
    return {
        "max_concurrency": MAX_CONCURRENCY,
        "rpm": RPM,
        "workers": "4, +1 joined, 1 killed",
        "seconds": args.seconds,
        "events": events,
        "peak_in_flight": peak,
        "max_requests_in_any_60s": per_minute,
        "requests": final["requests"],
        "answered_during_run": answered,
        "errors": producer.errors,
        "error_codes": producer.codes,
        "error_examples": producer.messages,
        "samples": samples,
        "pass_concurrency": peak <= MAX_CONCURRENCY,
        "pass_rpm": per_minute <= RPM,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--join-at", type=float, default=40.0)
    parser.add_argument("--kill-at", type=float, default=80.0)
    args = parser.parse_args(argv)
    if args.quick:
        quick_results()
        args.seconds, args.join_at, args.kill_at = 30.0, 10.0, 20.0
    logging.basicConfig(level=logging.WARNING)
    data = uvloop.run(run(args))
    save("fleet_limits", data)
    print(json.dumps({k: v for k, v in data.items() if k != "samples"}, indent=2))
    print(
        f"fleet limits, 4 workers (+1 joined, 1 killed): peak in flight {data['peak_in_flight']}"
        f" (limit {MAX_CONCURRENCY}), most requests in any 60 s {data['max_requests_in_any_60s']}"
        f" (limit {RPM}), errors {data['errors']}"
    )


if __name__ == "__main__":
    main()
