"""The closed set of error codes a job can end with.

Every error reply and every dead letter carries exactly one of these codes.
The set is part of the wire contract (docs/protocol.md): adding a code is a
minor schema change, renaming or removing one is a major change.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["HTTP_STATUS", "RETRIABLE", "ErrorCode"]


class ErrorCode(StrEnum):
    """Why a job did not get an ``ok`` reply."""

    INVALID_REQUEST = "invalid_request"
    """The message is not a valid job: bad JSON, schema, headers or ids."""
    UNKNOWN_MODEL = "unknown_model"
    """No configured endpoint serves the model (after alias resolution)."""
    PAYLOAD_TOO_LARGE = "payload_too_large"
    """The body is larger than the configured limit."""
    DEADLINE_EXCEEDED = "deadline_exceeded"
    """The job's deadline passed before an upstream answered."""
    UPSTREAM_ERROR = "upstream_error"
    """Upstreams failed (5xx, timeouts, refused, malformed) on every attempt allowed."""
    UPSTREAM_REJECTED = "upstream_rejected"
    """An upstream refused the request itself (400, 404 model, 413): retrying cannot help."""
    NO_HEALTHY_ENDPOINT = "no_healthy_endpoint"
    """Every endpoint of the model (and its fallbacks) is ejected or unusable."""
    OVER_CAPACITY = "over_capacity"
    """Every endpoint is rate-limited or at its concurrency limit until past the deadline."""
    OVER_BUDGET = "over_budget"
    """A hard spending cap for the model or tenant is reached."""
    INTERNAL_ERROR = "internal_error"
    """The worker failed on this job repeatedly (poison message, delivery limit)."""
    STREAM_INTERRUPTED = "stream_interrupted"
    """A streamed answer broke off after its first chunk reached the caller (the
    upstream failed mid-answer, the caller's stream queue went away, or a
    restarted worker began the answer again): the chunks received are not the
    whole answer. Asking again is safe."""


# Whether resubmitting the same job later may succeed.
RETRIABLE: dict[ErrorCode, bool] = {
    ErrorCode.INVALID_REQUEST: False,
    ErrorCode.UNKNOWN_MODEL: False,
    ErrorCode.PAYLOAD_TOO_LARGE: False,
    ErrorCode.DEADLINE_EXCEEDED: True,
    ErrorCode.UPSTREAM_ERROR: True,
    ErrorCode.UPSTREAM_REJECTED: False,
    ErrorCode.NO_HEALTHY_ENDPOINT: True,
    ErrorCode.OVER_CAPACITY: True,
    ErrorCode.OVER_BUDGET: False,
    ErrorCode.INTERNAL_ERROR: False,
    ErrorCode.STREAM_INTERRUPTED: True,
}

# The HTTP status an OpenAI-compatible front end answers with. Codes a caller
# cannot fix by waiting map to 4xx other than 429, so SDKs (which retry
# 408/409/429/5xx) do not retry them; over_budget keeps OpenAI's own 429 for
# quota, and internal_error is a 500 like any server fault.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNKNOWN_MODEL: 400,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.UPSTREAM_REJECTED: 400,
    ErrorCode.NO_HEALTHY_ENDPOINT: 503,
    ErrorCode.OVER_CAPACITY: 429,
    ErrorCode.OVER_BUDGET: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.STREAM_INTERRUPTED: 502,
}
