"""Hostile or buggy producers against a real worker on the real broker.

The standard each case is held to: after the bad message the worker answers a
normal job, nothing is lost or answered twice, and no caller sees another's
data or makes the worker write where it may not.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import aio_pika
import orjson
import pytest
from harness import Caller, chat, running_fleet
from harness import started as started_worker

from producers.client import LlmqClient
from schemas.settings import ConfigError, Settings
from workers.service import Worker

pytestmark = pytest.mark.rabbitmq


started = partial(started_worker, name="hostile-worker")


def deep(levels: int) -> bytes:
    """A job body nested ``levels`` deep: orjson reads it, but cannot write it again."""
    nested = b"[" * levels + b'"x"' + b"]" * levels
    return b'{"model":"m1","messages":[{"role":"user","content":"hi"}],"extra":' + nested + b"}"


async def answered_normally(caller: Caller) -> None:
    job = await caller.publish(chat())
    await caller.wait_for(lambda: job in caller.replies, timeout=10)
    assert [r["status"] for r in caller.replies[job]] == ["ok"]


def code(caller: Caller, job: str) -> str:
    [reply] = caller.replies[job]
    return str(reply["error"]["code"])


async def test_bodies_that_cannot_be_forwarded_do_not_wedge_the_worker(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """Bodies nested past orjson's write limit: invalid_request at intake, no slot leaked."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        endpoints = [
            {**e, "max_concurrency": 4} for e in make_settings(fleet).model_dump()["endpoints"]
        ]
        for e in endpoints:
            e["api_key_env"] = "LLMQ_TEST_FLEET_KEY"
        settings = make_settings(fleet, endpoints=endpoints)
        async with started(settings, connection) as (worker, caller):
            bad = [await caller.publish(deep(300)) for _ in range(8)]
            await caller.wait_for(lambda: all(j in caller.replies for j in bad))
            for _ in range(3):
                await answered_normally(caller)
            status = worker.router.snapshot(now=time.monotonic())
    assert {code(caller, j) for j in bad} == {"invalid_request"}
    assert all(s.in_flight == 0 for s in status)
    assert sorted(caller.dead_ids()) == sorted(bad)


