"""A streamed answer's bytes, without I/O: server-sent events as OpenAI frames them.

``stream: true`` on ``/v1/chat/completions`` is answered with
``text/event-stream``: one ``data: {chunk}`` event per
``chat.completion.chunk``, then ``data: [DONE]``. A failure after the first
chunk cannot change the status any more, so it becomes an event of OpenAI's
error shape (``{"error": {...}}``, which the openai SDKs raise as
``APIError``) and the stream ends without ``[DONE]``: a client never takes
a broken answer for a whole one. :mod:`producers.gateway_stream` writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from producers.gateway_core import Answer, BadRequest

__all__ = [
    "DONE",
    "RESERVED_PARAMS",
    "StreamCall",
    "error_event",
    "event",
    "stream_call",
    "stream_headers",
]

DONE = b"data: [DONE]\n\n"

# LlmqClient.stream's own keyword arguments: a body field of one of these names
# cannot ride in its **params (a TypeError at best, and ``tenant`` must come from
# the key, never from the body). OpenAI has no parameter of these names.
RESERVED_PARAMS = frozenset({"self", "sla_ms", "sla_class", "tenant", "job_id", "traceparent"})


@dataclass(frozen=True, slots=True)
class StreamCall:
    """A streamed request body, split as ``LlmqClient.stream`` takes it."""

    model: Any
    messages: Any
    params: dict[str, Any]
    """The other fields, ``stream_options`` included; ``stream`` is the client's to set."""


def stream_call(body: Mapping[str, Any]) -> StreamCall:
    """Split a checked body with ``stream: true``; raises :class:`BadRequest`.

    ``model`` and ``messages`` are not checked here: the worker does that, as
    for any other request (a missing one is its ``invalid_request``).
    """
    reserved = sorted(RESERVED_PARAMS.intersection(body))
    if reserved:
        raise BadRequest(f"unknown parameter: {reserved[0]}")
    params = {k: v for k, v in body.items() if k not in ("model", "messages", "stream")}
    return StreamCall(body.get("model"), body.get("messages"), params)


def stream_headers(job_id: str, request_id: str) -> dict[str, str]:
    """The response headers of a stream: no caching, no proxy buffering, and llmq's ids.

    ``x-llmq-endpoint`` and ``x-llmq-attempts`` are known only at the end, so
    a stream does not carry them.
    """
    return {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx and friends: pass each event on at once
        "x-llmq-job-id": job_id,
        "x-request-id": request_id,
    }


def event(data: Mapping[str, Any]) -> bytes:
    """One ``data:`` event. orjson escapes newlines in strings, so it is one line."""
    return b"data: " + orjson.dumps(data) + b"\n\n"


def error_event(answer: Answer) -> bytes:
    """The event for an error after the first chunk: the body its status would have had."""
    return event({"error": answer.body["error"]})
