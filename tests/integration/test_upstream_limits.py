"""An upstream's answer is input too: one that never ends, or inflates when
decompressed, is cut off at the worker's limit and fails the attempt."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.errors import UpstreamFailure
from workers.httpx_upstream import HttpxUpstream
from workers.providers import Call, adapter_for
from workers.routing import FailureKind
from workers.upstream import AiohttpUpstream

LIMIT = 1024 * 1024
OK = b'{"choices":[{"message":{"role":"assistant","content":"hi"}}],"usage":{}}'


async def endless(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    chunk = b" " * 65536
    for _ in range(10_000):  # 640 MB if nobody stops reading
        await response.write(chunk)
    return response


async def bomb(request: web.Request) -> web.Response:
    body = gzip.compress(b" " * (64 * LIMIT))  # ~64 KB on the wire, 64 MB inflated
    return web.Response(
        body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def declared(request: web.Request) -> web.Response:
    return web.Response(body=b" " * (2 * LIMIT), content_type="application/json")


async def fine(request: web.Request) -> web.Response:
    return web.Response(body=OK, content_type="application/json")


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    for name, handler in (("endless", endless), ("bomb", bomb), ("declared", declared)):
        app.router.add_post(f"/{name}", handler)
    app.router.add_post("/fine", fine)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["endless", "bomb", "declared"])
@pytest.mark.parametrize("kind", ["aiohttp", "httpx"])
async def test_an_answer_past_the_limit_fails_the_attempt(
    server: str, path: str, kind: str
) -> None:
    if kind == "httpx" and path == "endless":
        pytest.skip("httpx reads a whole answer before the worker can look at it")
    upstream = (
        AiohttpUpstream(max_bytes=LIMIT) if kind == "aiohttp" else HttpxUpstream(max_bytes=LIMIT)
    )
    adapter = adapter_for(EndpointSettings(name="u", base_url=server, models=["m"]))
    chat = JobKind.CHAT
    try:
        with pytest.raises(UpstreamFailure) as caught:
            await upstream.send(adapter, chat, Call(f"{server}/{path}", {}, b"{}"), timeout_s=20)
        ok = await upstream.send(adapter, chat, Call(f"{server}/fine", {}, b"{}"), timeout_s=5)
    finally:
        await upstream.aclose()
    assert caught.value.kind is FailureKind.MALFORMED
    assert "larger than" in str(caught.value)
    assert ok.body["choices"][0]["message"]["content"] == "hi"
