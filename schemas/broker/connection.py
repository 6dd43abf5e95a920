"""Connections to the broker: every llmq connection is made here.

Each reads its frames through a guard (below); robust ones reconnect with
full-jitter exponential backoff (:func:`connect`).

:class:`SafeConnection` and :class:`SafeRobustConnection` are aio-pika's
connection classes with one difference: aiormq opens their socket with
:class:`SafeTransportFactory`, whose reader hands aiormq each frame as
:class:`schemas.broker.frames.FrameGuard` left it. Why: see ``schemas/broker/frames.py``.
"""

from __future__ import annotations

import asyncio
import random
import struct
from typing import Any, cast

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from pamqp.common import FieldTable
from yarl import URL

from schemas.broker.frames import FrameGuard

__all__ = [
    "JitteredRobustConnection",
    "SafeConnection",
    "SafeFrameReader",
    "SafeRobustConnection",
    "SafeTransportFactory",
    "connect",
    "open_connection",
]

_RECONNECT_BASE_S = 0.5
_RECONNECT_CAP_S = 15.0

_HEAD = struct.Struct(">BHI")
_GUARDED = (1, 2)  # method frames and content headers; bodies and heartbeats pass


class SafeFrameReader:
    """The reading half of a connection: the bytes of each frame as :class:`FrameGuard` left it.

    aiormq's frame receiver uses only ``readexactly``, ``read`` and ``at_eof``.
    Content headers and method frames are read whole and guarded; body frames
    and heartbeats pass straight through.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._guard = FrameGuard()
        self._pending = b""  # guarded bytes not yet handed out
        self._through = 0  # bytes of the current frame to pass straight through
        self._raw = False  # the peer did not speak in frames: pass everything through

    def at_eof(self) -> bool:
        return not self._pending and self._reader.at_eof()

    async def read(self, n: int = -1) -> bytes:
        if self._pending:
            out, self._pending = self._pending, b""
            return out
        return await self._reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        if not (self._pending or self._through or self._raw):
            await self._next_frame()
        pending = self._pending
        if pending:
            if n < len(pending):
                self._pending = pending[n:]
                return pending[:n]
            self._pending = b""
            if n == len(pending):
                return pending
            return pending + await self.readexactly(n - len(pending))
        if self._raw:
            return await self._reader.readexactly(n)
        if self._through >= n:
            self._through -= n
            return await self._reader.readexactly(n)
        # A read past the end of the frame: this one's rest, then the next's start.
        take, self._through = self._through, 0
        out = await self._reader.readexactly(take)
        return out + await self.readexactly(n - take)

    async def _next_frame(self) -> None:
        head = await self._reader.readexactly(7)
        if head.startswith(b"AMQP"):  # a protocol header back: aiormq reports it
            self._raw, self._pending = True, head
            return
        kind, _, size = _HEAD.unpack(head)
        if kind in _GUARDED:
            self._pending = self._guard.frame(head + await self._reader.readexactly(size + 1))
        else:
            self._pending, self._through = head, size + 1


class SafeTransportFactory(TransportFactory):
    """aiormq's TCP or TLS transport, read through a :class:`SafeFrameReader`."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        inner = TLSTransportFactory() if url.scheme == "amqps" else TCPTransportFactory()
        reader, writer = await inner.create(url, **kwargs)
        # Duck-typed: aiormq's frame receiver needs only the three methods above.
        return cast(asyncio.StreamReader, SafeFrameReader(reader)), writer


class SafeConnection(aio_pika.Connection):
    """aio-pika's connection, its frames read through :class:`SafeFrameReader`."""

    def __init__(
        self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = SafeTransportFactory()


class SafeRobustConnection(RobustConnection):
    """aio-pika's reconnecting connection, its frames read through :class:`SafeFrameReader`."""

    def __init__(
        self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = SafeTransportFactory()


class JitteredRobustConnection(SafeRobustConnection):
    """aio-pika reconnects every ``reconnect_interval`` seconds, fixed; this
    makes it full-jitter exponential so a fleet of workers does not reconnect
    in lockstep after a broker restart."""

    _tries = 0

    @property
    def reconnect_interval(self) -> float:
        self._tries += 1
        ceiling = min(_RECONNECT_CAP_S, _RECONNECT_BASE_S * 2.0 ** min(self._tries, 16))
        return random.uniform(_RECONNECT_BASE_S, ceiling)

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._tries = 0


async def connect(url: str, *, name: str, heartbeat_s: int = 30) -> AbstractRobustConnection:
    """A robust connection with jittered reconnects; the first connect fails fast.

    Its frames are read through :class:`schemas.broker.frames.FrameGuard`: a
    message the client library could not decode arrives marked instead of
    ending the connection (see ``schemas/broker/frames.py``).
    """
    connection = await aio_pika.connect_robust(
        url,
        connection_class=JitteredRobustConnection,
        client_properties={"connection_name": name},
        heartbeat=heartbeat_s,
    )
    connection.reconnect_callbacks.add(_reset_backoff)
    return connection


async def open_connection(
    url: str, *, name: str, heartbeat_s: int | None = None
) -> aio_pika.abc.AbstractConnection:
    """A plain connection (no reconnects) for a command that ends with it.

    Its frames are read through the guard like every llmq connection's.
    """
    properties: FieldTable = {"connection_name": name}
    if heartbeat_s is None:
        return await aio_pika.connect(
            url, connection_class=SafeConnection, client_properties=properties
        )
    return await aio_pika.connect(
        url, connection_class=SafeConnection, client_properties=properties, heartbeat=heartbeat_s
    )


def _reset_backoff(connection: Any) -> None:
    connection._tries = 0
