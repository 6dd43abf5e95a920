"""The httpx transports to upstreams (``worker.http_transport = "httpx"`` or
``"httpx-aiohttp"``), kept to compare against the default aiohttp one.

httpx and httpx-aiohttp come with the ``llmq-router[httpx]`` extra; only
:func:`workers.upstream.make_upstream` imports this module, after checking
they are installed, so a default install never loads them.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from schemas.contract import JobKind
from workers.errors import UpstreamFailure
from workers.providers.base import Adapter, Call, UpstreamReply
from workers.routing import FailureKind
from workers.upstream import MAX_RESPONSE_BYTES, request_headers, too_large

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
        except (TimeoutError, httpx.TimeoutException):
            raise UpstreamFailure(
                FailureKind.TIMEOUT, f"{name}: no answer within {timeout_s:.3g} s"
            ) from None
        except httpx.ConnectError:
            raise UpstreamFailure(FailureKind.REFUSED, f"{name}: cannot connect") from None
        except httpx.HTTPError as exc:
            raise UpstreamFailure(
                FailureKind.SERVER_ERROR, f"{name}: {type(exc).__name__}"
            ) from None
        if len(response.content) > self._max_bytes:  # read whole first: httpx has no cap
            raise too_large(name, self._max_bytes)
        return adapter.answer(
            kind, response.status_code, response.headers, response.content, now=time.time()
        )

    async def aclose(self) -> None:
        await self._client.aclose()
