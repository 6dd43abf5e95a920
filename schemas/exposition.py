"""Where a process shows its health: a private Prometheus registry and the small
HTTP server for ``/metrics``, ``/healthz`` and ``/readyz`` (worker and gateway).

Each process builds its own ``CollectorRegistry`` (never the global one), so
two workers in one test process do not share series.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics import disable_created_metrics

__all__ = ["MetricsServer", "new_registry"]


def new_registry() -> CollectorRegistry:
    """A private registry; ``*_created`` series are off (they double the output)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    return CollectorRegistry()


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
        site = web.TCPSite(self._runner, host, port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else port
        return self.port

    async def stop(self) -> None:
        await self._runner.cleanup()
