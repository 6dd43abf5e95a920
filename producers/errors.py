"""Errors the client raises: one class per reply error code, plus broker errors.

::

    LlmqError
    ├── JobFailed                     the job ended with an error reply
    │   ├── InvalidRequest            invalid_request
    │   ├── UnknownModel              unknown_model
    │   ├── PayloadTooLarge           payload_too_large
    │   ├── DeadlineExceeded          deadline_exceeded
    │   ├── UpstreamError             upstream_error
    │   ├── UpstreamRejected          upstream_rejected
    │   ├── NoHealthyEndpoint         no_healthy_endpoint
    │   ├── OverCapacity              over_capacity
    │   ├── OverBudget                over_budget
    │   ├── InternalError             internal_error
    │   └── StreamInterrupted         stream_interrupted: chunks already yielded
    │                                 are not the whole answer
    └── PublishFailed                 the broker did not take the job
        ├── Backpressure              the queue is full (broker nack): slow down
        ├── Unroutable                no queue for the routing key (bad SLA class?)
        └── TooLarge                  over the broker's max_message_size: never retried
"""

from __future__ import annotations

from typing import Any

from schemas.errors import ErrorCode

__all__ = [
    "Backpressure",
    "DeadlineExceeded",
    "InternalError",
    "InvalidRequest",
    "JobFailed",
    "LlmqError",
    "NoHealthyEndpoint",
    "OverBudget",
    "OverCapacity",
    "PayloadTooLarge",
    "PublishFailed",
    "StreamInterrupted",
    "TooLarge",
    "UnknownModel",
    "Unroutable",
    "UpstreamError",
    "UpstreamRejected",
    "error_for",
]


class LlmqError(Exception):
    """Base of every llmq client error."""


class JobFailed(LlmqError):
    """The worker answered with an error reply."""

    code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, job_id: str | None, reply: dict[str, Any]) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.reply = reply
        self.retriable = bool((reply.get("error") or {}).get("retriable", False))


class InvalidRequest(JobFailed):
    code = ErrorCode.INVALID_REQUEST


class UnknownModel(JobFailed):
    code = ErrorCode.UNKNOWN_MODEL


class PayloadTooLarge(JobFailed):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class DeadlineExceeded(JobFailed):
    code = ErrorCode.DEADLINE_EXCEEDED


class UpstreamError(JobFailed):
    code = ErrorCode.UPSTREAM_ERROR


class UpstreamRejected(JobFailed):
    code = ErrorCode.UPSTREAM_REJECTED


class NoHealthyEndpoint(JobFailed):
    code = ErrorCode.NO_HEALTHY_ENDPOINT


class OverCapacity(JobFailed):
    code = ErrorCode.OVER_CAPACITY


class OverBudget(JobFailed):
    code = ErrorCode.OVER_BUDGET


class InternalError(JobFailed):
    code = ErrorCode.INTERNAL_ERROR


class StreamInterrupted(JobFailed):
    code = ErrorCode.STREAM_INTERRUPTED


class PublishFailed(LlmqError):
    """The broker did not confirm the job; it was not accepted."""


class Backpressure(PublishFailed):
    """The work queue is full (``overflow=reject-publish``): retry later, slower."""


class Unroutable(PublishFailed):
    """No queue is bound for the job's routing key."""


class TooLarge(PublishFailed):
    """The broker refused the job's size (its ``max_message_size``); sending it
    again fails the same way. The worker's own limit (``worker.max_body_bytes``)
    answers smaller jobs with ``payload_too_large``."""


_BY_CODE: dict[str, type[JobFailed]] = {
    cls.code.value: cls
    for cls in (
        InvalidRequest,
        UnknownModel,
        PayloadTooLarge,
        DeadlineExceeded,
        UpstreamError,
        UpstreamRejected,
        NoHealthyEndpoint,
        OverCapacity,
        OverBudget,
        InternalError,
        StreamInterrupted,
    )
}


def error_for(reply: dict[str, Any]) -> JobFailed:
    """The typed exception for an error reply (unknown codes: ``JobFailed``)."""
    error = reply.get("error") or {}
    code = str(error.get("code", ""))
    cls = _BY_CODE.get(code, JobFailed)
    return cls(f"{code}: {error.get('message', '')}", job_id=reply.get("job_id"), reply=reply)
