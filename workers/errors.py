"""The worker's own errors; library exceptions are translated at the boundary.

::

    WorkerError
    ├── UpstreamFailure        one attempt at one endpoint failed (carries a FailureKind)
    └── providers.sse.SseError an upstream event stream cannot be read on
        └── EventTooLarge      one event outgrew the reader's bound

    schemas.broker.errors.BrokerFailure   a reply or dead letter was not confirmed
    ├── Returned                         returned: no queue bound / reply queue gone
    └── Refused                            nacked: the target queue is full

Nothing here may carry an API key: :func:`schemas.secrets.redact` scrubs
upstream text before it becomes a message, a log line or a dead-letter header.
"""

from __future__ import annotations

from workers.routing import FailureKind

__all__ = ["UpstreamFailure", "WorkerError"]


class WorkerError(Exception):
    """Base of the worker's errors."""


class UpstreamFailure(WorkerError):
    """One upstream attempt failed.

    ``kind`` drives routing (retry elsewhere, cool down, give up);
    ``status`` is the HTTP status when there was one.
    """

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s

    def __repr__(self) -> str:
        return f"UpstreamFailure({self.kind.value}, status={self.status}, {self.args[0]!r})"
