"""The OpenAI dialect (``kind = "openai"``): OpenAI and every compatible server.

``POST {base_url}/chat/completions`` or ``{base_url}/embeddings`` with
``Authorization: Bearer <key>``; the job's body goes as is, its ``model`` set
to the endpoint's name for it. The URLs and headers are built once, at
start-up: a call costs one dict copy and one ``orjson.dumps``, as before
adapters existed.

The reading half (:func:`read_reply`, :func:`failure`) is shared by the
dialects that answer in OpenAI's shape (azure).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from schemas.contract import JobKind
from schemas.secrets import redact
from schemas.settings import EndpointSettings
from workers.errors import UpstreamFailure
from workers.providers.base import Call, UpstreamReply
from workers.routing import FailureKind

__all__ = [
    "OpenAIAdapter",
    "endpoint_headers",
    "endpoint_secrets",
    "error_detail",
    "failure",
    "read_reply",
    "retry_after_in_text",
    "retry_after_s",
    "with_query",
]

_RETRY_AFTER_CAP_S = 300.0
_MAX_ERROR_TEXT = 300
_PATHS = {JobKind.CHAT: "/chat/completions", JobKind.EMBEDDING: "/embeddings"}
"""Where each job kind goes, under the base URL (OpenAI) or the deployment (Azure)."""


class OpenAIAdapter:
    """``Authorization: Bearer``, ``{base}/chat/completions`` and ``{base}/embeddings``."""

    def __init__(self, endpoint: EndpointSettings) -> None:
        self.name = endpoint.name
        self.secrets = endpoint_secrets(endpoint)
        self.streams = True
        auth = {}
        if endpoint.api_key is not None:
            auth["Authorization"] = f"Bearer {endpoint.api_key.get_secret_value()}"
        self._headers = endpoint_headers(endpoint, auth)
        self._urls = {
            kind: with_query(f"{endpoint.base_url}{path}", endpoint.query)
            for kind, path in _PATHS.items()
        }

    def __repr__(self) -> str:
        return f"OpenAIAdapter({self.name!r})"

    def call(self, kind: JobKind, request: Mapping[str, Any], upstream_model: str) -> Call:
        return Call(
            self._urls[kind], self._headers, orjson.dumps({**request, "model": upstream_model})
        )

    def answer(
        self, kind: JobKind, status: int, headers: Mapping[str, str], raw: bytes, *, now: float
    ) -> UpstreamReply:
        if status == 200:
            return read_reply(self.name, kind, raw)
        raise failure(self.name, self.secrets, status, headers, raw, now=now)


def endpoint_secrets(endpoint: EndpointSettings) -> tuple[str, ...]:
    """Every secret the endpoint's calls carry: its key, token, secret header values."""
    values = [endpoint.api_key, endpoint.azure_ad_token, *endpoint.secret_header_values.values()]
    return tuple(v.get_secret_value() for v in values if v is not None)


def endpoint_headers(endpoint: EndpointSettings, auth: Mapping[str, str]) -> dict[str, str]:
    """JSON in and out, the kind's ``auth`` headers, then the endpoint's own."""
    return {
        "Content-Type": "application/json",
        "Accept": "application/json",
        **auth,
        **endpoint.headers,
        **{k: v.get_secret_value() for k, v in endpoint.secret_header_values.items()},
    }


def with_query(url: str, query: Mapping[str, str]) -> str:
    """``url`` with the endpoint's query parameters, encoded once at start-up."""
    return f"{url}?{urlencode(query)}" if query else url


