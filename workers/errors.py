"""The worker's own errors; library exceptions are translated at the boundary.

::

    WorkerError
    ├── UpstreamFailure        one attempt at one endpoint failed (carries a FailureKind)
    └── BrokerFailure          the broker could not take a reply or dead letter
        ├── Unroutable         the message was returned (no queue bound / reply queue gone)
        └── Refused            the broker nacked it (the target queue is full)

Nothing here may carry an API key: ``redact`` scrubs upstream text before it
becomes a message, a log line or a dead-letter header.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

from workers.routing import FailureKind

__all__ = [
    "BrokerFailure",
    "Refused",
    "Unroutable",
    "UpstreamFailure",
    "WorkerError",
    "redact",
    "redact_url",
    "url_secrets",
]


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


class Refused(BrokerFailure):
    """The broker nacked the message: a queue it routes to refuses it (full)."""


# What upstreams echo of a key: OpenAI-style "sk-..." (masked or whole),
# "Bearer <token>", and "key=..." fragments.
_KEYISH = re.compile(
    r"(?i)\b(?:sk|rk|pk|key)[-_][A-Za-z0-9*_.\-]{3,}|bearer\s+\S+|(?:api[_-]?key|token)=\S+"
)


def redact(text: str, secrets: Iterable[str]) -> str:
    """Remove every secret, any tail of it an API echoes, and key-shaped strings.

    Upstream error messages are the one place outside text enters our
    replies, logs and dead letters, and some echo (parts of) the key sent.
    """
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
            if len(secret) >= 12:
                text = text.replace(secret[-8:], "[redacted]").replace(secret[-4:], "[redacted]")
    return _KEYISH.sub("[redacted]", text)


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: what operator tools may print."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a malformed port or host: print nothing of it
        return "[unparseable URL]"
    if password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def url_secrets(url: str) -> tuple[str, ...]:
    """The password of ``url`` as written and decoded, for :func:`redact` of texts naming it."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ()
    return (password, unquote(password)) if password else ()
