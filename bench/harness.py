"""Shared pieces of the benchmarks: a private vhost, the fleet and workers as
processes, process CPU/RSS readings from /proc, and one load generator
(:class:`Producer`) used by every broker benchmark. Every load is bounded.

``python -m bench.harness worker --config FILE ...`` runs one llmq worker
in-process (``workers.service.Worker``, unchanged) with an event-loop lag
sampler and optional profiling, for the benchmarks that look inside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiormq
import orjson
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SCENARIOS = REPO / "workers" / "fleet" / "scenarios"


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def private_vhost() -> Iterator[str]:
    """An AMQP URL of a fresh vhost, deleted afterwards (the broker is shared)."""
    name = f"llmq-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{quote(name, safe='')}"
    finally:
        rabbitmqctl("delete_vhost", name)


@contextlib.contextmanager
def fleet_process(scenario: Path, seed: int = 1) -> Iterator[dict[str, str]]:
    """Serve ``scenario`` in a subprocess; yields {endpoint name: base URL}."""
    with fleet_with_pid(scenario, seed) as (urls, _pid):
        yield urls


@contextlib.contextmanager
def fleet_with_pid(scenario: Path, seed: int = 1) -> Iterator[tuple[dict[str, str], int]]:
    """Like :func:`fleet_process`, also yielding the fleet's pid (for its CPU time)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.fleet", "--scenario", str(scenario), "--seed", str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    urls: dict[str, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("fleet ready"):
                break
            name, url, *_ = line.split()
            urls[name] = url
        else:
            raise RuntimeError("the fleet exited before it was ready")
        yield urls, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write_config(
    path: Path, amqp_url: str, endpoints: dict[str, str], models: list[str], **worker: Any
) -> Path:
    lines = ["[broker]", f'url = "{amqp_url}"', "[worker]"]
    # The benchmark's own reply queues (bench.reply.*, bench.replies) besides LlmqClient's.
    worker = {"reply_queues": ["llmq.reply.*", "bench.*"], **worker}
    lines += [f"{k} = {json.dumps(v)}" for k, v in worker.items()]
    for name, url in endpoints.items():
        lines += [
            "[[endpoints]]",
            f'name = "{name}"',
            f'base_url = "{url}"',
            f"models = {json.dumps(models)}",
            "max_concurrency = 4096",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def llmq_config(
    path: Path, amqp_url: str, endpoints: dict[str, str], models: list[str], **worker: Any
) -> Path:
    """:func:`write_config`, plus the worker's metrics endpoint (kept on, as shipped)
    on a free port, so several workers and a demo can run side by side."""
    write_config(path, amqp_url, endpoints, models, **worker)
    from schemas.settings import Settings

    if "metrics" in Settings.model_fields:
        with path.open("a") as f:
            f.write("[metrics]\nport = 0\n")
    return path


def start_worker(config: Path, name: str) -> subprocess.Popen[bytes]:
    """An ``llmq worker`` process; its log goes to ``$BENCH_WORKER_LOGS/<name>.log`` if set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    logs = os.environ.get("BENCH_WORKER_LOGS")
    stderr: Any = subprocess.DEVNULL
    if logs:
        stderr = (Path(logs) / f"{name}.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "llmq_cli", "worker", "--config", str(config), "--name", name],
        env=env,
        stderr=stderr,
    )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mb(pid: int, peak: bool = False) -> float:
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


def environment() -> dict[str, Any]:
    versions = {}
    for dist in ("aio-pika", "aiormq", "aiohttp", "httpx", "orjson", "uvloop", "pydantic"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def result_path(name: str, ext: str = "json") -> Path:
    """bench/results/<name><suffix>.<ext>; the suffix (``BENCH_RESULT_SUFFIX``, set to
    ``_quick`` by ``--quick``) keeps smoke runs from overwriting the committed results."""
    suffix = os.environ.get("BENCH_RESULT_SUFFIX", "")
    if name.endswith(suffix):
        suffix = ""
    return RESULTS / f"{name}{suffix}.{ext}"


def quick_results() -> None:
    """Call from a benchmark's ``--quick``: its results go to ``*_quick`` files."""
    os.environ["BENCH_RESULT_SUFFIX"] = "_quick"


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = result_path(name)
    path.write_text(
        json.dumps({"benchmark": name, "environment": environment(), **data}, indent=2) + "\n"
    )
    return path


# ---------------------------------------------------------------------------
# Shared by ceiling, overhead, concurrency and burst.

MODEL = "gpt-4.1-mini"
JOB_BODY = orjson.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
)
WORK_QUEUE = "llmq.q.interactive"


