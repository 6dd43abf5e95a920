"""The ceiling: what any RabbitMQ-based router written in Python reaches on this machine.

A raw aio-pika RPC echo with llmq's queue type and persistence: jobs go to
llmq's quorum queue (arguments from ``schemas.topology.plan``) as persistent
messages with publisher confirms; an echo-worker process (uvloop, orjson,
prefetch 256, manual ack, a consuming and a publishing connection like the
real worker) publishes a reply envelope with a confirm, then acks. Two kinds:

* ``echo``: the reply straight away;
* ``http-echo``: one HTTP call (aiohttp, keep-alive) to a zero-latency fake
  endpoint inside the echo, its JSON answer wrapped in the reply. This is
  the fair comparison for llmq, which makes that call too.

Measured with :class:`bench.harness.Producer` (the same load generator as for
llmq): max jobs/s in a closed loop with 1,024 jobs outstanding, then
round-trip latency at fixed open-loop rates (25/50/75% of the http-echo's
max). ``bench.overhead`` runs this and llmq side by side in one invocation;
this command runs the ceiling alone.

    python -m bench.ceiling [--quick]            # -> bench/results/ceiling.json
    python -m bench.ceiling --echo-worker --url AMQP_URL [--http URL]   # the echo process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import uvloop

from bench.harness import (
    SCENARIOS,
    WORK_QUEUE,
    CpuMeter,
    Producer,
    broker_pid,
    cdf_points,
    declare_llmq_topology,
    ephemeral_scenario,
    fleet_with_pid,
    latency_summary,
    private_vhost,
    quick_results,
    rss_mb,
    save,
    stop_process,
    wait_for_consumers,
)

ECHO_PREFETCH = 256

# ---------------------------------------------------------------------------
# The echo worker: runs in its own process, like the real worker.


async def echo_worker(amqp_url: str, queue_name: str, prefetch: int, http_url: str | None) -> None:
    import aio_pika
    import aiohttp
    from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

    consume_conn = await aio_pika.connect(amqp_url)
    publish_conn = await aio_pika.connect(amqp_url)
    publisher = await publish_conn.channel(publisher_confirms=True, on_return_raises=True)
    exchange = publisher.default_exchange
    channel = await consume_conn.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(queue_name, ensure=False)
    session = (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
        if http_url
        else None
    )
    headers = {"Content-Type": "application/json", "Accept": "application/json"}

    async def on_message(message: AbstractIncomingMessage) -> None:
        try:
            response = None
            status = "ok"
            if session is not None:
                assert http_url is not None
                async with session.post(http_url, data=message.body, headers=headers) as r:
                    raw = await r.read()
                if r.status == 200:
                    response = orjson.loads(raw)
                else:
                    status = "error"
            body = orjson.dumps(
                {
                    "schema_version": 1,
                    "job_id": message.message_id,
                    "status": status,
                    "response": response,
                    "error": None,
                    "routing": {},
                }
            )
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/json",
                    correlation_id=message.correlation_id,
                    message_id=uuid.uuid4().hex,
                    delivery_mode=DeliveryMode.PERSISTENT,
                    headers={"job-id": message.message_id},
                ),
                routing_key=message.reply_to or "",
                mandatory=True,
            )
            await message.ack()
        except Exception:
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)

    await queue.consume(on_message, no_ack=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print("echo ready", flush=True)
    await stop.wait()
    await consume_conn.close()
    await publish_conn.close()
    if session is not None:
        await session.close()


def start_echo(
    amqp_url: str, http_url: str | None, prefetch: int = ECHO_PREFETCH
) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench.ceiling", "--echo-worker", "--url", amqp_url]
    cmd += ["--prefetch", str(prefetch)]
    if http_url:
        cmd += ["--http", http_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("echo ready"):
            return proc
    raise RuntimeError("the echo worker exited before it was ready")


# ---------------------------------------------------------------------------
# Running several systems side by side.

Starter = Callable[[str, dict[str, str], Path], list[subprocess.Popen[Any]]]
"""(AMQP URL of the system's vhost, fleet URLs, temp dir) -> worker processes."""

Vhost = Callable[[], contextlib.AbstractContextManager[str]]
"""A fresh vhost's AMQP URL (several comma-separated for a cluster), deleted afterwards."""


@dataclass
class System:
    name: str
    kind: str  # "ceiling" or "llmq"
    workers: int
    start: Starter
    note: str = ""
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    url: str = ""
    vhost: Vhost = private_vhost
    broker_ports: tuple[int, ...] = (5672,)
    """The broker's AMQP ports: its nodes' CPU is metered."""

    @property
    def producer_url(self) -> str:
        """The first address: the load generator and topology stay on one node."""
        return self.url.split(",")[0]


def ceiling_systems() -> list[System]:
    def echo(url: str, urls: dict[str, str], tmp: Path) -> list[subprocess.Popen[Any]]:
        return [start_echo(url, None)]

    def http_echo(url: str, urls: dict[str, str], tmp: Path) -> list[subprocess.Popen[Any]]:
        return [start_echo(url, next(iter(urls.values())) + "/chat/completions")]

    return [
        System("echo", "ceiling", 1, echo, "raw aio-pika echo, no HTTP"),
        System("http-echo", "ceiling", 1, http_echo, "raw aio-pika echo + one aiohttp call"),
    ]


@dataclass
class Options:
    rounds: int = 2
    window: int = 1024
    warmup_s: float = 2.0
    measure_s: float = 6.0
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    open_s: float = 5.0
    reference: str = "http-echo"

    @classmethod
    def quick(cls) -> Options:
        return cls(rounds=1, warmup_s=1.0, measure_s=3.0, fractions=(0.5,), open_s=3.0)


def run_comparison(systems: list[System], options: Options) -> dict[str, Any]:
    """Start every system on its own vhost (all idle but one at a time), measure
    max jobs/s round-robin, then the open-loop rates, alternating the order."""
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        scenario = ephemeral_scenario(SCENARIOS / "zero.toml", Path(tmp))
        urls, fleet_pid = stack.enter_context(fleet_with_pid(scenario))
        for system in systems:
            system.url = stack.enter_context(system.vhost())
            uvloop.run(declare_llmq_topology(system.producer_url))
            system.procs = system.start(system.url, urls, Path(tmp))
            for proc in system.procs:
                stack.callback(stop_process, proc)
        return uvloop.run(_measure(systems, options, fleet_pid))


async def _measure(systems: list[System], o: Options, fleet_pid: int) -> dict[str, Any]:
    brokers = {s.name: [p for p in map(broker_pid, s.broker_ports) if p] for s in systems}
    async with contextlib.AsyncExitStack() as stack:
        producers: dict[str, Producer] = {}
        for s in systems:
            await wait_for_consumers(s.producer_url, WORK_QUEUE, s.workers)
            producers[s.name] = await stack.enter_async_context(Producer(s.producer_url))
            # llmq's reply says when the worker started and finished: split the time.
            producers[s.name].collect_routing = s.kind == "llmq"
        maxima: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
        print(f"max jobs/s: closed loop, {o.window} outstanding, {o.measure_s:g} s per run")
        for r in range(o.rounds):
            for s in systems if r % 2 == 0 else systems[::-1]:
                pids = [p.pid for p in s.procs]
                meter = CpuMeter(
                    {
                        "workers": pids,
                        "producer": [os.getpid()],
                        "broker": brokers[s.name],
                        "fleet": [fleet_pid],
                    }
                )
                res = await producers[s.name].closed_loop(
                    o.window,
                    warmup_s=o.warmup_s,
                    measure_s=o.measure_s,
                    on_start=meter.start,
                    on_stop=meter.stop,
                )
                lat = res.pop("latencies_ms")
                jobs = len(lat)
                res["closed_loop_latency"] = latency_summary(lat)
                res["cpu_cores"] = meter.shares()
                res["worker_cpu_s_per_1000_jobs"] = round(
                    meter.used.get("workers", 0.0) * 1000 / max(jobs, 1), 3
                )
                maxima[s.name].append(res)
                print(
                    f"  round {r + 1} {s.name:<10} {res['jobs_per_s']:>8.1f} jobs/s"
                    f"  worker CPU {res['worker_cpu_s_per_1000_jobs']:.3f} s/1000"
                    f"  cores {res['cpu_cores']}",
                    flush=True,
                )
        best = {k: statistics.median(r["jobs_per_s"] for r in v) for k, v in maxima.items()}
        reference = best.get(o.reference) or max(best.values())
        rates = {f: reference * f for f in o.fractions}
        latencies: dict[str, dict[float, list[float]]] = {s.name: {} for s in systems}
        open_runs: dict[str, dict[float, list[dict[str, Any]]]] = {s.name: {} for s in systems}
        print(f"open loop at {', '.join(f'{f:.0%}' for f in o.fractions)} of {reference:.0f}/s")
        for r in range(o.rounds):
            for f, rate in rates.items():
                for s in systems if r % 2 == 0 else systems[::-1]:
                    res = await producers[s.name].open_loop(rate, duration_s=o.open_s)
                    lat = res.pop("latencies_ms")
                    latencies[s.name].setdefault(f, []).extend(lat)
                    summary = latency_summary(lat)
                    res["p50_ms"], res["p99_ms"] = summary.get("p50_ms"), summary.get("p99_ms")
                    open_runs[s.name].setdefault(f, []).append(res)
                    print(
                        f"  round {r + 1} {f:>4.0%} {s.name:<10} {rate:>7.0f}/s"
                        f"  p50 {summary.get('p50_ms', 0):>7.2f}  p99 {summary.get('p99_ms', 0):>7.2f} ms"
                        f"  lost {res['lost']}",
                        flush=True,
                    )
        result: dict[str, Any] = {
            "options": {
                "rounds": o.rounds,
                "window": o.window,
                "warmup_s": o.warmup_s,
                "measure_s": o.measure_s,
                "open_s": o.open_s,
                "fractions": list(o.fractions),
                "prefetch": ECHO_PREFETCH,
            },
            "reference_system": o.reference,
            "reference_max_jobs_per_s": round(reference, 1),
            "rates_per_s": {f"{f:g}": round(rate, 1) for f, rate in rates.items()},
            "systems": {},
        }
        for s in systems:
            runs = maxima[s.name]
            result["systems"][s.name] = {
                "kind": s.kind,
                "workers": s.workers,
                "note": s.note,
                "max_jobs_per_s": round(best[s.name], 1),
                "max_runs": runs,
                "worker_cpu_s_per_1000_jobs": round(
                    statistics.median(r["worker_cpu_s_per_1000_jobs"] for r in runs), 3
                ),
                "worker_rss_mb": [round(rss_mb(p.pid), 1) for p in s.procs],
                "worker_peak_rss_mb": [round(rss_mb(p.pid, peak=True), 1) for p in s.procs],
                "open_loop": {
                    f"{f:g}": {
                        "rate_per_s": round(rates[f], 1),
                        "latency": latency_summary(latencies[s.name][f]),
                        "p50_p99_per_round": [
                            [x["p50_ms"], x["p99_ms"]] for x in open_runs[s.name][f]
                        ],
                        "errors": sum(x["errors"] for x in open_runs[s.name][f]),
                        "lost": sum(x["lost"] for x in open_runs[s.name][f]),
                        "producer_max_behind_ms": max(
                            x["producer_max_behind_ms"] for x in open_runs[s.name][f]
                        ),
                        "breakdown_per_round": [
                            x["breakdown"] for x in open_runs[s.name][f] if x.get("breakdown")
                        ],
                        "cdf_ms": cdf_points(latencies[s.name][f]),
                    }
                    for f in o.fractions
                },
            }
        result["_latencies"] = latencies  # raw, for plots; dropped before saving
        return result


def print_table(result: dict[str, Any]) -> None:
    fractions = result["options"]["fractions"]
    head = f"{'system':<11}{'workers':>8}{'max jobs/s':>12}{'CPU s/1000':>11}{'RSS MB':>8}"
    for f in fractions:
        head += f"{f'p50@{f:.0%}':>11}{f'p99@{f:.0%}':>11}"
    print(head)
    for name, s in result["systems"].items():
        row = (
            f"{name:<11}{s['workers']:>8}{s['max_jobs_per_s']:>12.1f}"
            f"{s['worker_cpu_s_per_1000_jobs']:>11.3f}{sum(s['worker_peak_rss_mb']):>8.1f}"
        )
        for f in fractions:
            lat = s["open_loop"][f"{f:g}"]["latency"]
            row += (
                f"{lat.get('p50_ms', float('nan')):>11.2f}{lat.get('p99_ms', float('nan')):>11.2f}"
            )
        print(row)
    rates = ", ".join(f"{float(f):.0%} = {r:.0f}/s" for f, r in result["rates_per_s"].items())
    print(f"open-loop rates ({rates}) are fractions of {result['reference_system']}'s max")


def strip_raw(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def ceiling_part(result: dict[str, Any]) -> dict[str, Any]:
    """The ceiling systems of a comparison, for bench/results/ceiling.json."""
    out = strip_raw(result)
    out["systems"] = {k: v for k, v in out["systems"].items() if v["kind"] == "ceiling"}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ceiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--echo-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--http", help=argparse.SUPPRESS)
    parser.add_argument("--queue", default=WORK_QUEUE, help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", type=int, default=ECHO_PREFETCH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        quick_results()
    if args.echo_worker:
        uvloop.run(echo_worker(args.url, args.queue, args.prefetch, args.http))
        return
    options = Options.quick() if args.quick else Options()
    if args.rounds:
        options.rounds = args.rounds
    load_before = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    result = run_comparison(ceiling_systems(), options)
    print_table(result)
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    result["load_average_before"] = load_before
    print("saved", save("ceiling", ceiling_part(result)))


if __name__ == "__main__":
    main()
