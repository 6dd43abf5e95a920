"""The worker's messages: replies and dead letters as AMQP messages.

A dead letter must fit the broker's frame: its headers are bounded
(:func:`bounded_headers`) and a large undelivered reply rides in the body.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from pamqp import encode
from pamqp.commands import Basic

from schemas.broker.ports import Incoming
from schemas.broker.publisher import FRAME_MAX as _FRAME_MAX
from schemas.broker.publisher import PERSISTENT as _PERSISTENT
from schemas.broker.publisher import Outgoing
from schemas.contract import CONTENT_TYPE, DEAD_HEADERS, HEADERS

__all__ = [
    "REPLY_IN_HEADER",
    "bounded_headers",
    "dead_letter_message",
    "header_budget",
    "minimal_dead_letter",
    "reply_message",
]

REPLY_IN_HEADER = 8_192
"""An undelivered reply up to this size rides in the ``reply`` header; a larger
one is appended to the body (``reply-offset`` says where it starts)."""


def minimal_dead_letter(incoming: Incoming, headers: Mapping[str, Any]) -> Outgoing:
    """The job's body and ids with our error headers only: the last resort."""
    return Outgoing(
        incoming.body,
        Basic.Properties(
            content_type=incoming.content_type,
            headers={k: v for k, v in headers.items() if k != DEAD_HEADERS.REPLY},
            delivery_mode=_PERSISTENT,
            correlation_id=incoming.correlation_id,
            message_id=incoming.message_id,
        ),
    )


def reply_message(
    body: bytes,
    *,
    correlation_id: str | None,
    job_id: str | None,
    traceparent: str | None = None,
) -> Outgoing:
    """A reply envelope as an AMQP message.

    The reply's own ``message_id`` is fresh: the client library matches
    returns by message id, and a duplicate delivery of one job can have two
    replies in flight. ``traceparent`` (W3C) carries the job's trace on.
    """
    headers: dict[str, Any] = {"job-id": job_id} if job_id else {}
    if traceparent is not None:
        headers["traceparent"] = traceparent
    # An empty header table and priority 0 are sent, as aio-pika's Message did.
    return Outgoing(
        body,
        Basic.Properties(
            content_type=CONTENT_TYPE,
            headers=headers,
            delivery_mode=_PERSISTENT,
            priority=0,
            correlation_id=correlation_id,
            message_id=uuid.uuid4().hex,
        ),
    )


def header_budget(frame_max: int = _FRAME_MAX) -> int:
    """Bytes the headers of a message we write may take: far below one frame,
    whatever the input, so the broker never closes the connection (FRAME_ERROR)."""
    return max(1_024, min(32_768, frame_max // 4))


def bounded_headers(
    original: Mapping[str, Any], extra: Mapping[str, Any], *, budget: int
) -> dict[str, Any]:
    """``extra`` (ours, small) plus as many of ``original`` as fit in ``budget`` bytes.

    The contract's own headers go first, then the rest in order; what does not
    fit, or does not encode, is dropped and counted in ``headers-dropped``.
    """
    headers = dict(extra)
    used = _encoded_size(headers)
    contract = {v for k, v in vars(HEADERS).items() if k.isupper()}
    ordered = sorted(original.items(), key=lambda kv: kv[0] not in contract)
    dropped = 0
    for name, value in ordered:
        if name in headers:
            continue
        size = _encoded_size({name: value})
        if size < 0 or used + size > budget:
            dropped += 1
            continue
        headers[name] = value
        used += size
    if dropped:
        headers[DEAD_HEADERS.HEADERS_DROPPED] = dropped
    return headers


def _encoded_size(table: Mapping[str, Any]) -> int:
    try:
        return len(encode.field_table(dict(table)))
    except (TypeError, ValueError, OverflowError, RecursionError, UnicodeError):
        return -1


def dead_letter_message(
    incoming: Incoming,
    extra_headers: Mapping[str, Any],
    *,
    reply: bytes | None = None,
    frame_max: int = _FRAME_MAX,
    omit: frozenset[str] = frozenset(),
) -> Outgoing:
    """A copy of the original job, body and properties, with the error headers added.

    Bounded whatever the input: the original headers are kept as far as
    :func:`header_budget` allows, and an undelivered ``reply`` travels in a
    header only when small, else after the job's body (``reply-offset``).
    The job's headers named in ``omit`` are not copied.
    """
    extra = dict(extra_headers)
    body = incoming.body
    if reply is not None:
        if len(reply) <= REPLY_IN_HEADER:
            # Header tables can't hold raw bytes; the envelope is UTF-8 JSON.
            extra[DEAD_HEADERS.REPLY] = reply.decode("utf-8", "replace")
        else:
            extra[DEAD_HEADERS.REPLY_OFFSET] = len(body)
            body = body + reply
    original = {k: v for k, v in (incoming.headers or {}).items() if k not in omit}
    headers = bounded_headers(original, extra, budget=header_budget(frame_max))
    return Outgoing(
        body,
        Basic.Properties(
            content_type=incoming.content_type,
            content_encoding=incoming.content_encoding,
            headers=headers,
            delivery_mode=_PERSISTENT,
            priority=incoming.priority or 0,
            correlation_id=incoming.correlation_id,
            reply_to=incoming.reply_to,
            message_id=incoming.message_id,
            timestamp=incoming.timestamp,
            message_type=incoming.type,
            app_id=incoming.app_id,
        ),
    )
