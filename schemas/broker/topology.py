"""Declare the topology plan on a broker: ``llmq topology apply``.

Idempotent (declaring an identical object is a no-op in AMQP). A queue that
already exists with other arguments makes the broker close the channel with
PRECONDITION_FAILED; that becomes one :class:`TopologyError` line naming
the queue and the argument, not a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
import aiormq

from schemas.topology import Topology

__all__ = ["Applied", "TopologyError", "apply_topology"]


class TopologyError(Exception):
    """The broker refused part of the topology; ``str()`` says what and how to fix it."""


@dataclass(frozen=True, slots=True)
class Applied:
    exchanges: int
    queues: int
    bindings: int


async def apply_topology(connection: aio_pika.abc.AbstractConnection, topo: Topology) -> Applied:
    """Declare every exchange, queue and binding of ``topo``."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        exchanges = {}
        for ex in topo.exchanges:
            try:
                exchanges[ex.name] = await channel.declare_exchange(ex.name, ex.type, durable=True)
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise TopologyError(_conflict("exchange", ex.name, exc)) from None
        queues = {}
        for q in topo.queues:
            try:
                queues[q.name] = await channel.declare_queue(
                    q.name, durable=True, arguments=q.arguments
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise TopologyError(_conflict("queue", q.name, exc)) from None
        for b in topo.bindings:
            await queues[b.queue].bind(exchanges[b.exchange], routing_key=b.routing_key)
    finally:
        if not channel.is_closed:
            await channel.close()
    return Applied(len(topo.exchanges), len(topo.queues), len(topo.bindings))


def _conflict(kind: str, name: str, exc: Exception) -> str:
    detail = str(exc.args[0] if exc.args else exc)
    # aiormq wraps the broker's reply text; keep only the human part.
    if "PRECONDITION_FAILED" in detail:
        detail = detail.split("PRECONDITION_FAILED - ", 1)[-1].rstrip("'\")>")
    return (
        f"{kind} {name!r} already exists with different settings ({detail}). "
        f"Drain and delete it, or change llmq.toml to match it; "
        f"tune limits on a live queue with an operator policy."
    )
