"""The OpenAI wire format as the fleet speaks it: request checks and answer bodies.

Kept apart from the server so the shapes can be read in one place and
checked against what the router's client sends and parses; nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "MALFORMED_BODY",
    "ChatCall",
    "Refusal",
    "completion_body",
    "completion_text",
    "error_body",
    "models_body",
    "parse_chat",
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


def completion_body(
    *,
    endpoint: str,
    seq: int,
    model: str,
    created: int,
    completion_tokens: int,
    finish_reason: str,
    prompt: int,
    usage: bool,
) -> bytes:
    """A ``chat.completion`` object; without ``usage`` when the plan says so."""
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
    return orjson.dumps(body)


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


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


@dataclass(frozen=True, slots=True)
class Refusal:
    """A client error to answer at once: status and body."""

    status: int
    body: bytes


def _invalid(message: str, param: str | None = None, code: str | None = None) -> Refusal:
    return Refusal(400, error_body(message, "invalid_request_error", code, param))


def parse_chat(raw: bytes, models: tuple[str, ...]) -> ChatCall | Refusal:
    """Check a request body as OpenAI would: JSON, messages, model, no streaming."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _invalid("We could not parse the JSON body of your request.")
    if not isinstance(body, dict):
        return _invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _invalid("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return _invalid("'messages' must be a non-empty array", "messages")
    if body.get("stream"):
        return _invalid("this fake upstream does not stream", "stream", "unsupported_value")
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
    return ChatCall(model=model, messages=messages, max_tokens=max_tokens)
