"""``llmq dlq`` on the real broker: dead letters made by a worker and by the broker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from click.testing import CliRunner
from harness import chat, running_fleet

from producers.deadletters.actions import purge, replay
from producers.deadletters.command import dlq_group
from producers.deadletters.letters import Filter
from producers.deadletters.queue import browse
from schemas.broker.topology import apply_topology
from schemas.settings import Settings
from schemas.topology import plan
from workers.fleet import Fleet
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

ROOT = Path(__file__).resolve().parents[2]
SECRET = "sk-live-do-not-print-0123456789"


@dataclass
class World:
    """A fleet, settings and a reply queue of this test's own."""

    settings: Settings
    fleet: Fleet
    connection: aio_pika.abc.AbstractConnection
    config: Path
    reply_queue: str = ""
    replies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> None:
        await apply_topology(self.connection, plan(self.settings.topology))
        self.channel = await self.connection.channel(publisher_confirms=True)
        self.reply_queue = f"reply.{uuid.uuid4().hex[:8]}"
        queue = await self.channel.declare_queue(self.reply_queue, exclusive=True)
        await queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.replies.setdefault(message.correlation_id or "", []).append(orjson.loads(message.body))
        self.arrived.set()

    async def publish(
        self,
        body: dict[str, Any],
        *,
        routing_key: str = "interactive",
        headers: dict[str, Any] | None = None,
        exchange: str | None = None,
        job_id: str | None = None,
    ) -> str:
        job_id = job_id or uuid.uuid4().hex[:12]
        target = await self.channel.get_exchange(exchange or self.settings.topology.jobs_exchange)
        await target.publish(
            aio_pika.Message(
                orjson.dumps(body),
                message_id=job_id,
                correlation_id=job_id,
                reply_to=self.reply_queue,
                content_type="application/json",
                headers=headers or {},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
            mandatory=True,
        )
        return job_id

    async def count(self, queue: str) -> int:
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def wait_count(self, queue: str, n: int, timeout: float = 10.0) -> None:
        async def enough() -> bool:
            return await self.count(queue) >= n

        await until(enough, timeout)

    async def expect(self, queue: str, n: int) -> None:
        """``queue`` holds ``n`` ready messages (requeues reach the count a moment late)."""
        await self.wait_count(queue, n)
        assert await self.count(queue) == n

    async def wait_replies(self, ids: list[str], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not set(ids) <= set(self.replies):
                self.arrived.clear()
                await self.arrived.wait()

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take (and ack) everything in ``queue``."""
        channel = await self.connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        out = []
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            out.append(message)
        await channel.close()
        return out

    @property
    def dead(self) -> str:
        return self.settings.topology.dead_queue

    def queue(self, sla_class: str) -> str:
        return self.settings.topology.queue_name(sla_class)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


def write_config(path: Path, settings: Settings) -> Path:
    t = settings.topology
    path.write_text(
        f'[broker]\nurl = "{settings.broker.url.get_secret_value()}"\n'
        f'[topology]\njobs_exchange = "{t.jobs_exchange}"\ndead_exchange = "{t.dead_exchange}"\n'
        f'dead_queue = "{t.dead_queue}"\nqueue_prefix = "{t.queue_prefix}"\n'
        f"delivery_limit = {t.delivery_limit}\n"
    )
    return path


@pytest.fixture
async def world(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> AsyncIterator[World]:
    async with running_fleet(
        {"name": "a", "models": ["m1"], "latency_ms": {"median": 2, "p99": 3}}
    ) as fleet:
        settings = make_settings(fleet, worker={"max_attempts": 1})
        w = World(settings, fleet, connection, write_config(tmp_path / "llmq.toml", settings))
        await w.start()
        yield w


@asynccontextmanager
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    w = Worker(settings, name="dlq-test-worker")
    await w.start()
    try:
        yield w
    finally:
        await w.stop(grace_s=5)


async def broker_dead_letter(w: World) -> str:
    """A job the broker dead-letters: delivered and requeued past the delivery limit."""
    job = await w.publish(chat(), routing_key="batch")
    channel = await w.connection.channel()
    queue = await channel.get_queue(w.queue("batch"), ensure=False)
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        await message.nack(requeue=True)
    await channel.close()
    return job


async def make_dead_letters(w: World) -> dict[str, list[str]]:
    """Two unknown_model, two upstream_error (endpoint down), one broker dead letter."""
    ids: dict[str, list[str]] = {"broker": [await broker_dead_letter(w)]}
    await w.wait_count(w.dead, 1)
    await w.fleet.set_down("a", True)
    async with worker(w.settings):
        ids["unknown_model"] = [
            await w.publish(chat("nope"), headers={"authorization": f"Bearer {SECRET}"}),
            await w.publish(chat("nope")),
        ]
        ids["upstream"] = [await w.publish(chat()), await w.publish(chat())]
        await w.wait_replies(ids["unknown_model"] + ids["upstream"])
        await w.wait_count(w.dead, 5)
    await w.fleet.set_down("a", False)
    return ids


async def fake_dead_letter(
    w: World, code: str, *, model: str = "m1", job_id: str | None = None
) -> str:
    """A worker-shaped dead letter, published straight to the dead-letter exchange."""
    return await w.publish(
        chat(model),
        job_id=job_id,
        exchange=w.settings.topology.dead_exchange,
        headers={
            "error-code": code,
            "error": f"{code} (made by the test)",
            "attempts": 1,
            "failed-at": int(time.time() * 1000),
            "worker": "test",
            "sla-class": "interactive",
        },
    )


def cli(*args: str) -> Any:
    """Run ``llmq dlq ARGS`` in a thread: it runs its own event loop."""
    return asyncio.to_thread(CliRunner().invoke, dlq_group, list(args), input="n\n")


async def test_list_shows_each_code_and_gives_every_dead_letter_back(world: World) -> None:
    """Worker and broker dead letters get their codes; browsing keeps count and order."""
    ids = await make_dead_letters(world)
    await world.expect(world.dead, 5)
    first = await browse(world.settings, Filter(), window=2)  # three windows
    await world.expect(world.dead, 5)
    assert first.total == first.scanned == first.matched == 5
    by_id = {letter.job_id: letter for letter in first.letters}
    [broker] = ids["broker"]
    assert by_id[broker].code == "internal_error" and by_id[broker].source == "broker"
    assert "delivery_limit" in by_id[broker].error and by_id[broker].sla_class == "batch"
    for job in ids["unknown_model"]:
        assert by_id[job].code == "unknown_model" and by_id[job].model == "nope"
    for job in ids["upstream"]:
        letter = by_id[job]
        assert letter.code == "upstream_error" and letter.model == "m1"
        assert letter.attempts == 1 and letter.worker == "dlq-test-worker"
        assert letter.sla_class == "interactive" and letter.age_s(int(time.time() * 1000)) < 60

    again = await browse(world.settings, Filter())
    assert [x.job_id for x in again.letters] == [x.job_id for x in first.letters]
    code = await browse(world.settings, Filter(codes=frozenset({"unknown_model"})))
    assert {x.job_id for x in code.letters} == set(ids["unknown_model"])
    model = await browse(world.settings, Filter(models=frozenset({"nope"})))
    assert {x.job_id for x in model.letters} == set(ids["unknown_model"])
    assert (await browse(world.settings, Filter(older_than_s=3600))).matched == 0
    limited = await browse(world.settings, Filter(limit=2))
    assert limited.matched == 5 and len(limited.letters) == 2

    result = await cli("list", "--config", str(world.config), "--json")
    assert result.exit_code == 0, result.output
    rows = orjson.loads(result.stdout)
    assert {r["job_id"]: r["code"] for r in rows} == {k: v.code for k, v in by_id.items()}
    result = await cli("list", "--config", str(world.config), "--code", "internal_error")
    assert result.exit_code == 0, result.output
    assert broker in result.stdout and "delivery_limit" in result.stdout
    assert "1 of 5 match" in result.stdout
    await world.expect(world.dead, 5)


async def test_show_prints_one_dead_letter_in_full_without_secrets(world: World) -> None:
    """``show`` prints headers, properties and body; authorization-like headers are redacted."""
    ids = await make_dead_letters(world)
    job = ids["unknown_model"][0]
    result = await cli("show", job, "--config", str(world.config), "--json")
    assert result.exit_code == 0, result.output
    shown = orjson.loads(result.stdout)
    assert shown["job_id"] == job and shown["code"] == "unknown_model"
    assert shown["headers"]["authorization"] == "[redacted]"
    assert shown["headers"]["error-code"] == "unknown_model"
    assert shown["properties"]["reply_to"] == world.reply_queue
    assert shown["body"]["model"] == "nope" and shown["copies"] == 1
    assert SECRET not in result.output
    result = await cli("show", job, "--config", str(world.config))
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output and "unknown_model" in result.output
    missing = await cli("show", "no-such-job", "--config", str(world.config))
    assert missing.exit_code == 1 and "no dead letter" in missing.output
    await world.expect(world.dead, 5)


async def test_replay_by_code_sends_the_same_job_with_a_fresh_deadline(world: World) -> None:
    """Only upstream_error is replayed: same ids, replay-count 1, new deadline; then answered."""
    ids = await make_dead_letters(world)
    dry = await cli(
        "replay", "--config", str(world.config), "--code", "upstream_error", "--dry-run"
    )
    assert dry.exit_code == 0, dry.output
    assert all(job in dry.stdout for job in ids["upstream"])
    await world.expect(world.dead, 5)

    t0 = int(time.time() * 1000)
    report = await replay(world.settings, Filter(codes=frozenset({"upstream_error"})))
    assert (report.total, report.matched, report.replayed) == (5, 2, 2)
    assert report.by_class == {"interactive": 2} and not report.failed
    await world.expect(world.dead, 3)
    work = world.queue("interactive")
    await world.wait_count(work, 2)

    channel = await world.connection.channel()
    queue = await channel.get_queue(work, ensure=False)
    taken = [await queue.get(no_ack=False), await queue.get(no_ack=False)]
    for message in taken:
        headers = message.headers or {}
        assert message.message_id in ids["upstream"]
        assert message.correlation_id == message.message_id
        assert message.reply_to == world.reply_queue
        assert orjson.loads(message.body) == chat()
        assert headers["replay-count"] == 1 and headers["sla-ms"] == 30_000
        assert headers["published-ms"] >= t0 and "deadline-ms" not in headers
        gone = {"error-code", "error", "attempts", "failed-at", "worker", "sla-class", "x-death"}
        assert not gone & set(headers)
        assert [k for k in headers if k.startswith("x-")] in ([], ["x-delivery-count"])
    for message in taken:
        await message.nack(requeue=True)
    await channel.close()

    for job in ids["upstream"]:
        world.replies.pop(job, None)  # their first, failed, replies
    async with worker(world.settings):
        await world.wait_replies(ids["upstream"])
    assert all(world.replies[job][0]["status"] == "ok" for job in ids["upstream"])
    left = await browse(world.settings, Filter())
    assert {x.code for x in left.letters} == {"unknown_model", "internal_error"}


async def test_replay_killed_midway_loses_nothing(world: World, tmp_path: Path) -> None:
    """SIGKILL during a rate-limited replay: every job is still dead or back in its queue."""
    ids = {await fake_dead_letter(world, "upstream_error") for _ in range(40)}
    await world.wait_count(world.dead, 40)
    work = world.queue("interactive")
    env = {k: v for k, v in os.environ.items() if k != "LLMQ_CONFIG"}
    with (tmp_path / "replay.err").open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "llmq_cli", "dlq", "replay", "--config", str(world.config)),
            *("--rate", "20", "--yes"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            await world.wait_count(work, 3, timeout=20)
            await asyncio.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()

    async def all_back() -> bool:
        return await world.count(world.dead) + await world.count(work) >= 40

    await until(all_back)
    dead = await world.drain(world.dead)
    replayed = await world.drain(work)
    assert 3 <= len(replayed) < 40, "killed midway"
    assert {m.message_id for m in dead} | {m.message_id for m in replayed} == ids
    assert all((m.headers or {})["replay-count"] == 1 for m in replayed)


async def test_replay_sends_one_copy_of_a_job_dead_lettered_twice(world: World) -> None:
    """At-least-once dead-lettering can leave two copies: one replay, both removed."""
    twice = await fake_dead_letter(world, "upstream_error")
    await fake_dead_letter(world, "upstream_error", job_id=twice)
    once = await fake_dead_letter(world, "upstream_error")
    await world.wait_count(world.dead, 3)
    report = await replay(world.settings, Filter(), rate=100)
    assert (report.replayed, report.duplicates, report.done) == (2, 1, 3)
    await world.expect(world.dead, 0)
    replayed = await world.drain(world.queue("interactive"))
    assert sorted(m.message_id or "" for m in replayed) == sorted([twice, once])


async def test_purge_removes_only_what_matches(world: World) -> None:
    """``purge`` asks first, then acks only the matching dead letters; order is kept."""
    unknown = [await fake_dead_letter(world, "unknown_model", model="nope") for _ in range(3)]
    upstream = [await fake_dead_letter(world, "upstream_error") for _ in range(2)]
    broker = await broker_dead_letter(world)
    await world.wait_count(world.dead, 6)
    before = [x.job_id for x in (await browse(world.settings, Filter())).letters]

    declined = await cli("purge", "--config", str(world.config), "--code", "unknown_model")
    assert declined.exit_code == 0 and "cancelled" in declined.output
    await world.expect(world.dead, 6)
    result = await cli("purge", "--config", str(world.config), "--code", "unknown_model", "--yes")
    assert result.exit_code == 0, result.output
    assert "deleted 3 dead letters" in result.output
    after = [x.job_id for x in (await browse(world.settings, Filter())).letters]
    assert after == [j for j in before if j not in unknown]
    assert set(after) == {*upstream, broker}

    one = await purge(world.settings, Filter(codes=frozenset({"upstream_error"}), limit=1))
    assert (one.matched, one.deleted) == (1, 1)
    rest = await purge(world.settings, Filter(codes=frozenset({"internal_error"})))
    assert rest.deleted == 1
    assert [x.job_id for x in (await browse(world.settings, Filter())).letters] == upstream[1:]


async def test_browsing_keeps_the_order_across_windows_and_commands(world: World) -> None:
    """Back-to-back browses with any window size see the same order: nothing rotates."""
    ids = [await fake_dead_letter(world, "upstream_error") for _ in range(60)]
    await world.wait_count(world.dead, 60)
    for window in (7, 60, 1000, 16):
        seen = await browse(world.settings, Filter(), window=window)
        assert [x.job_id for x in seen.letters] == ids, window


async def test_browsing_25_times_loses_nothing_and_keeps_the_order(world: World) -> None:
    """RabbitMQ 4.0 gives quorum queues a delivery limit of 20 and drops what
    passes it when the queue has no dead-letter exchange (llmq.dead has none):
    a browse that requeued counted a delivery each time and lost every dead
    letter on the 21st. Browsing must never count: after 25 rounds every
    letter is there, in order, never delivered before (on 3.10, where nothing
    is dropped, the delivery count still shows the difference)."""
    ids = [await fake_dead_letter(world, "upstream_error") for _ in range(5)]
    ids.append(await broker_dead_letter(world))
    await world.wait_count(world.dead, 6)
    ids += [await fake_dead_letter(world, "upstream_error") for _ in range(7)]
    await world.wait_count(world.dead, 13)
    for n in range(25):
        seen = await browse(world.settings, Filter(), window=5, keep_messages=True)
        assert [x.job_id for x in seen.letters] == ids, f"browse {n + 1}"
        counts = {(m.headers or {}).get("x-delivery-count", 0) for m in seen.messages}
        assert counts == {0}, f"browse {n + 1} found delivered letters: {counts}"
        assert not any(m.redelivered for m in seen.messages)
    await world.expect(world.dead, 13)
    broker = (await browse(world.settings, Filter(codes=frozenset({"internal_error"})))).letters
    assert [x.job_id for x in broker] == [ids[5]] and "delivery_limit" in broker[0].error
    assert broker[0].sla_class == "batch"


async def test_a_large_undelivered_reply_is_shown_and_never_replayed(world: World) -> None:
    """A dead letter whose body carries a large undelivered reply after the job
    (``reply-offset``): show splits them, replay sends the job's part only, as the
    operator's broker user, with the tenant the dead letter recorded."""
    job = orjson.dumps(chat())
    reply = orjson.dumps({"status": "ok", "response": {"text": "x" * 20_000}})
    target = await world.channel.get_exchange(world.settings.topology.dead_exchange)
    await target.publish(
        aio_pika.Message(
            job + reply,
            message_id="big-reply",
            reply_to=world.reply_queue,
            headers={
                "error-code": "internal_error",
                "error": "the reply could not be delivered",
                "reply-error": "reply_to queue does not exist",
                "reply-offset": len(job),
                "sla-class": "interactive",
                "tenant": "acme",
            },
        ),
        routing_key="interactive",
    )
    await world.wait_count(world.dead, 1)
    shown = await cli("show", "--config", str(world.config), "big-reply", "--json")
    assert shown.exit_code == 0, shown.output
    doc = orjson.loads(shown.stdout)
    assert doc["body"] == chat() and doc["reply"]["response"]["text"] == "x" * 20_000
    report = await replay(world.settings, Filter())
    assert report.replayed == 1
    channel = await world.connection.channel()
    queue = await channel.get_queue(world.queue("interactive"), ensure=False)
    await world.wait_count(world.queue("interactive"), 1)
    message = await queue.get(no_ack=True)
    await channel.close()
    assert message.body == job
    assert message.user_id == "guest" and (message.headers or {})["tenant"] == "acme"
    assert not {"reply-offset", "reply-error", "reply"} & set(message.headers or {})
