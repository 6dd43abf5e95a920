"""What every provider adapter does: build one HTTP call, read one answer.

An adapter speaks one provider's wire format (``endpoints.N.kind``) and is
pure: no I/O, no clock (``now`` is passed in). The transport
(:mod:`workers.upstream`) sends the :class:`Call` it builds and hands the
status, headers and bytes back to :meth:`Adapter.answer`, which returns an
OpenAI-shaped :class:`UpstreamReply` or raises
:class:`~workers.errors.UpstreamFailure` with the fitting
:class:`~workers.routing.FailureKind`. So routing, deadlines, retries,
hedging and cost work the same whatever the provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from schemas.contract import JobKind

__all__ = ["Adapter", "Call", "UpstreamReply"]


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request to send: always a POST."""

    url: str
    headers: Mapping[str, str] = field(repr=False)
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A successful answer, in OpenAI's shape, and the tokens billed for it."""

    body: dict[str, Any]
    prompt_tokens: int | None
    """All input tokens, cached ones included (OpenAI's ``prompt_tokens``)."""
    completion_tokens: int | None
    cached_tokens: int | None = None
    """Input tokens read from the provider's prompt cache (billed at a discount)."""
    cache_write_tokens: int | None = None
    """Input tokens written to the prompt cache (Anthropic bills them at a premium)."""


class Adapter(Protocol):
    """One endpoint's provider dialect, bound to its URL, headers and secrets."""

    name: str
    """The endpoint's name, for messages."""
    secrets: tuple[str, ...]
    """Values to scrub from any text that leaves the adapter (keys, tokens)."""
    streams: bool
    """Whether the endpoint answers ``stream: true`` with OpenAI's chunk stream;
    a streamed job sent elsewhere is called whole and cut into chunks."""

    def call(self, kind: JobKind, request: Mapping[str, Any], upstream_model: str) -> Call:
        """The HTTP call for a job's request body, with ``model`` set to the
        endpoint's name for it. Raises ``UpstreamFailure(BAD_REQUEST)`` for a
        request this provider cannot take (said in the message, no key in it)."""
        ...

    def answer(
        self, kind: JobKind, status: int, headers: Mapping[str, str], raw: bytes, *, now: float
    ) -> UpstreamReply:
        """The reply to a finished HTTP exchange, or the ``UpstreamFailure`` it is."""
        ...
