"""What to do with a delivery once its job is over: every job ends exactly once.

=================  ===========  ==========================================
outcome            reply_to     do (then ack, after the broker confirms)
=================  ===========  ==========================================
ok                 yes          publish the ok reply
error ``code``     yes          publish the error reply and a dead letter
error ``code``     no           publish a dead letter only
ok                 no           dead letter ``invalid_request``: the answer
                                has nowhere to go (the worker should have
                                refused the job before calling upstream)
any                unroutable   dead letter (``internal_error`` if it was ok),
                                carrying the reply: the caller's queue is gone
=================  ===========  ==========================================
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.errors import ErrorCode

__all__ = ["Disposition", "disposition"]


@dataclass(frozen=True, slots=True)
class Disposition:
    """Publish these (each confirmed), then ack the delivery."""

    reply: bool
    """Publish a reply (ok when ``code`` is None, else an error reply) to reply_to."""
    dead_letter: bool
    """Publish a copy of the job to the dead-letter exchange with ``code``."""
    code: ErrorCode | None
    """The job's error code; None for an ok reply."""


def disposition(
    outcome: ErrorCode | None, *, has_reply_to: bool, reply_unroutable: bool = False
) -> Disposition:
    """The one place that decides replies and dead letters (``outcome`` None = ok).

    Called again with ``reply_unroutable=True`` when the broker returned the reply.
    """
    if reply_unroutable:
        return Disposition(reply=False, dead_letter=True, code=outcome or ErrorCode.INTERNAL_ERROR)
    if outcome is None:
        if has_reply_to:
            return Disposition(reply=True, dead_letter=False, code=None)
        return Disposition(reply=False, dead_letter=True, code=ErrorCode.INVALID_REQUEST)
    return Disposition(reply=has_reply_to, dead_letter=True, code=outcome)
