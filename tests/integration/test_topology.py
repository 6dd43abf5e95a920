"""Topology on the real broker: declared, idempotent, routes jobs, dead-letters rejects."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aio_pika
import pytest

from schemas.broker.topology import TopologyError, apply_topology
from schemas.settings import TopologySettings
from schemas.topology import plan

pytestmark = pytest.mark.rabbitmq

REPO = Path(__file__).resolve().parents[2]


async def _get(
    channel: aio_pika.abc.AbstractChannel, queue: str
) -> aio_pika.abc.AbstractIncomingMessage:
    q = await channel.get_queue(queue, ensure=False)
    for _ in range(100):
        message = await q.get(fail=False, no_ack=False)
        if message is not None:
            return message
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing arrived in {queue}")


async def test_apply_is_idempotent_and_routes(amqp_url: str) -> None:
    settings = TopologySettings(
        queue_prefix="t1.q.", dead_queue="t1.dead", dead_exchange="t1.dlx", jobs_exchange="t1.jobs"
    )
    topo = plan(settings)
    connection = await aio_pika.connect(amqp_url)
    try:
        first = await apply_topology(connection, topo)
        second = await apply_topology(connection, topo)
        assert first == second
        assert (first.exchanges, first.queues, first.bindings) == (3, 4, 3)  # + the spend stream

        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        jobs = await channel.get_exchange("t1.jobs")
        await jobs.publish(
            aio_pika.Message(
                b'{"model":"m","messages":[{"role":"user","content":"hi"}]}', message_id="job-1"
            ),
            routing_key="interactive",
            mandatory=True,
        )
        received = await _get(channel, "t1.q.interactive")
        assert received.message_id == "job-1"
        # A rejected job must not vanish: the queue's DLX takes it to the dead queue.
        await received.reject(requeue=False)
        dead = await _get(channel, "t1.dead")
        assert dead.message_id == "job-1"
        assert dead.headers["x-death"][0]["reason"] == "rejected"
        await dead.ack()

        # A routing key no queue is bound to is returned, not dropped.
        with pytest.raises(aio_pika.exceptions.PublishError):
            await jobs.publish(
                aio_pika.Message(b"{}", message_id="job-2"), routing_key="nope", mandatory=True
            )
    finally:
        await connection.close()


async def test_conflicting_queue_gives_one_clear_line(amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    try:
        base = dict(
            queue_prefix="t2.q.",
            dead_queue="t2.dead",
            dead_exchange="t2.dlx",
            jobs_exchange="t2.jobs",
        )
        await apply_topology(connection, plan(TopologySettings(**base)))
        with pytest.raises(TopologyError) as info:
            await apply_topology(connection, plan(TopologySettings(**base, delivery_limit=9)))
        text = str(info.value)
        assert "\n" not in text
        assert "x-delivery-limit" in text and "t2.q." in text
        # The connection stays usable after the refusal.
        await apply_topology(connection, plan(TopologySettings(**base)))
    finally:
        await connection.close()


async def test_delivery_limit_dead_letters_a_poison_job(amqp_url: str) -> None:
    base = dict(
        queue_prefix="t3.q.",
        dead_queue="t3.dead",
        dead_exchange="t3.dlx",
        jobs_exchange="t3.jobs",
        delivery_limit=1,
    )
    connection = await aio_pika.connect(amqp_url)
    try:
        await apply_topology(connection, plan(TopologySettings(**base)))
        channel = await connection.channel()
        jobs = await channel.get_exchange("t3.jobs")
        await jobs.publish(aio_pika.Message(b"{}", message_id="poison"), routing_key="batch")
        for _ in range(2):  # delivered limit + 1 times, requeued each time
            message = await _get(channel, "t3.q.batch")
            await message.nack(requeue=True)
        dead = await _get(channel, "t3.dead")
        assert dead.message_id == "poison"
        assert dead.headers["x-death"][0]["reason"] == "delivery_limit"
        await dead.ack()
    finally:
        await connection.close()


def test_definitions_json_matches_the_plan() -> None:
    """deploy/rabbitmq/definitions.json declares what `llmq topology apply` declares."""
    defs = json.loads((REPO / "deploy/rabbitmq/definitions.json").read_text())
    topo = plan(TopologySettings())
    queues = {q["name"]: q["arguments"] for q in defs["queues"]}
    for q in topo.queues:
        assert queues[q.name] == q.arguments, q.name
    exchanges = {e["name"]: e["type"] for e in defs["exchanges"]}
    for ex in topo.exchanges:
        assert exchanges[ex.name] == ex.type
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]}
    for b in topo.bindings:
        assert (b.exchange, b.queue, b.routing_key) in bindings
