"""A hard cap across a restart of every worker: does the fleet stop at the cap?

Two real ``llmq worker`` processes share a hard-capped monthly budget on a
priced model of the fake fleet (constant latency, 16 output tokens a job, so
every job costs about the same known amount). Jobs are published at a steady
rate; in the middle of the run every worker gets SIGTERM (they drain and
stop) and two new processes (new origins, nothing in memory) take over. The
cap is reached after the restart, so the new workers only stop in time if
they learned the first ones' spend from the broker (``workers/spend_store.py``).

Reports the cap, the fleet's charged spend (the ok replies' ``cost_usd`` plus
the estimate of every attempt the fleet saw abandoned: hedge losers and
timeouts, from ``/fleet/stats``), the workers' own view (their state messages
merged, and what ``llmq status`` shows of it),
the largest single job's cost, and overshoot = spent − cap: PASS when it is at
most one job's cost. Two workers may pass a cap by one worker's in-flight
estimates plus the spend the other has not heard yet (docs/observability.md,
"Budgets"); the rate and the state interval here keep that under one job.
Writes bench/results/spend_cap.json.

    python -m bench.spend_cap [--quick] [--rate 4] [--seconds 40] [--cap 0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiormq
import orjson
from aiormq.abc import DeliveredMessage

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

PROMPT = "How much does this answer cost?"
BODY = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}
)
INPUT_PER_MTOK, OUTPUT_PER_MTOK = 10.0, 200.0
"""Prices set in the configuration: ~0.0032 USD a job (16 output tokens)."""
STATE_INTERVAL_S = 0.2
WORK_QUEUE = "llmq.q.interactive"


class CostProducer(Producer):
    """The harness's producer, keeping each reply's cost and error code."""

    def __init__(self, url: str) -> None:
        super().__init__(url, body=BODY, max_unconfirmed=64)
        self.costs: list[float] = []
        self.codes: dict[str, int] = {}

    async def _on_reply(self, message: DeliveredMessage) -> None:
        reply = orjson.loads(message.body)
        if reply.get("status") == "ok":
            self.costs.append(float(reply["routing"].get("cost_usd") or 0.0))
        else:
            code = reply.get("error", {}).get("code", "?")
            self.codes[code] = self.codes.get(code, 0) + 1
        await super()._on_reply(message)


def write_config(path: Path, url: str, endpoint_url: str, cap: float) -> Path:
    path.write_text(
        f"""[broker]
