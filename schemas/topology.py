"""The broker objects llmq needs, as data derived from the settings.

``plan()`` is pure; ``schemas.broker.topology`` declares the plan over AMQP and
deploy/rabbitmq/definitions.json is checked against it by a test, so the
two can't drift.

Why arguments and not policies: on RabbitMQ 3.10 a quorum queue must get its
dead-letter exchange, ``at-least-once`` dead-lettering (which needs
``overflow=reject-publish``) and a ``delivery-limit`` (no default before
4.0) before its first message, or jobs can be dropped silently; declaring
them as arguments makes ``llmq topology apply`` need nothing but AMQP. The
numeric limits stay tunable on a live queue with an *operator policy*
(``max-length``, ``delivery-limit``): for those the lower value wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.settings import TopologySettings

__all__ = [
    "SPEND_STREAM_MAX_BYTES",
    "SPEND_STREAM_SEGMENT_BYTES",
    "Binding",
    "Exchange",
    "Queue",
    "Topology",
    "plan",
]

SPEND_STREAM_MAX_BYTES = 8_000_000
"""What the spend stream keeps: the newest ~8 MB of snapshots (docs/operations.md)."""
SPEND_STREAM_SEGMENT_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class Exchange:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True, slots=True)
class Topology:
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]


def plan(settings: TopologySettings) -> Topology:
    """Exchanges, quorum queues, the spend stream and bindings for the SLA classes."""
    work_args: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": settings.dead_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": settings.delivery_limit,
    }
    queues = [
        Queue(
            settings.queue_name(name),
            {**work_args, "x-max-length": cls.max_length},
        )
        for name, cls in sorted(settings.classes.items())
    ]
    queues.append(
        Queue(
            settings.dead_queue,
            {
                "x-queue-type": "quorum",
                "x-overflow": "reject-publish",
                "x-max-length": settings.dead_max_length,
            },
        )
    )
    # The fleet's monthly spend across restarts (workers/spend_store.py): each
    # message a full snapshot, so only the newest few matter; small segments
    # let the byte limit drop old ones (retention removes whole segments).
    queues.append(
        Queue(
            settings.spend_stream,
            {
                "x-queue-type": "stream",
                "x-max-length-bytes": SPEND_STREAM_MAX_BYTES,
                "x-stream-max-segment-size-bytes": SPEND_STREAM_SEGMENT_BYTES,
            },
        )
    )
    bindings = [
        Binding(settings.jobs_exchange, settings.queue_name(name), name)
        for name in sorted(settings.classes)
    ]
    bindings.append(Binding(settings.dead_exchange, settings.dead_queue, ""))
    return Topology(
        exchanges=(
            Exchange(settings.jobs_exchange, "topic"),
            Exchange(settings.dead_exchange, "fanout"),
            # Workers' state, health and spend (workers/state.py): each worker
            # binds its own exclusive queue, so the plan has no queue for it.
            Exchange(settings.state_exchange, "fanout"),
        ),
        queues=tuple(queues),
        bindings=tuple(bindings),
    )
