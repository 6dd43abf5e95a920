"""What went wrong with one attempt, and what that means for routing.

The HTTP adapter classifies every failed attempt into one :class:`FailureKind`;
the router and :func:`~workers.routing.steps.next_step` only ever look at the
kind, never at status codes or exceptions::

    FailureKind
    ├── endpoint failures      REFUSED TIMEOUT SERVER_ERROR MALFORMED
    │                          health: circuit breaker + failure cost; retry elsewhere
    ├── RATE_LIMITED           429: cooldown (Retry-After), lower learned capacity;
    │                          retry elsewhere; not a health failure
    ├── endpoint unusable      AUTH (401/403), NOT_FOUND (404 model)
    │                          mark (endpoint, model) unusable for a long time; retry elsewhere
    └── request rejected       BAD_REQUEST (400/422), TOO_LARGE (413)
                               the request itself is bad: give up at once

NOT_FOUND is retried elsewhere rather than given up on: the model name an
endpoint is sent is that endpoint's own configuration (``models`` maps the
canonical name to an upstream name per endpoint), so a 404 says "this endpoint
is configured wrong for this model", not "this request is bad". Marking the
pair unusable means each misconfigured endpoint costs at most one attempt
per job, and none at all for later jobs until the mark expires.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FailureKind"]


class FailureKind(StrEnum):
    """Why one attempt at one endpoint failed."""

    REFUSED = "refused"
    """The connection was refused or reset before a response."""
    TIMEOUT = "timeout"
    """No complete answer within the attempt timeout."""
    SERVER_ERROR = "server_error"
    """HTTP 5xx."""
    MALFORMED = "malformed"
    """HTTP 200 whose body is not a chat completion."""
    RATE_LIMITED = "rate_limited"
    """HTTP 429."""
    AUTH = "auth"
    """HTTP 401/403: the endpoint refuses our key for this model."""
    BAD_REQUEST = "bad_request"
    """HTTP 400/422: the request itself is invalid."""
    NOT_FOUND = "not_found"
    """HTTP 404: the endpoint does not know the (upstream) model name."""
    TOO_LARGE = "too_large"
    """HTTP 413: the request is too large."""

    @property
    def endpoint_failure(self) -> bool:
        """Counts against the endpoint's health (circuit breaker, failure cost)."""
        return self in _ENDPOINT_FAILURES

    @property
    def retriable(self) -> bool:
        """Another endpoint may well succeed with the same request."""
        return self not in _REQUEST_REJECTED

    @property
    def marks_unusable(self) -> bool:
        """The endpoint cannot serve this model until the mark expires."""
        return self is FailureKind.AUTH or self is FailureKind.NOT_FOUND


_ENDPOINT_FAILURES = frozenset(
    {FailureKind.REFUSED, FailureKind.TIMEOUT, FailureKind.SERVER_ERROR, FailureKind.MALFORMED}
)
_REQUEST_REJECTED = frozenset({FailureKind.BAD_REQUEST, FailureKind.TOO_LARGE})
