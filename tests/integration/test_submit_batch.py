"""``llmq submit --openai-batch`` on the real broker, with a worker and the fake fleet:
the round trip (chat, embeddings, a bad line, a failed job) and the resume."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import pytest
from click.testing import CliRunner, Result
from harness import Caller, chat, running_fleet, started

from producers import openai_batch
from producers.batch_console import EXIT_INCOMPLETE, exit_status
from producers.batch_file import OutputFile, error_record, job_id_for, read_batch
from producers.client import LlmqClient
from producers.deadletters.actions import replay
from producers.deadletters.letters import Filter
from producers.openai_batch import BatchRun, batch_key, default_prefix, reply_queue
from producers.submit_command import submit_command
from schemas.broker.topology import apply_topology
from schemas.errors import ErrorCode
from schemas.settings import Settings
from schemas.topology import plan
from workers.fleet import Fleet
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq

CHAT = "/v1/chat/completions"
EMBED = "/v1/embeddings"


def line(custom_id: str, url: str = CHAT, body: dict[str, Any] | None = None) -> bytes:
    if body is None:
        body = chat("m1", custom_id) if url == CHAT else {"model": "e1", "input": custom_id}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


@dataclass
class Env:
    settings: Settings
    fleet: Fleet
    caller: Caller | None
    config: Path
    tmp: Path

    def batch(self, *lines: bytes) -> Path:
        path = self.tmp / "in.jsonl"
        path.write_bytes(b"".join(x + b"\n" for x in lines))
        return path

    def requests(self) -> int:
        """Requests the fleet received (the upstream calls paid for)."""
        return sum(s.requests for s in self.fleet.stats().values())

    def submit(self, *args: str) -> Any:
        """``llmq submit ARGS`` in a thread: the command runs its own event loop."""
        argv = ["--config", str(self.config), *args]
        return asyncio.to_thread(CliRunner().invoke, submit_command, argv)


def write_config(path: Path, settings: Settings) -> Path:
    t = settings.topology
    lines = [
        "[broker]",
        f'url = "{settings.broker.url.get_secret_value()}"',
        "[topology]",
        f'jobs_exchange = "{t.jobs_exchange}"',
        f'dead_exchange = "{t.dead_exchange}"',
        f'dead_queue = "{t.dead_queue}"',
        f'queue_prefix = "{t.queue_prefix}"',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def make_env(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    tmp_path: Path,
) -> Callable[..., Any]:
    @asynccontextmanager
    async def make(latency_ms: Any = 2, worker: bool = True, **sections: Any) -> AsyncIterator[Env]:
        async with running_fleet(
            {"name": "chat", "models": ["m1"], "latency_ms": latency_ms},
            {"name": "emb", "models": ["e1"], "latency_ms": latency_ms},
        ) as fleet:
            key = {"api_key_env": "LLMQ_TEST_FLEET_KEY", "max_concurrency": 64}
            endpoints = [
                {"name": "chat", "base_url": fleet.url("chat"), "models": {"m1": "m1"}, **key},
                {
                    "name": "emb",
                    "base_url": fleet.url("emb"),
                    "models": {"e1": {"upstream": "e1", "kind": "embedding"}},
                    **key,
                },
            ]
            settings = make_settings(fleet, endpoints=endpoints, **sections)
            await apply_topology(connection, plan(settings.topology))
            config = write_config(tmp_path / "llmq.toml", settings)
            if not worker:
                yield Env(settings, fleet, None, config, tmp_path)
                return
            async with started(settings, connection, name="batch-test-worker") as (_, caller):
                yield Env(settings, fleet, caller, config, tmp_path)

    return make


def results(path: Path) -> dict[str | None, dict[str, Any]]:
    records = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    by_id = {r["custom_id"]: r for r in records}
    assert len(by_id) == len(records), "a custom_id appears twice"
    return by_id


async def queue_exists(connection: aio_pika.abc.AbstractConnection, name: str) -> bool:
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    await channel.close()
    return True


async def test_a_batch_file_round_trip(
    make_env: Any, connection: aio_pika.abc.AbstractConnection
) -> None:
    """Chat and embeddings lines answered, a bad line and a failed job as errors with
    their codes, in OpenAI's output format; the failed job is a replayable dead letter."""
    async with make_env() as env:
        source = env.batch(
            line("c1"),
            line("with space"),
            line("e1", EMBED),
            line("bad", "/v1/completions"),
            line("nope", body=chat("no-such-model")),
        )
        out = env.tmp / "out.jsonl"
        result: Result = await env.submit("--openai-batch", str(source), "--output", str(out))
        assert env.caller is not None
        await env.caller.wait_for(lambda: len(env.caller.dead) >= 1)
        key = batch_key(read_batch(source), out)
        gone = not await queue_exists(connection, reply_queue(key))
    assert result.exit_code == 1, result.output  # complete, with error lines
    by_id = results(out)
    assert set(by_id) == {"c1", "with space", "e1", "bad", "nope"}
    prefix = default_prefix(key)
    for custom_id in ("c1", "with space", "e1"):
        record = by_id[custom_id]
        assert record["error"] is None and record["id"].startswith("batch_req_")
        assert record["response"]["status_code"] == 200
        assert record["response"]["request_id"] == job_id_for(prefix, custom_id)
    assert by_id["c1"]["response"]["body"]["object"] == "chat.completion"
    assert by_id["e1"]["response"]["body"]["object"] == "list"
    assert by_id["e1"]["response"]["body"]["data"][0]["embedding"]
    assert by_id["bad"]["response"] is None
    assert by_id["bad"]["error"]["code"] == "invalid_request"
    assert "url must be one of" in by_id["bad"]["error"]["message"]
    failed = by_id["nope"]["response"]
    assert failed["status_code"] == 400 and by_id["nope"]["error"] is None
    assert failed["body"]["error"]["code"] == "unknown_model"
    assert "errors in" in result.stderr and "unknown_model=1" in result.stderr
    [dead] = env.caller.dead  # type: ignore[union-attr]
    assert dead.message_id == job_id_for(prefix, "nope")
    assert dead.reply_to == reply_queue(key) and dead.correlation_id == "nope"
    assert (dead.headers or {})["custom-id"] == "nope"
    assert (dead.headers or {})["sla-class"] == "batch"
    assert gone  # a complete batch deletes its reply queue


