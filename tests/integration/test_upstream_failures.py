"""Every transport turns what can go wrong on the wire into the same
:class:`UpstreamFailure` kinds, for a whole answer (``send``) and a stream
(``open_stream``) alike: routing depends on the kind (a refused endpoint is
tried elsewhere at once, a timeout feeds the latency model), so the three
transports must not disagree. The upstream is a raw TCP server on loopback
that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from schemas.contract import JobKind
from schemas.settings import EndpointSettings
from workers.errors import UpstreamFailure
from workers.providers import Call, adapter_for
from workers.routing import FailureKind
from workers.upstream import Upstream, make_upstream

TRANSPORTS = ["aiohttp", "httpx", "httpx-aiohttp"]
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _request(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _request(reader)
    await asyncio.sleep(30)


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _request(reader)
    writer.transport.abort()  # a reset, before any byte of an answer


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _request(reader)
    writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")  # not HTTP at all
    await writer.drain()
    writer.close()


async def cut_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await _request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
    await writer.drain()
    writer.transport.abort()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Behaviour], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(behaviour: Behaviour) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await behaviour(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.transport.abort()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call(transport: str, url: str, stream: bool) -> UpstreamFailure:
    if transport != "aiohttp":
        pytest.importorskip("httpx_aiohttp")
    upstream: Upstream = make_upstream(transport)
    adapter = adapter_for(EndpointSettings(name="e", base_url=url, models=["m"]))
    body = b'{"model":"m","messages":[],"stream":true}'
    attempt = upstream.open_stream if stream else upstream.send
    try:
        with pytest.raises(UpstreamFailure) as info:
            await attempt(adapter, JobKind.CHAT, Call(f"{url}/chat", {}, body), timeout_s=0.5)
    finally:
        await upstream.aclose()
    return info.value


@pytest.mark.parametrize("stream", [False, True], ids=["send", "open_stream"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_closed_port_is_refused(transport: str, stream: bool) -> None:
    failure = await call(transport, f"http://127.0.0.1:{closed_port()}", stream)
    assert failure.kind is FailureKind.REFUSED, failure


@pytest.mark.parametrize("stream", [False, True], ids=["send", "open_stream"])
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [
        (hang, FailureKind.TIMEOUT),
        (hang_up, FailureKind.SERVER_ERROR),
        (garbage, FailureKind.SERVER_ERROR),
        (cut_headers, FailureKind.SERVER_ERROR),
    ],
    ids=["hang", "hang_up", "garbage", "cut_headers"],
)
async def test_a_misbehaving_upstream_fails_the_attempt_with_its_kind(
    serve: Callable[[Behaviour], Awaitable[str]],
    transport: str,
    stream: bool,
    behaviour: Behaviour,
    kind: FailureKind,
) -> None:
    failure = await call(transport, await serve(behaviour), stream)
    assert failure.kind is kind, failure
    assert "e:" in str(failure)  # names the endpoint, and says no more of the wire
