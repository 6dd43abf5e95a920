"""What llmq adds to a streamed answer: time to first token, the gaps between
chunks, the worker's CPU per token; and the coalescing trade-off.

One fake endpoint streams 64 tokens after a 50 ms first token, one every 2 ms,
without jitter (so token *k* leaves the endpoint at ``first + (k − 1) · 2 ms``
and any later arrival is the path's doing). Three paths, at the same open-loop
rate, rounds interleaved: the endpoint called **directly** (aiohttp, SSE),
through **LlmqClient.stream** (one worker process), and through **llmq
gateway** (SSE over HTTP; the gateway process runs its own LlmqClient).

A fourth row, **hop**, is the durable hop alone (a persistent job to a
quorum queue with a confirm, a consumer that answers at once): the floor
under any router that keeps jobs in RabbitMQ on this machine, so what llmq
adds beyond the hop shows.

Per path: time to first token (TTFT) p50/p99; the **added delay of a token**
after the first, ``(arrival_k − arrival_1) − (k − 1) · 2 ms``, p50/p99 over
all tokens (what coalescing costs a reader); messages per token (parts per
token through the queue); worker CPU per job and per token.

Then the trade-off: the client path again with ``worker.stream_flush_ms`` at
0, 5, 20 and 50 ms (one worker each), same rate: broker messages per token
against the added delay per token, and the worker's CPU per token.

The rate: the issue asks for 50 % of the ceiling's rate. ``--rate`` sets
it; by default it is half the largest rate the client path sustains here,
found by a short search (streams are heavier than whole answers: each is
several broker messages), and the JSON says which.

    python -m bench.stream_latency [--quick] [--rate R] [--seconds S]

Writes bench/results/stream_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import uvloop

from bench.gateway_overhead import GATEWAY_KEY, free_port, start_gateway, until_ready
from bench.harness import (
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
MESSAGES = [{"role": "user", "content": "stream"}]
TOKENS = 64
FIRST_MS = 50.0
PER_TOKEN_MS = 2.0
FLUSH_MS = (0.0, 5.0, 20.0, 50.0)
SCENARIO = f"""
seed = 1
[[endpoints]]
name = "s"
port = 0
models = ["{MODEL}"]
latency_ms = {FIRST_MS}
ms_per_token = {PER_TOKEN_MS}
token_jitter = 0.0
output_tokens = {TOKENS}
"""


@dataclass
class Samples:
    """One path's measurements over its rounds."""

    ttft_ms: list[float] = field(default_factory=list)
    added_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    errors: int = 0
    tokens: int = 0

    def record(self, started: float, arrivals: list[float]) -> None:
        if len(arrivals) < TOKENS:
            self.errors += 1
            return
        first = arrivals[0]
        self.ttft_ms.append((first - started) * 1000)
        self.total_ms.append((arrivals[-1] - started) * 1000)
        self.added_ms += [
            (t - first) * 1000 - k * PER_TOKEN_MS for k, t in enumerate(arrivals) if k
        ]
        self.tokens += len(arrivals)

    def summary(self) -> dict[str, Any]:
        def q(values: list[float], p: float) -> float | None:
            return round(percentile(values, p), 3) if values else None

        return {
            "streams": len(self.ttft_ms),
            "errors": self.errors,
            "ttft_p50_ms": q(self.ttft_ms, 0.5),
            "ttft_p99_ms": q(self.ttft_ms, 0.99),
            "token_added_p50_ms": q(self.added_ms, 0.5),
            "token_added_p99_ms": q(self.added_ms, 0.99),
            "total_p50_ms": q(self.total_ms, 0.5),
            "total_p99_ms": q(self.total_ms, 0.99),
        }


def contents(chunk: dict[str, Any]) -> int:
    return sum(1 for c in chunk.get("choices") or [] if (c.get("delta") or {}).get("content"))


async def read_sse(response: aiohttp.ClientResponse, arrivals: list[float]) -> None:
    """Content arrival times of an OpenAI SSE body, read as it comes."""
    async for line in response.content:
        if line.startswith(b"data: {"):
            n = contents(orjson.loads(line[6:]))
            now = time.perf_counter()
            arrivals += [now] * n


