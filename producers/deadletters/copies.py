"""The copy of a dead letter that a browse puts back: the same letter, never requeued.

Browsing takes each dead letter (RabbitMQ has no peek) and must give back
what it does not remove. A requeue (``nack``) counts as a delivery on
RabbitMQ 4.0–4.2 (4.3 counts ``reject`` only), and a quorum queue drops a
message past its delivery limit — 20 by default since 4.0 — when, like
``llmq.dead``, it has no dead-letter exchange. So a browse publishes this
copy to the tail of the dead-letter queue, waits for the broker's confirm and
only then acks the original: the copy was never delivered, so its count
starts from zero, and a whole round puts every letter back in its order.

The copy is the letter: body and properties unchanged, headers unchanged but
for three things a publisher cannot or must not send again:

- ``x-delivery-count`` and ``x-acquired-count``: the broker's marks of *this*
  delivery, not part of the letter (RabbitMQ 3.13+ keeps other ``x-`` headers
  a client sends, ``x-death`` included, as plain headers);
- ``user_id`` unless it is the operator's own: RabbitMQ refuses a publish
  whose ``user_id`` is not the connection's user, so it moves to the
  :data:`USER_ID_HEADER` header (a replay drops it);
- header values the client library read but cannot write again (a long
  string that is not UTF-8, a double out of range): dropped and counted in
  ``headers-dropped``, so that one odd header cannot pin a letter in the
  requeue path.

A letter without a ``message_id`` gets a random one from the client library
on its first browse (it publishes none without), and keeps that from then on.
"""

from __future__ import annotations

import struct
from typing import Any

from pamqp import encode
from pamqp.commands import Basic

from schemas.broker.publisher import Outgoing
from schemas.contract import DEAD_HEADERS

__all__ = ["DELIVERY_MARKS", "USER_ID_HEADER", "browse_copy"]

DELIVERY_MARKS = frozenset({"x-delivery-count", "x-acquired-count"})
"""Headers the broker adds to a delivery of a quorum-queue message."""
USER_ID_HEADER = "user-id"
"""Where a copy keeps a ``user_id`` the operator may not publish."""


def browse_copy(body: bytes, properties: Basic.Properties, *, operator: str | None) -> Outgoing:
    """The message a browse publishes back for the delivered letter ``body`` + ``properties``."""
    headers: dict[str, Any] = {}
    dropped = 0
    for name, value in (properties.headers or {}).items():
        if name in DELIVERY_MARKS:
            continue
        if _writable(value):
            headers[name] = value
        else:
            dropped += 1
    if dropped:
        before = headers.get(DEAD_HEADERS.HEADERS_DROPPED)
        already = before if isinstance(before, int) and not isinstance(before, bool) else 0
        headers[DEAD_HEADERS.HEADERS_DROPPED] = already + dropped
    user_id = properties.user_id
    if user_id and user_id != operator:
        headers.setdefault(USER_ID_HEADER, user_id)
        user_id = None
    return Outgoing(
        body,
        Basic.Properties(
            content_type=properties.content_type,
            content_encoding=properties.content_encoding,
            headers=headers,
            delivery_mode=properties.delivery_mode,
            priority=properties.priority,
            correlation_id=properties.correlation_id,
            reply_to=properties.reply_to,
            expiration=properties.expiration,
            message_id=properties.message_id,
            timestamp=properties.timestamp,
            message_type=properties.message_type,
            user_id=user_id,
            app_id=properties.app_id,
        ),
    )


def _writable(value: Any) -> bool:
    try:
        encode.encode_table_value(value)
    except (TypeError, ValueError, OverflowError, RecursionError, struct.error):
        return False
    return True