def ephemeral_scenario(source: Path, directory: Path) -> Path:
    """A copy of a shipped scenario on free ports (a demo may hold the fixed ones)."""
    target = directory / source.name
    text = re.sub(r"(?m)^(\s*port\s*=\s*)\d+", r"\g<1>0", source.read_text())
    target.write_text(text)
    return target


def broker_pid(port: int = 5672) -> int | None:
    """The Erlang VM listening on ``port`` (read-only: its CPU time from /proc).

    Not just any ``beam.smp``: ``rabbitmqctl`` runs one too, and a test may
    start a second broker on another port.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].rsplit(":", 1)[1] == f"{port:04X}" and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != "beam.smp":
                continue
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(entry.name)
    return None


class CpuMeter:
    """CPU seconds used by named groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {k: v for k, v in groups.items() if v}
        self._before: dict[str, float] = {}
        self._t0 = 0.0
        self.used: dict[str, float] = {}
        self.elapsed = 0.0

    def _read(self) -> dict[str, float]:
        out = {}
        for name, pids in self.groups.items():
            total = 0.0
            for pid in pids:
                with contextlib.suppress(OSError):
                    total += cpu_seconds(pid)
            out[name] = total
        return out

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._before = self._read()

    def stop(self) -> None:
        self.elapsed = time.perf_counter() - self._t0
        after = self._read()
        self.used = {k: after[k] - self._before.get(k, 0.0) for k in after}

    def shares(self) -> dict[str, float]:
        """CPU cores used per group over the window (1.0 = one core busy)."""
        return {k: round(v / self.elapsed, 3) for k, v in self.used.items()} if self.elapsed else {}


async def declare_llmq_topology(amqp_url: str) -> None:
    """llmq's exchanges and quorum queues, with llmq's arguments (``schemas.topology.plan``)."""
    import aio_pika

    from schemas.broker.topology import apply_topology
    from schemas.settings import TopologySettings
    from schemas.topology import plan

    connection = await aio_pika.connect(amqp_url)
    try:
        await apply_topology(connection, plan(TopologySettings()))
    finally:
        await connection.close()


async def wait_for_consumers(amqp_url: str, queue: str, count: int, timeout_s: float = 60) -> None:
    """Until ``queue`` has at least ``count`` consumers (the workers are up)."""
    connection = await aiormq.connect(amqp_url)
    try:
        channel = await connection.channel()
        give_up = time.monotonic() + timeout_s
        while True:
            ok = await channel.queue_declare(queue, passive=True)
            if (ok.consumer_count or 0) >= count:
                return
            if time.monotonic() > give_up:
                raise RuntimeError(f"{queue}: {ok.consumer_count} consumers, expected {count}")
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


def latency_summary(latencies_ms: list[float]) -> dict[str, Any]:
    if not latencies_ms:
        return {"count": 0}
    return {
        "count": len(latencies_ms),
        "p50_ms": round(percentile(latencies_ms, 0.50), 3),
        "p90_ms": round(percentile(latencies_ms, 0.90), 3),
        "p99_ms": round(percentile(latencies_ms, 0.99), 3),
        "p999_ms": round(percentile(latencies_ms, 0.999), 3),
        "max_ms": round(max(latencies_ms), 3),
        "mean_ms": round(sum(latencies_ms) / len(latencies_ms), 3),
    }


def cdf_points(values: list[float], points: int = 100) -> list[list[float]]:
    """``points`` (value, quantile) pairs of the empirical CDF, for plots from JSON."""
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered)
    qs = sorted({min(n - 1, round(i * (n - 1) / (points - 1))) for i in range(points)})
    return [[round(ordered[i], 3), round((i + 1) / n, 5)] for i in qs]


