"""Helpers shared by the integration tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson

from schemas.settings import Settings
from workers.fleet import Fleet, Scenario

FLEET_KEY = "sk-test-fleet-key-0123456789"
TEST_REPLY_QUEUES = ("llmq.reply.*", "reply.*", "r.*", "tp.*", "*replies*", "no-such-queue")
"""The reply queues the tests declare; the default (llmq.reply.*) is what LlmqClient
creates, and tests/integration/test_hostile.py checks that others are refused."""


@asynccontextmanager
async def running_fleet(*endpoints: dict[str, Any], seed: int = 1) -> AsyncIterator[Fleet]:
    scenario = Scenario.model_validate(
        {"seed": seed, "api_key": FLEET_KEY, "endpoints": list(endpoints)}
    )
    async with Fleet(scenario) as fleet:
        yield fleet


class Caller:
    """Publishes raw jobs and collects replies and dead letters, like any producer."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
        self.connection = connection
        self.settings = settings
        self.replies: dict[str, list[dict[str, Any]]] = {}
        self.dead: list[aio_pika.abc.AbstractIncomingMessage] = []
        self.reply_queue = f"llmq.reply.{uuid.uuid4().hex[:8]}"
        self._arrived = asyncio.Event()

    async def start(self) -> None:
        self.channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        # Like LlmqClient's: survives a dropped connection, expires when unused;
        # durable because RabbitMQ 4.3 refuses transient non-exclusive queues.
        queue = await self.channel.declare_queue(
            self.reply_queue, durable=True, arguments={"x-expires": 300_000}
        )
        await queue.consume(self._on_reply, no_ack=True)
        dead = await self.channel.get_queue(self.settings.topology.dead_queue, ensure=False)
        await dead.consume(self._on_dead, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.replies.setdefault(message.correlation_id or "", []).append(orjson.loads(message.body))
        self._arrived.set()

    async def _on_dead(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.dead.append(message)
        self._arrived.set()

    async def publish(
        self,
        body: bytes | dict[str, Any],
        *,
        job_id: str | None = None,
        reply: bool = True,
        routing_key: str = "interactive",
        headers: dict[str, Any] | None = None,
        reply_to: str | None = None,
        **properties: Any,
    ) -> str:
        job_id = job_id or uuid.uuid4().hex
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        exchange = await self.channel.get_exchange(self.settings.topology.jobs_exchange)
        await exchange.publish(
            aio_pika.Message(
                raw,
                message_id=job_id,
                correlation_id=job_id,
                reply_to=reply_to or (self.reply_queue if reply else None),
                content_type=properties.pop("content_type", "application/json"),
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                **properties,
            ),
            routing_key=routing_key,
            mandatory=True,
        )
        return job_id

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._arrived.clear()
                await self._arrived.wait()

    def dead_ids(self) -> list[str | None]:
        return [m.message_id for m in self.dead]


def chat_and_embedding_endpoints(fleet: Fleet) -> list[dict[str, Any]]:
    """Settings' endpoints for a fleet of ``chat`` (model m1) and ``emb`` (model e1):
    an endpoint serves one kind of model, so embeddings get their own."""
    key = {"api_key_env": "LLMQ_TEST_FLEET_KEY"}
    return [
        {"name": "chat", "base_url": fleet.url("chat"), "models": ["m1"], **key},
        {
            "name": "emb",
            "base_url": fleet.url("emb"),
            "models": {"e1": {"upstream": "e1", "kind": "embedding"}},
            **key,
        },
    ]


def chat(model: str = "m1", content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def write_worker_config(
    path: Path,
    amqp_url: str,
    names: dict[str, str],
    endpoints: dict[str, str],
    models: tuple[str, ...] = ("m1",),
    **worker: Any,
) -> Path:
    """An llmq.toml for a worker process: the test's topology names, these endpoints."""
    lines = ["[broker]", f'url = "{amqp_url}"', "[topology]"]
    lines += [f'{k} = "{v}"' for k, v in names.items()]
    lines += ["delivery_limit = 3", "[worker]"]
    worker = {"reply_queues": list(TEST_REPLY_QUEUES), **worker}
    lines += [f"{k} = {json.dumps(v)}" for k, v in worker.items()]
    for name, url in endpoints.items():
        lines += [
            "[[endpoints]]",
            f'name = "{name}"',
            f'base_url = "{url}"',
            'api_key_env = "LLMQ_TEST_FLEET_KEY"',
            f"models = {json.dumps(list(models))}",
            "max_concurrency = 1024",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def start_worker_process(
    config: Path, connection: aio_pika.abc.AbstractConnection, queue: str
) -> subprocess.Popen[bytes]:
    """``llmq worker --config`` as a subprocess; returns once it consumes ``queue``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}
    with (config.parent / "worker.log").open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220 - a quick spawn; the waiting below is async
            [sys.executable, "-m", "llmq_cli", "worker", "--config", str(config)],
            env={**env, "LLMQ_TEST_FLEET_KEY": FLEET_KEY},
            stderr=log,
        )
    for _ in range(200):
        if proc.poll() is not None:
            raise AssertionError((config.parent / "worker.log").read_text())
        try:
            if await consumers(connection, queue) > 0:
                return proc
        except aio_pika.exceptions.ChannelNotFoundEntity:
            pass
        await asyncio.sleep(0.1)
    proc.kill()
    raise AssertionError("worker did not start consuming")


async def consumers(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """How many consumers ``queue`` has (a passive declare)."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.consumer_count)
    finally:
        await channel.close()


async def queue_depth(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    """Ready messages in ``queue``."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count)
    finally:
        await channel.close()


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


RESULTS: list[dict[str, Any]] = []
"""Fault-suite summaries, one per case (printed at the end of the session)."""


@dataclass
class Ledger:
    """Job ids published, and every reply and dead letter seen for each."""

    case: str
    fault: str
    published: set[str] = field(default_factory=set)
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    dead_only: set[str] = field(default_factory=set)
    """Published jobs whose reply has nowhere it may go: they end as a dead letter only."""

    def reply(self, job_id: str, envelope: dict[str, Any]) -> None:
        self.replies.setdefault(job_id, []).append(envelope)

    def dead_letter(self, job_id: str) -> None:
        self.dead[job_id] = self.dead.get(job_id, 0) + 1

    @property
    def prefix(self) -> str:
        """The case name as a valid job-id prefix."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.case).strip("-")

    @property
    def lost(self) -> set[str]:
        return self.published - set(self.replies) - (self.dead_only & set(self.dead))

    def settled(self) -> bool:
        """Every job replied, and every failed one dead-lettered."""
        return not self.lost and not self.failed_without_dead_letter()

    def failed_without_dead_letter(self) -> set[str]:
        failed = {j for j, rs in self.replies.items() if all(r["status"] == "error" for r in rs)}
        return failed - set(self.dead)

    def check(self) -> None:
        """The suite's invariant: none lost; every failure also a dead letter."""
        summary = self.summary()
        RESULTS.append(summary)
        assert self.lost == set(), f"lost jobs: {sorted(self.lost)[:10]}"
        assert self.failed_without_dead_letter() == set()
        assert set(self.replies) <= self.published  # nothing unexpected
        assert not (self.dead_only & set(self.replies)), "a reply went where it may not"

    def summary(self) -> dict[str, Any]:
        ok = sum(1 for rs in self.replies.values() if any(r["status"] == "ok" for r in rs))
        return {
            "case": self.case,
            "fault": self.fault,
            "published": len(self.published),
            "ok": ok,
            "errors": len(self.replies) - ok + len(self.dead_only & set(self.dead)),
            "dead_letters": sum(self.dead.values()),
            "duplicates": sum(len(rs) - 1 for rs in self.replies.values())
            + sum(n - 1 for n in self.dead.values()),
            "lost": len(self.lost),
        }


def record_reply(ledger: Ledger, data: dict[str, Any], correlation_id: str | None) -> None:
    """A reply answers its job."""
    ledger.reply(data["job_id"] or correlation_id, data)


@asynccontextmanager
async def collecting(
    amqp_url: str,
    settings: Settings,
    ledger: Ledger,
    record: Callable[[Ledger, dict[str, Any], str | None], None] = record_reply,
) -> AsyncIterator[str]:
    """A durable reply queue and the dead-letter queue, consumed into ``ledger``
    over a robust connection (it must outlive broker restarts); ``record`` says
    what a message on the reply queue means for the ledger."""
    connection = await aio_pika.connect_robust(amqp_url)
    channel = await connection.channel()
    name = f"replies.{uuid.uuid4().hex[:8]}"
    replies = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    dead = await channel.get_queue(settings.topology.dead_queue, ensure=False)

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        record(ledger, orjson.loads(message.body), message.correlation_id)
        await message.ack()

    async def on_dead(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        ledger.dead_letter(message.message_id or "")
        await message.ack()

    await replies.consume(on_reply)
    await dead.consume(on_dead)
    try:
        yield name
    finally:
        await connection.close()


async def stop_processes(*procs: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM what still runs, and wait for each to end."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        if proc is not None:
            await asyncio.to_thread(proc.wait, 30)


@asynccontextmanager
async def started(
    settings: Settings,
    connection: aio_pika.abc.AbstractConnection,
    *,
    name: str = "test-worker",
    **kw: Any,
) -> AsyncIterator[tuple[Any, Caller]]:
    """A worker of ``settings`` in this process and a caller on ``connection``."""
    from workers.service import Worker

    worker = Worker(settings, name=name, **kw)
    await worker.start()
    caller = Caller(connection, settings)
    await caller.start()
    try:
        yield worker, caller
    finally:
        await worker.stop(grace_s=5)