async def test_a_rerun_skips_finished_lines_and_redoes_a_torn_one(make_env: Any) -> None:
    """Lines in the output are not sent again; a half-written last line is redone."""
    async with make_env() as env:
        ids = [f"r{i}" for i in range(6)]
        source = env.batch(*(line(i) for i in ids))
        batch = read_batch(source)
        out = env.tmp / "out.jsonl"
        done = [error_record(x, ErrorCode.UPSTREAM_ERROR, "from before") for x in batch.lines[:2]]
        torn = orjson.dumps(error_record(batch.lines[2], ErrorCode.UPSTREAM_ERROR, "cut"))
        out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in done) + torn[:30])
        result = await env.submit("--openai-batch", str(source), "--output", str(out), "-q")
        requests = env.requests()
    assert result.exit_code == 1, result.output  # two lines from before are errors
    by_id = results(out)
    assert set(by_id) == set(ids)
    assert [by_id[i]["error"]["message"] for i in ids[:2]] == ["from before"] * 2
    assert all(by_id[i]["response"]["status_code"] == 200 for i in ids[2:])
    assert requests == 4


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job ids every LlmqClient publishes, in order."""
    ids: list[str] = []
    original = LlmqClient.submit

    async def counting(self: LlmqClient, job: Any, **kw: Any) -> str:
        ids.append(kw["job_id"])
        return await original(self, job, **kw)

    monkeypatch.setattr(LlmqClient, "submit", counting)
    return ids


def new_run(env: Env, source: Path, out: Path) -> BatchRun:
    batch = read_batch(source)
    key = batch_key(batch, out)
    return BatchRun(
        env.settings, batch, OutputFile(out, batch), key=key, prefix=default_prefix(key)
    )


async def until(condition: Callable[[], Awaitable[bool] | bool]) -> None:
    """Poll ``condition`` (the broker and the fleet have no event to wait on)."""
    while True:
        held = condition()
        if held if isinstance(held, bool) else await held:
            return
        await asyncio.sleep(0.01)


async def interrupted(run: BatchRun, done: Callable[[], bool], **kw: Any) -> None:
    """Run until ``done()`` (lines written, jobs sent), then cancel, as Ctrl-C does."""
    task = asyncio.create_task(run.run(**kw))
    await until(done)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    run.output.close()


async def waiting_replies(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await channel.close()
    return declared.declaration_result.message_count or 0


async def test_replies_that_came_while_no_run_read_them_are_written_not_sent_again(
    make_env: Any, connection: aio_pika.abc.AbstractConnection, sent: list[str]
) -> None:
    """Interrupted after one line with the rest in flight: their replies wait in the
    batch's reply queue, and the rerun writes them without sending a job again."""
    async with make_env(latency_ms={"median": 100, "p99": 800}) as env:
        ids = [f"j{i}" for i in range(12)]
        source = env.batch(*(line(i, EMBED if i.endswith("3") else CHAT) for i in ids))
        out = env.tmp / "out.jsonl"
        first = new_run(env, source, out)
        await interrupted(first, lambda: first.summary.now.total >= 1, max_pending=12)
        written = len(first.output.done)
        left = len(ids) - written

        async def all_answered() -> bool:  # the worker answers the jobs left in flight
            return await waiting_replies(connection, first.queue) >= left

        await until(all_answered)
        sent_first = set(sent)
        sent.clear()
        second = new_run(env, source, out)
        summary = await second.run()
        second.output.close()
        requests = env.requests()
    assert 1 <= written < len(ids)
    assert sent_first == {job_id_for(first.prefix, i) for i in ids}
    assert sent == [], "a job whose reply was waiting was sent again"
    assert summary.complete and summary.ok and summary.before.total == written
    by_id = results(out)
    assert set(by_id) == set(ids)
    assert all(r["response"]["status_code"] == 200 for r in by_id.values())
    assert requests == len(ids)


