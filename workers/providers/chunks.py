"""An OpenAI-style chat stream read chunk by chunk, and a whole answer cut into chunks.

Pure: one server-sent event in, one :class:`Chunk` out (or the
:class:`~workers.errors.UpstreamFailure` the event is). The worker's stream
relay counts what each chunk carries to decide when to publish
(:mod:`workers.coalescer`) and keeps the outcome (finish reason, usage) for
the stream's last part.

What counts as a token: a choice whose delta carries text (``content``,
``refusal``, ``reasoning_content``) or a tool call. A chunk usually carries
one token; counting chunks, not tokenizer tokens, is what the coalescer and
the bill need when the upstream's own usage is missing.

An endpoint whose provider cannot stream (:attr:`Adapter.streams` false) is
called without ``stream`` and its whole answer is cut into chunks by
:func:`chunks_of`, so the caller gets a stream whatever the endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from schemas.secrets import redact
from schemas.stream import chunks_of_completion
from workers.errors import UpstreamFailure
from workers.providers.base import UpstreamReply
from workers.providers.sse import Event, SseError, SseReader
from workers.routing import FailureKind

__all__ = ["Chunk", "ChunkReader", "chunks_of", "read_chunk", "usage_counts"]

_MAX_ERROR_TEXT = 300


@dataclass(slots=True)
class Chunk:
    """One ``chat.completion.chunk`` and what it carries; read-only by convention
    (not ``frozen``: a frozen dataclass costs ~2 µs more to make, once per token)."""

    body: dict[str, Any]
    tokens: int
    size: int
    """Bytes of its JSON as the upstream sent it."""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    """The usage object, on the chunk that reports it (``include_usage``)."""

    @property
    def usage_only(self) -> bool:
        """OpenAI's last chunk with ``include_usage``: no choices, only the usage."""
        return self.usage is not None and not self.body.get("choices")


def read_chunk(name: str, secrets: tuple[str, ...], event: Event) -> Chunk:
    """The chunk an event carries; an error event or malformed data is the failure it is."""
    data = event.data
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamFailure(
            FailureKind.MALFORMED, f"{name}: stream chunk is not JSON", status=200
        ) from None
    if type(body) is not dict:
        raise UpstreamFailure(
            FailureKind.MALFORMED, f"{name}: stream chunk is not an object", status=200
        )
    error = body.get("error")
    if error is not None or event.event == "error":
        raise UpstreamFailure(
            FailureKind.SERVER_ERROR, f"{name}: error in stream: {_error_text(error, secrets)}"
        )
    choices = body.get("choices")
    if choices is None:
        choices = []
    if type(choices) is not list:
        raise UpstreamFailure(
            FailureKind.MALFORMED, f"{name}: stream chunk's choices is not a list", status=200
        )
    tokens = 0
    finish: str | None = None
    for choice in choices:
        if type(choice) is not dict:
            continue
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            finish = reason
        delta = choice.get("delta")
        if type(delta) is dict and _carries_token(delta):
            tokens += 1
    usage = body.get("usage")
    return Chunk(body, tokens, len(data), finish, usage if type(usage) is dict else None)


def _carries_token(delta: dict[str, Any]) -> bool:
    """Text (``content``, ``refusal``, ``reasoning_content``) or a tool call."""
    get = delta.get
    return bool(get("content") or get("refusal") or get("reasoning_content") or get("tool_calls"))


def _error_text(error: object, secrets: tuple[str, ...]) -> str:
    if isinstance(error, dict):
        error = error.get("message") or error.get("type") or error.get("code")
    text = str(error)[:_MAX_ERROR_TEXT] if error is not None else "error event"
    return redact(text, secrets)


def usage_counts(usage: dict[str, Any] | None) -> tuple[int | None, int | None, int | None]:
    """(prompt, completion, cached) tokens of a usage object; None where it does not say."""
    if usage is None:
        return None, None, None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None
    return (
        _count(usage.get("prompt_tokens")),
        _count(usage.get("completion_tokens")),
        _count(cached),
    )


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def chunks_of(reply: UpstreamReply) -> list[Chunk]:
    """A whole chat completion as the chunks a stream of it would have carried."""
    chunks = []
    for body in chunks_of_completion(reply.body):
        usage = body.get("usage")
        choices = body["choices"]
        finish = next((c["finish_reason"] for c in choices if c["finish_reason"]), None)
        tokens = sum(1 for c in choices if _carries_token(c["delta"]))
        chunks.append(Chunk(body, tokens, 0, finish, usage if type(usage) is dict else None))
    return chunks


class ChunkReader:
    """One upstream stream's bytes in, chunks out: the SSE reader and :func:`read_chunk`.

    :meth:`end` says whether the stream ended well: after ``[DONE]``, or at
    least after a finish reason (some servers close without ``[DONE]``).
    """

    def __init__(self, name: str, secrets: tuple[str, ...]) -> None:
        self._name = name
        self._secrets = secrets
        self._sse = SseReader()
        self.finished = False
        """A chunk with a finish reason was read."""

    @property
    def done(self) -> bool:
        """``[DONE]`` was read."""
        return self._sse.done

    def feed(self, piece: bytes) -> list[Chunk]:
        try:
            events = self._sse.feed(piece)
        except SseError as exc:
            raise UpstreamFailure(
                FailureKind.MALFORMED, f"{self._name}: {exc}", status=200
            ) from None
        chunks = [read_chunk(self._name, self._secrets, e) for e in events if not e.done]
        for chunk in chunks:
            if chunk.finish_reason is not None:
                self.finished = True
                break
        return chunks

    def end(self) -> None:
        """The connection ended: fine after ``[DONE]`` or a finish reason, else a failure."""
        if self.done or (self.finished and not self._sse.pending):
            return
        raise UpstreamFailure(
            FailureKind.SERVER_ERROR, f"{self._name}: stream broke off before its end"
        )
