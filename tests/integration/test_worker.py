"""The worker on the real broker and the fake fleet: routing, failures, bad input."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
import pytest
from harness import chat, running_fleet, started

from schemas.settings import Settings
from workers.routing import RoutingConfig

pytestmark = pytest.mark.rabbitmq


def requests(stats: dict[str, Any], name: str) -> int:
    return int(stats[name].requests)


async def test_job_is_routed_and_answered_with_the_full_envelope(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(
        {"name": "a", "models": ["m1"], "latency_ms": {"median": 5, "p99": 5}}
    ) as fleet:
        async with started(make_settings(fleet), connection) as (worker, caller):
            job = await caller.publish(chat(max_tokens=20), headers={"tenant": "t1"})
            await caller.wait_for(lambda: job in caller.replies)
    [reply] = caller.replies[job]
    assert reply["status"] == "ok" and reply["job_id"] == job and reply["error"] is None
    assert reply["response"]["object"] == "chat.completion"
    routing = reply["routing"]
    assert routing["endpoint"] == "a" and routing["model"] == "m1"
    assert routing["attempts"] == 1 and routing["hedged"] is False
    for key in (
        "queue_ms",
        "upstream_ms",
        "total_ms",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    ):
        assert routing[key] is not None, key
    assert caller.dead == []
    assert worker.stats.ok == 1


async def test_traffic_moves_away_from_a_slow_endpoint(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(
        {"name": "fast", "models": ["m1"], "latency_ms": {"median": 10, "p99": 15}},
        {"name": "slow", "models": ["m1"], "latency_ms": {"median": 200, "p99": 250}},
    ) as fleet:
        settings = make_settings(
            fleet, topology={"classes": {"interactive": {"default_sla_ms": 10000, "hedge": False}}}
        )
        async with started(settings, connection) as (_, caller):
            ids = []
            for _ in range(60):  # sequential: each answer informs the next pick
                ids.append(await caller.publish(chat()))
                await caller.wait_for(lambda: ids[-1] in caller.replies)
            stats = fleet.stats()
    assert requests(stats, "fast") >= 50, stats
    assert all(caller.replies[j][0]["status"] == "ok" for j in ids)


async def test_failing_endpoint_is_avoided_then_used_again_after_recovery(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    routing = RoutingConfig(eject_base_s=0.5, eject_max_s=1.0)
    async with running_fleet(
        {"name": "best", "models": ["m1"], "latency_ms": {"median": 5, "p99": 5}},
        {"name": "backup", "models": ["m1"], "latency_ms": {"median": 60, "p99": 80}},
    ) as fleet:
        settings = make_settings(
            fleet, topology={"classes": {"interactive": {"default_sla_ms": 10000, "hedge": False}}}
        )
        async with started(settings, connection, routing=routing) as (_, caller):

            async def run(n: int) -> list[str]:
                done = []
                for _ in range(n):
                    done.append(await caller.publish(chat()))
                    await caller.wait_for(lambda: done[-1] in caller.replies)
                return done

            await run(10)
            await fleet.set_down("best", True)
            fleet.reset()
            outage = await run(30)
            during = fleet.stats()
            await fleet.set_down("best", False)
            await asyncio.sleep(1.5)  # longer than the ejection
            fleet.reset()
            after = await run(30)
            recovered = fleet.stats()
    # Refused connections failed over: every job was still answered ok.
    assert all(caller.replies[j][0]["status"] == "ok" for j in outage + after)
    assert requests(during, "backup") == 30
    assert requests(recovered, "best") >= 20, recovered


async def test_429_cooldown_is_honoured(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(
        {"name": "limited", "models": ["m1"], "rate_limit_rate": 1.0, "retry_after_s": 3},
        {"name": "other", "models": ["m1"], "latency_ms": {"median": 30, "p99": 30}},
    ) as fleet:
        async with started(make_settings(fleet), connection) as (_, caller):
            ids = []
            for _ in range(20):
                ids.append(await caller.publish(chat()))
                await caller.wait_for(lambda: ids[-1] in caller.replies)
            stats = fleet.stats()
    assert all(caller.replies[j][0]["status"] == "ok" for j in ids)
    # A lone 429 costs its job a retry elsewhere; the second in a row puts the endpoint in a
    # cooldown of at least Retry-After (3 s): not asked again meanwhile.
    assert requests(stats, "limited") <= 2, stats


async def test_deadlines_are_enforced(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet(
        {"name": "slow", "models": ["m1"], "latency_ms": {"median": 3000, "p99": 3000}}
    ) as fleet:
        async with started(make_settings(fleet), connection) as (_, caller):
            expired = await caller.publish(
                chat(), headers={"deadline-ms": int(time.time() * 1000) - 1}
            )
            tight = await caller.publish(chat(), headers={"sla-ms": 700})
            t0 = time.monotonic()
            await caller.wait_for(
                lambda: {expired, tight} <= set(caller.replies) and len(caller.dead) == 2
            )
            elapsed = time.monotonic() - t0
            stats = fleet.stats()
    for job in (expired, tight):
        assert caller.replies[job][0]["error"]["code"] == "deadline_exceeded"
    assert sorted(caller.dead_ids()) == sorted([expired, tight])
    assert requests(stats, "slow") == 1  # the expired job never went upstream
    assert elapsed < 2.5  # answered by its deadline, not by the upstream


@pytest.mark.parametrize(
    ("body", "properties", "code"),
    [
        (b"not json", {}, "invalid_request"),
        (b'{"model": "m1", "messages": []}', {}, "invalid_request"),
        (b'{"model": "m1"}', {}, "invalid_request"),
        (b"[1, 2]", {}, "invalid_request"),
        (
            b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}]}',
            {"content_type": "text/plain"},
            "invalid_request",
        ),
        (
            b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}',
            {},
            "unknown_model",
        ),
        (
            b'{"model": "m1", "messages": [{"role": "user", "content": "' + b"x" * 3000 + b'"}]}',
            {},
            "payload_too_large",
        ),
    ],
)
async def test_bad_input_gets_its_error_code_and_a_dead_letter(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    body: bytes,
    properties: dict[str, Any],
    code: str,
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        settings = make_settings(fleet, worker={"max_body_bytes": 2048})
        async with started(settings, connection) as (_, caller):
            job = await caller.publish(body, **properties)
            await caller.wait_for(lambda: job in caller.replies and len(caller.dead) == 1)
            stats = fleet.stats()
    assert caller.replies[job][0]["error"]["code"] == code
    [dead] = caller.dead
    assert dead.message_id == job and dead.body == body
    assert dead.headers["error-code"] == code
    assert {"error", "attempts", "failed-at", "worker"} <= set(dead.headers)
    assert requests(stats, "a") == 0


async def test_job_without_reply_to_is_dead_lettered_only(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        async with started(make_settings(fleet), connection) as (_, caller):
            job = await caller.publish(chat(), reply=False)
            await caller.wait_for(lambda: len(caller.dead) == 1)
    assert caller.dead[0].message_id == job
    assert caller.dead[0].headers["error-code"] == "invalid_request"
    assert caller.replies == {}


async def test_same_job_delivered_twice_is_answered(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        async with started(make_settings(fleet), connection) as (_, caller):
            await caller.publish(chat(), job_id="twice")
            await caller.wait_for(lambda: "twice" in caller.replies)
            await caller.publish(chat(), job_id="twice")
            await caller.wait_for(lambda: len(caller.replies["twice"]) == 2)
    assert [r["status"] for r in caller.replies["twice"]] == ["ok", "ok"]


async def test_debug_log_explains_each_pick(
    make_settings: Callable[..., Settings],
    connection: aio_pika.abc.AbstractConnection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running_fleet(
        {"name": "up", "models": ["m1"]}, {"name": "down", "models": ["m1"]}
    ) as fleet:
        await fleet.set_down("down", True)
        async with started(make_settings(fleet), connection) as (_, caller):
            caplog.set_level("DEBUG", logger="llmq.worker")
            for _ in range(8):  # enough to see "down" fail and get skipped or costed
                job = await caller.publish(chat())
                await caller.wait_for(lambda job=job: job in caller.replies)
    lines = [r.getMessage() for r in caplog.records if "candidates:" in r.getMessage()]
    assert len(lines) == 8
    assert all("up cost=" in line and "down" in line for line in lines)


async def test_unroutable_reply_is_kept_with_the_dead_letter(
    make_settings: Callable[..., Settings], connection: aio_pika.abc.AbstractConnection
) -> None:
    """The caller's reply queue is gone: the answer is not dropped but dead-lettered with it."""
    async with running_fleet({"name": "a", "models": ["m1"]}) as fleet:
        async with started(make_settings(fleet), connection) as (worker, caller):
            exchange = await caller.channel.get_exchange(worker.settings.topology.jobs_exchange)
            await exchange.publish(
                aio_pika.Message(
                    orjson.dumps(chat()), message_id="orphan", reply_to="no-such-queue"
                ),
                routing_key="interactive",
            )
            await caller.wait_for(lambda: len(caller.dead) == 1)
    [dead] = caller.dead
    assert dead.message_id == "orphan"
    assert dead.headers["error-code"] == "internal_error"
    assert dead.headers["reply-error"] == "reply_to queue does not exist"
    assert orjson.loads(dead.headers["reply"])["status"] == "ok"
    assert worker.stats.requeued == 0
