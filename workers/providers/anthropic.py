"""The ``anthropic`` endpoint kind: Anthropic's native Messages API.

The request is translated by :mod:`workers.providers.anthropic_messages`;
this module sends it (``POST {base_url}/v1/messages`` with ``x-api-key`` and
``anthropic-version``) and maps the answer back to an OpenAI
``chat.completion``, so replies look the same whichever kind served them:

========================  =========================================
Messages                  chat.completion
========================  =========================================
``text`` blocks           ``message.content`` (joined)
``tool_use`` blocks       ``message.tool_calls`` (input JSON-encoded)
``stop_reason``           ``finish_reason`` (:data:`FINISH_REASONS`)
``usage``                 ``usage``: ``prompt_tokens`` counts every input
                          token, cache reads and writes included;
                          ``prompt_tokens_details.cached_tokens`` the reads
========================  =========================================

Errors arrive as ``{"type": "error", "error": {"type", "message"}}`` and map
onto :class:`~workers.routing.FailureKind` by status, then by error type
(:data:`FAILURE_BY_STATUS`, :data:`FAILURE_BY_TYPE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from schemas.contract import JobKind
from schemas.secrets import redact
from schemas.settings import EndpointSettings
from workers.errors import UpstreamFailure
from workers.providers.anthropic_messages import Untranslatable, to_messages
from workers.providers.base import Call, UpstreamReply
from workers.providers.openai import endpoint_secrets, retry_after_s, with_query
from workers.routing import FailureKind

__all__ = [
    "ANTHROPIC_VERSION",
    "FAILURE_BY_STATUS",
    "FAILURE_BY_TYPE",
    "FINISH_REASONS",
    "AnthropicAdapter",
    "completion",
]

ANTHROPIC_VERSION = "2023-06-01"
"""The ``anthropic-version`` header sent unless the endpoint's ``headers`` set another."""

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",  # a server tool paused the turn; we offer none, so seldom seen
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
"""``stop_reason`` → OpenAI ``finish_reason``; any other reason reads as ``stop``."""

FAILURE_BY_STATUS = {
    400: FailureKind.BAD_REQUEST,  # invalid_request_error
    401: FailureKind.AUTH,  # authentication_error
    402: FailureKind.AUTH,  # billing_error: this account cannot pay; another endpoint may
    403: FailureKind.AUTH,  # permission_error
    404: FailureKind.NOT_FOUND,  # not_found_error: the model name is this endpoint's config
    408: FailureKind.TIMEOUT,
    413: FailureKind.TOO_LARGE,  # request_too_large
    429: FailureKind.RATE_LIMITED,  # rate_limit_error (with retry-after)
    504: FailureKind.TIMEOUT,  # timeout_error
    # 529 overloaded_error: Anthropic is overloaded for everyone, not limiting us.
    # SERVER_ERROR, not RATE_LIMITED: a 429 lowers the endpoint's learned
    # concurrency (as if our own load caused it) and ends an exhausted job
    # over_capacity; an overload says nothing about our concurrency, and as a
    # health failure a lasting one ejects the endpoint (circuit breaker, with
    # half-open probes to find when it is back) while a passing one costs a
    # retry elsewhere. A retry-after, when sent, still holds the endpoint off.
    529: FailureKind.SERVER_ERROR,
}
"""HTTP status → failure kind: Anthropic documents one error type per status."""

FAILURE_BY_TYPE = {
    "invalid_request_error": FailureKind.BAD_REQUEST,
    "authentication_error": FailureKind.AUTH,
    "billing_error": FailureKind.AUTH,
    "permission_error": FailureKind.AUTH,
    "not_found_error": FailureKind.NOT_FOUND,
    "request_too_large": FailureKind.TOO_LARGE,
    "rate_limit_error": FailureKind.RATE_LIMITED,
    "timeout_error": FailureKind.TIMEOUT,
    "api_error": FailureKind.SERVER_ERROR,
    "overloaded_error": FailureKind.SERVER_ERROR,
}
"""Error type → failure kind, for a status not in :data:`FAILURE_BY_STATUS`
(a proxy's, or one Anthropic adds); else 5xx is a server error, 4xx a bad request."""

_SPEND_LIMIT = "enforced_spend_limit_reached"
"""``error.details.error_code`` of a 429 that is the organisation's monthly spend
cap, not a rate limit: retrying this endpoint fails until the month turns."""
_MAX_ERROR_TEXT = 300


