"""A TCP forwarder on loopback: a stand-in for one broker node.

Two proxies in front of the one test broker are two "nodes" with their own
addresses: killing one (its listener closed, every connection through it
reset) is a node lost as the clients see it, while the queues live on behind
the other. ``hold()`` stops the broker's bytes from reaching the clients (a
confirm that never arrives) without stopping theirs from reaching the broker.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``kill()`` drops it like a dead node."""

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self._target = (target_host, target_port)
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.accepted = 0
        """Client connections accepted since the start."""

    @property
    def open_connections(self) -> int:
        return len(self._writers) // 2

    def url(self, amqp_url: str) -> str:
        """``amqp_url`` pointed at this proxy (same user, password, vhost)."""
        scheme, rest = amqp_url.split("://", 1)
        account, _, tail = rest.rpartition("@")
        path = tail[tail.index("/") :] if "/" in tail else "/"
        return f"{scheme}://{account}@127.0.0.1:{self.port}{path}"

    async def start(self) -> None:
        """Listen (on the port of an earlier start, if any)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def kill(self) -> None:
        """Stop listening (connects are refused) and reset every connection through it."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for pump in list(self._pumps):
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._flowing.set()

    def hold(self) -> None:
        """Keep the broker's bytes from the clients until :meth:`kill` (or :meth:`release`)."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pumps = (
            asyncio.create_task(self._pump(reader, up_writer, hold=False)),
            asyncio.create_task(self._pump(up_reader, writer, hold=True)),
        )
        self._pumps.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                self._pumps.discard(pump)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold: bool
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if hold:
                    await self._flowing.wait()
                writer.write(data)
                await writer.drain()
