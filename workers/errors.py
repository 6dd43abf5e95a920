"""The worker's own errors; library exceptions are translated at the boundary.

::

    WorkerError
    ├── UpstreamFailure        one attempt at one endpoint failed (carries a FailureKind)
    └── BrokerFailure          the broker could not take a reply or dead letter
        └── Unroutable         the message was returned (no queue bound / reply queue gone)

Nothing here may carry an API key: ``redact`` scrubs upstream text before it
becomes a message, a log line or a dead-letter header.
"""

from __future__ import annotations

from collections.abc import Iterable

from workers.routing import FailureKind

__all__ = ["BrokerFailure", "Unroutable", "UpstreamFailure", "WorkerError", "redact"]


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


class BrokerFailure(WorkerError):
    """Publishing a reply or dead letter failed; the job must not be acked."""


class Unroutable(BrokerFailure):
    """The broker returned the message: nothing is bound to that routing key."""


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret (and its last 8 characters, which APIs echo) in ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
            if len(secret) >= 12:
                text = text.replace(secret[-8:], "[redacted]")
    return text
