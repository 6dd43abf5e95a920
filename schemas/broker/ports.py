"""What the roles need of the broker, as protocols: a delivered message they
settle and a confirming publisher. aio-pika's ``IncomingMessage`` and
:class:`~schemas.broker.publisher.Publisher` satisfy them on RabbitMQ;
:mod:`schemas.broker.memory` satisfies them in memory, for tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from schemas.broker.publisher import Outgoing

__all__ = ["Confirming", "Incoming"]


class Incoming(Protocol):
    """A delivered message: its properties, and the ack, nack or reject that settles it."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, Any]: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def timestamp(self) -> datetime | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...

    async def ack(self) -> None: ...
    async def nack(self, *, requeue: bool = True) -> None: ...
    async def reject(self, *, requeue: bool = False) -> None:
        """Like ``nack``, but a requeue counts as a failed delivery on every
        RabbitMQ version (4.3 counts ``nack`` only as an acquisition)."""
        ...


class Confirming(Protocol):
    """Publishes and returns once the broker confirmed; raises
    :class:`~schemas.broker.errors.BrokerFailure` (or a subclass) otherwise."""

    @property
    def frame_max(self) -> int: ...

    async def publish(
        self, message: Outgoing, *, exchange: str, routing_key: str, timeout_s: float = 30
    ) -> None: ...
