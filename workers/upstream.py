"""HTTP adapters to OpenAI-compatible upstreams, kept thin and swappable.

One client per worker, keep-alive pooling, no client-side retries: the
worker is the only layer that retries. ``aiohttp`` is the default transport
(its per-request CPU cost is several times lower than httpx's default
transport at high concurrency; bench/ measures it); ``httpx`` and
``httpx-aiohttp`` are kept behind the same interface to compare.

Every library exception becomes an :class:`UpstreamFailure` here, and every
response is classified by one function, :func:`classify`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import httpx
import orjson

from schemas.settings import EndpointSettings
from workers.errors import UpstreamFailure, redact
from workers.routing import FailureKind

__all__ = [
    "AiohttpUpstream",
    "HttpxUpstream",
    "Target",
    "Upstream",
    "UpstreamReply",
    "classify",
    "make_upstream",
]

_RETRY_AFTER_CAP_S = 300.0
_MAX_ERROR_TEXT = 300
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""The largest upstream answer read (decompressed): an answer is input too, and
one that never ends must not take the worker's memory."""


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


def _headers(target: Target, traceparent: str | None) -> dict[str, str]:
    if traceparent is None:
        return target.headers
    return {**target.headers, "traceparent": traceparent}


async def _read_bounded(target: Target, response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise _too_large(target, limit)
    if response.content_length is not None and not response.headers.get("Content-Encoding"):
        return await response.read()  # the common case: the size is known and small
    buf = bytearray()
    while chunk := await response.content.read(limit + 1 - len(buf)):
        buf += chunk
        if len(buf) > limit:
            raise _too_large(target, limit)
    return bytes(buf)


def _too_large(target: Target, limit: int) -> UpstreamFailure:
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
                target.url, data=body, headers=_headers(target, traceparent), timeout=timeout
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


class HttpxUpstream:
    """``httpx.AsyncClient``, with httpx's own transport or the aiohttp one."""

    def __init__(
        self, *, aiohttp_transport: bool = False, max_bytes: int = MAX_RESPONSE_BYTES
    ) -> None:
        self._max_bytes = max_bytes
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
        transport: httpx.AsyncBaseTransport
        if aiohttp_transport:
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=limits)
        else:
            transport = httpx.AsyncHTTPTransport(limits=limits, retries=0)
        self._client = httpx.AsyncClient(transport=transport, follow_redirects=False)

    async def complete(
        self, target: Target, body: bytes, *, timeout_s: float, traceparent: str | None = None
    ) -> UpstreamReply:
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        try:
            # httpx applies its timeout per phase; bound the whole call as well.
            async with asyncio.timeout(timeout_s):
                response = await self._client.post(
                    target.url,
                    content=body,
                    headers=_headers(target, traceparent),
                    timeout=timeout,
                )
        except (TimeoutError, httpx.TimeoutException):
            raise UpstreamFailure(
                FailureKind.TIMEOUT, f"{target.name}: no answer within {timeout_s:.3g} s"
            ) from None
        except httpx.ConnectError:
            raise UpstreamFailure(FailureKind.REFUSED, f"{target.name}: cannot connect") from None
        except httpx.HTTPError as exc:
            raise UpstreamFailure(
                FailureKind.SERVER_ERROR, f"{target.name}: {type(exc).__name__}"
            ) from None
        if len(response.content) > self._max_bytes:  # read whole first: httpx has no cap
            raise _too_large(target, self._max_bytes)
        return classify(target, response.status_code, response.headers, response.content)

    async def aclose(self) -> None:
        await self._client.aclose()


def make_upstream(transport: str) -> Upstream:
    """The adapter named in ``worker.http_transport``."""
    if transport == "aiohttp":
        return AiohttpUpstream()
    return HttpxUpstream(aiohttp_transport=transport == "httpx-aiohttp")
