"""The OpenAI wire format as the fleet speaks it: request checks and answer bodies
(chat completions and embeddings).

Kept apart from the server so the shapes can be read in one place and
checked against what the router's client sends and parses; nothing here does I/O.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "MALFORMED_BODY",
    "OPENAI",
    "ChatCall",
    "Dialect",
    "EmbeddingCall",
    "Refusal",
    "completion_dict",
    "completion_text",
    "embeddings_body",
    "error_body",
    "models_body",
    "parse_chat",
    "parse_embeddings",
    "prompt_tokens",
]

_WORDS = (
    "the quick fleet answers every request with plain deterministic words so that"
    " tests and benchmarks can compare bodies byte for byte across runs "
)
_TEXT = _WORDS * 64
"""Long enough for the largest sensible completion; sliced, never rebuilt."""

MALFORMED_BODY = b'{"id": "chatcmpl-malformed", "object": "chat.completion", "choices": [{"mess'
"""A 200 body cut mid-object: what a proxy that drops a connection early delivers."""


def prompt_tokens(messages: list[Any]) -> int:
    """About a token per four characters of message text, as OpenAI's rule of thumb says."""
    chars = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    chars += len(part["text"])
    return max(1, round(chars / 4))


def completion_text(endpoint: str, seq: int, tokens: int) -> str:
    """Deterministic content of about ``tokens`` tokens (four characters each)."""
    head = f"{endpoint} #{seq}: "
    want = max(tokens * 4, len(head))
    if want - len(head) > len(_TEXT):
        return head + (_TEXT * (1 + want // len(_TEXT)))[: want - len(head)]
    return head + _TEXT[: want - len(head)]


def completion_dict(
    *,
    endpoint: str,
    seq: int,
    model: str,
    created: int,
    completion_tokens: int,
    finish_reason: str,
    prompt: int,
    usage: bool,
) -> dict[str, Any]:
    """A ``chat.completion`` object (without ``usage`` when the plan says so), as a
    dict: dialects add to it (azure) before it is encoded."""
    body: dict[str, Any] = {
        "id": f"chatcmpl-{endpoint}-{seq}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": completion_text(endpoint, seq, completion_tokens),
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "system_fingerprint": f"fp_fleet_{endpoint}",
    }
    if usage:
        body["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        }
    return body


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one provider kind words what the fleet's shared machinery answers."""

    too_many: Callable[[str], bytes]
    """The 429 body, given the fleet's reason (``rate_limit_rate`` or ``capacity``)."""
    completion: Callable[[dict[str, Any]], bytes]
    """A chat completion's body, from its OpenAI shape (:func:`completion_dict`)."""
    error: Callable[[int, str], bytes] = lambda _status, message: error_body(
        message, "server_error"
    )
    """The body of an ``error_rate`` answer, given its status and the fleet's message."""


_TOO_MANY = {
    "rate_limit_rate": "Rate limit reached for requests (fleet: rate_limit_rate).",
    "capacity": "Too many concurrent requests (fleet: capacity).",
}


def _too_many(reason: str) -> bytes:
    return error_body(_TOO_MANY[reason], "requests", "rate_limit_exceeded")


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


OPENAI = Dialect(_too_many, orjson.dumps)
"""OpenAI's words."""


def models_body(models: tuple[str, ...], created: int, owner: str) -> bytes:
    """The ``GET /v1/models`` list."""
    data = [{"id": m, "object": "model", "created": created, "owned_by": owner} for m in models]
    return orjson.dumps({"object": "list", "data": data})


@dataclass(frozen=True, slots=True)
class ChatCall:
    """The parts of a valid chat-completions request the fleet uses."""

    model: str
    messages: list[Any]
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    """``stream_options.include_usage``: a last chunk with the usage."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A client error to answer at once: status and body."""

    status: int
    body: bytes


def _invalid(message: str, param: str | None = None, code: str | None = None) -> Refusal:
    return Refusal(400, error_body(message, "invalid_request_error", code, param))


def parse_chat(
    raw: bytes, models: tuple[str, ...], deployment: str | None = None, *, streams: bool = True
) -> ChatCall | Refusal:
    """Check a request body as OpenAI would: JSON, messages, model, streaming.

    With ``deployment`` (Azure: the model is in the URL, checked already) the
    body's ``model`` is ignored, as Azure ignores it. Without ``streams``
    (a kind whose fake does not stream) ``stream: true`` is refused.
    """
    body = _json_object(raw)
    if isinstance(body, Refusal):
        return body
    model = body.get("model") if deployment is None else deployment
    if not isinstance(model, str) or not model:
        return _invalid("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _invalid("'messages' must be a non-empty array", "messages")
    stream = _stream_options(body, streams)
    if isinstance(stream, Refusal):
        return stream
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        return _invalid("max_tokens must be an integer >= 1", "max_tokens")
    if model not in models:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return Refusal(404, error_body(message, "invalid_request_error", "model_not_found"))
    return ChatCall(model, messages, max_tokens, *stream)


def _stream_options(body: dict[str, Any], streams: bool) -> tuple[bool, bool] | Refusal:
    """``(stream, include_usage)`` as OpenAI checks them: booleans (or null), and
    ``stream_options`` an object given only with ``stream: true``."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return _invalid("'stream' must be a boolean", "stream")
    if stream and not streams:
        return _invalid("this fake upstream does not stream", "stream", "unsupported_value")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        return _invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    if not isinstance(options, dict):
        return _invalid("'stream_options' must be an object", "stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        return _invalid(
            "'stream_options.include_usage' must be a boolean", "stream_options.include_usage"
        )
    return True, bool(include_usage)


def _json_object(raw: bytes) -> dict[str, Any] | Refusal:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _invalid("We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return _invalid("The request body must be a JSON object.")
    return body


@dataclass(frozen=True, slots=True)
class EmbeddingCall:
    """The parts of a valid embeddings request the fleet uses."""

    model: str
    inputs: list[Any]
    """One entry per vector to return: a string or a token array."""
    tokens: int
    """About a token per four characters (a token array counts its length)."""
    dimensions: int
    base64: bool


_DIMENSIONS = 8
"""Vectors are short: the fleet measures routing, not similarity."""


def parse_embeddings(
    raw: bytes, models: tuple[str, ...], deployment: str | None = None
) -> EmbeddingCall | Refusal:
    """Check an embeddings body as OpenAI would: model, a non-empty ``input``."""
    body = _json_object(raw)
    if isinstance(body, Refusal):
        return body
    model = body.get("model") if deployment is None else deployment
    if not isinstance(model, str) or not model:
        return _invalid("you must provide a model parameter", "model")
    given = body.get("input")
    inputs = given if isinstance(given, list) and given and not _is_tokens(given) else [given]
    tokens = 0
    for item in inputs:
        if isinstance(item, str) and item:
            tokens += max(1, round(len(item) / 4))
        elif isinstance(item, list) and item and _is_tokens(item):
            tokens += len(item)
        else:
            return _invalid(
                "'input' must be a non-empty string, array of strings or tokens", "input"
            )
    dimensions = body.get("dimensions", _DIMENSIONS)
    if (
        not isinstance(dimensions, int)
        or isinstance(dimensions, bool)
        or not 1 <= dimensions <= 256
    ):
        return _invalid("dimensions must be an integer from 1 to 256 here", "dimensions")
    fmt = body.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        return _invalid("encoding_format must be float or base64", "encoding_format")
    if model not in models:
        message = f"The model `{model}` does not exist or you do not have access to it."
        return Refusal(404, error_body(message, "invalid_request_error", "model_not_found"))
    return EmbeddingCall(model, inputs, tokens, dimensions, fmt == "base64")


def _is_tokens(value: list[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def embeddings_body(call: EmbeddingCall, *, usage: bool) -> bytes:
    """An embeddings ``list``: one deterministic vector per input, and the usage."""
    data = []
    for index, item in enumerate(call.inputs):
        seed = len(item) + 7 * index
        vector = [round(math.sin(seed + j), 6) for j in range(call.dimensions)]
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if call.base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body: dict[str, Any] = {"object": "list", "data": data, "model": call.model}
    if usage:
        body["usage"] = {"prompt_tokens": call.tokens, "total_tokens": call.tokens}
    return orjson.dumps(body)