async def test_a_job_sent_but_not_answered_is_sent_again_under_its_id_and_paid_once(
    make_env: Any, connection: aio_pika.abc.AbstractConnection, sent: list[str]
) -> None:
    """Interrupted with every job queued and none answered (no worker yet): the rerun
    sends each again under the same id; the worker answers the repeat from memory
    (or joins it), so each upstream request is paid once; each custom_id is written once."""
    async with make_env(worker=False) as env:
        ids = [f"k{i}" for i in range(8)]
        source = env.batch(*(line(i) for i in ids))
        out = env.tmp / "out.jsonl"
        first = new_run(env, source, out)
        await interrupted(first, lambda: len(sent) >= len(ids))
        sent_first = list(sent)
        sent.clear()
        second = new_run(env, source, out)
        task = asyncio.create_task(second.run())
        await until(lambda: len(sent) >= len(ids))  # all sent again before a worker runs
        async with started(env.settings, connection, name="late-worker"):
            summary = await task
            second.output.close()
            requests = env.requests()
    assert sorted(sent) == sorted(sent_first) == sorted(job_id_for(first.prefix, i) for i in ids)
    assert summary.complete and summary.ok and summary.before.total == 0
    assert set(results(out)) == set(ids)
    assert requests == len(ids)


async def test_jobs_the_broker_does_not_take_stay_unwritten_for_a_rerun(
    make_env: Any, connection: aio_pika.abc.AbstractConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch queue stays full: the run stops sending and writes no line for the
    refused jobs (over_capacity is not their outcome); once there is room, a rerun
    finishes the batch."""
    monkeypatch.setattr(openai_batch, "_BACKPRESSURE_TRIES", 2)
    small = {"classes": {"batch": {"max_length": 1}}}
    async with make_env(worker=False, topology=small) as env:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(env.settings.topology.jobs_exchange)
        with contextlib.suppress(aiormq.exceptions.DeliveryError):
            for n in range(100):  # one at a time until it refuses (a quorum queue's limit)
                blocker = aio_pika.Message(orjson.dumps(chat()), message_id=f"fill-{n}")
                await exchange.publish(blocker, routing_key="batch", mandatory=True)
        ids = [f"f{i}" for i in range(3)]
        source = env.batch(*(line(i) for i in ids))
        out = env.tmp / "out.jsonl"
        stopped = new_run(env, source, out)
        refused = await stopped.run()
        stopped.output.close()
        kept = out.read_bytes()
        work = await channel.get_queue(env.settings.topology.queue_name("batch"), ensure=False)
        await work.purge()
        async with started(env.settings, connection, name="batch-test-worker"):
            rerun = new_run(env, source, out)
            summary = await rerun.run()
            rerun.output.close()
        await channel.close()
    assert refused.unsent == {"backpressure": 3} and not refused.complete
    assert exit_status(refused) == EXIT_INCOMPLETE
    assert kept == b""
    assert summary.complete and summary.ok
    assert set(results(out)) == set(ids)


async def test_a_replayed_dead_letter_of_a_finished_batch_comes_back_with_its_reply(
    make_env: Any, connection: aio_pika.abc.AbstractConnection
) -> None:
    """A failed line's job is a dead letter with what a replay needs; replayed after
    the batch completed (its reply queue deleted), its answer cannot be delivered and
    comes back to llmq.dead as internal_error with reply-error, the reply attached."""
    async with make_env(worker=False) as env:
        await env.fleet.set_down("chat", True)
        worker = Worker(env.settings, name="replay-test-worker")
        await worker.start()
        try:
            source = env.batch(line("later"))
            out = env.tmp / "out.jsonl"
            failed = new_run(env, source, out)
            failed.sla_ms = 1500
            summary = await failed.run()
            failed.output.close()
            await env.fleet.set_down("chat", None)
            report = await replay(env.settings, Filter())
            dead = await next_dead_letter(connection, env.settings.topology.dead_queue)
        finally:
            await worker.stop(grace_s=5)
    [record] = results(out).values()
    assert summary.complete and record["response"]["status_code"] >= 500
    assert report.replayed == 1
    headers = dead.headers or {}
    assert dead.message_id == job_id_for(failed.prefix, "later")
    assert headers["error-code"] == "internal_error" and "reply-error" in headers
    assert orjson.loads(headers["reply"])["status"] == "ok"
    assert headers["custom-id"] == "later" and headers["replay-count"] == 1


async def next_dead_letter(
    connection: aio_pika.abc.AbstractConnection, queue: str
) -> aio_pika.abc.AbstractIncomingMessage:
    channel = await connection.channel()
    dead = await channel.get_queue(queue, ensure=False)
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def one() -> bool:
        message = await dead.get(no_ack=True, fail=False)
        if message is not None:
            taken.append(message)
        return bool(taken)

    await until(one)
    await channel.close()
    return taken[0]