class BrokerLost(RuntimeError):
    """The producer's connection closed mid-run."""


class Producer:
    """Submits llmq jobs (the llmq wire format) and times their replies.

    Raw aiormq, not aio-pika and not ``LlmqClient``: the load generator
    shares the CPUs with what it measures, so it is kept cheap, and it is the
    same code for the ceiling and for llmq. Every publish is persistent,
    mandatory and confirmed; at most ``max_unconfirmed`` are unconfirmed.
    Replies are matched by correlation id; unknown or repeated ones count
    as ``duplicates``. Times are ``time.perf_counter()`` seconds.
    """

    def __init__(
        self,
        amqp_url: str,
        *,
        routing_key: str = "interactive",
        exchange: str = "llmq.jobs",
        sla_ms: int = 600_000,
        body: bytes = JOB_BODY,
        max_unconfirmed: int = 1024,
    ) -> None:
        self.url = amqp_url
        self.routing_key = routing_key
        self.exchange = exchange
        self.sla_ms = sla_ms
        self.body = body
        self.max_unconfirmed = max_unconfirmed
        self.reply_queue = f"bench.reply.{uuid.uuid4().hex}"
        self._seq = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._start: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self.done: list[tuple[float, float]] = []
        self.collect_routing = False
        """Keep each llmq reply's ``routing`` timings (queue, worker, upstream, reply path)."""
        self._published_ms: dict[str, int] = {}
        self.breakdown: list[tuple[float, float, float, float, float]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the previous run (its unanswered jobs were counted as lost)."""
        self._start.clear()
        self._waiters.clear()
        self.done = []
        self._published_ms.clear()
        self.breakdown = []
        self.ok = self.errors = self.duplicates = self.nacked = self.unroutable = 0
        self.published = 0
        self.broken = False

    async def __aenter__(self) -> Producer:
        self._connection = await aiormq.connect(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)
        # Exclusive: the producer never reconnects, and RabbitMQ 4.3 refuses
        # transient queues that are not exclusive.
        await self._channel.queue_declare(
            self.reply_queue, exclusive=True, arguments={"x-expires": 300_000}
        )
        ok = await self._channel.basic_consume(self.reply_queue, self._on_reply, no_ack=True)
        self._consumer_tag = ok.consumer_tag or ""
        self._unconfirmed = asyncio.Semaphore(self.max_unconfirmed)
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await self._channel.basic_cancel(self._consumer_tag)
        with contextlib.suppress(Exception):
            await self._channel.queue_delete(self.reply_queue)
        with contextlib.suppress(Exception):
            await self._connection.close()

    @property
    def unanswered(self) -> int:
        return len(self._start)

    async def _on_reply(self, message: DeliveredMessage) -> None:
        now = time.perf_counter()
        corr = message.header.properties.correlation_id or ""
        started = self._start.pop(corr, None)
        if started is None:
            self.duplicates += 1
            return
        self.done.append((now, now - started))
        if self.collect_routing:
            self._note_routing(corr, message.body)
        if b'"status":"ok"' in message.body:
            self.ok += 1
        else:
            self.errors += 1
        waiter = self._waiters.pop(corr, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_answered(self, timeout_s: float, tasks: set[Any] | None = None) -> bool:
        """Until every published job has its reply (and ``tasks`` are done), or timeout."""
        give_up = time.perf_counter() + timeout_s
        while self._start or tasks:  # polled: replies arrive in callbacks
            if time.perf_counter() > give_up or self._connection.is_closed:
                return False
            await asyncio.sleep(0.02)
        return True

    def next_id(self) -> str:
        return f"{self._prefix}-{next(self._seq)}"

    def _note_routing(self, job_id: str, body: bytes) -> None:
        """(arrival, queue, worker, reply path, upstream) in ms from an llmq reply envelope:
        queue = publish to worker start, worker = start to reply built minus the upstream
        call, reply path = the rest (reply publish, broker, delivery to us). Wall clock, ms;
        the worker stamps whole ms for the queue, so sub-ms figures are approximate."""
        arrived = time.time() * 1000
        published = self._published_ms.pop(job_id, None)
        with contextlib.suppress(ValueError, KeyError, TypeError):
            routing = orjson.loads(body)["routing"]
            queue, total = float(routing["queue_ms"]), float(routing["total_ms"])
            upstream = float(routing.get("upstream_ms") or 0.0)
            if published is not None:
                self.breakdown.append(
                    (
                        arrived,
                        queue,
                        total - queue - upstream,
                        arrived - published - total,
                        upstream,
                    )
                )

    def breakdown_summary(
        self, since_wall_ms: float = 0.0, until_wall_ms: float = float("inf")
    ) -> dict[str, Any]:
        rows = [b for b in self.breakdown if since_wall_ms <= b[0] < until_wall_ms]
        if not rows:
            return {}
        out: dict[str, Any] = {"count": len(rows)}
        for i, name in (
            (1, "queue_ms"),
            (2, "worker_ms"),
            (3, "reply_path_ms"),
            (4, "upstream_ms"),
        ):
            values = [r[i] for r in rows]
            out[name] = {
                "p50": round(percentile(values, 0.5), 2),
                "p99": round(percentile(values, 0.99), 2),
            }
        return out

    async def publish(self, job_id: str, started: float) -> bool:
        """Publish one job; its latency counts from ``started``. False if refused."""
        self._start[job_id] = started
        published_ms = int(time.time() * 1000)
        if self.collect_routing:
            self._published_ms[job_id] = published_ms
        properties = spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,
            message_id=job_id,
            correlation_id=job_id,
            reply_to=self.reply_queue,
            headers={"published-ms": published_ms, "sla-ms": self.sla_ms},
        )
        async with self._unconfirmed:
            try:
                await self._channel.basic_publish(
                    self.body,
                    exchange=self.exchange,
                    routing_key=self.routing_key,
                    properties=properties,
                    mandatory=True,
                    # Not waiting for the socket drain inside aiormq's channel lock:
                    # with it, publishes on a channel go one per loop turn or two.
                    wait=False,  # type: ignore[call-arg]  # aiormq's Channel has it, its ABC not
                )
                self.published += 1
                return True
            except aiormq.exceptions.PublishError:
                self.unroutable += 1
            except aiormq.exceptions.DeliveryError:
                self.nacked += 1
            except (aiormq.exceptions.AMQPError, ConnectionError):
                self.broken = True
        self._start.pop(job_id, None)
        return False

    def check(self) -> None:
        """A lost connection (a broker restart on a shared machine) voids the run."""
        if self.broken or self._connection.is_closed:
            raise BrokerLost("the broker connection was lost during the run: results void")

    def _window(self, a: float, b: float) -> list[float]:
        """Latencies (ms) of the replies that arrived in [a, b)."""
        return [lat * 1000 for t, lat in self.done if a <= t < b]

    async def closed_loop(
        self,
        window: int,
        *,
        warmup_s: float,
        measure_s: float,
        ramp_s: float = 0.0,
        drain_s: float = 30.0,
        on_start: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """``window`` jobs always outstanding; the rate is replies/s in the measured window.

        Lanes start spread over ``ramp_s`` so a slow endpoint's replies do not
        come back in lockstep waves.
        """
        self.reset()
        loop = asyncio.get_running_loop()
        stopping = False

        async def lane(k: int) -> None:
            if ramp_s:
                await asyncio.sleep(ramp_s * k / window)
            while not stopping:
                job_id = self.next_id()
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters[job_id] = waiter
                if await self.publish(job_id, time.perf_counter()):
                    await waiter
                elif self.broken:
                    return
                else:
                    self._waiters.pop(job_id, None)
                    await asyncio.sleep(0.01)

        lanes = [asyncio.create_task(lane(k)) for k in range(window)]
        try:
            await asyncio.sleep(warmup_s)
            if on_start:
                on_start()
            a = time.perf_counter()
            await asyncio.sleep(measure_s)
            b = time.perf_counter()
            if on_stop:
                on_stop()
            stopping = True
            _, pending = await asyncio.wait(lanes, timeout=drain_s)
        finally:
            for task in lanes:
                task.cancel()
        self.check()
        latencies = self._window(a, b)
        wall_a = time.time() * 1000 - (time.perf_counter() - a) * 1000
        wall_b = wall_a + (b - a) * 1000
        return {
            "breakdown": self.breakdown_summary(wall_a, wall_b) if self.collect_routing else {},
            "window": window,
            "measure_s": round(b - a, 3),
            "jobs_per_s": round(len(latencies) / (b - a), 1),
            "replies": len(self.done),
            "errors": self.errors,
            "nacked": self.nacked,
            "lost": len(pending),
            "latencies_ms": latencies,
        }

    async def open_loop(
        self, rate: float, *, duration_s: float, warmup_s: float = 0.5, drain_s: float = 30.0
    ) -> dict[str, Any]:
        """Jobs at a fixed rate, evenly spaced; latency counts from each job's scheduled
        time, so a late producer or a backed-up system cannot hide (no coordinated omission)."""
        self.reset()
        n = max(1, round(rate * duration_s))
        tasks: set[asyncio.Task[bool]] = set()
        t0 = time.perf_counter() + 0.01
        i = 0
        behind = 0.0
        while i < n:
            now = time.perf_counter()
            due = min(n, int((now - t0) * rate) + 1)
            if due > i:
                behind = max(behind, now - (t0 + i / rate))
            while i < due:
                task = asyncio.create_task(self.publish(self.next_id(), t0 + i / rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if i < n:
                await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        sent_s = time.perf_counter() - t0
        await self.wait_answered(drain_s, tasks)
        for task in tasks:
            task.cancel()
        self.check()
        # Latencies of jobs scheduled after the warm-up.
        latencies = [lat * 1000 for t, lat in self.done if t - lat >= t0 + warmup_s]
        wall_warm = (time.time() - (time.perf_counter() - t0 - warmup_s)) * 1000
        return {
            "breakdown": self.breakdown_summary(wall_warm) if self.collect_routing else {},
            "rate": round(rate, 1),
            "jobs": n,
            "sent_per_s": round(n / sent_s, 1),
            "producer_max_behind_ms": round(behind * 1000, 3),
            "errors": self.errors,
            "nacked": self.nacked,
            "lost": len(self._start),
            "latencies_ms": latencies,
        }

    async def burst(self, jobs: int, *, lanes: int = 1024) -> dict[str, Any]:
        """Publish ``jobs`` as fast as confirms allow (``lanes`` unconfirmed); returns at
        the last confirm. Replies keep arriving: poll :attr:`unanswered`."""
        self.reset()
        todo = iter(range(jobs))
        t0 = time.perf_counter()

        async def lane() -> None:
            for _ in todo:
                await self.publish(self.next_id(), time.perf_counter())

        await asyncio.gather(*(lane() for _ in range(min(lanes, jobs))))
        self.check()
        elapsed = time.perf_counter() - t0
        return {
            "started": t0,
            "publish_s": round(elapsed, 3),
            "publish_per_s": round(jobs / elapsed, 1),
            "nacked": self.nacked,
            "unroutable": self.unroutable,
        }


# ---------------------------------------------------------------------------
# One llmq worker in-process, with a lag sampler and optional profiling.


def start_inprocess_worker(
    config: Path,
    name: str,
    stats_out: Path,
    *,
    profile: str | None = None,
    profile_out: Path | None = None,
) -> subprocess.Popen[str]:
    """``python -m bench.harness worker`` in a subprocess; returns once it consumes.

    SIGUSR1 marks the start of the measured window (and starts the profiler),
    SIGUSR2 its end; SIGTERM stops the worker and writes ``stats_out``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    cmd = [
        sys.executable, "-m", "bench.harness", "worker",
        "--config", str(config), "--name", name, "--stats-out", str(stats_out),
    ]  # fmt: skip
    if profile:
        cmd += ["--profile", profile, "--profile-out", str(profile_out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("worker ready"):
            return proc
    raise RuntimeError("the in-process worker exited before it was ready")


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 30) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def _serve_worker(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from schemas.settings import load_settings
    from workers.service import Worker

    logging.basicConfig(level=logging.WARNING)
    settings = load_settings(args.config)
    worker = Worker(settings, name=args.name)
    await worker.start()
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, float, int]] = []
    marks: dict[str, float] = {}
    profiler: Any = None

    async def sampler() -> None:
        # The loop's responsiveness: how late a 10 ms sleep wakes up.
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.010)
            samples.append((t, (time.monotonic() - t - 0.010) * 1000, worker.stats.in_flight))

    def mark_start() -> None:
        nonlocal profiler
        marks["start"] = time.monotonic()
        marks["cpu_start"] = time.process_time()
        marks["ok_start"] = worker.stats.ok
        if args.profile == "pyinstrument":
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
        elif args.profile == "cprofile":
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()

    def mark_stop() -> None:
        marks["stop"] = time.monotonic()
        marks["cpu_stop"] = time.process_time()
        marks["ok_stop"] = worker.stats.ok
        if profiler is None:
            return
        if args.profile == "pyinstrument":
            profiler.stop()
            _write_pyinstrument(profiler, Path(args.profile_out))
        else:
            profiler.disable()
            profiler.dump_stats(args.profile_out)

    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, mark_start)
    loop.add_signal_handler(signal.SIGUSR2, mark_stop)
    task = asyncio.create_task(sampler())
    print("worker ready", flush=True)
    await stop.wait()
    task.cancel()
    await worker.stop(grace_s=5)
    return {"samples": samples, "marks": marks, "status": worker.status()}


