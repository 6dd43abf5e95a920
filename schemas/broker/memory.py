"""An in-memory broker for tests, in the manner of dramatiq's ``StubBroker``.

It keeps queues, bindings and deliveries in dicts and models what the roles
rely on: a confirmed publish that raises :class:`Returned` when no queue
is bound (``mandatory``) and :class:`Refused` when the queue is full
(``x-max-length`` with ``reject-publish``); deliveries that are acked,
or nacked or rejected back to the head of their queue with
``x-delivery-count`` raised (quorum queues; with ``nack_counts=False`` as
on RabbitMQ 4.3, where a ``nack`` raises only ``x-acquired-count``). Faults
are injected by :meth:`MemoryBroker.fail_next`. No timers, no network: a
test of the worker shell runs in milliseconds.
"""

from __future__ import annotations

import datetime as dt
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.broker.errors import BrokerFailure, Refused, Returned
from schemas.broker.publisher import FRAME_MAX, Outgoing

__all__ = ["MemoryBroker", "MemoryMessage", "MemoryPublisher"]


@dataclass(eq=False)
class MemoryMessage:
    """One delivery; satisfies :class:`~schemas.broker.ports.Incoming`."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    routing_key: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    timestamp: dt.datetime | None = None
    user_id: str | None = None
    priority: int | None = None
    type: str | None = None
    app_id: str | None = None
    queue: str = ""
    broker: MemoryBroker | None = field(default=None, repr=False)
    settled: str | None = None
    """``"ack"``, ``"requeue"`` or ``"reject"`` once settled."""

    async def ack(self) -> None:
        self._settle("ack")

    async def nack(self, *, requeue: bool = True) -> None:
        self._settle("requeue" if requeue else "reject")
        if requeue and self.broker is not None:
            self.broker.redeliver(self, failed=self.broker.nack_counts)

    async def reject(self, *, requeue: bool = False) -> None:
        self._settle("requeue" if requeue else "reject")
        if requeue and self.broker is not None:
            self.broker.redeliver(self, failed=True)

    def _settle(self, how: str) -> None:
        if self.settled is not None:
            raise BrokerFailure(f"delivery already settled ({self.settled})")
        self.settled = how


class MemoryPublisher:
    """A confirming publisher into a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, frame_max: int = FRAME_MAX) -> None:
        self.broker = broker
        self.frame_max = frame_max

    async def publish(
        self, message: Outgoing, *, exchange: str, routing_key: str, timeout_s: float = 30
    ) -> None:
        self.broker.accept(message, exchange=exchange, routing_key=routing_key)


class MemoryBroker:
    """Queues by name; the default exchange ``""`` routes to the queue named by the key."""

    def __init__(self, *, nack_counts: bool = True) -> None:
        self.nack_counts = nack_counts
        """Whether a ``nack`` with requeue counts as a failed delivery (RabbitMQ
        3.x–4.2); on 4.3 only a ``reject`` (or a lost channel) does."""
        self.queues: dict[str, deque[MemoryMessage]] = {}
        self.max_length: dict[str, int] = {}
        self.bindings: dict[tuple[str, str], list[str]] = {}
        self._faults: deque[BrokerFailure] = deque()

    def declare(self, queue: str, *, max_length: int | None = None) -> None:
        self.queues.setdefault(queue, deque())
        if max_length is not None:
            self.max_length[queue] = max_length

    def bind(self, exchange: str, routing_key: str, queue: str) -> None:
        self.declare(queue)
        self.bindings.setdefault((exchange, routing_key), []).append(queue)

    def fail_next(self, *failures: BrokerFailure) -> None:
        """The next publishes raise these, in order (then publishing works again)."""
        self._faults.extend(failures)

    def publisher(self, frame_max: int = FRAME_MAX) -> MemoryPublisher:
        return MemoryPublisher(self, frame_max)

    def accept(self, message: Outgoing, *, exchange: str, routing_key: str) -> None:
        """A publish with ``mandatory`` and a confirm: returns, or raises as RabbitMQ would."""
        if self._faults:
            raise self._faults.popleft()
        if exchange == "":
            targets = [routing_key] if routing_key in self.queues else []
        else:
            targets = list(self.bindings.get((exchange, routing_key), ()))
        if not targets:
            raise Returned(f"no queue for {exchange or '(default)'}/{routing_key}")
        for queue in targets:
            limit = self.max_length.get(queue)
            if limit is not None and len(self.queues[queue]) >= limit:
                raise Refused(f"queue {queue} is full")
        for queue in targets:
            self.queues[queue].append(self._incoming(message, queue, routing_key))

    def _incoming(self, message: Outgoing, queue: str, routing_key: str) -> MemoryMessage:
        p = message.properties
        return MemoryMessage(
            body=message.body,
            headers=dict(p.headers or {}),
            message_id=p.message_id,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            routing_key=routing_key,
            content_type=p.content_type,
            content_encoding=p.content_encoding,
            timestamp=p.timestamp,
            user_id=p.user_id,
            priority=p.priority,
            type=p.message_type,
            app_id=p.app_id,
            queue=queue,
            broker=self,
        )

    def put(self, queue: str, body: bytes, **properties: Any) -> MemoryMessage:
        """A message as a producer would publish it straight into ``queue``."""
        self.declare(queue)
        message = MemoryMessage(body=body, queue=queue, broker=self, **properties)
        self.queues[queue].append(message)
        return message

    def get(self, queue: str) -> MemoryMessage | None:
        """The next delivery of ``queue`` (None when empty)."""
        pending = self.queues.get(queue)
        return pending.popleft() if pending else None

    def redeliver(self, message: MemoryMessage, *, failed: bool = True) -> None:
        """A requeued delivery goes back to the head; a failed one with its delivery
        count raised, any with its acquired count raised (RabbitMQ 4.3's headers)."""
        headers = dict(message.headers)
        headers["x-acquired-count"] = headers.get("x-acquired-count", 0) + 1
        if failed:
            headers["x-delivery-count"] = headers.get("x-delivery-count", 0) + 1
        again = MemoryMessage(
            **{
                **{k: getattr(message, k) for k in _PROPERTIES},
                "headers": headers,
                "queue": message.queue,
                "broker": self,
            }
        )
        self.queues.setdefault(message.queue, deque()).appendleft(again)

    def bodies(self, queue: str) -> list[bytes]:
        return [m.body for m in self.queues.get(queue, ())]


_PROPERTIES = (
    "body",
    "message_id",
    "correlation_id",
    "reply_to",
    "routing_key",
    "content_type",
    "content_encoding",
    "timestamp",
    "user_id",
    "priority",
    "type",
    "app_id",
)


if TYPE_CHECKING:  # the in-memory broker is checked against the ports it stands in for
    from schemas.broker.ports import Confirming, Incoming

    _incoming: Incoming = MemoryMessage(b"")
    _confirming: Confirming = MemoryPublisher(MemoryBroker())
