"""The worker shell's settling half on the in-memory broker: every path a
delivery can take (workers/deliveries.py's table), in milliseconds.

Each test puts a job into a :class:`MemoryBroker` queue, hands the delivery
to :class:`Deliveries` with a stand-in ``route``, and reads what reached
the reply and dead-letter queues and how the delivery was settled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from pamqp.commands import Basic

from schemas.broker.errors import BrokerFailure, Refused, Returned
from schemas.broker.frames import MARKER
from schemas.broker.memory import MemoryBroker, MemoryMessage
from schemas.broker.publisher import Outgoing
from schemas.codec import Job, encode_reply
from schemas.settings import Settings, load_settings
from workers.deliveries import Deliveries
from workers.events import Event, JobDone
from workers.intake import Intake, admission
from workers.outcome import Outcome

REPLY = "llmq.reply.caller"
DEAD = "dead"
JOBS = "llmq.q.interactive"
BODY = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
NOW_S = 1_800_000_000.0


def settings() -> Settings:
    endpoint = {"name": "a", "base_url": "http://127.0.0.1:9/v1", "models": {"m1": "m1"}}
    return load_settings(None, endpoints=[endpoint], topology={"delivery_limit": 3})


class World:
    """A memory broker, the shell under test and what its route was asked."""

    def __init__(
        self,
        route: Callable[[Job, int], Awaitable[Outcome]] | None = None,
        *,
        nack_counts: bool = True,
    ) -> None:
        config = settings()
        self.broker = MemoryBroker(nack_counts=nack_counts)
        self.broker.declare(REPLY)
        self.broker.bind(config.topology.dead_exchange, "interactive", DEAD)
        self.routed: list[Job] = []
        self.events: list[Event] = []
        self.deliveries = Deliveries(
            Intake(
                admission(config),
                default_sla_ms={"interactive": 30_000},
                max_body_bytes=10_000,
                max_sla_ms=3_600_000,
            ),
            route or self.ok,
            name="w1",
            dead_exchange=config.topology.dead_exchange,
            delivery_limit=config.topology.delivery_limit,
            hook=self.events.append,
            clock=lambda: NOW_S,
        )
        self.deliveries.publisher = self.broker.publisher()

    async def ok(self, job: Job, now_ms: int) -> Outcome:
        self.routed.append(job)
        await asyncio.sleep(0)
        body = encode_reply(job.job_id, response={"answer": len(self.routed)}, routing={})
        return Outcome(job.job_id, body, job=job, reply_to=job.reply_to)

    def job(self, body: bytes = BODY, **properties: Any) -> MemoryMessage:
        props: dict[str, Any] = {
            "message_id": "j1",
            "reply_to": REPLY,
            "routing_key": "interactive",
            "content_type": "application/json",
            **properties,
        }
        return self.broker.put(JOBS, body, **props)

    async def run(self, message: MemoryMessage) -> None:
        got = self.broker.get(JOBS)
        assert got is message
        await self.deliveries.process(message)

    def replies(self) -> list[dict[str, Any]]:
        return [orjson.loads(body) for body in self.broker.bodies(REPLY)]

    def dead(self) -> list[MemoryMessage]:
        return list(self.broker.queues[DEAD])


async def test_a_served_job_is_answered_then_acked() -> None:
    world = World()
    message = world.job(correlation_id="c1")
    await world.run(message)
    [reply] = world.replies()
    assert reply["status"] == "ok" and reply["job_id"] == "j1"
    assert world.broker.queues[REPLY][0].correlation_id == "c1"
    assert message.settled == "ack" and world.dead() == []
    assert world.deliveries.stats.ok == 1
    [done] = [e for e in world.events if isinstance(e, JobDone)]
    assert done.code is None and not done.dead_lettered


async def test_a_bad_job_gets_its_error_and_a_dead_letter_without_a_route() -> None:
    world = World()
    message = world.job(b"not json")
    await world.run(message)
    [reply] = world.replies()
    assert reply["error"]["code"] == "invalid_request"
    [dead] = world.dead()
    assert dead.headers["error-code"] == "invalid_request" and dead.body == b"not json"
    assert message.settled == "ack" and world.routed == []


@pytest.mark.parametrize("reply_to", ["llmq.dead", JOBS, "another-service", "amq.rabbitmq.x"])
async def test_a_reply_to_that_is_no_reply_queue_is_never_written(reply_to: str) -> None:
    world = World()
    world.broker.declare(reply_to)
    message = world.job(reply_to=reply_to)
    await world.run(message)
    assert world.broker.bodies(reply_to) == []
    [dead] = world.dead()
    assert "not a reply queue" in dead.headers["error"]
    assert message.settled == "ack" and world.routed == []


async def test_undecodable_properties_are_dead_lettered_only() -> None:
    world = World()
    message = world.job(headers={MARKER: "invalid UTF-8 in message_id"})
    await world.run(message)
    assert world.replies() == [] and world.routed == []
    [dead] = world.dead()
    assert "could not be decoded" in dead.headers["error"]
    assert message.settled == "ack"


async def test_a_reply_queue_that_is_gone_keeps_the_answer_in_the_dead_letter() -> None:
    world = World()
    message = world.job(reply_to="llmq.reply.gone")
    await world.run(message)
    [dead] = world.dead()
    assert dead.headers["reply-error"] == "reply_to queue does not exist"
    assert orjson.loads(dead.headers["reply"])["status"] == "ok"
    assert message.settled == "ack" and world.deliveries.stats.requeued == 0


async def test_a_full_reply_queue_keeps_the_answer_in_the_dead_letter() -> None:
    world = World()
    world.broker.declare("llmq.reply.full", max_length=0)
    message = world.job(reply_to="llmq.reply.full")
    await world.run(message)
    [dead] = world.dead()
    assert dead.headers["reply-error"] == "reply_to queue refused it (full)"
    assert message.settled == "ack"


async def test_a_refused_dead_letter_is_sent_again_minimal() -> None:
    world = World()
    message = world.job(b"not json", headers={"x-custom": "y" * 100})
    world.broker.fail_next(Refused("full"), Refused("dead letter too big"))
    # The reply is refused (full): its dead letter is refused too, then the minimal one goes.
    await world.run(message)
    [dead] = world.dead()
    assert "x-custom" not in dead.headers and dead.headers["error-code"] == "invalid_request"
    assert message.settled == "ack"


@pytest.mark.parametrize("nack_counts", [True, False], ids=["rabbitmq-3-to-4.2", "rabbitmq-4.3"])
async def test_a_broker_that_takes_nothing_gets_the_job_back_unacked(nack_counts: bool) -> None:
    """Counted toward the delivery limit on every version, so a broker that never
    takes the answer ends the job in its own dead-lettering."""
    world = World(nack_counts=nack_counts)
    message = world.job()
    world.broker.fail_next(BrokerFailure("connection lost"))
    await world.run(message)
    assert message.settled == "requeue" and world.deliveries.stats.requeued == 1
    again = world.broker.get(JOBS)
    assert again is not None and again.headers["x-delivery-count"] == 1
    await world.deliveries.process(again)  # the redelivery is answered from the cache
    assert [r["status"] for r in world.replies()] == ["ok"]
    assert len(world.routed) == 1 and world.deliveries.stats.duplicates == 1


async def test_a_redelivery_while_serving_joins_the_running_job() -> None:
    release = asyncio.Event()
    world = World()

    async def slow(job: Job, now_ms: int) -> Outcome:
        await release.wait()
        return await world.ok(job, now_ms)

    world.deliveries.route = slow
    first, second = world.job(), world.job()
    await world.deliveries.on_message(world.broker.get(JOBS))  # type: ignore[arg-type]
    await world.deliveries.on_message(world.broker.get(JOBS))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    release.set()
    await world.deliveries.drain(5)
    assert len(world.routed) == 1  # one upstream call
    assert [r["status"] for r in world.replies()] == ["ok", "ok"]
    assert first.settled == second.settled == "ack"


async def test_a_reused_job_id_with_another_request_is_served_on_its_own() -> None:
    world = World()
    await world.run(world.job())
    other = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "other"}]})
    await world.run(world.job(other))
    await world.run(world.job(reply_to="llmq.reply.someone-else"))
    assert len(world.routed) == 3
    assert world.deliveries.stats.duplicates == 0


@pytest.mark.parametrize("nack_counts", [True, False], ids=["rabbitmq-3-to-4.2", "rabbitmq-4.3"])
async def test_a_bug_requeues_then_ends_the_job_on_its_last_delivery(nack_counts: bool) -> None:
    """On 4.3 only a reject counts toward the limit: a bug's requeue must be one,
    or the job goes round for ever."""

    async def broken(job: Job, now_ms: int) -> Outcome:
        raise RuntimeError("a bug")

    world = World(broken, nack_counts=nack_counts)
    message = world.job()
    await world.run(message)
    assert message.settled == "requeue" and world.replies() == []
    last = message
    for _ in range(10):  # requeued until its last permitted delivery
        if last.settled == "ack":
            break
        again = world.broker.get(JOBS)
        assert again is not None
        await world.deliveries.process(again)
        last = again
    assert last.headers["x-delivery-count"] == 3 and world.deliveries.stats.requeued == 3
    [reply] = world.replies()
    assert reply["error"]["code"] == "internal_error"
    [dead] = world.dead()
    assert dead.headers["error-code"] == "internal_error"


async def test_shutdown_requeues_what_is_still_running() -> None:
    started = asyncio.Event()

    async def hangs(job: Job, now_ms: int) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never")

    world = World(hangs)
    message = world.job()
    await world.deliveries.on_message(world.broker.get(JOBS))  # type: ignore[arg-type]
    await started.wait()
    await world.deliveries.drain(0)
    assert message.settled == "requeue"
    again = world.broker.get(JOBS)
    assert again is not None and again.headers["x-acquired-count"] == 1
    assert world.replies() == [] and world.dead() == []
    assert world.deliveries.stats.in_flight == 0 and not world.deliveries.busy


async def test_the_memory_broker_refuses_like_rabbitmq() -> None:
    broker = MemoryBroker()
    broker.declare("q", max_length=1)
    publisher = broker.publisher()
    message = Outgoing(b"x", Basic.Properties(message_id="m"))
    await publisher.publish(message, exchange="", routing_key="q")
    with pytest.raises(Refused):
        await publisher.publish(message, exchange="", routing_key="q")
    with pytest.raises(Returned):
        await publisher.publish(message, exchange="", routing_key="nowhere")
    with pytest.raises(Returned):
        await publisher.publish(message, exchange="ex", routing_key="q")
    [delivered] = broker.queues["q"]
    await delivered.ack()
    with pytest.raises(BrokerFailure):
        await delivered.ack()  # settled once only
