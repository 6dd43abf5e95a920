"""The copy a browse puts back for a dead letter: the same letter, never requeued."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pamqp.commands import Basic

from producers.deadletters.copies import USER_ID_HEADER, browse_copy
from producers.deadletters.letters import REMOVED_ON_REPLAY, read_letter

DEATH = [
    {
        "count": 5,
        "reason": "delivery_limit",
        "queue": "llmq.q.batch",
        "time": dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "exchange": "llmq.jobs",
        "routing-keys": ["batch"],
    }
]


def props(**overrides: Any) -> Basic.Properties:
    base: dict[str, Any] = {
        "content_type": "application/json",
        "content_encoding": "identity",
        "headers": {
            "error-code": "upstream_error",
            "attempts": 3,
            "x-death": DEATH,
            "x-first-death-reason": "delivery_limit",
            "x-delivery-count": 19,
            "x-acquired-count": 40,
        },
        "delivery_mode": 2,
        "priority": 3,
        "correlation_id": "corr-1",
        "reply_to": "llmq.reply.svc",
        "expiration": "60000",
        "message_id": "job-1",
        "timestamp": dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "message_type": "chat",
        "user_id": "ops",
        "app_id": "app",
    }
    base.update(overrides)
    return Basic.Properties(**base)


def test_the_copy_is_the_letter_without_the_marks_of_its_delivery() -> None:
    """Body, properties and headers unchanged, x-death included; only the
    delivery and acquired counts go, so the broker counts the copy from zero."""
    original = props()
    copy = browse_copy(b"body", original, operator="ops")
    assert copy.body == b"body"
    p = copy.properties
    for name in (
        "content_type",
        "content_encoding",
        "delivery_mode",
        "priority",
        "correlation_id",
        "reply_to",
        "expiration",
        "message_id",
        "timestamp",
        "message_type",
        "user_id",
        "app_id",
    ):
        assert getattr(p, name) == getattr(original, name), name
    assert p.headers == {
        "error-code": "upstream_error",
        "attempts": 3,
        "x-death": DEATH,
        "x-first-death-reason": "delivery_limit",
    }


def test_a_copy_reads_as_the_same_dead_letter() -> None:
    class Delivered:
        def __init__(self, body: bytes, p: Basic.Properties) -> None:
            self.body, self.headers = body, p.headers
            self.message_id, self.correlation_id = p.message_id, p.correlation_id
            self.reply_to, self.timestamp = p.reply_to, p.timestamp

    original = props(headers={"x-death": DEATH, "x-delivery-count": 19})
    copy = browse_copy(b"{}", original, operator="ops")
    before = read_letter(Delivered(b"{}", original))
    after = read_letter(Delivered(copy.body, copy.properties))
    assert after.row(0) == before.row(0)
    assert after.code == "internal_error" and after.sla_class == "batch"


def test_a_user_id_the_operator_may_not_publish_moves_to_a_header() -> None:
    """RabbitMQ refuses a publish whose user_id is not the connection's user."""
    copy = browse_copy(b"", props(user_id="tenant-a"), operator="ops")
    assert copy.properties.user_id is None
    assert (copy.properties.headers or {})[USER_ID_HEADER] == "tenant-a"
    assert USER_ID_HEADER in REMOVED_ON_REPLAY
    unknown = browse_copy(b"", props(user_id="tenant-a"), operator=None)
    assert unknown.properties.user_id is None
    mine = browse_copy(b"", props(user_id="ops"), operator="ops")
    assert mine.properties.user_id == "ops"
    assert USER_ID_HEADER not in (mine.properties.headers or {})


def test_headers_the_client_cannot_write_again_are_dropped_and_counted() -> None:
    """A header read but not writable would fail every copy and leave the letter
    in the requeue path (counted deliveries): it goes, and the count says so."""
    headers = {"fine": "x", "huge": 1e300, "headers-dropped": 2}
    copy = browse_copy(b"", props(headers=headers), operator="ops")
    assert copy.properties.headers == {"fine": "x", "headers-dropped": 3}
    clean = browse_copy(b"", props(headers={"fine": "x"}), operator="ops")
    assert clean.properties.headers == {"fine": "x"}
