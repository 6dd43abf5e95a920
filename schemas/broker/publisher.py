"""The one confirmed publish: ``publish`` returns once the broker has the message.

A returned (unroutable) message and a nack are failures, never silence;
while the connection is down it publishes again until its timeout. A publish
the broker answers by closing the channel (too large, access refused) is
final: sending it again would only fail again.

Messages go out on the raw aiormq channel with bare AMQP properties:
aio-pika's ``Message`` costs ~8 µs per message for nothing we use, and its
``publish`` holds the channel lock until the frame is written, which lets
the publishes of a busy worker through one per loop turn or two.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection, AbstractMessage
from pamqp.commands import Basic

from schemas.broker.errors import BrokerFailure, Refused, Rejected, Returned, TooLarge

__all__ = ["FRAME_MAX", "PERSISTENT", "Outgoing", "Publisher"]

_REPUBLISH_PAUSE_S = 0.25
PERSISTENT = 2
"""AMQP ``delivery-mode`` 2: the broker writes the message to disk."""
FRAME_MAX = 131_072
"""RabbitMQ's default ``frame_max``: a message's properties must fit in one frame."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: the body and its AMQP properties."""

    body: bytes
    properties: Basic.Properties

    @classmethod
    def of(cls, message: AbstractMessage) -> Outgoing:
        """An aio-pika message as it goes on the wire."""
        return cls(message.body, message.properties)


class Publisher:
    """A confirming channel: ``publish`` returns once the broker has the message."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self._channel = channel

    @classmethod
    async def open(cls, connection: AbstractConnection) -> Publisher:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return cls(channel)

    async def publish(
        self,
        message: Outgoing,
        *,
        exchange: str,
        routing_key: str,
        timeout_s: float = 30,
        retry_lost: bool = True,
        bound_confirm: bool = True,
    ) -> None:
        """Publish with ``mandatory``; raises :class:`Returned`, :class:`Refused` (a nack)
        or :class:`BrokerFailure`.

        While the connection is down (a broker restart, a reconnect that comes
        back after the consuming side's) it waits and publishes again, up to
        ``timeout_s``: the answer is already paid for, and requeueing the job
        instead would spend its delivery limit in a tight loop. With
        ``retry_lost=False`` a lost connection fails at once (a tool whose
        connection does not come back). ``bound_confirm=False`` waits for
        the confirm without a timer of its own (a timer per publish costs a
        producer publishing thousands a second ~15 % of its rate; the
        connection's heartbeat still ends a dead wait).
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
                    timeout=timeout_s if bound_confirm else None,
                    wait=False,
                )
                return
            except aiormq.exceptions.PublishError:
                raise Returned(f"no queue for {exchange or '(default)'}/{routing_key}") from None
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise Returned(f"exchange {exchange!r} does not exist") from None
            except aiormq.exceptions.DeliveryError:
                raise Refused(
                    f"broker refused the message for {routing_key} (queue full?)"
                ) from None
            except (
                aiormq.exceptions.ChannelPreconditionFailed,
                aiormq.exceptions.ChannelAccessRefused,
            ) as exc:
                raise _rejected(exc, len(message.body)) from None
            except (
                aiormq.exceptions.AMQPError,
                aiormq.exceptions.ChannelInvalidStateError,
                ConnectionError,
                TimeoutError,
            ) as exc:
                if not retry_lost or time.monotonic() + _REPUBLISH_PAUSE_S > give_up:
                    raise BrokerFailure(f"publish failed: {type(exc).__name__}") from None
                await asyncio.sleep(_REPUBLISH_PAUSE_S)

    @property
    def frame_max(self) -> int:
        """The connection's negotiated ``frame_max`` (RabbitMQ's default until known)."""
        underlay = getattr(self._channel, "_channel", None)
        tune = getattr(getattr(underlay, "connection", None), "connection_tune", None)
        value = getattr(tune, "frame_max", 0)
        return value if isinstance(value, int) and value > 0 else FRAME_MAX

    async def close(self) -> None:
        if not self._channel.is_closed:
            await self._channel.close()


def _rejected(exc: aiormq.exceptions.AMQPError, size: int) -> Rejected:
    # RabbitMQ: "PRECONDITION_FAILED - message size 17825792 is larger than
    # configured max size 16777216".
    text = str(exc.args[0] if exc.args else exc)
    if "larger than" in text and "max size" in text:
        return TooLarge(f"the broker refused a {size}-byte message: {text}")
    return Rejected(f"the broker refused the message: {text}")