def _package(path: str | None) -> str:
    """Which library a source file belongs to, for grouping profile time."""
    if not path:
        return "(native)"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    for own in ("workers", "schemas", "producers", "llmq_cli", "bench"):
        if f"/{own}/" in path:
            return own
    if "/lib/python3" in path:
        return "stdlib:" + path.rsplit("/", 1)[-1].removesuffix(".py")
    return path.rsplit("/", 1)[-1]


def _write_pyinstrument(profiler: Any, out: Path) -> None:
    session = profiler.last_session
    out.with_suffix(".txt").write_text(
        profiler.output_text(unicode=False, color=False, show_all=False)
    )
    session.save(str(out.with_suffix(".pyisession")))
    by_package: dict[str, float] = {}
    by_function: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    root = session.root_frame(trim_stem=False)
    # (frame, function keys of its ancestors): inclusive time counts a function
    # once per stack, however often it recurses.
    stack: list[tuple[Any, frozenset[str]]] = [(root, frozenset())] if root is not None else []
    while stack:
        frame, above = stack.pop()
        if frame.is_synthetic:
            continue
        pkg = _package(frame.file_path)
        key = f"{pkg}:{frame.function}"
        if key not in above:
            inclusive[key] = inclusive.get(key, 0.0) + frame.time
        stack.extend((c, above | {key}) for c in frame.children)
        own = frame.time - sum(c.time for c in frame.children if not c.is_synthetic)
        by_package[pkg] = by_package.get(pkg, 0.0) + own
        by_function[key] = by_function.get(key, 0.0) + own
    out.write_text(
        json.dumps(
            {
                "duration_s": session.duration,
                "sampled_s": sum(by_package.values()),
                "self_s_by_package": dict(sorted(by_package.items(), key=lambda kv: -kv[1])),
                "self_s_top_functions": dict(
                    sorted(by_function.items(), key=lambda kv: -kv[1])[:40]
                ),
                "inclusive_s_top_functions": dict(
                    sorted(inclusive.items(), key=lambda kv: -kv[1])[:80]
                ),
            },
            indent=2,
        )
    )


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="one llmq worker in-process, with a lag sampler")
    w.add_argument("--config", required=True)
    w.add_argument("--name", default="bench")
    w.add_argument("--stats-out", required=True)
    w.add_argument("--profile", choices=["pyinstrument", "cprofile"])
    w.add_argument("--profile-out")
    args = parser.parse_args(argv)
    import uvloop

    stats = uvloop.run(_serve_worker(args))
    Path(args.stats_out).write_text(json.dumps(stats))


if __name__ == "__main__":
    _main()
