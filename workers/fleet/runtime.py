"""The fleet: every endpoint of a scenario served by one event loop.

One process and one loop for all endpoints keeps the fake cheap enough to sit
beside the router on a two-core machine, and gives every endpoint the same
clock, so "fleet time" (seconds since start, monotonic) means one thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from workers.fleet.plan import is_down, next_change
from workers.fleet.scenario import Scenario
from workers.fleet.server import Admin, EndpointServer, Seen
from workers.fleet.stats import EndpointStats

__all__ = ["EndpointInfo", "Fleet", "endpoint_rng"]

_DRAIN_TICKS = 100
"""stop() waits at most this many 10 ms ticks for cut connections to unwind."""


def endpoint_rng(seed: int, name: str) -> random.Random:
    """The generator an endpoint draws from: a function of (seed, name) only.

    Seeding with a string hashes it with SHA-512, stable across processes
    (unlike ``hash()``), so a seed replays the same outcomes on any run.
    """
    return random.Random(f"{seed}:{name}")


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """Where a running endpoint listens and what it serves."""

    name: str
    host: str
    port: int
    url: str
    models: tuple[str, ...]
    listening: bool


class Fleet:
    """Serve a scenario's endpoints: ``async with Fleet(scenario) as fleet: ...``.

    Args:
        scenario: the endpoints and their behaviour.
        seed: overrides ``scenario.seed`` when given.
        host: the address every endpoint binds to.
    """

    def __init__(
        self, scenario: Scenario, seed: int | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.scenario = scenario
        self.seed = scenario.seed if seed is None else seed
        self.host = host
        self._t0: float | None = None
        self._overrides: dict[str, bool] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: list[asyncio.Task[None]] = []
        admin = Admin(self.stats_json, self.reset)
        self._servers = {
            e.name: EndpointServer(
                e,
                key=scenario.key_for(e),
                rng=endpoint_rng(self.seed, e.name),
                clock=self.now,
                host=host,
                admin=admin,
            )
            for e in scenario.endpoints
        }

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def now(self) -> float:
        """Fleet time: seconds since start on the loop's monotonic clock (0 before)."""
        if self._t0 is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._t0

    async def start(self) -> None:
        """Bind every endpoint, start the clock, then follow the ``down`` windows."""
        try:
            for server in self._servers.values():
                await server.open()
        except BaseException:
            await self.stop()
            raise
        self._t0 = asyncio.get_running_loop().time()
        for server in self._servers.values():
            self._locks[server.endpoint.name] = asyncio.Lock()
            if any(w.down for w in server.endpoint.windows):
                self._tasks.append(asyncio.create_task(self._follow(server)))

    async def stop(self) -> None:
        """Close every port and cut every connection; idempotent."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for server in self._servers.values():
            await server.close()
        await self._drain()

    async def _drain(self) -> None:
        """Give cut connections' handlers a moment to unwind before the loop closes."""
        for _ in range(_DRAIN_TICKS):
            if not any(s.connections for s in self._servers.values()):
                return
            await asyncio.sleep(0.01)

    @property
    def endpoints(self) -> dict[str, EndpointInfo]:
        """The endpoints in scenario order, with their bound ports."""
        return {
            name: EndpointInfo(
                name=name,
                host=s.host,
                port=s.port,
                url=s.url,
                models=s.endpoint.models,
                listening=s.listening,
            )
            for name, s in self._servers.items()
        }

    def url(self, name: str) -> str:
        """The base URL of endpoint ``name``: ``http://127.0.0.1:PORT/v1`` (openai),
        the resource root ``http://127.0.0.1:PORT`` (azure)."""
        return self._server(name).url

    def seen(self, name: str) -> list[Seen]:
        """The last requests endpoint ``name`` received, oldest first (its ``record``)."""
        return list(self._server(name).seen or ())

    def stats(self) -> dict[str, EndpointStats]:
        """A snapshot of every endpoint's counters."""
        return {name: s.stats.snapshot() for name, s in self._servers.items()}

    def stats_json(self) -> dict[str, Any]:
        """What ``GET /fleet/stats`` answers."""
        return {
            "seed": self.seed,
            "uptime_s": round(self.now(), 3),
            "endpoints": {name: s.stats.as_dict() for name, s in self._servers.items()},
        }

    def reset(self) -> None:
        """Zero every endpoint's counters (``POST /fleet/reset``); draws go on."""
        for server in self._servers.values():
            server.stats.reset()

    async def set_down(self, name: str, down: bool | None) -> None:
        """Force endpoint ``name`` down (True) or up (False); None follows the windows again.

        Returns once the port is closed (connections refused, open ones cut)
        or listening again.
        """
        server = self._server(name)
        if down is None:
            self._overrides.pop(name, None)
        else:
            self._overrides[name] = down
        if self._t0 is not None:
            await self._apply(server)

    async def _apply(self, server: EndpointServer) -> None:
        name = server.endpoint.name
        want_down = self._overrides.get(name)
        if want_down is None:
            want_down = is_down(server.endpoint, self.now())
        async with self._locks[name]:
            if want_down:
                await server.close()
            else:
                await server.open()

    async def _follow(self, server: EndpointServer) -> None:
        """Open and close the port at each ``down`` window's edges."""
        while True:
            await self._apply(server)
            edge = next_change(server.endpoint, self.now())
            if edge is None:
                return
            await asyncio.sleep(max(0.0, edge - self.now()))

    def _server(self, name: str) -> EndpointServer:
        try:
            return self._servers[name]
        except KeyError:
            raise KeyError(f"no endpoint {name!r}; known: {list(self._servers)}") from None
