"""Secrets never leave: what scrubs them from texts, URLs and header tables.

Upstream error messages are the one place outside text enters our replies,
logs and dead letters; operator tools print broker URLs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["redact", "redact_headers", "redact_url", "url_secrets"]


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


_SECRET_KEYS = (
    *("authorization", "api-key", "api_key", "apikey", "token", "secret", "password"),
    *("cookie", "credential"),
)


def redact_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Headers with anything credential-like replaced, at any depth."""
    out: dict[str, Any] = {}
    for key, value in headers.items():
        if any(hint in key.lower() for hint in _SECRET_KEYS):
            out[key] = "[redacted]"
        elif isinstance(value, Mapping):
            out[key] = redact_headers(value)
        elif isinstance(value, list | tuple):
            out[key] = [redact_headers(v) if isinstance(v, Mapping) else v for v in value]
        else:
            out[key] = value
    return out
