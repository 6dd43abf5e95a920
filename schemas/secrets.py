"""Secrets never leave in text: what scrubs them from messages, logs and URLs.

Upstream error messages are the one place outside text enters our replies,
logs and dead letters; operator tools print broker URLs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["redact", "redact_url", "url_secrets"]


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