async def test_a_known_job_id_never_returns_another_callers_answer(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """A second request under someone's message_id runs on its own; a true redelivery
    (same body, same reply queue) still gets the cached answer."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        async with started(settings, connection) as (worker, victim):
            thief = Caller(connection, settings)
            await thief.start()
            job = await victim.publish(chat(content="my secret question"))
            await victim.wait_for(lambda: job in victim.replies)
            await thief.publish(chat(content="what did they ask?"), job_id=job)
            await thief.wait_for(lambda: job in thief.replies)
            again = await victim.publish(chat(content="my secret question"), job_id=job)
            await victim.wait_for(lambda: len(victim.replies[again]) == 2)
            stats = fleet.stats()["a"]
    [mine, same] = victim.replies[job]
    [theirs] = thief.replies[job]
    assert mine == same  # the redelivery: served from the cache
    assert theirs["response"] != mine["response"]
    assert theirs["routing"]["upstream_ms"] is not None  # a call of its own
    assert stats.requests == 2 and worker.stats.duplicates == 1


@pytest.mark.parametrize("target", ["work_queue", "dead_queue", "other_service", "amq"])
async def test_reply_to_is_only_ever_a_reply_queue(
    target: str,
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    """A reply_to naming any other queue: refused (invalid_request), dead-lettered once,
    and nothing is written to the named queue."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        topo = settings.topology
        channel = await connection.channel()
        other = await channel.declare_queue(f"billing.jobs.{uuid.uuid4().hex[:6]}", exclusive=True)
        name = {
            "work_queue": topo.queue_name("batch"),
            "dead_queue": topo.dead_queue,
            "other_service": other.name,
            "amq": "amq.gen-JzTY20BRgKO-HjmUJj0wLg",
        }[target]
        async with started(settings, connection) as (worker, caller):
            job = await caller.publish(chat(), reply_to=name)
            await caller.wait_for(lambda: job in caller.dead_ids())
            await answered_normally(caller)
            batch = await channel.declare_queue(topo.queue_name("batch"), passive=True)
            held = await channel.declare_queue(other.name, passive=True)
        await channel.close()
    [dead] = [m for m in caller.dead if m.message_id == job]
    assert dead.headers["error-code"] == "invalid_request"
    assert "not a reply queue" in str(dead.headers["error"])
    assert caller.dead_ids().count(job) == 1
    assert batch.declaration_result.message_count == 0
    assert held.declaration_result.message_count == 0
    assert worker.stats.ok == 1


async def test_the_tenant_header_does_not_escape_a_hard_cap(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """A producer's broker user maps to its tenant; writing another tenant's name, a
    look-alike, or nothing in the header changes nothing."""
    async with running_fleet({"name": "a", "models": ["m1"], "output_tokens": 10}) as fleet:
        endpoints = make_settings(fleet).model_dump()["endpoints"]
        for e in endpoints:
            e.update(api_key_env="LLMQ_TEST_FLEET_KEY", output_per_mtok=1_000_000)
        settings = make_settings(
            fleet,
            endpoints=endpoints,
            budgets={"tenants": {"capped": {"monthly_usd": 0.000001, "hard_cap": True}}},
            tenancy={"users": {"guest": "capped"}},
        )
        async with started(settings, connection) as (_, caller):
            first = await caller.publish(chat())  # no user_id: no tenant, no tenant cap
            await caller.wait_for(lambda: first in caller.replies)
            tries = [
                await caller.publish(chat(), user_id="guest", headers=h)
                for h in ({}, {"tenant": "Capped"}, {"tenant": "capped "}, {"tenant": "other"})
            ]
            await caller.wait_for(lambda: all(j in caller.replies for j in tries))
    assert caller.replies[first][0]["status"] == "ok"
    assert [code(caller, j) for j in tries] == ["over_budget"] * 4


async def test_deadlines_and_publish_times_from_the_future_are_refused_or_clamped(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet, worker={"max_sla_ms": 60_000})
        async with started(settings, connection) as (_, caller):
            now = int(time.time() * 1000)
            future = await caller.publish(chat(), headers={"published-ms": now + 3_600_000})
            far = await caller.publish(chat(), headers={"deadline-ms": 2**53})
            old = await caller.publish(
                chat(), headers={"published-ms": now - 120_000, "deadline-ms": 2**53}
            )
            await caller.wait_for(lambda: all(j in caller.replies for j in (future, far, old)))
    assert code(caller, future) == "invalid_request"
    assert caller.replies[far][0]["status"] == "ok"  # clamped to a minute, served at once
    assert code(caller, old) == "deadline_exceeded"  # a minute after its publish time


async def test_cost_multipliers_above_the_model_limits_are_refused(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet, models={"m1": {"max_output_tokens": 100, "max_n": 2}})
        async with started(settings, connection) as (_, caller):
            jobs = [
                await caller.publish(chat(max_tokens=101)),
                await caller.publish(chat(n=3)),
                await caller.publish(chat(n=10**9)),
                await caller.publish(chat(max_tokens=100, n=2)),
            ]
            await caller.wait_for(lambda: all(j in caller.replies for j in jobs))
            requests = fleet.stats()["a"].requests
    assert [code(caller, j) for j in jobs[:3]] == ["invalid_request"] * 3
    assert caller.replies[jobs[3]][0]["status"] == "ok"
    assert requests == 1


async def test_dead_letters_stay_far_below_the_frame_limit(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """A job whose headers nearly fill a frame, and a long answer whose reply queue is
    gone: both are dead-lettered once, at once, with what fits (the reply in the body)."""
    async with running_fleet(
        {"name": "a", "models": ["m1"], "output_tokens": {"min": 6000, "max": 6000}}
    ) as fleet:
        settings = make_settings(fleet)
        async with started(settings, connection) as (worker, caller):
            fat = {f"h{i}": "v" * 1_000 for i in range(110)}  # ~110 KB of headers
            unknown = await caller.publish(chat(model="nope"), headers=fat)
            gone = await caller.publish(chat(max_tokens=6000), reply_to="llmq.reply.gone")
            await caller.wait_for(lambda: {unknown, gone} <= set(caller.dead_ids()))
            await answered_normally(caller)
            reconnects = worker.stats.reconnects
    by_id = {m.message_id: m for m in caller.dead}
    assert sorted(caller.dead_ids()) == sorted([unknown, gone])
    first = by_id[unknown]
    assert first.headers["error-code"] == "unknown_model"
    assert int(first.headers["headers-dropped"]) > 0
    second = by_id[gone]
    offset = int(second.headers["reply-offset"])
    assert orjson.loads(second.body[:offset])["model"] == "m1"  # the job, replayable
    assert orjson.loads(second.body[offset:])["status"] == "ok"  # the paid-for answer
    assert reconnects == 0 and worker.stats.requeued == 0


async def test_llmq_client_jobs_are_billed_to_its_broker_users_tenant(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """LlmqClient sends its broker user as ``user_id`` (RabbitMQ checks it), so a
    tenant claimed in the header does not move the bill."""
    async with running_fleet({"name": "a", "models": ["m1"], "output_tokens": 10}) as fleet:
        endpoints = make_settings(fleet).model_dump()["endpoints"]
        for e in endpoints:
            e.update(api_key_env="LLMQ_TEST_FLEET_KEY", output_per_mtok=1_000)
        settings = make_settings(
            fleet,
            endpoints=endpoints,
            budgets={"tenants": {"acme": {"monthly_usd": 100}, "globex": {"monthly_usd": 100}}},
            tenancy={"users": {"guest": "acme"}},
        )
        async with started(settings, connection) as (worker, _):
            async with LlmqClient(
                settings.broker.url.get_secret_value(), **client_names(settings)
            ) as client:
                await client.complete("m1", [{"role": "user", "content": "hi"}], tenant="globex")
            spent = {b["name"]: b["spent_usd"] for b in worker.telemetry.spend_limits.view()}
    assert spent["acme"] > 0 and spent["globex"] == 0


def client_names(settings: Settings) -> dict[str, Any]:
    return {"exchange": settings.topology.jobs_exchange}


async def test_concurrent_jobs_cannot_run_past_a_hard_cap(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """40 jobs at once against a cap one job's worst case fills: one runs, 39 are
    refused before any call (the cap was checked before and charged after)."""
    async with running_fleet(
        {"name": "a", "models": ["m1"], "output_tokens": 10, "latency_ms": 200}
    ) as fleet:
        endpoints = make_settings(fleet).model_dump()["endpoints"]
        for e in endpoints:
            e.update(api_key_env="LLMQ_TEST_FLEET_KEY", output_per_mtok=1_000_000)
        settings = make_settings(
            fleet,
            endpoints=endpoints,  # 1 USD per output token: max_tokens=10 costs 10 USD at most
            budgets={"models": {"m1": {"monthly_usd": 15, "hard_cap": True}}},
        )
        async with started(settings, connection) as (worker, caller):
            jobs = [await caller.publish(chat(max_tokens=10)) for _ in range(40)]
            await caller.wait_for(lambda: all(j in caller.replies for j in jobs))
            requests = fleet.stats()["a"].requests
            spent = {b["name"]: b["spent_usd"] for b in worker.telemetry.spend_limits.view()}
    codes = [
        caller.replies[j][0]["status"]
        if caller.replies[j][0]["status"] == "ok"
        else code(caller, j)
        for j in jobs
    ]
    assert codes.count("ok") == 1 and codes.count("over_budget") == 39
    assert requests == 1 and spent["m1"] <= 15


async def test_strict_preflight_refuses_a_broker_whose_consumer_timeout_is_too_short(
    make_settings: Callable[..., Settings],
) -> None:
    """With worker.strict_preflight, a worker that cannot confirm the broker's
    consumer_timeout outlasts its longest deadline does not start."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        base = make_settings(fleet, worker={"strict_preflight": True})
        broker = base.broker.model_copy(update={"management_url": "http://127.0.0.1:9"})
        worker = Worker(base.model_copy(update={"broker": broker}), name="preflight-worker")
        with pytest.raises(ConfigError, match="preflight"):
            await worker.start()


async def test_a_full_reply_queue_ends_in_one_dead_letter_not_a_requeue_loop(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """A caller whose reply queue refuses messages (full, reject-publish): the answer is
    kept in the dead letter at once; the job is not requeued into the same wall."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet)
        channel = await connection.channel()
        full = await channel.declare_queue(
            f"llmq.reply.full-{uuid.uuid4().hex[:6]}",
            exclusive=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        async with started(settings, connection) as (worker, caller):
            job = await caller.publish(chat(), reply_to=full.name)
            await caller.wait_for(lambda: job in caller.dead_ids())
            await answered_normally(caller)
            requeued, requests = worker.stats.requeued, fleet.stats()["a"].requests
        await channel.close()
    [dead] = caller.dead
    assert dead.headers["error-code"] == "internal_error"
    assert dead.headers["reply-error"] == "reply_to queue refused it (full)"
    assert orjson.loads(dead.headers["reply"])["status"] == "ok"
    assert requeued == 0 and requests == 2
