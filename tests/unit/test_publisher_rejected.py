"""A publish the broker answers by closing the channel is final: no 30 s of retries.

RabbitMQ 4.0 lowered ``max_message_size`` to 16 MiB; a larger job closes the
publishing channel with PRECONDITION_FAILED. The publisher used to treat that
like a lost connection and publish again until its timeout.
"""

from __future__ import annotations

import time
from typing import Any, cast

import aio_pika
import aiormq
import pytest
from pamqp.commands import Basic

from schemas.broker.errors import Rejected, TooLarge
from schemas.broker.publisher import Outgoing, Publisher

TOO_BIG = "PRECONDITION_FAILED - message size 17825792 is larger than configured max size 16777216"


class ClosingChannel:
    """An aiormq channel whose every publish ends with the broker closing it."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
        self.publishes = 0

    async def basic_publish(self, *args: Any, **kwargs: Any) -> None:
        self.publishes += 1
        raise self.exc


class Channel:
    """The aio-pika channel around it."""

    is_closed = False

    def __init__(self, underlay: ClosingChannel) -> None:
        self.underlay = underlay

    async def get_underlay_channel(self) -> ClosingChannel:
        return self.underlay


def publisher(exc: Exception) -> tuple[Publisher, ClosingChannel]:
    underlay = ClosingChannel(exc)
    return Publisher(cast(aio_pika.abc.AbstractChannel, Channel(underlay))), underlay


MESSAGE = Outgoing(b"x" * 1000, Basic.Properties())


async def test_a_message_over_the_brokers_size_limit_fails_at_once_as_too_large() -> None:
    pub, channel = publisher(aiormq.exceptions.ChannelPreconditionFailed(TOO_BIG))
    started = time.monotonic()
    with pytest.raises(TooLarge, match=r"1000-byte message.*larger than configured max size"):
        await pub.publish(MESSAGE, exchange="llmq.jobs", routing_key="interactive", timeout_s=5)
    assert channel.publishes == 1
    assert time.monotonic() - started < 1  # not the retry loop's timeout


@pytest.mark.parametrize(
    "exc",
    [
        aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED - something else"),
        aiormq.exceptions.ChannelAccessRefused("ACCESS_REFUSED - user_id property set to 'x'"),
    ],
)
async def test_other_channel_closing_refusals_are_final_too(exc: Exception) -> None:
    pub, channel = publisher(exc)
    with pytest.raises(Rejected) as raised:
        await pub.publish(MESSAGE, exchange="llmq.jobs", routing_key="interactive", timeout_s=5)
    assert not isinstance(raised.value, TooLarge)
    assert channel.publishes == 1
