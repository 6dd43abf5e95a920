"""A broker's addresses: the AMQP URLs of the nodes of one cluster, and their order.

``broker.url`` may list several URLs separated by commas (``broker.urls`` is
the list form). Every node of a RabbitMQ cluster has the same users, virtual
hosts and permissions, so the URLs may differ only in host and port: one
account, many doors. :class:`Rotation` says which door a connection tries
next. Pure: no sockets, no clock; randomness only from the ``random.Random``
it is given.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

__all__ = ["DEFAULT_PORTS", "Rotation", "check_urls", "node_of", "split_urls"]

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}

# Only a comma followed by a scheme separates: a comma is legal inside a URL's
# password, and nobody's password goes on with "amqp://".
_SEPARATOR = re.compile(r"\s*,\s*(?=amqps?://)", re.IGNORECASE)


def split_urls(text: str) -> tuple[str, ...]:
    """The URLs of a comma-separated list (one URL gives itself)."""
    return tuple(part for part in (p.strip() for p in _SEPARATOR.split(text.strip())) if part)


def node_of(url: str) -> str:
    """``host:port`` of a URL: what messages may show of it (never its credentials)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port
    except ValueError:
        return "[unparseable URL]"
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port or DEFAULT_PORTS.get(parts.scheme.lower(), 5672)}"


def check_urls(urls: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``urls`` are one broker's addresses.

    Each must be ``amqp://`` or ``amqps://``; all must share the scheme,
    user, password, virtual host and options of the first (a connection
    keeps its account when it moves to another node). Messages name the
    address by position and ``host:port``, never a credential.
    """
    if not urls:
        raise ValueError("no broker address: give at least one amqp:// URL")
    first: SplitResult | None = None
    for i, url in enumerate(urls, start=1):
        where = f"address {i} ({node_of(url)})" if len(urls) > 1 else "the URL"
        try:
            parts = urlsplit(url)
            _ = parts.port  # a malformed port raises here
        except ValueError:
            raise ValueError(f"{where} is not a valid URL") from None
        if parts.scheme.lower() not in DEFAULT_PORTS:
            prefix = f"{where}: " if len(urls) > 1 else ""
            raise ValueError(f"{prefix}must be an amqp:// or amqps:// URL")
        if first is None:
            first = parts
            continue
        for what, mine, theirs in (
            ("scheme", parts.scheme.lower(), first.scheme.lower()),
            ("user", parts.username, first.username),
            ("password", parts.password, first.password),
            ("virtual host", parts.path.rstrip("/") or "/", first.path.rstrip("/") or "/"),
            ("options", parts.query, first.query),
        ):
            if mine != theirs:
                raise ValueError(
                    f"{where} differs from the first in its {what}: every address of a"
                    " cluster is reached with the same scheme, user, password, virtual"
                    " host and options (only host and port differ)"
                )


class Rotation:
    """The order in which one connection tries a broker's addresses.

    A connection attempt is a *round*: every address once, starting at
    :attr:`start`. The first round starts at a random address when a
    ``random.Random`` is given (so a fleet spreads over the nodes), else at
    the first (a command tries them in the order written). Once a connection
    is made the connection stays on that node; when it is lost, the next
    round starts at another node (random among the others, or the next one)
    and tries the lost node last, so a client does not queue up behind the
    node that just failed and the clients of a dead node spread over the
    live ones.
    """

    def __init__(self, count: int, rng: random.Random | None = None) -> None:
        if count < 1:
            raise ValueError("a rotation needs at least one address")
        self._count = count
        self._rng = rng
        self.start = rng.randrange(count) if rng is not None else 0
        self.current: int | None = None
        """The address of the last connection made (None before the first)."""

    def round(self) -> tuple[int, ...]:
        """The addresses to try in the next attempt, in order (indexes): from
        :attr:`start` round the ring, the node last connected to at the end."""
        ring = [(self.start + k) % self._count for k in range(self._count)]
        if self.current is not None and self._count > 1:
            ring.remove(self.current)
            ring.append(self.current)
        return tuple(ring)

    def connected(self, index: int) -> None:
        """A connection was made to address ``index``: a later round starts elsewhere."""
        self.current = index
        others = [i for i in range(self._count) if i != index] or [index]
        if self._rng is not None:
            self.start = self._rng.choice(others)
        else:
            self.start = (index + 1) % self._count
