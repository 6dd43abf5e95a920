"""Where a process shows its health: a private Prometheus registry and the small
HTTP server for ``/metrics``, ``/healthz`` and ``/readyz`` (worker and gateway).

Each process builds its own ``CollectorRegistry`` (never the global one), so
two workers in one test process do not share series.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics import disable_created_metrics

__all__ = ["ListeningSite", "MetricsServer", "listening_port", "new_registry"]


def new_registry() -> CollectorRegistry:
    """A private registry; ``*_created`` series are off (they double the output)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return CollectorRegistry()


def listening_port(server: asyncio.Server) -> int:
    """The port ``server`` listens on; closes it and raises ``OSError``
    (EADDRINUSE) when it does not listen.

    uvloop's ``create_server`` does not raise when ``listen()`` fails: it
    returns a server whose socket is gone. That happens when two processes
    start on one port at once (workers started together, each with the
    default metrics port): both bind, since neither listens yet, and the
    second ``listen()`` finds the port taken. aiohttp then failed on the
    missing socket with an ``AttributeError``, which stopped a worker that
    should only have gone without ``/metrics``.
    """
    sockets = list(server.sockets)
    if not sockets or any(sock is None for sock in sockets):
        server.close()
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    return int(sockets[0].getsockname()[1])


class ListeningSite(web.TCPSite):
    """aiohttp's TCP site, failing with ``OSError`` whenever it does not listen
    (:func:`listening_port`)."""

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        handler = self._runner.server
        assert handler is not None
        self._server = await asyncio.get_running_loop().create_server(
            handler, self._host, self._port, backlog=self._backlog, reuse_address=True
        )
        self._bound_port = listening_port(self._server)


class MetricsServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on a small aiohttp server.

    ``health`` and ``ready`` return ``(ok, details)``; not ok answers 503.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        ready: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> None:
        self._health = health
        self._ready = ready
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(registry))
        app.router.add_get("/healthz", self._probe(health))
        app.router.add_get("/readyz", self._probe(ready))
        self._runner = web.AppRunner(app, access_log=None)
        self.port: int | None = None

    @staticmethod
    def _probe(
        check: Callable[[], tuple[bool, dict[str, Any]]],
    ) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            ok, details = check()
            return web.json_response(details, status=200 if ok else 503)

        return handler

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (``port=0`` picks a free one). Raises OSError."""
        await self._runner.setup()
        site = ListeningSite(self._runner, host, port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = site.port
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
