"""What serving one delivery came to: the reply to send, how it ended and
the routing facts (:class:`RoutingRecord`) the reply explains.

An :class:`Outcome` is data: the delivery shell (``workers/deliveries.py``)
turns it into a reply, a dead letter and an ack through the core's
:func:`~workers.routing.disposition`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any

from schemas.codec import Job, encode_reply, error_body
from schemas.errors import ErrorCode

__all__ = ["Outcome", "Route", "RoutingRecord", "failure", "seconds"]


@dataclass(frozen=True, slots=True)
class RoutingRecord:
    """How the worker served a job, as far as it got: the reply's ``routing``.

    Unknown facts stay None and are left out of the reply (a job refused
    before routing says only how long it queued).
    """

    queue_ms: float | None = None
    model: str | None = None
    endpoint: str | None = None
    attempts: int | None = None
    hedged: bool | None = None
    upstream_ms: float | None = None
    total_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    via: str | None = None
    """How ``model`` was reached when it is not the one the job asked for:
    ``fallback`` (that one had no usable endpoint) or ``overflow`` (it was at
    capacity); None otherwise. Last, so that positional construction keeps working."""

    def wire(self) -> dict[str, Any]:
        """The reply's ``routing`` object: the known facts."""
        return {name: value for name in _FIELDS if (value := getattr(self, name)) is not None}


_FIELDS = tuple(f.name for f in fields(RoutingRecord))


@dataclass(frozen=True, slots=True)
class Outcome:
    job_id: str | None
    reply: bytes
    code: ErrorCode | None = None
    message: str = ""
    attempts: int = 0
    job: Job | None = None
    routing: RoutingRecord | None = None
    duplicate: bool = False
    reply_to: str | None = None
    """Where the reply may go: the job's ``reply_to`` once admitted, else None."""


Route = Callable[[Job, int], Awaitable[Outcome]]
"""Serve an admitted job (``now_ms`` given): the worker's routing half."""


def failure(
    job_id: str | None,
    code: ErrorCode,
    message: str,
    routing: RoutingRecord | None = None,
    attempts: int = 0,
    job: Job | None = None,
    reply_to: str | None = None,
) -> Outcome:
    """An error outcome; its reply goes to the job's ``reply_to`` or to ``reply_to``."""
    wire = None if routing is None else routing.wire()
    body = encode_reply(job_id, error=error_body(code, message), routing=wire)
    to = job.reply_to if job is not None else reply_to
    return Outcome(job_id, body, code, message, attempts, job, routing, reply_to=to)


def seconds(ms: float | None) -> float | None:
    """A ``*_ms`` figure in seconds (None when unknown)."""
    return None if ms is None else ms / 1000
