"""``llmq submit`` on the real broker, with a worker and the fake fleet where replies matter."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
from click.testing import CliRunner, Result
from harness import chat, running_fleet

from producers.submit import run_submit
from producers.submit_command import submit_command
from schemas.broker.topology import apply_topology
from schemas.settings import Settings
from schemas.topology import plan
from workers.fleet import Fleet
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq


@dataclass
class Env:
    settings: Settings
    fleet: Fleet
    connection: aio_pika.abc.AbstractConnection
    config: Path
    tmp: Path

    def jobs_file(self, n: int, model: str = "m1") -> Path:
        path = self.tmp / f"jobs-{uuid.uuid4().hex[:6]}.jsonl"
        path.write_bytes(b"".join(orjson.dumps(chat(model, f"job {i}")) + b"\n" for i in range(n)))
        return path

    async def reply_queue(self) -> str:
        """A durable queue of the test's own (not exclusive: the CLI checks it from elsewhere)."""
        name = f"replies.{uuid.uuid4().hex[:8]}"
        channel = await self.connection.channel()
        await channel.declare_queue(name, durable=True)
        await channel.close()
        return name

    async def fill(self, sla_class: str = "interactive") -> int:
        """Publish one at a time until the class's queue refuses (a burst would overshoot)."""
        channel = await self.connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(self.settings.topology.jobs_exchange)
        stored = 0
        while True:
            message = aio_pika.Message(orjson.dumps(chat()), message_id=f"fill-{stored}")
            try:
                await exchange.publish(message, routing_key=sla_class, mandatory=True)
            except aiormq.exceptions.DeliveryError:
                await channel.close()
                return stored
            stored += 1

    async def take(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        channel = await self.connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        out = []
        while (message := await q.get(no_ack=True, fail=False)) is not None:
            out.append(message)
        await channel.close()
        return out


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
def make_env(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(**sections: Any) -> AsyncIterator[Env]:
        async with running_fleet(
            {"name": "a", "models": ["m1"], "latency_ms": {"median": 2, "p99": 3}}
        ) as fleet:
            settings = make_settings(fleet, **sections)
            await apply_topology(connection, plan(settings.topology))
            config = write_config(tmp_path / "llmq.toml", settings)
            yield Env(settings, fleet, connection, config, tmp_path)

    return make


@asynccontextmanager
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    w = Worker(settings, name="submit-test-worker")
    await w.start()
    try:
        yield w
    finally:
        await w.stop(grace_s=5)


def submit(env: Env, *args: str) -> Any:
    """``llmq submit ARGS`` in a thread: the command runs its own event loop."""
    return asyncio.to_thread(
        CliRunner().invoke, submit_command, ["--config", str(env.config), *args]
    )


def lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


async def test_jsonl_file_with_wait_writes_one_reply_per_job(make_env: Any) -> None:
    """20 jobs from a file, --wait: 20 ok replies in --out, one per line number; a summary."""
    async with make_env() as env, worker(env.settings):
        out = env.tmp / "replies.jsonl"
        result: Result = await submit(
            env, "--file", str(env.jobs_file(20)), "--wait", "--out", str(out), "--id-prefix", "f-"
        )
    assert result.exit_code == 0, result.output
    replies = lines(out.read_text())
    assert len(replies) == 20
    assert {r["job_id"] for r in replies} == {f"f-{i}" for i in range(1, 21)}
    assert all(
        r["status"] == "ok" and r["response"]["object"] == "chat.completion" for r in replies
    )
    assert "p50 ms" in result.stderr and "20" in result.stderr
    assert result.stdout == ""


async def test_one_job_from_flags_prints_its_reply(make_env: Any) -> None:
    """--model/--message/--wait: the reply envelope on stdout."""
    async with make_env() as env, worker(env.settings):
        result = await submit(
            env, "--model", "m1", "--system", "be brief", "--message", "hi", "--wait", "-q"
        )
    assert result.exit_code == 0, result.output
    [reply] = lines(result.stdout)
    assert reply["status"] == "ok" and reply["job_id"].startswith("submit-")
    assert result.stderr == ""


async def test_stream_prints_the_text_as_it_comes_and_how_it_ended(make_env: Any) -> None:
    """--stream: the text on stdout, one JSON line on stderr; an error exits 1."""
    async with make_env() as env, worker(env.settings):
        result = await submit(
            env, "--model", "m1", "--message", "hi", "--stream", "--max-tokens", "12"
        )
        unknown = await submit(env, "--model", "nope", "--message", "hi", "--stream")
        refused = await submit(env, "--model", "m1", "--message", "hi", "--stream", "--wait")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    [end] = lines(result.stderr)
    assert end["finish_reason"] in ("stop", "length") and end["endpoint"] == "a"
    assert end["usage"]["completion_tokens"] >= 1
    assert unknown.exit_code == 1 and "unknown_model" in unknown.stderr
    assert refused.exit_code == 2 and "--stream sends one job" in refused.output


async def test_error_replies_are_counted_by_code(make_env: Any) -> None:
    """An unknown model is an error reply, counted by its code, with the latency of each."""
    async with make_env() as env, worker(env.settings):
        jobs = iter([(1, chat()), (2, chat("nope")), (3, chat())])
        records: dict[str, dict[str, Any]] = {}
        summary = await run_submit(
            env.settings,
            jobs,
            total=3,
            wait=True,
            id_prefix="e-",
            on_result=lambda _line, job, record: records.__setitem__(job, record),
        )
    assert (summary.submitted, summary.ok, summary.errors) == (3, 2, {"unknown_model": 1})
    assert len(summary.latencies_ms) == 3 and summary.percentile(0.99) is not None
    assert records["e-2"]["error"]["code"] == "unknown_model"


async def test_rate_is_respected_and_replies_go_to_the_named_queue(make_env: Any) -> None:
    """--rate 10 for 10 jobs takes about a second; without --wait they name --reply-to."""
    async with make_env() as env:
        replies = await env.reply_queue()
        t0 = time.monotonic()
        result = await submit(
            env,
            *("--file", str(env.jobs_file(10)), "--rate", "10", "--reply-to", replies),
            *("--class", "batch", "--sla-ms", "5000", "--id-prefix", "r-"),
        )
        elapsed = time.monotonic() - t0
        queued = await env.take(env.settings.topology.queue_name("batch"))
    assert result.exit_code == 0, result.output
    assert elapsed >= 10 / 10 * 0.5
    assert [r["status"] for r in lines(result.stdout)] == ["submitted"] * 10
    assert sorted(m.message_id or "" for m in queued) == sorted(f"r-{i}" for i in range(1, 11))
    for message in queued:
        assert message.reply_to == replies and (message.headers or {})["sla-ms"] == 5000


async def test_without_wait_the_reply_queue_must_exist(make_env: Any) -> None:
    """No --wait: --reply-to is required and must name an existing queue; nothing is sent."""
    async with make_env() as env:
        missing = await submit(env, "--model", "m1", "--prompt", "hi", "--reply-to", "nope.q")
        bare = await submit(env, "--model", "m1", "--prompt", "hi")
        queued = await env.take(env.settings.topology.queue_name("interactive"))
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert bare.exit_code == 2 and "--reply-to" in bare.output
    assert queued == []


async def test_backpressure_slows_down_and_resends_with_the_same_job_id(make_env: Any) -> None:
    """A full queue nacks; the job is resent with its id once room is made; nothing doubles."""
    async with make_env(topology={"classes": {"interactive": {"max_length": 2}}}) as env:
        replies = await env.reply_queue()
        work = env.settings.topology.queue_name("interactive")
        filled = await env.fill()
        drained: list[aio_pika.abc.AbstractIncomingMessage] = []

        async def make_room() -> None:
            await asyncio.sleep(0.3)
            drained.extend(await env.take(work))

        room = asyncio.create_task(make_room())
        summary = await run_submit(
            env.settings,
            iter([(1, chat()), (2, chat())]),
            total=2,
            reply_to=replies,
            id_prefix="b-",
            backpressure_tries=30,
            backpressure_base_s=0.05,
        )
        await room
        rest = await env.take(work)
    assert summary.submitted == 2 and summary.not_submitted == {}
    assert summary.backpressure >= 2
    ids = sorted(m.message_id or "" for m in drained + rest)
    assert ids == sorted(["b-1", "b-2"] + [f"fill-{i}" for i in range(filled)])  # each once


async def test_backpressure_gives_up_after_bounded_tries(make_env: Any) -> None:
    """The queue stays full: the refused jobs are reported, not retried forever."""
    async with make_env(topology={"classes": {"interactive": {"max_length": 2}}}) as env:
        await env.fill()
        summary = await run_submit(
            env.settings,
            iter([(1, chat()), (2, chat())]),
            total=2,
            reply_to=await env.reply_queue(),
            backpressure_tries=3,
            backpressure_base_s=0.01,
        )
    assert summary.submitted == 0 and summary.not_submitted == {"over_capacity": 2}
    assert summary.backpressure == 6


async def test_a_job_without_a_reply_ends_deadline_exceeded_with_its_reason(make_env: Any) -> None:
    """No worker: --wait writes a record with a code of the closed set (not no_reply),
    the reason kept beside it, counted in the summary by that code; exit status 1."""
    async with make_env() as env:
        out = env.tmp / "replies.jsonl"
        result = await submit(
            env, "--model", "m1", "--prompt", "hi", "--wait", "--sla-ms", "50", "--out", str(out)
        )
    assert result.exit_code == 1, result.output
    [record] = lines(out.read_text())
    assert record["status"] == "error"
    assert record["error"]["code"] == "deadline_exceeded"
    assert (record["error"]["reason"], record["error"]["retriable"]) == ("no_reply", True)
    assert "deadline_exceeded=1" in result.stderr
