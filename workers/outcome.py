"""What serving one delivery came to: the reply to send and how it ended.

An :class:`Outcome` is data: the delivery shell (``workers/deliveries.py``)
turns it into a reply, a dead letter and an ack through the core's
:func:`~workers.routing.disposition`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.codec import Job, encode_reply, error_body
from schemas.errors import ErrorCode

__all__ = ["Outcome", "failure", "seconds"]


@dataclass(frozen=True, slots=True)
class Outcome:
    job_id: str | None
    reply: bytes
    code: ErrorCode | None = None
    message: str = ""
    attempts: int = 0
    job: Job | None = None
    routing: dict[str, Any] | None = None
    duplicate: bool = False
    reply_to: str | None = None
    """Where the reply may go: the job's ``reply_to`` once admitted, else None."""


def failure(
    job_id: str | None,
    code: ErrorCode,
    message: str,
    routing: dict[str, Any] | None = None,
    attempts: int = 0,
    job: Job | None = None,
    reply_to: str | None = None,
) -> Outcome:
    """An error outcome; its reply goes to the job's ``reply_to`` or to ``reply_to``."""
    body = encode_reply(job_id, error=error_body(code, message), routing=routing)
    to = job.reply_to if job is not None else reply_to
    return Outcome(job_id, body, code, message, attempts, job, routing, reply_to=to)


def seconds(routing: dict[str, Any] | None, key: str) -> float | None:
    """A ``*_ms`` figure of the routing facts in seconds (None when absent)."""
    value = None if routing is None else routing.get(key)
    return None if value is None else value / 1000
