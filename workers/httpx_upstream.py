"""The httpx transports to upstreams (``worker.http_transport = "httpx"`` or
``"httpx-aiohttp"``), kept to compare against the default aiohttp one.

httpx and httpx-aiohttp come with the ``llmq-router[httpx]`` extra; only
:func:`workers.upstream.make_upstream` imports this module, after checking
they are installed, so a default install never loads them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx

from schemas.contract import JobKind
from workers.errors import UpstreamFailure
from workers.providers.base import Adapter, Call, UpstreamReply
from workers.providers.chunks import ChunkReader
from workers.routing import FailureKind
from workers.upstream import MAX_RESPONSE_BYTES, failure_of, request_headers, too_large
from workers.upstream_streams import Opened, PieceStream, finite, is_event_stream, read_first

__all__ = ["HttpxUpstream"]


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

    async def send(
        self,
        adapter: Adapter,
        kind: JobKind,
        call: Call,
        *,
        timeout_s: float,
        traceparent: str | None = None,
    ) -> UpstreamReply:
        timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        name = adapter.name
        try:
            # httpx applies its timeout per phase; bound the whole call as well.
            async with asyncio.timeout(timeout_s):
                response = await self._client.post(
                    call.url,
                    content=call.body,
                    headers=request_headers(call, traceparent),
                    timeout=timeout,
                )
        except (TimeoutError, httpx.HTTPError, aiohttp.ClientError) as exc:
            raise _failure(name, exc, f"no answer within {timeout_s:.3g} s") from None
        if len(response.content) > self._max_bytes:  # read whole first: httpx has no cap
            raise too_large(name, self._max_bytes)
        return adapter.answer(
            kind, response.status_code, response.headers, response.content, now=time.time()
        )

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
        timeout = httpx.Timeout(None, connect=min(timeout_s, 10.0))
        request = self._client.build_request(
            "POST",
            call.url,
            content=call.body,
            headers=request_headers(call, traceparent),
            timeout=timeout,
        )
        response: httpx.Response | None = None
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._client.send(request, stream=True)
                if response.status_code == 200 and is_event_stream(
                    response.headers.get("content-type")
                ):
                    stream = PieceStream(
                        name,
                        ChunkReader(name, adapter.secrets),
                        _pieces(name, response),
                        _closer(response),
                    )
                    return Opened(await read_first(stream), stream)
                raw = await response.aread()
                await response.aclose()
        except BaseException as exc:
            await _drop(response)
            failure = _failure(name, exc, f"no first token within {timeout_s:.3g} s")
            if failure is exc:
                raise
            raise failure from None
        if len(raw) > self._max_bytes:
            raise too_large(name, self._max_bytes)
        return finite(adapter, kind, response.status_code, response.headers, raw)

    async def aclose(self) -> None:
        await self._client.aclose()


def _failure(name: str, exc: BaseException, timed_out: str) -> BaseException:
    """What the worker sees of ``exc``, raised calling endpoint ``name``: httpx's
    errors as :class:`UpstreamFailure` (``timed_out`` says what did not come in
    time), anything else as it is.

    Under httpx-aiohttp the error may be aiohttp's: re-raised as it is when
    httpx-aiohttp has no httpx name for it (a bad status line), or as the
    cause of a mislabelled one (a refused connection or a reset arrive as
    ``ConnectTimeout``); aiohttp's own error decides then, as in the default
    transport."""
    if isinstance(exc.__cause__, aiohttp.ClientError):
        exc = exc.__cause__
    if isinstance(exc, aiohttp.ClientError):
        return failure_of(name, exc, timed_out)
    if isinstance(exc, (TimeoutError, httpx.TimeoutException)):
        return UpstreamFailure(FailureKind.TIMEOUT, f"{name}: {timed_out}")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamFailure(FailureKind.REFUSED, f"{name}: cannot connect")
    if isinstance(exc, httpx.HTTPError):
        return UpstreamFailure(FailureKind.SERVER_ERROR, f"{name}: {type(exc).__name__}")
    return exc


def _pieces(name: str, response: httpx.Response) -> Callable[[], Awaitable[bytes]]:
    pieces = response.aiter_bytes()  # decoded: an upstream may compress its stream

    async def piece() -> bytes:
        try:
            return await anext(pieces, b"")
        except (httpx.HTTPError, aiohttp.ClientError, ConnectionError) as exc:
            raise UpstreamFailure(
                FailureKind.SERVER_ERROR, f"{name}: stream broke off ({type(exc).__name__})"
            ) from None

    return piece


def _closer(response: httpx.Response) -> Callable[[bool], Awaitable[None]]:
    async def close(ended: bool) -> None:
        await response.aclose()

    return close


async def _drop(response: httpx.Response | None) -> None:
    if response is not None:
        await response.aclose()
