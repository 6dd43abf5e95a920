"""What the OpenAI-compatible gateway adds to a call, over ``LlmqClient.complete``.

One zero-latency endpoint, one worker process and one gateway process on a
private vhost. The same jobs run at the same concurrency two ways: directly
with ``LlmqClient.complete`` from this process, and as HTTP requests to the
gateway (an aiohttp client with keep-alive). Rounds alternate between the two
so drift hits both; warm-up requests are not counted. Reports p50/p90/p99
per path and the difference, and the gateway's CPU per request.

    python -m bench.gateway_overhead [--requests 2000] [--concurrency 8] [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import uvloop

from bench.harness import (
    SCENARIOS,
    cpu_seconds,
    fleet_process,
    percentile,
    private_vhost,
    save,
    start_worker,
    write_config,
)
from producers.client import LlmqClient
from schemas.broker.topology import apply_topology
from schemas.settings import TopologySettings
from schemas.topology import plan

MODEL = "gpt-4.1-mini"
MESSAGES = [{"role": "user", "content": "hi"}]
GATEWAY_KEY = "sk-bench-gateway"  # a throwaway key for this run, not a secret
WARMUP = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(config: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    env["BENCH_GATEWAY_KEYS"] = GATEWAY_KEY
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmq_cli",
            "gateway",
            "--config",
            str(config),
            "--port",
            str(port),
        ],
        env=env,
        stderr=subprocess.DEVNULL,
    )


async def until_ready(http: aiohttp.ClientSession, url: str, wait_s: float = 30) -> None:
    for _ in range(int(wait_s / 0.1)):
        try:
            async with http.get(url) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


async def run_load(
    call: Callable[[], Awaitable[bool]], requests: int, concurrency: int
) -> tuple[list[float], int, float]:
    """``requests`` calls, ``concurrency`` at a time; latencies in ms, errors, elapsed s."""
    latencies: list[float] = []
    errors = 0
    todo = iter(range(requests))

    async def lane() -> None:
        nonlocal errors
        for _ in todo:
            t0 = time.perf_counter()
            ok = await call()
            latencies.append((time.perf_counter() - t0) * 1000)
            errors += not ok

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0


def summary(latencies: list[float], errors: int, elapsed: float) -> dict[str, Any]:
    return {
        "requests": len(latencies),
        "errors": errors,
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p90_ms": round(percentile(latencies, 0.90), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "mean_ms": round(sum(latencies) / len(latencies), 3),
    }


async def measure(
    amqp_url: str, urls: dict[str, str], requests: int, concurrency: int, rounds: int
) -> dict[str, Any]:
    connection = await aio_pika.connect(amqp_url)
    await apply_topology(connection, plan(TopologySettings()))
    await connection.close()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp) / "llmq.toml", amqp_url, urls, [MODEL], concurrency=256)
        with config.open("a") as f:
            f.write(f'[gateway]\nport = {port}\napi_keys_env = "BENCH_GATEWAY_KEYS"\n')
        worker = start_worker(config, "bench")
        gateway = start_gateway(config, port)
        try:
            return await compare(amqp_url, port, gateway.pid, requests, concurrency, rounds)
        finally:
            for proc in (gateway, worker):
                proc.terminate()
                proc.wait(timeout=30)


async def compare(
    amqp_url: str, port: int, gateway_pid: int, requests: int, concurrency: int, rounds: int
) -> dict[str, Any]:
    body = orjson.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 16})
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"}
    endpoint = f"http://127.0.0.1:{port}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with (
        LlmqClient(amqp_url) as client,
        aiohttp.ClientSession(connector=connector) as http,
    ):
        await until_ready(http, f"http://127.0.0.1:{port}/readyz")

        async def direct() -> bool:
            response = await client.complete(MODEL, MESSAGES, sla_ms=30_000, max_tokens=16)
            return response.get("object") == "chat.completion"

        async def via_gateway() -> bool:
            async with http.post(endpoint, data=body, headers=headers) as r:
                answer = await r.read()
                return r.status == 200 and orjson.loads(answer).get("object") == "chat.completion"

        paths = {"direct": direct, "gateway": via_gateway}
        for call in paths.values():
            await run_load(call, WARMUP, concurrency)
        results: dict[str, tuple[list[float], int, float]] = {p: ([], 0, 0.0) for p in paths}
        gateway_cpu = 0.0
        for _ in range(rounds):
            for name, call in paths.items():
                cpu0 = cpu_seconds(gateway_pid)
                lat, err, elapsed = await run_load(call, requests // rounds, concurrency)
                if name == "gateway":
                    gateway_cpu += cpu_seconds(gateway_pid) - cpu0
                old = results[name]
                results[name] = (old[0] + lat, old[1] + err, old[2] + elapsed)
    rows = {name: summary(*values) for name, values in results.items()}
    added = {
        key: round(rows["gateway"][key] - rows["direct"][key], 3)
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")
    }
    return {
        "concurrency": concurrency,
        "rounds": rounds,
        "warmup_per_path": WARMUP,
        "paths": rows,
        "gateway_added": added,
        "gateway_cpu_ms_per_request": round(gateway_cpu * 1000 / rows["gateway"]["requests"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="per path")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8, help="alternations direct/gateway")
    args = parser.parse_args()
    # aiormq warns when the vhost is deleted under a closing connection.
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    # Port 0: the fixed port of zero.toml may be taken by a demo running beside us.
    with tempfile.TemporaryDirectory() as tmp:
        scenario = Path(tmp) / "zero.toml"
        scenario.write_text(
            (SCENARIOS / "zero.toml").read_text().replace("port = 18110", "port = 0")
        )
        with fleet_process(scenario) as urls, private_vhost() as url:
            result = uvloop.run(measure(url, urls, args.requests, args.concurrency, args.rounds))
    print(f"concurrency {result['concurrency']}, zero-latency endpoint, 1 worker")
    print(
        f"{'path':<9}{'requests':>9}{'errors':>8}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
    )
    for name, r in result["paths"].items():
        print(
            f"{name:<9}{r['requests']:>9}{r['errors']:>8}{r['per_s']:>9}{r['p50_ms']:>9}{r['p90_ms']:>9}{r['p99_ms']:>9}{r['mean_ms']:>9}"
        )
    a = result["gateway_added"]
    print(
        f"{'added':<9}{'':>9}{'':>8}{'':>9}{a['p50_ms']:>9}{a['p90_ms']:>9}{a['p99_ms']:>9}{a['mean_ms']:>9}"
    )
    print(f"gateway CPU per request: {result['gateway_cpu_ms_per_request']} ms")
    print("saved", save("gateway_overhead", result))


if __name__ == "__main__":
    main()