class AnthropicAdapter:
    """An ``anthropic`` endpoint: Messages API calls for chat jobs.

    ``base_url`` is the API root, as Anthropic's SDKs take it
    (``https://api.anthropic.com``): the adapter posts to
    ``{base_url}/v1/messages``. A ``base_url`` ending in ``/v1``, as
    OpenAI-style endpoints are written, means the same (no ``/v1/v1``).
    The key goes in ``x-api-key``; ``headers`` may add others
    (``anthropic-beta``) or replace ``anthropic-version``; ``query`` is
    appended to the URL. Embedding jobs are refused: Anthropic has no
    embeddings API (settings refuse such a model on such an endpoint already).
    """

    def __init__(self, endpoint: EndpointSettings) -> None:
        self.name = endpoint.name
        root = endpoint.base_url.rstrip("/").removesuffix("/v1")
        self.url = with_query(f"{root}/v1/messages", endpoint.query)
        self.secrets = endpoint_secrets(endpoint)
        self.streams = False
        # Lower-cased, so an endpoint's "Anthropic-Version" replaces ours, not joins it.
        headers = {
            "content-type": "application/json",
            "accept": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
            **{name.lower(): value for name, value in endpoint.headers.items()},
            **{k.lower(): v.get_secret_value() for k, v in endpoint.secret_header_values.items()},
        }
        if endpoint.api_key is not None:
            headers["x-api-key"] = endpoint.api_key.get_secret_value()
        self._headers = headers

    def __repr__(self) -> str:
        return f"<AnthropicAdapter {self.name} {self.url}>"

    def call(self, kind: JobKind, request: Mapping[str, Any], upstream_model: str) -> Call:
        """The Messages call for a chat request; ``BAD_REQUEST`` for what it cannot say."""
        if kind is not JobKind.CHAT:
            raise UpstreamFailure(
                FailureKind.BAD_REQUEST, f"{self.name}: anthropic has no embeddings API"
            )
        try:
            body = to_messages(request, upstream_model)
        except Untranslatable as exc:
            raise UpstreamFailure(
                FailureKind.BAD_REQUEST, f"{self.name}: not translatable to Anthropic: {exc}"
            ) from None
        return Call(self.url, self._headers, orjson.dumps(body))

    def answer(
        self, kind: JobKind, status: int, headers: Mapping[str, str], raw: bytes, *, now: float
    ) -> UpstreamReply:
        """The OpenAI-shaped reply, or the failure this answer is."""
        if status != 200:
            raise self._failure(status, headers, raw, now)
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise self._malformed("response is not JSON") from None
        reply = completion(message, now=now)
        if reply is None:
            raise self._malformed("response is not a Messages message")
        return reply

    def _malformed(self, what: str) -> UpstreamFailure:
        return UpstreamFailure(FailureKind.MALFORMED, f"{self.name}: {what}", status=200)

    def _failure(
        self, status: int, headers: Mapping[str, str], raw: bytes, now: float
    ) -> UpstreamFailure:
        error = _error(raw)
        type_ = error.get("type") if isinstance(error.get("type"), str) else None
        details = error.get("details")
        if isinstance(details, dict) and details.get("error_code") == _SPEND_LIMIT:
            kind = FailureKind.AUTH  # the account, not the load: mark it, go elsewhere
        else:
            kind = FAILURE_BY_STATUS.get(status) or FAILURE_BY_TYPE.get(
                type_ or "", FailureKind.SERVER_ERROR if status >= 500 else FailureKind.BAD_REQUEST
            )
        text = error.get("message")
        if not isinstance(text, str):
            text = "" if error else raw[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
        said = ": ".join(s for s in (type_, text[:_MAX_ERROR_TEXT]) if s)
        message = redact(
            f"{self.name}: HTTP {status}" + (f": {said}" if said else ""), self.secrets
        )
        wait = (
            retry_after_s(headers, now=now)
            if kind in (FailureKind.RATE_LIMITED, FailureKind.SERVER_ERROR)
            else None
        )
        return UpstreamFailure(kind, message, status=status, retry_after_s=wait)


def _error(raw: bytes) -> dict[str, Any]:
    """The ``error`` object of an error body, or ``{}``."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def completion(message: Any, *, now: float) -> UpstreamReply | None:
    """A Messages ``message`` as an OpenAI ``chat.completion``; None if it is not one."""
    if not isinstance(message, dict) or message.get("type") != "message":
        return None
    blocks = message.get("content")
    if not isinstance(blocks, list):
        return None
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            return None
        if block.get("type") == "text":
            if not isinstance(block.get("text"), str):
                return None
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            call = _tool_call(block)
            if call is None:
                return None
            calls.append(call)
        # Other blocks (thinking, server tools) answer features we never request.
    answer: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
    }
    if calls:
        answer["tool_calls"] = calls
    stop = message.get("stop_reason")
    body: dict[str, Any] = {
        "id": message.get("id") if isinstance(message.get("id"), str) else "",
        "object": "chat.completion",
        "created": int(now),
        "model": message.get("model") if isinstance(message.get("model"), str) else "",
        "choices": [
            {
                "index": 0,
                "message": answer,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(stop, "stop")
                if isinstance(stop, str)
                else "stop",
            }
        ],
    }
    return _with_usage(body, message.get("usage"))


def _tool_call(block: dict[str, Any]) -> dict[str, Any] | None:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
        return None
    encoded = orjson.dumps(arguments).decode()
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": encoded}}


def _with_usage(body: dict[str, Any], usage: Any) -> UpstreamReply:
    if not isinstance(usage, dict):
        return UpstreamReply(body, None, None)
    if _count(usage.get("input_tokens")) is None:
        return UpstreamReply(body, None, _count(usage.get("output_tokens")))
    read = _count(usage.get("cache_read_input_tokens")) or 0
    written = _count(usage.get("cache_creation_input_tokens")) or 0
    prompt = usage["input_tokens"] + read + written
    output = _count(usage.get("output_tokens"))
    body["usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": output or 0,
        "total_tokens": prompt + (output or 0),
        "prompt_tokens_details": {"cached_tokens": read},
    }
    return UpstreamReply(body, prompt, output, cached_tokens=read, cache_write_tokens=written)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
