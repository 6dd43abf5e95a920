"""The AMQP properties of replies and dead letters, built without aio-pika's Message."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aio_pika
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from schemas.contract import CONTENT_TYPE
from workers.amqp import dead_letter_message, reply_message

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def incoming(body: bytes = b'{"model": "m1"}', **properties: Any) -> aio_pika.IncomingMessage:
    """A delivery as aio-pika hands it to the worker's consumer."""
    delivered = DeliveredMessage(
        delivery=Basic.Deliver(
            consumer_tag="ctag", delivery_tag=1, exchange="llmq.jobs", routing_key="interactive"
        ),
        header=ContentHeader(body_size=len(body), properties=Basic.Properties(**properties)),
        body=body,
        channel=None,
    )
    return aio_pika.IncomingMessage(delivered, no_ack=True)


def test_reply_properties() -> None:
    """A reply is persistent JSON with the caller's correlation id and the job id header."""
    reply = reply_message(b"{}", correlation_id="c1", job_id="j1")
    p = reply.properties
    assert reply.body == b"{}"
    assert (p.content_type, p.delivery_mode, p.correlation_id) == (CONTENT_TYPE, 2, "c1")
    assert p.headers == {"job-id": "j1"}
    assert p.message_id is not None and len(p.message_id) == 32
    assert (p.reply_to, p.expiration, p.timestamp, p.message_type) == (None, None, None, None)


def test_each_reply_has_its_own_message_id() -> None:
    """Two replies to one job can be in flight; the client matches returns by message id."""
    first = reply_message(b"{}", correlation_id="c1", job_id="j1")
    second = reply_message(b"{}", correlation_id="c1", job_id="j1")
    assert first.properties.message_id != second.properties.message_id


def test_reply_carries_the_trace_on() -> None:
    """The job's W3C traceparent goes on the reply, after the job id."""
    p = reply_message(b"{}", correlation_id="c1", job_id="j1", traceparent=TRACEPARENT).properties
    assert p.headers == {"job-id": "j1", "traceparent": TRACEPARENT}
    p = reply_message(b"{}", correlation_id=None, job_id=None, traceparent=TRACEPARENT).properties
    assert p.headers == {"traceparent": TRACEPARENT}


def test_reply_wire_format_is_what_aio_pika_sent() -> None:
    """Same bytes as the aio-pika Message the worker used to build: an empty header
    table and priority 0 are on the wire too."""
    for correlation_id, job_id in [("c1", "j1"), (None, None)]:
        ours = reply_message(b"{}", correlation_id=correlation_id, job_id=job_id)
        theirs = aio_pika.Message(
            b"{}",
            content_type=CONTENT_TYPE,
            correlation_id=correlation_id,
            message_id=ours.properties.message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"job-id": job_id} if job_id else None,
        )
        assert ours.properties.marshal() == theirs.properties.marshal()


def test_dead_letter_copies_the_job_and_adds_the_error_headers() -> None:
    """Body and properties of the job, persistent, its headers plus the error's."""
    sent = datetime(2026, 11, 24, 4, 40, tzinfo=UTC)
    job = incoming(
        content_type="application/json",
        content_encoding="utf-8",
        headers={"sla-ms": 5000, "tenant": "t1"},
        delivery_mode=1,
        priority=3,
        correlation_id="c1",
        reply_to="replies",
        message_id="j1",
        timestamp=sent,
        message_type="chat",
        app_id="svc",
    )
    dead = dead_letter_message(job, {"error-code": "upstream_error", "attempts": 2})
    p = dead.properties
    assert dead.body == job.body
    assert p.headers == {
        "sla-ms": 5000,
        "tenant": "t1",
        "error-code": "upstream_error",
        "attempts": 2,
    }
    assert (p.content_type, p.content_encoding, p.delivery_mode, p.priority) == (
        "application/json",
        "utf-8",
        2,
        3,
    )
    assert (p.correlation_id, p.reply_to, p.message_id) == ("c1", "replies", "j1")
    assert (p.timestamp, p.message_type, p.app_id) == (sent, "chat", "svc")


def test_dead_letter_of_a_bare_job() -> None:
    """A job with no properties: only the error headers, persistence and priority 0."""
    p = dead_letter_message(incoming(), {"error-code": "invalid_request"}).properties
    assert p.headers == {"error-code": "invalid_request"}
    assert (p.delivery_mode, p.priority, p.message_id, p.timestamp) == (2, 0, None, None)