url = "{url}"
[worker]
concurrency = 64
state_interval_s = {STATE_INTERVAL_S}
reply_queues = ["llmq.reply.*", "bench.*"]
[metrics]
port = 0
[[endpoints]]
name = "a"
base_url = "{endpoint_url}"
models = ["{MODEL}"]
max_concurrency = 256
input_per_mtok = {INPUT_PER_MTOK}
output_per_mtok = {OUTPUT_PER_MTOK}
[budgets.models."{MODEL}"]
monthly_usd = {cap}
hard_cap = true
"""
    )
    return path


def write_scenario(path: Path) -> Path:
    path.write_text(
        '[[endpoints]]\nname = "a"\nport = 0\n'
        f'models = ["{MODEL}"]\nlatency_ms = 50\noutput_tokens = 16\n'
    )
    return path


def fleet_stats(endpoint_url: str) -> dict[str, Any]:
    base = endpoint_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{base}/fleet/stats", timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


async def workers_view(url: str, cap: float) -> float:
    """The fleet's spend as the running workers know it: every state message heard
    for 32 state intervals (past one anti-entropy round, when each worker sends
    every origin it knows) merged like a worker merges them."""
    from workers.routing.spend import SpendLedger, SpendLimit
    from workers.spend_limits import month_of
    from workers.state import decode_state

    ledger = SpendLedger([SpendLimit("model", MODEL, cap, True)], origin="bench", thresholds=())
    month = month_of(time.time())

    async def heard(message: DeliveredMessage) -> None:
        state = decode_state(message.body)
        if state is not None and isinstance(state.get("spend"), dict):
            ledger.merge(state["spend"], month=month)

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        queue = (await channel.queue_declare(exclusive=True, auto_delete=True)).queue or ""
        await channel.queue_bind(queue, "llmq.state")
        await channel.basic_consume(queue, heard, no_ack=True)
        await asyncio.sleep(32 * STATE_INTERVAL_S)
    finally:
        await connection.close()
    return ledger.spent(f"model:{MODEL}")


def status_view(config: Path) -> float | None:
    """What ``llmq status --json`` shows for the budget after listening as long."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    command = [sys.executable, "-m", "llmq_cli", "status", "--config", str(config), "--json"]
    done = subprocess.run(
        [*command, "--listen", str(32 * STATE_INTERVAL_S)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        print("llmq status failed:", done.stderr.strip()[-500:])
        return None
    doc = json.loads(done.stdout)
    return next((float(b["spent_usd"]) for b in doc["budgets"] if b["name"] == MODEL), None)


async def publish_steadily(producer: CostProducer, rate: float, until: float) -> int:
    sent, t0 = 0, time.perf_counter()
    while time.perf_counter() < until:
        await producer.publish(producer.next_id(), time.perf_counter())
        sent += 1
        await asyncio.sleep(max(0.0, t0 + sent / rate - time.perf_counter()))
    return sent


async def _run(url: str, config: Path, rate: float, seconds: float, cap: float) -> dict[str, Any]:
    procs = [start_worker(config, f"bench-cap-{i}") for i in range(2)]
    await wait_for_consumers(url, WORK_QUEUE, 2)
    restarted_at = None
    producer = CostProducer(url)
    async with producer:
        t0 = time.perf_counter()
        publishing = asyncio.create_task(publish_steadily(producer, rate, t0 + seconds))
        await asyncio.sleep(seconds / 2)
        for p in procs:  # SIGTERM every worker: a deploy
            p.terminate()
        for p in procs:
            await asyncio.to_thread(stop_process, p)
        procs = [start_worker(config, f"bench-cap-new-{i}") for i in range(2)]
        await wait_for_consumers(url, WORK_QUEUE, 2)
        restarted_at = round(time.perf_counter() - t0, 1)
        sent = await publishing
        answered = await producer.wait_answered(60)
        producer.check()
        await asyncio.sleep(3 * STATE_INTERVAL_S)
        listening = asyncio.create_task(workers_view(url, cap))
        status = await asyncio.to_thread(status_view, config)
        view = await listening
        costs, codes = list(producer.costs), dict(producer.codes)
    for p in procs:
        stop_process(p)
    return {
        "sent": sent,
        "answered": answered,
        "ok": len(costs),
        "errors": codes,
        "costs": costs,
        "restarted_at_s": restarted_at,
        "workers_view_usd": round(view, 6),
        "llmq_status_usd": status,
    }


def run(rate: float, seconds: float, cap: float) -> dict[str, Any]:
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        scenario = write_scenario(Path(tmp) / "cap.toml")
        with fleet_process(scenario) as urls, private_vhost() as url:
            asyncio.run(declare_llmq_topology(url))
            config = write_config(Path(tmp) / "llmq.toml", url, urls["a"], cap)
            result = asyncio.run(_run(url, config, rate, seconds, cap))
            stats = fleet_stats(urls["a"])["endpoints"]["a"]
    costs = result.pop("costs")
    # An abandoned attempt is charged its prompt (characters / 4) at the input price.
    estimate = max(1, len(PROMPT) // 4) * INPUT_PER_MTOK / 1e6
    abandoned = int(stats.get("dropped", 0))
    charged = sum(costs) + abandoned * estimate
    largest = max(costs, default=0.0)
    overshoot = charged - cap
    return {
        **result,
        "rate_per_s": rate,
        "seconds": seconds,
        "workers": 2,
        "state_interval_s": STATE_INTERVAL_S,
        "cap_usd": cap,
        "replies_cost_usd": round(sum(costs), 6),
        "abandoned_attempts": abandoned,
        "abandoned_estimate_usd": round(abandoned * estimate, 6),
        "charged_usd": round(charged, 6),
        "largest_job_usd": round(largest, 6),
        "overshoot_usd": round(overshoot, 6),
        "fleet_requests": stats.get("requests"),
        "passed": overshoot <= largest,
    }


def print_table(r: dict[str, Any]) -> None:
    status = r["llmq_status_usd"]
    rows = [
        ("cap (hard)", f"{r['cap_usd']:.4f} USD"),
        ("jobs sent / ok / refused", f"{r['sent']} / {r['ok']} / {r['errors']}"),
        ("all workers restarted at", f"{r['restarted_at_s']} s of {r['seconds']:.0f} s"),
        ("ok replies' cost_usd", f"{r['replies_cost_usd']:.6f} USD"),
        (
            "abandoned attempts (estimate)",
            f"{r['abandoned_attempts']} ({r['abandoned_estimate_usd']:.6f} USD)",
        ),
        ("charged in all", f"{r['charged_usd']:.6f} USD"),
        ("workers' view (state messages)", f"{r['workers_view_usd']:.6f} USD"),
        ("llmq status --json shows", "n/a" if status is None else f"{status:.6f} USD"),
        ("largest single job", f"{r['largest_job_usd']:.6f} USD"),
        ("overshoot = charged - cap", f"{r['overshoot_usd']:+.6f} USD"),
        ("overshoot <= one job", "PASS" if r["passed"] else "FAIL"),
    ]
    for k, v in rows:
        print(f"  {k:<32}{v}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.spend_cap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="20 s")
    parser.add_argument("--rate", type=float, default=4.0, help="jobs per second")
    parser.add_argument("--seconds", type=float, help="publishing time (default 40)")
    parser.add_argument("--cap", type=float, help="USD (default: ~2/3 of the jobs' cost)")
    args = parser.parse_args(argv)
    if args.quick:
        quick_results()
    seconds = args.seconds or (20.0 if args.quick else 40.0)
    # ~0.0032 USD a job: the cap falls about two thirds into the run, after the restart.
    cap = args.cap or round(args.rate * seconds * 2 / 3 * 0.0032, 2)
    result = run(args.rate, seconds, cap)
    print_table(result)
    print("saved", save("spend_cap", result))


if __name__ == "__main__":
    main()
