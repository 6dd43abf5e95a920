"""The worker's confirming publisher on the real broker: delivered, returned, refused, resent."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest

from schemas.broker.connection import connect
from schemas.broker.errors import BrokerFailure, Returned
from schemas.broker.publisher import Publisher
from schemas.contract import CONTENT_TYPE
from workers.amqp import reply_message

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
async def publisher(amqp_url: str) -> AsyncIterator[Publisher]:
    connection = await connect(amqp_url, name="llmq-test-publisher")
    publisher = await Publisher.open(connection)
    yield publisher
    await connection.close()


async def declare(
    connection: aio_pika.abc.AbstractConnection, **arguments: Any
) -> aio_pika.abc.AbstractQueue:
    """A queue of this test's own (the session's vhost goes, and takes it, at the end);
    durable, as RabbitMQ 4.3 refuses a transient queue that is not exclusive."""
    channel = await connection.channel()
    name = f"pub.{uuid.uuid4().hex[:8]}"
    return await channel.declare_queue(name, durable=True, arguments=arguments)


async def test_reply_arrives_with_its_properties(
    publisher: Publisher, connection: aio_pika.abc.AbstractConnection
) -> None:
    """Published on the raw channel, the reply reaches the queue as the caller expects it."""
    queue = await declare(connection)
    reply = reply_message(b'{"status": "ok"}', correlation_id="c1", job_id="j1")
    await publisher.publish(reply, exchange="", routing_key=queue.name)
    got = await queue.get(timeout=5)
    assert got.body == b'{"status": "ok"}'
    assert (got.correlation_id, got.message_id) == ("c1", reply.properties.message_id)
    assert (got.content_type, got.delivery_mode) == (CONTENT_TYPE, aio_pika.DeliveryMode.PERSISTENT)
    assert got.headers == {"job-id": "j1"}


async def test_returned_message_is_unroutable(publisher: Publisher) -> None:
    """Nothing bound to the routing key: the broker returns it and publish says so."""
    reply = reply_message(b"{}", correlation_id="c1", job_id="j1")
    with pytest.raises(Returned, match="no-such-queue"):
        await publisher.publish(reply, exchange="", routing_key=f"no-such-queue.{uuid.uuid4()}")


async def test_nack_is_a_broker_failure(
    publisher: Publisher, connection: aio_pika.abc.AbstractConnection
) -> None:
    """A full queue that rejects publishes nacks: a broker failure, not an unroutable reply."""
    queue = await declare(connection, **{"x-max-length": 1, "x-overflow": "reject-publish"})
    first, second = (reply_message(b, correlation_id=None, job_id=None) for b in (b"1", b"2"))
    await publisher.publish(first, exchange="", routing_key=queue.name)
    with pytest.raises(BrokerFailure, match="refused") as raised:
        await publisher.publish(second, exchange="", routing_key=queue.name)
    assert not isinstance(raised.value, Returned)


async def test_publish_waits_through_a_reconnect(
    publisher: Publisher,
    amqp_url: str,
    vhost: str,
    rabbitmqctl: Callable[..., Any],
) -> None:
    """The broker drops the connection: publish waits for the reconnect and sends it once."""
    async with await aio_pika.connect(amqp_url) as connection:
        name = (await declare(connection)).name
    result = await asyncio.to_thread(
        rabbitmqctl, "close_all_connections", "--vhost", vhost, "publisher test"
    )
    assert result.returncode == 0, result.stderr
    await publisher.publish(
        reply_message(b"after", correlation_id="c1", job_id="j1"), exchange="", routing_key=name
    )
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(name, ensure=True)
        got = await queue.get(timeout=5)
        assert got.body == b"after"
        assert await queue.get(fail=False) is None
