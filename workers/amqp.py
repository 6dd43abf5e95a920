"""The worker's broker edge: connections, confirmed publishing, message shapes.

Two connections per worker: consuming and publishing, because a memory or
disk alarm blocks publishing connections and must not stall acks. Every
publish waits for the broker's confirm; a returned (unroutable) message and
a nack are failures, never silence.

Replies and dead letters go out on the raw aiormq channel with bare AMQP
properties: aio-pika's ``Message`` costs ~8 µs per job for nothing we use,
and its ``publish`` holds the channel lock until the frame is written, which
lets the publishes of a busy worker through one per loop turn or two.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pamqp import encode
from pamqp.commands import Basic

from schemas.contract import CONTENT_TYPE, DEAD_HEADERS, HEADERS
from workers.errors import BrokerFailure, Refused, Unroutable
from workers.frame_reader import SafeRobustConnection

__all__ = [
    "Outgoing",
    "Publisher",
    "bounded_headers",
    "connect",
    "dead_letter_message",
    "header_budget",
    "minimal_dead_letter",
    "reply_message",
]

_RECONNECT_BASE_S = 0.5
_RECONNECT_CAP_S = 15.0
_REPUBLISH_PAUSE_S = 0.25
_PERSISTENT = 2
"""AMQP ``delivery-mode`` 2: the broker writes the message to disk."""
_FRAME_MAX = 131_072
"""RabbitMQ's default ``frame_max``: a message's properties must fit in one frame."""
REPLY_IN_HEADER = 8_192
"""An undelivered reply up to this size rides in the ``reply`` header; a larger
one is appended to the body (``reply-offset`` says where it starts)."""


class JitteredRobustConnection(SafeRobustConnection):
    """aio-pika reconnects every ``reconnect_interval`` seconds, fixed; this
    makes it full-jitter exponential so a fleet of workers does not reconnect
    in lockstep after a broker restart."""

    _tries = 0

    @property
    def reconnect_interval(self) -> float:
        self._tries += 1
        ceiling = min(_RECONNECT_CAP_S, _RECONNECT_BASE_S * 2.0 ** min(self._tries, 16))
        return random.uniform(_RECONNECT_BASE_S, ceiling)

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._tries = 0


async def connect(url: str, *, name: str, heartbeat_s: int = 30) -> AbstractRobustConnection:
    """A robust connection with jittered reconnects; the first connect fails fast.

    Its frames are read through :class:`workers.frames.FrameGuard`: a message
    the client library could not decode arrives marked instead of ending the
    connection (see ``workers/frames.py``).
    """
    connection = await aio_pika.connect_robust(
        url,
        connection_class=JitteredRobustConnection,
        client_properties={"connection_name": name},
        heartbeat=heartbeat_s,
    )
    connection.reconnect_callbacks.add(_reset_backoff)
    return connection


def _reset_backoff(connection: Any) -> None:
    connection._tries = 0


class Publisher:
    """A confirming channel: ``publish`` returns once the broker has the message."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self._channel = channel

    @classmethod
    async def open(cls, connection: AbstractRobustConnection) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel)

    async def publish(
        self, message: Outgoing, *, exchange: str, routing_key: str, timeout_s: float = 30
    ) -> None:
        """Publish with ``mandatory``; raises :class:`Unroutable`, :class:`Refused` (a nack)
        or :class:`BrokerFailure`.

        While the connection is down (a broker restart, a reconnect that comes
        back after the consuming side's) it waits and publishes again, up to
        ``timeout_s``: the answer is already paid for, and requeueing the job
        instead would spend its delivery limit in a tight loop.
        """
        give_up = time.monotonic() + timeout_s
        while True:
            try:
                if self._channel.is_closed:
                    raise aiormq.exceptions.ChannelInvalidStateError("publishing channel closed")
                # Asked for on every publish: a reconnect replaces the raw channel.
                # aio-pika's is always an aiormq.Channel; only that has ``wait``.
                channel = cast(aiormq.Channel, await self._channel.get_underlay_channel())
                # wait=False: don't hold the channel lock until the frame is
                # written; the broker's confirm is still awaited.
                await channel.basic_publish(
                    message.body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=message.properties,
                    mandatory=True,
                    timeout=timeout_s,
                    wait=False,
                )
                return
            except aiormq.exceptions.PublishError:
                raise Unroutable(f"no queue for {exchange or '(default)'}/{routing_key}") from None
            except aiormq.exceptions.DeliveryError:
                raise Refused(
                    f"broker refused the message for {routing_key} (queue full?)"
                ) from None
            except (
                aiormq.exceptions.AMQPError,
                aiormq.exceptions.ChannelInvalidStateError,
                ConnectionError,
                TimeoutError,
            ) as exc:
                if time.monotonic() + _REPUBLISH_PAUSE_S > give_up:
                    raise BrokerFailure(f"publish failed: {type(exc).__name__}") from None
                await asyncio.sleep(_REPUBLISH_PAUSE_S)

    @property
    def frame_max(self) -> int:
        """The connection's negotiated ``frame_max`` (RabbitMQ's default until known)."""
        underlay = getattr(self._channel, "_channel", None)
        tune = getattr(getattr(underlay, "connection", None), "connection_tune", None)
        value = getattr(tune, "frame_max", 0)
        return value if isinstance(value, int) and value > 0 else _FRAME_MAX

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: the body and its AMQP properties."""

    body: bytes
    properties: Basic.Properties


def minimal_dead_letter(incoming: AbstractIncomingMessage, headers: Mapping[str, Any]) -> Outgoing:
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
    incoming: AbstractIncomingMessage,
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
