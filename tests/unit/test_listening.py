"""A server that does not listen fails with ``OSError``, never anything else.

uvloop's ``create_server`` returns a server whose socket is gone when its
``listen()`` fails: two processes that start on one port at once both bind
(neither listens yet) and the second ``listen()`` finds the port taken. The
worker treats an ``OSError`` from its metrics server as "serve without
/metrics"; the ``AttributeError`` aiohttp used to raise there stopped it
(it happened to two workers started together in CI). The race itself cannot
be forced from outside, so the server uvloop returns is stood in for here.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest
from aiohttp import web

from schemas.exposition import MetricsServer, listening_port, new_registry


class DeadServer:
    """What uvloop's ``create_server`` returns when ``listen()`` failed."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket | None] = [None]
        self.closed = False

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


@pytest.fixture
async def dead_listen(monkeypatch: pytest.MonkeyPatch) -> list[DeadServer]:
    """The running loop's ``create_server`` returns dead servers."""
    made: list[DeadServer] = []

    async def create_server(*args: Any, **kwargs: Any) -> DeadServer:
        made.append(DeadServer())
        return made[-1]

    monkeypatch.setattr(asyncio.get_running_loop(), "create_server", create_server)
    return made


def test_a_server_without_its_socket_is_address_in_use() -> None:
    server = DeadServer()
    with pytest.raises(OSError) as info:
        listening_port(server)  # type: ignore[arg-type]
    assert info.value.errno == errno.EADDRINUSE
    assert server.closed


async def test_the_metrics_server_fails_with_oserror_when_it_does_not_listen(
    dead_listen: list[DeadServer],
) -> None:
    server = MetricsServer(new_registry(), health=lambda: (True, {}), ready=lambda: (True, {}))
    with pytest.raises(OSError) as info:
        await server.start("127.0.0.1", 9)
    assert info.value.errno == errno.EADDRINUSE
    assert dead_listen and dead_listen[0].closed


async def test_the_gateway_site_fails_with_oserror_when_it_does_not_listen(
    dead_listen: list[DeadServer],
) -> None:
    from producers.gateway_server import ConnectionLimits, GatewaySite

    runner = web.AppRunner(web.Application())
    await runner.setup()
    limits = ConnectionLimits(max_connections=10, header_timeout_s=5, idle_timeout_s=5)
    try:
        with pytest.raises(OSError) as info:
            await GatewaySite(runner, "127.0.0.1", 9, limits=limits).start()
        assert info.value.errno == errno.EADDRINUSE
    finally:
        await runner.cleanup()


async def test_a_real_port_taken_is_oserror_and_a_free_one_is_reported() -> None:
    first = MetricsServer(new_registry(), health=lambda: (True, {}), ready=lambda: (True, {}))
    port = await first.start("127.0.0.1", 0)
    try:
        assert port > 0
        second = MetricsServer(new_registry(), health=lambda: (True, {}), ready=lambda: (True, {}))
        with pytest.raises(OSError):
            await second.start("127.0.0.1", port)
    finally:
        await first.stop()
