"""HTTP adapters to OpenAI-compatible upstreams, kept thin and swappable.

One client per worker, keep-alive pooling, no client-side retries: the
worker is the only layer that retries. ``aiohttp`` is the default transport
(its per-request CPU cost is several times lower than httpx's default
transport at high concurrency; bench/ measures it); ``httpx`` and
``httpx-aiohttp`` are kept behind the same interface to compare, in
:mod:`workers.httpx_upstream`, imported only when chosen: httpx is an extra
(``llmq-router[httpx]``), not a dependency of every install.

Every library exception becomes an :class:`UpstreamFailure` here, and every
response is classified by one function, :func:`classify`.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson

from schemas.secrets import redact
from schemas.settings import ConfigError, EndpointSettings
from workers.errors import UpstreamFailure
from workers.routing import FailureKind

__all__ = [
    "HTTPX_EXTRA",
    "AiohttpUpstream",
    "Target",
    "Upstream",
    "UpstreamReply",
    "classify",
    "make_upstream",
    "request_headers",
    "require_transport",
    "too_large",
]

_RETRY_AFTER_CAP_S = 300.0
_MAX_ERROR_TEXT = 300
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""The largest upstream answer read (decompressed): an answer is input too, and
one that never ends must not take the worker's memory."""
HTTPX_EXTRA = "llmq-router[httpx]"
"""What to install for ``worker.http_transport = "httpx"`` or ``"httpx-aiohttp"``."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to call one endpoint; built once at start-up."""

    name: str
    url: str
    headers: dict[str, str] = field(repr=False)
    secrets: tuple[str, ...] = field(repr=False)

    @classmethod
    def from_settings(cls, endpoint: EndpointSettings) -> Target:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        secrets: tuple[str, ...] = ()
        if endpoint.api_key is not None:
            key = endpoint.api_key.get_secret_value()
            headers["Authorization"] = f"Bearer {key}"
            secrets = (key,)
        return cls(endpoint.name, f"{endpoint.base_url}/chat/completions", headers, secrets)


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A successful answer: the OpenAI response and its token usage, if given."""

    body: dict[str, Any]
    prompt_tokens: int | None
    completion_tokens: int | None


class Upstream(Protocol):
    async def complete(
        self, target: Target, body: bytes, *, timeout_s: float, traceparent: str | None = None
    ) -> UpstreamReply: ...

    async def aclose(self) -> None: ...


def classify(
    target: Target, status: int, headers: Any, raw: bytes, *, now: float | None = None
) -> UpstreamReply:
    """Turn an HTTP answer into a reply, or raise the fitting ``UpstreamFailure``."""
    if status == 200:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamFailure(
                FailureKind.MALFORMED, f"{target.name}: response is not JSON", status=status
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise UpstreamFailure(
                FailureKind.MALFORMED, f"{target.name}: response has no choices", status=status
            )
        usage = body.get("usage")
        prompt = completion = None
        if isinstance(usage, dict):
            prompt = _count(usage.get("prompt_tokens"))
            completion = _count(usage.get("completion_tokens"))
        return UpstreamReply(body, prompt, completion)

    text = redact(_error_text(raw), target.secrets)
    message = f"{target.name}: HTTP {status}: {text}" if text else f"{target.name}: HTTP {status}"
    kind = _KIND_BY_STATUS.get(status)
    if kind is None:
        kind = FailureKind.SERVER_ERROR if status >= 500 else FailureKind.BAD_REQUEST
    retry_after = (
        retry_after_s(headers, now=time.time() if now is None else now)
        if kind in (FailureKind.RATE_LIMITED, FailureKind.SERVER_ERROR)
        else None
    )
    raise UpstreamFailure(kind, message, status=status, retry_after_s=retry_after)


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


def retry_after_s(headers: Any, *, now: float) -> float | None:
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


def _error_text(raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:_MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = data["error"].get("message")
        if isinstance(message, str):
            return message[:_MAX_ERROR_TEXT]
    return ""


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def request_headers(target: Target, traceparent: str | None) -> dict[str, str]:
    """The endpoint's headers, with the job's trace context when it has one."""
    if traceparent is None:
        return target.headers
    return {**target.headers, "traceparent": traceparent}


async def _read_bounded(target: Target, response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise too_large(target, limit)
    if response.content_length is not None and not response.headers.get("Content-Encoding"):
        return await response.read()  # the common case: the size is known and small
    buf = bytearray()
    while chunk := await response.content.read(limit + 1 - len(buf)):
        buf += chunk
        if len(buf) > limit:
            raise too_large(target, limit)
    return bytes(buf)


def too_large(target: Target, limit: int) -> UpstreamFailure:
    """The failure of an answer longer than ``limit`` bytes."""
    return UpstreamFailure(
        FailureKind.MALFORMED, f"{target.name}: answer larger than {limit} bytes"
    )


class AiohttpUpstream:
    """The default adapter: one ``aiohttp.ClientSession`` with a shared pool."""

    def __init__(self, max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=True,
            raise_for_status=False,
        )

    async def complete(
        self, target: Target, body: bytes, *, timeout_s: float, traceparent: str | None = None
    ) -> UpstreamReply:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 10.0))
        try:
            async with self._session.post(
                target.url, data=body, headers=request_headers(target, traceparent), timeout=timeout
            ) as response:
                raw = await _read_bounded(target, response, self._max_bytes)
                return classify(target, response.status, response.headers, raw)
        except TimeoutError:
            raise UpstreamFailure(
                FailureKind.TIMEOUT, f"{target.name}: no answer within {timeout_s:.3g} s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamFailure(
                FailureKind.REFUSED, f"{target.name}: cannot connect ({exc.os_error.strerror})"
            ) from None
        except (aiohttp.ClientError, ValueError) as exc:
            raise UpstreamFailure(
                FailureKind.SERVER_ERROR, f"{target.name}: {type(exc).__name__}"
            ) from None

    async def aclose(self) -> None:
        await self._session.close()


def make_upstream(transport: str) -> Upstream:
    """The adapter named in ``worker.http_transport``.

    Raises :class:`ConfigError` when an httpx transport is chosen but the
    httpx extra is not installed (see :func:`require_transport`).
    """
    if transport == "aiohttp":
        return AiohttpUpstream()
    require_transport(transport)
    from workers.httpx_upstream import HttpxUpstream

    return HttpxUpstream(aiohttp_transport=transport == "httpx-aiohttp")


def require_transport(transport: str) -> None:
    """Raise :class:`ConfigError` unless the packages ``transport`` needs are installed.

    Commands call it right after loading the settings, so a worker stops with
    one line naming the extra instead of a traceback once it has connected.
    """
    needs = {"httpx": ("httpx",), "httpx-aiohttp": ("httpx", "httpx_aiohttp")}
    for module in needs.get(transport, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"config error: worker.http_transport = {transport!r} needs the httpx extra "
                f"({module} is not installed): pip install '{HTTPX_EXTRA}'"
            ) from None
