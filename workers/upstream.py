"""The HTTP transport to upstreams: it sends a provider adapter's call and
hands the answer back to that adapter, kept thin and swappable.

One client per worker, keep-alive pooling, no client-side retries: the
worker is the only layer that retries. ``aiohttp`` is the default transport
(its per-request CPU cost is several times lower than httpx's default
transport at high concurrency; bench/ measures it); ``httpx`` and
``httpx-aiohttp`` are kept behind the same interface to compare, in
:mod:`workers.httpx_upstream`, imported only when chosen: httpx is an extra
(``llmq-router[httpx]``), not a dependency of every install.

What to send and what an answer means is the adapter's
(:mod:`workers.providers`: one per ``endpoints.N.kind``); the transport
bounds the read and turns every library exception into an
:class:`UpstreamFailure`.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

import aiohttp

from schemas.contract import JobKind
from schemas.settings import ConfigError
from workers.errors import UpstreamFailure
from workers.providers.base import Adapter, Call, UpstreamReply
from workers.providers.chunks import ChunkReader
from workers.providers.openai import retry_after_s
from workers.routing import FailureKind
from workers.upstream_streams import (
    Opened,
    PieceStream,
    finite,
    is_event_stream,
    read_first,
)

__all__ = [
    "HTTPX_EXTRA",
    "AiohttpUpstream",
    "Upstream",
    "UpstreamReply",
    "failure_of",
    "make_upstream",
    "request_headers",
    "require_transport",
    "retry_after_s",
    "too_large",
]

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
"""The largest upstream answer read (decompressed): an answer is input too, and
one that never ends must not take the worker's memory."""
HTTPX_EXTRA = "llmq-router[httpx]"
"""What to install for ``worker.http_transport = "httpx"`` or ``"httpx-aiohttp"``."""


class Upstream(Protocol):
    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        """POST ``call`` and return ``adapter.answer(...)`` of what came back."""
        ...

    async def open_stream(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> Opened:
        """POST a streamed ``call``; return once its first token is in, within
        ``timeout_s`` (:mod:`workers.upstream_streams`)."""
        ...

    async def aclose(self) -> None: ...


def request_headers(call: Call, traceparent: str | None) -> Mapping[str, str]:
    """The call's headers, with the job's trace context when it has one."""
    if traceparent is None:
        return call.headers
    return {**call.headers, "traceparent": traceparent}


async def _read_bounded(name: str, response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise too_large(name, limit)
    if response.content_length is not None and not response.headers.get("Content-Encoding"):
        return await response.read()  # the common case: the size is known and small
    buf = bytearray()
    while chunk := await response.content.read(limit + 1 - len(buf)):
        buf += chunk
        if len(buf) > limit:
            raise too_large(name, limit)
    return bytes(buf)


def too_large(name: str, limit: int) -> UpstreamFailure:
    """The failure of endpoint ``name``'s answer longer than ``limit`` bytes."""
    return UpstreamFailure(FailureKind.MALFORMED, f"{name}: answer larger than {limit} bytes")


class AiohttpUpstream:
    """The default transport: one ``aiohttp.ClientSession`` with a shared pool."""

    def __init__(self, max_bytes: int = MAX_RESPONSE_BYTES) -> None:
        self._max_bytes = max_bytes
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=True,
            raise_for_status=False,
        )

    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 10.0))
        name = adapter.name
        try:
            async with self._session.post(
                call.url,
                data=call.body,
                headers=request_headers(call, traceparent),
                timeout=timeout,
            ) as response:
                raw = await _read_bounded(name, response, self._max_bytes)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise failure_of(name, exc, f"no answer within {timeout_s:.3g} s") from None
        # Read outside the try: the adapter's own errors are UpstreamFailures already.
        return adapter.answer(kind, response.status, response.headers, raw, now=time.time())

    async def open_stream(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> Opened:
        name = adapter.name
        # No total: the stream outlives the first token; each read is bounded instead.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout_s, 10.0))
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._session.post(
                    call.url,
                    data=call.body,
                    headers=request_headers(call, traceparent),
                    timeout=timeout,
                )
                if response.status == 200 and is_event_stream(response.content_type):
                    stream = PieceStream(
                        name,
                        ChunkReader(name, adapter.secrets),
                        _pieces(name, response),
                        _closer(response),
                    )
                    return Opened(await read_first(stream), stream)
                raw = await _read_bounded(name, response, self._max_bytes)
        except BaseException as exc:
            _drop(response)
            failure = failure_of(name, exc, f"no first token within {timeout_s:.3g} s")
            if failure is exc:
                raise
            raise failure from None
        response.release()
        return finite(adapter, kind, response.status, response.headers, raw)

    async def aclose(self) -> None:
        await self._session.close()


def failure_of(name: str, exc: BaseException, timed_out: str) -> BaseException:
    """What the worker sees of ``exc``, raised calling endpoint ``name``: aiohttp's
    errors as :class:`UpstreamFailure` (``timed_out`` says what did not come
    in time), anything else as it is."""
    if isinstance(exc, TimeoutError):
        return UpstreamFailure(FailureKind.TIMEOUT, f"{name}: {timed_out}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(
            FailureKind.REFUSED, f"{name}: cannot connect ({exc.os_error.strerror})"
        )
    if isinstance(exc, (aiohttp.ClientError, ValueError)):
        return UpstreamFailure(FailureKind.SERVER_ERROR, f"{name}: {type(exc).__name__}")
    return exc


def _pieces(name: str, response: aiohttp.ClientResponse) -> Callable[[], Awaitable[bytes]]:
    async def piece() -> bytes:
        try:
            return await response.content.readany()
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamFailure(
                FailureKind.SERVER_ERROR, f"{name}: stream broke off ({type(exc).__name__})"
            ) from None

    return piece


def _closer(response: aiohttp.ClientResponse) -> Callable[[bool], Awaitable[None]]:
    async def close(ended: bool) -> None:
        if ended:
            response.release()  # read to its end: the connection goes back to the pool
        else:
            response.close()  # mid-answer: drop it, so the upstream stops generating

    return close


def _drop(response: aiohttp.ClientResponse | None) -> None:
    if response is not None:
        response.close()


def make_upstream(transport: str) -> Upstream:
    """The transport named in ``worker.http_transport``.

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
