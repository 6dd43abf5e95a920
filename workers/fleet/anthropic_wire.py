"""Anthropic's Messages wire format as the fleet speaks it: request checks and answers.

The fake is as strict as Anthropic's reference says the API is, so a badly
translated request fails here as it would there: ``x-api-key`` and
``anthropic-version`` headers; ``model`` and ``max_tokens`` required; no
unknown top-level keys (Anthropic: "Extra inputs are not permitted");
``messages`` of roles ``user``/``assistant`` only, alternating, starting with
``user`` (a system prompt is the top-level ``system``); content blocks of the
documented shapes; every ``tool_use`` answered by a ``tool_result`` first in the
next user turn; ``temperature`` within 0..1; tools as ``{name, input_schema}``.

Prompt caching is modelled: the request up to its last ``cache_control``
breakpoint (tools, then system, then messages) is a prefix; the first request
with a prefix writes it (``cache_creation_input_tokens``), later ones read it
(``cache_read_input_tokens``). There is no minimum length, unlike the real API.
Nothing here does I/O; the server keeps the set of prefixes seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from workers.fleet import anthropic_checks as checks
from workers.fleet.anthropic_checks import Invalid
from workers.fleet.wire import Dialect, Refusal, completion_text

__all__ = [
    "DIALECT",
    "MAX_OUTPUT_TOKENS",
    "MessagesCall",
    "check_headers",
    "error_body",
    "error_type",
    "message_body",
    "parse_messages",
    "tool_input",
]

MAX_OUTPUT_TOKENS = 64_000
"""The most ``max_tokens`` any fake model takes (Claude Sonnet 4.5's limit);
more is a 400, as Anthropic answers it: a request the adapter passes but the
provider refuses."""

_KEYS = frozenset(
    {"model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream"}
    | {"temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier"}
)
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> bytes:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    error = {"type": error_type(status), "message": message}
    return orjson.dumps({"type": "error", "error": error, "request_id": "req_fleet"})


_TOO_MANY = {
    "rate_limit_rate": "This request would exceed the rate limit for your organization"
    " (fleet: rate_limit_rate).",
    "capacity": "Too many concurrent requests (fleet: capacity).",
}
DIALECT = Dialect(
    too_many=lambda reason: error_body(429, _TOO_MANY[reason]),
    completion=orjson.dumps,  # unused: Messages answers are made by message_body
    error=error_body,
)
"""Anthropic's words for the fleet's 429s and ``error_rate`` answers (529: overloaded)."""


def _refuse(message: str, status: int = 400) -> Refusal:
    return Refusal(status, error_body(status, message))


def check_headers(
    headers: Mapping[str, str], key: str | None, echo: str = "none"
) -> Refusal | None:
    """The ``x-api-key`` (when the endpoint has a key) and ``anthropic-version``.

    ``echo`` is what a 401 says of the key it got (the scenario's ``echo_key``):
    nothing, a masked form, or all of it, like a careless relay."""
    given = headers.get("x-api-key")
    if key is not None and given != key:
        shown = {"full": given, "masked": f"{(given or '')[:7]}***{(given or '')[-4:]}"}
        said = f": {shown[echo]}" if echo in shown and given else ""
        return _refuse(f"invalid x-api-key{said}", 401)
    if not headers.get("anthropic-version"):
        return _refuse("anthropic-version: header is required")
    return None


@dataclass(frozen=True, slots=True)
class MessagesCall:
    """The parts of a valid Messages request the fleet answers from."""

    model: str
    max_tokens: int
    input_tokens: int
    """All input tokens, about four characters each (cached ones included)."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] = field(default_factory=list)
    answers_tools: bool = False
    """The last user turn holds tool results: the model answers them in text."""
    cache_prefix: str | None = None
    """A digest of the request up to its last ``cache_control`` breakpoint."""
    cache_tokens: int = 0


def parse_messages(raw: bytes, models: tuple[str, ...]) -> MessagesCall | Refusal:
    """Check a request body as the Messages API would; the call, or the 4xx to answer."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _refuse("There was an issue with the format of your request: invalid JSON")
    if not isinstance(body, dict):
        return _refuse("The request body must be a JSON object")
    try:
        call = _call(body)
    except Invalid as exc:
        return _refuse(str(exc))
    if call.model not in models:
        return _refuse(f"model: {call.model}", 404)
    return call


def _call(body: dict[str, Any]) -> MessagesCall:
    for key in body:
        if key not in _KEYS:
            raise Invalid(f"{key}: Extra inputs are not permitted")
    model, max_tokens = body.get("model"), body.get("max_tokens")
    if not isinstance(model, str) or not model:
        raise Invalid("model: Field required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise Invalid("max_tokens: Field required (an integer >= 1)")
    if max_tokens > MAX_OUTPUT_TOKENS:
        raise Invalid(
            f"max_tokens: {max_tokens} > {MAX_OUTPUT_TOKENS}, which is the maximum allowed"
            f" number of output tokens for {model}"
        )
    if body.get("stream"):
        raise Invalid("stream: this fake upstream does not stream")
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and not (isinstance(value, int | float) and 0 <= value <= 1):
            raise Invalid(f"{name}: Input should be less than or equal to 1")
    pieces = checks.tools(body.get("tools")) + checks.system(body.get("system"))
    turns = checks.turns(body.get("messages"))
    pieces += [block for turn in turns for block in turn]
    choice = checks.tool_choice(body.get("tool_choice"), body.get("tools") or [])
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise Invalid("stop_sequences: Input should be a list of non-empty strings")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or set(metadata) - {"user_id"}):
        raise Invalid("metadata: only user_id is permitted")
    prefix, cache_tokens = _cache_prefix(pieces)
    last = turns[-1]
    return MessagesCall(
        model=model,
        max_tokens=max_tokens,
        input_tokens=sum(_tokens(p) for p in pieces),
        tools=list(body.get("tools") or []),
        tool_choice=choice,
        stop_sequences=stops,
        answers_tools=any(b.get("type") == "tool_result" for b in last),
        cache_prefix=prefix,
        cache_tokens=cache_tokens,
    )


def _tokens(piece: dict[str, Any]) -> int:
    text = piece.get("text")
    size = len(text) if isinstance(text, str) else len(orjson.dumps(piece))
    return max(1, round(size / 4))


def _cache_prefix(pieces: list[dict[str, Any]]) -> tuple[str | None, int]:
    marks = [i for i, piece in enumerate(pieces) if "cache_control" in piece]
    if not marks:
        return None, 0
    prefix = pieces[: marks[-1] + 1]
    digest = hashlib.sha256(orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return digest, sum(_tokens(p) for p in prefix)


def tool_input(schema: Mapping[str, Any]) -> dict[str, Any]:
    """An input that fits ``schema``'s required properties: "fleet", 1, true or null."""
    properties = schema.get("properties") or {}
    values = {"string": "fleet", "integer": 1, "number": 1, "boolean": True}
    out: dict[str, Any] = {}
    for name in schema.get("required") or []:
        spec = properties.get(name) if isinstance(properties, dict) else None
        kind = spec.get("type") if isinstance(spec, dict) else None
        out[name] = values.get(kind) if isinstance(kind, str) else None
    return out


def message_body(
    call: MessagesCall,
    *,
    endpoint: str,
    seq: int,
    output_tokens: int,
    truncated: bool,
    usage: bool,
    cache_read: int = 0,
    cache_write: int = 0,
) -> bytes:
    """A Messages ``message``: a tool call when tools are offered and not yet
    answered (the named one, else the first), else text of ``output_tokens``."""
    content: list[dict[str, Any]] = []
    stop_sequence = None
    choice = call.tool_choice or {"type": "auto"}
    if call.tools and choice["type"] != "none" and not call.answers_tools and not truncated:
        name = choice.get("name") or call.tools[0]["name"]
        schema = next(t["input_schema"] for t in call.tools if t["name"] == name)
        if choice["type"] == "auto":
            content.append({"type": "text", "text": f"{endpoint} #{seq}: calling {name}."})
        tool_id = f"toolu_fleet_{endpoint}_{seq}"
        content.append(
            {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input(schema)}
        )
        stop_reason = "tool_use"
    else:
        content.append({"type": "text", "text": completion_text(endpoint, seq, output_tokens)})
        stop_reason = "max_tokens" if truncated else "end_turn"
        if call.stop_sequences and not truncated:
            stop_reason, stop_sequence = "stop_sequence", call.stop_sequences[0]
    body: dict[str, Any] = {
        "id": f"msg_fleet_{endpoint}_{seq}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
    }
    if usage:
        body["usage"] = {
            "input_tokens": call.input_tokens - cache_read - cache_write,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "output_tokens": output_tokens,
        }
    return orjson.dumps(body)