def read_reply(name: str, kind: JobKind, raw: bytes) -> UpstreamReply:
    """A 200 in OpenAI's shape: a chat completion, or an embeddings list with its usage."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamFailure(
            FailureKind.MALFORMED, f"{name}: response is not JSON", status=200
        ) from None
    if type(body) is not dict:
        raise UpstreamFailure(
            FailureKind.MALFORMED, f"{name}: response is not an object", status=200
        )
    usage = body.get("usage")
    if type(usage) is not dict:
        usage = _NO_USAGE
    if kind is _EMBEDDING:
        return _embeddings(name, body, usage)
    if type(body.get("choices")) is not list:
        raise UpstreamFailure(FailureKind.MALFORMED, f"{name}: response has no choices", status=200)
    # The hot path of every chat job: exact type checks, no helper calls for the
    # common answer (three non-negative ints), as cheap as before adapters existed.
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if type(details) is dict else None
    return UpstreamReply(
        body,
        prompt if type(prompt) is int and prompt >= 0 else None,
        completion if type(completion) is int and completion >= 0 else None,
        cached if type(cached) is int and cached >= 0 else None,
    )


_NO_USAGE: dict[str, Any] = {}
_EMBEDDING = JobKind.EMBEDDING


def _embeddings(name: str, body: dict[str, Any], usage: dict[str, Any]) -> UpstreamReply:
    # The usage is the bill (embeddings have no output tokens): an answer
    # without it cannot be charged, so it is no answer.
    prompt = _count(usage.get("prompt_tokens"))
    if not isinstance(body.get("data"), list) or prompt is None:
        raise UpstreamFailure(
            FailureKind.MALFORMED,
            f"{name}: embeddings response has no data list or no usage.prompt_tokens",
            status=200,
        )
    return UpstreamReply(body, prompt, 0)


def failure(
    name: str,
    secrets: tuple[str, ...],
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    *,
    now: float,
) -> UpstreamFailure:
    """The failure an error answer is: its kind by status, its text redacted."""
    code, text = error_detail(raw)
    if code == str(status):
        code = ""  # Azure's "code": "429" says nothing the status does not
    text = redact(f"{code}: {text}" if code and text else code or text, secrets)
    message = f"{name}: HTTP {status}: {text}" if text else f"{name}: HTTP {status}"
    kind = _KIND_BY_STATUS.get(status)
    if kind is None:
        kind = FailureKind.SERVER_ERROR if status >= 500 else FailureKind.BAD_REQUEST
    retry_after = (
        retry_after_s(headers, now=now)
        if kind in (FailureKind.RATE_LIMITED, FailureKind.SERVER_ERROR)
        else None
    )
    return UpstreamFailure(kind, message, status=status, retry_after_s=retry_after)


_KIND_BY_STATUS = {
    400: FailureKind.BAD_REQUEST,
    401: FailureKind.AUTH,
    403: FailureKind.AUTH,
    404: FailureKind.NOT_FOUND,
    408: FailureKind.TIMEOUT,
    413: FailureKind.TOO_LARGE,
    422: FailureKind.BAD_REQUEST,
    429: FailureKind.RATE_LIMITED,
}


def error_detail(raw: bytes) -> tuple[str, str]:
    """(code, message) of an error body: ``{"error": {"code", "message"}}``, else its text."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", raw[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return "", ""
    message, code = error.get("message"), error.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)  # Azure's 429 and 401 say "code": "429", some relays a number
    return (
        code[:64] if isinstance(code, str) else "",
        message[:_MAX_ERROR_TEXT] if isinstance(message, str) else "",
    )


def retry_after_s(headers: Mapping[str, str], *, now: float) -> float | None:
    """``retry-after-ms``, else ``Retry-After`` (seconds or HTTP-date), capped."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return min(max(float(value) / 1000, 0.0), _RETRY_AFTER_CAP_S)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), _RETRY_AFTER_CAP_S)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(when - now, 0.0), _RETRY_AFTER_CAP_S)


_WAIT_IN_TEXT = re.compile(r"(?i)retry after (\d{1,4}) seconds?")
"""Azure's 429 text ("Please retry after 6 seconds") when a proxy dropped the header."""


def retry_after_in_text(message: str) -> float | None:
    """The wait a 429's text asks for, capped; None when it names none."""
    found = _WAIT_IN_TEXT.search(message)
    return None if found is None else min(float(found.group(1)), _RETRY_AFTER_CAP_S)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