Path_ = Callable[[list[float]], Awaitable[None]]


def direct_path(http: aiohttp.ClientSession, url: str) -> Path_:
    body = orjson.dumps(
        {"model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "stream": True}
    )
    headers = {"Authorization": "Bearer x", "Content-Type": "application/json"}

    async def call(arrivals: list[float]) -> None:
        async with http.post(f"{url}/chat/completions", data=body, headers=headers) as r:
            await read_sse(r, arrivals)

    return call


def gateway_path(http: aiohttp.ClientSession, port: int) -> Path_:
    body = orjson.dumps(
        {"model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "stream": True}
    )
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def call(arrivals: list[float]) -> None:
        async with http.post(url, data=body, headers=headers) as r:
            if r.status == 200:
                await read_sse(r, arrivals)

    return call


def client_path(client: LlmqClient, messages: list[int] | None = None) -> Path_:
    """``messages`` (if given) gets each stream's count of broker messages."""

    async def call(arrivals: list[float]) -> None:
        async with client.stream(MODEL, MESSAGES, max_tokens=TOKENS, sla_ms=30_000) as s:
            async for chunk in s:
                n = contents(chunk)
                now = time.perf_counter()
                arrivals += [now] * n
        if messages is not None:
            messages.append(s.messages)

    return call


@contextlib.asynccontextmanager
async def hop_path(amqp_url: str) -> AsyncIterator[Path_]:
    """The durable hop alone, the floor under any queue-based router here: a
    persistent job to a quorum queue (publisher confirm), a consumer that at
    once publishes one message to the caller's exclusive queue. Its "TTFT" is
    the hop's round trip; it carries no tokens (only TTFT is read of it)."""
    connection = await aio_pika.connect(amqp_url)
    try:
        producer = await connection.channel(publisher_confirms=True)
        server = await connection.channel()
        jobs = await server.declare_queue(
            "bench.hop", durable=True, arguments={"x-queue-type": "quorum"}
        )
        replies = await producer.declare_queue(exclusive=True)
        waiting: dict[str, asyncio.Future[float]] = {}

        async def serve(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await server.default_exchange.publish(
                aio_pika.Message(b"{}", correlation_id=message.correlation_id),
                routing_key=message.reply_to or "",
            )
            await message.ack()

        async def answered(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            future = waiting.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

        await jobs.consume(serve)
        await replies.consume(answered, no_ack=True)
        body = orjson.dumps({"model": MODEL, "messages": MESSAGES, "stream": True})

        async def call(arrivals: list[float]) -> None:
            key = uuid.uuid4().hex
            future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            waiting[key] = future
            await producer.default_exchange.publish(
                aio_pika.Message(
                    body,
                    correlation_id=key,
                    reply_to=replies.name,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="bench.hop",
            )
            arrivals += [await future] * TOKENS

        yield call
        await jobs.delete(if_unused=False, if_empty=False)
    finally:
        await connection.close()


async def open_loop(call: Path_, rate: float, seconds: float, samples: Samples) -> float:
    """Start ``rate`` calls a second for ``seconds``; wait for all; elapsed s."""
    tasks: list[asyncio.Task[None]] = []

    async def one() -> None:
        started = time.perf_counter()
        arrivals: list[float] = []
        try:
            async with asyncio.timeout(30):
                await call(arrivals)
        except Exception:  # any failure is an error of the path
            samples.errors += 1
            return
        samples.record(started, arrivals)

    t0 = time.perf_counter()
    n = max(1, int(rate * seconds))
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


@contextlib.contextmanager
def llmq(amqp_url: str, fleet_url: str, flush_ms: float, gateway: bool) -> Iterator[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(
            Path(tmp) / "llmq.toml",
            amqp_url,
            {"s": fleet_url},
            [MODEL],
            concurrency=512,
            stream_flush_ms=flush_ms,
        )
        port = free_port()
        with config.open("a") as f:
            f.write(f'[gateway]\nport = {port}\napi_keys_env = "BENCH_GATEWAY_KEYS"\n')
        worker = start_worker(config, f"stream-{flush_ms:g}")
        gw = start_gateway(config, port) if gateway else None
        try:
            yield {"worker": worker.pid, "gateway": None if gw is None else gw.pid, "port": port}
        finally:
            for proc in (gw, worker):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=30)


async def ready(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    await apply_topology(connection, plan(TopologySettings()))
    await connection.close()


async def sustained(call: Path_, rate: float, seconds: float) -> bool:
    s = Samples()
    elapsed = await open_loop(call, rate, seconds, s)
    return (
        s.errors == 0
        and elapsed < seconds * 1.2 + 2
        and bool(s.ttft_ms)
        and (percentile(s.ttft_ms, 0.99) < 1000)
    )


async def find_rate(call: Path_, seconds: float) -> float:
    """The largest rate (doubling from 25/s, then one bisection step) the path sustains."""
    rate, best = 25.0, 0.0
    while rate <= 800 and await sustained(call, rate, seconds):
        best, rate = rate, rate * 2
    if best and await sustained(call, best * 1.5, seconds):
        best *= 1.5
    return best or 10.0


async def measure(options: argparse.Namespace) -> dict[str, Any]:
    seconds = 3.0 if options.quick else options.seconds
    rounds = 1 if options.quick else 3
    result: dict[str, Any] = {"tokens": TOKENS, "first_ms": FIRST_MS, "per_token_ms": PER_TOKEN_MS}
    with (
        tempfile.TemporaryDirectory() as tmp,
        private_vhost() as amqp_url,
    ):
        scenario = Path(tmp) / "stream.toml"
        scenario.write_text(SCENARIO)
        with fleet_process(scenario) as urls:
            await ready(amqp_url)
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                with llmq(amqp_url, urls["s"], 20.0, gateway=True) as procs:
                    await until_ready(http, f"http://127.0.0.1:{procs['port']}/readyz")
                    async with LlmqClient(amqp_url) as client, hop_path(amqp_url) as hop:
                        paths = {
                            "direct": direct_path(http, urls["s"]),
                            "hop": hop,
                            "client": client_path(client),
                            "gateway": gateway_path(http, procs["port"]),
                        }
                        for call in paths.values():  # warm up
                            await open_loop(call, 20, 1.0, Samples())
                        if options.rate:
                            rate, how = options.rate, "given (--rate)"
                        else:
                            top = await find_rate(paths["client"], 2.0 if options.quick else 4.0)
                            rate, how = top / 2, f"half of {top:g}/s, the client path's max here"
                        result["rate_per_s"], result["rate_is"] = rate, how
                        samples = {name: Samples() for name in paths}
                        cpu = {"worker": 0.0, "gateway": 0.0}
                        for _ in range(rounds):
                            for name, call in paths.items():
                                w0 = cpu_seconds(procs["worker"])
                                g0 = cpu_seconds(procs["gateway"])
                                await open_loop(call, rate, seconds, samples[name])
                                if name == "client":
                                    cpu["worker"] += cpu_seconds(procs["worker"]) - w0
                                if name == "gateway":
                                    cpu["gateway"] += cpu_seconds(procs["gateway"]) - g0
                        rows = {name: s.summary() for name, s in samples.items()}
                        base = rows["direct"]
                        for name in ("client", "gateway"):
                            rows[name]["added_ttft_p50_ms"] = _minus(
                                rows[name], base, "ttft_p50_ms"
                            )
                            rows[name]["added_ttft_p99_ms"] = _minus(
                                rows[name], base, "ttft_p99_ms"
                            )
                        hop_row = rows["hop"]  # its whole time is what a durable hop adds
                        hop_row["added_ttft_p50_ms"] = hop_row["ttft_p50_ms"]
                        hop_row["added_ttft_p99_ms"] = hop_row["ttft_p99_ms"]
                        hop_row["token_added_p50_ms"] = hop_row["token_added_p99_ms"] = None
                        client_s = samples["client"]
                        rows["client"]["worker_cpu_ms_per_job"] = _per(
                            cpu["worker"], len(client_s.ttft_ms)
                        )
                        rows["client"]["worker_cpu_us_per_token"] = _per(
                            cpu["worker"] * 1000, client_s.tokens
                        )
                        rows["gateway"]["gateway_cpu_ms_per_request"] = _per(
                            cpu["gateway"], len(samples["gateway"].ttft_ms)
                        )
                        result["paths"] = rows
                result["coalescing"] = await trade_off(
                    amqp_url, urls["s"], result["rate_per_s"], seconds
                )
    return result


async def trade_off(
    amqp_url: str, fleet_url: str, rate: float, seconds: float
) -> list[dict[str, Any]]:
    """The client path with each flush interval: messages per token against delay."""
    rows = []
    for flush in FLUSH_MS:
        with llmq(amqp_url, fleet_url, flush, gateway=False) as procs:
            async with LlmqClient(amqp_url) as client:
                counted: list[int] = []
                call = client_path(client, counted)
                await open_loop(call, 20, 1.0, Samples())
                counted.clear()
                s = Samples()
                w0 = cpu_seconds(procs["worker"])
                await open_loop(call, rate, seconds, s)
                cpu = cpu_seconds(procs["worker"]) - w0
                row = {"flush_ms": flush, **s.summary()}
                row["messages_per_token"] = round(sum(counted) / max(1, s.tokens), 4)
                row["messages_per_stream"] = round(sum(counted) / max(1, len(counted)), 2)
                row["worker_cpu_us_per_token"] = _per(cpu * 1000, s.tokens)
                rows.append(row)
    return rows


def _minus(row: dict[str, Any], base: dict[str, Any], key: str) -> float | None:
    if row.get(key) is None or base.get(key) is None:
        return None
    return round(float(row[key]) - float(base[key]), 3)


def _per(total: float, count: int) -> float | None:
    return round(total * 1000 / count, 3) if count else None


def report(result: dict[str, Any]) -> None:
    print(
        f"rate {result['rate_per_s']:g} streams/s ({result['rate_is']}); "
        f"{TOKENS} tokens, first after {FIRST_MS:g} ms, then one every {PER_TOKEN_MS:g} ms"
    )
    print(
        f"{'path':<9}{'TTFT p50':>10}{'p99':>9}{'added p50':>11}{'p99':>9}"
        f"{'token+ p50':>12}{'p99':>9}{'errors':>8}"
    )
    for name, r in result["paths"].items():
        print(
            f"{name:<9}{r['ttft_p50_ms']:>10}{r['ttft_p99_ms']:>9}"
            f"{r.get('added_ttft_p50_ms', ''):>11}{r.get('added_ttft_p99_ms', ''):>9}"
            f"{r['token_added_p50_ms'] or '':>12}{r['token_added_p99_ms'] or '':>9}{r['errors']:>8}"
        )
    c = result["paths"]["client"]
    print(
        f"worker CPU: {c['worker_cpu_ms_per_job']} ms per streamed job, "
        f"{c['worker_cpu_us_per_token']} µs per token; gateway CPU "
        f"{result['paths']['gateway']['gateway_cpu_ms_per_request']} ms per request"
    )
    print(
        "coalescing (client path): flush ms, messages per token, token delay p50/p99 ms, "
        "worker µs per token"
    )
    for row in result["coalescing"]:
        print(
            f"  {row['flush_ms']:>5g} ms  {row['messages_per_token']:>7}  "
            f"{row['token_added_p50_ms']} / {row['token_added_p99_ms']}  "
            f"{row['worker_cpu_us_per_token']}  (TTFT p50 {row['ttft_p50_ms']}, errors {row['errors']})"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rate", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=8.0)
    options = parser.parse_args(argv)
    result = uvloop.run(measure(options))
    report(result)
    print(f"saved {save('stream_latency', result)}")


if __name__ == "__main__":
    main()
