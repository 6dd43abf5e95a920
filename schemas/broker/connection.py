"""Connections to the broker: every llmq connection is made here.

Each reads its frames through a guard (below); robust ones reconnect with
full-jitter exponential backoff (:func:`connect`). A broker may have several
addresses (the nodes of a cluster, ``schemas/broker_urls.py``): each attempt
to connect tries them in turn (:class:`FailoverTransportFactory`), so a
connection whose node died comes back on a live one, and aio-pika restores
its channels, queues, bindings and consumers there as after any reconnect.

:class:`SafeConnection` and :class:`SafeRobustConnection` are aio-pika's
connection classes with one difference: aiormq opens their socket with
:class:`SafeTransportFactory`, whose reader hands aiormq each frame as
:class:`schemas.broker.frames.FrameGuard` left it. Why: see ``schemas/broker/frames.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url
from aio_pika.robust_connection import RobustConnection
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from aiormq.exceptions import AuthenticationError, ProbableAuthenticationError
from pamqp.common import FieldTable
from yarl import URL

from schemas.broker.errors import BrokerUnreachable
from schemas.broker.frames import FrameGuard
from schemas.broker_urls import DEFAULT_PORTS, Rotation, node_of, split_urls

__all__ = [
    "FailoverTransportFactory",
    "JitteredRobustConnection",
    "SafeConnection",
    "SafeFrameReader",
    "SafeRobustConnection",
    "SafeTransportFactory",
    "connect",
    "open_connection",
]

log = logging.getLogger("llmq.broker")
_C = TypeVar("_C", bound=aio_pika.abc.AbstractConnection)

_RECONNECT_BASE_S = 0.5
_RECONNECT_CAP_S = 15.0
_NODE_CONNECT_TIMEOUT_S = 10.0
"""How long one address may take to accept TCP (and TLS) when there are others
to try: a node whose host is gone does not refuse, it lets SYNs time out (minutes)."""
_NEXT_ATTEMPT_PAUSE_S = 0.5
"""Upper bound of the jittered pause before a first connect tries the next node
after one that accepted TCP but failed the AMQP handshake."""
_HANDSHAKE_TIMEOUT_S = 30.0
"""A whole connect (socket, AMQP handshake, open): a node that accepts the socket
and then says nothing (wedged, or its Erlang VM stopped in a partition) must
not hold a worker for ever; the attempt fails and the next goes elsewhere."""

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


class FailoverTransportFactory(SafeTransportFactory):
    """Opens the socket to the first of a broker's addresses that accepts it.

    aiormq hands every connect the connection's one URL; only its host and port
    matter here (user, password, virtual host and options are the same on every
    node: ``schemas.broker_urls.check_urls``). Each :meth:`create` is a round
    in the :class:`Rotation`'s order: the next address as soon as one refuses
    or times out, :class:`BrokerUnreachable` when none answered (the robust
    connection then waits its jittered backoff before the next round).
    """

    def __init__(self, urls: Sequence[str], rotation: Rotation | None = None) -> None:
        self._nodes = tuple(_node_url(u) for u in urls)
        self._names = tuple(node_of(u) for u in urls)
        self.rotation = rotation or Rotation(len(urls))
        # One address: connect exactly as aiormq would (no timer of ours).
        self._timeout_s = _NODE_CONNECT_TIMEOUT_S if len(urls) > 1 else None
        self.node: URL | None = None
        """The address of the last socket opened (None before the first)."""

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        failed: list[str] = []
        for index in self.rotation.round():
            try:
                pair = await asyncio.wait_for(
                    super().create(self._nodes[index], **kwargs), self._timeout_s
                )
            except OSError as exc:  # refused, unreachable, TLS, timed out (all OSError)
                why = _reason(exc, self._timeout_s)
                failed.append(f"{self._names[index]} ({why})")
                if len(self._nodes) > 1:
                    log.warning("broker node %s unreachable: %s", self._names[index], why)
                continue
            moved = self.rotation.current not in (None, index)
            self.rotation.connected(index)
            self.node = self._nodes[index]
            if moved:
                log.warning("broker connection moved to node %s", self._names[index])
            return pair
        raise BrokerUnreachable(f"no broker node answered: {', '.join(failed)}")


class SafeConnection(aio_pika.Connection):
    """aio-pika's connection, its frames read through :class:`SafeFrameReader`."""

    def __init__(
        self,
        url: URL,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        transport_factory: SafeTransportFactory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = transport_factory or SafeTransportFactory()

    async def _on_connected(self) -> None:
        _name_node(self)
        await super()._on_connected()


class SafeRobustConnection(RobustConnection):
    """aio-pika's reconnecting connection, its frames read through :class:`SafeFrameReader`."""

    def __init__(
        self,
        url: URL,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        transport_factory: SafeTransportFactory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(url, loop, **kwargs)
        self.kwargs["transport_factory"] = transport_factory or SafeTransportFactory()

    async def _on_connected(self) -> None:
        _name_node(self)
        await super()._on_connected()


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


async def connect(
    urls: str | Sequence[str],
    *,
    name: str,
    heartbeat_s: int = 30,
    rng: random.Random | None = None,
) -> AbstractRobustConnection:
    """A robust connection with jittered reconnects; the first connect fails fast.

    ``urls``: one AMQP URL, several separated by commas, or a list (the nodes
    of one cluster). The first round starts at a random node so that a fleet
    spreads; a reconnect starts at another node than the one lost. The first
    connect fails once every node was tried (:class:`BrokerUnreachable` when
    none accepted a socket).

    Its frames are read through :class:`schemas.broker.frames.FrameGuard`: a
    message the client library could not decode arrives marked instead of
    ending the connection (see ``schemas/broker/frames.py``).
    """
    addresses = _addresses(urls)
    factory = FailoverTransportFactory(addresses, Rotation(len(addresses), rng or random.Random()))
    url = make_url(addresses[0], heartbeat=heartbeat_s)

    async def attempt() -> JitteredRobustConnection:
        connection = JitteredRobustConnection(
            url, client_properties={"connection_name": name}, transport_factory=factory
        )
        try:
            # Kept by aio-pika for every reconnect as well.
            await connection.connect(timeout=_HANDSHAKE_TIMEOUT_S)
        except BaseException:
            await connection.close()
            raise
        return connection

    connection = await _first_of(attempt, len(addresses))
    connection.reconnect_callbacks.add(_reset_backoff)
    return connection


async def open_connection(
    urls: str | Sequence[str], *, name: str, heartbeat_s: int | None = None
) -> aio_pika.abc.AbstractConnection:
    """A plain connection (no reconnects) for a command that ends with it.

    With several addresses it tries them in the order written, each once,
    and raises :class:`BrokerUnreachable` when none accepted a socket. Its
    frames are read through the guard like every llmq connection's.
    """
    addresses = _addresses(urls)
    factory = FailoverTransportFactory(addresses)
    url = (
        make_url(addresses[0])
        if heartbeat_s is None
        else make_url(addresses[0], heartbeat=heartbeat_s)
    )
    properties: FieldTable = {"connection_name": name}

    async def attempt() -> SafeConnection:
        connection = SafeConnection(url, client_properties=properties, transport_factory=factory)
        try:
            await connection.connect(timeout=_HANDSHAKE_TIMEOUT_S)
        except BaseException:
            await connection.close()
            raise
        return connection

    return await _first_of(attempt, len(addresses))


async def _first_of(attempt: Callable[[], Awaitable[_C]], nodes: int) -> _C:
    """The first connection ``attempt`` makes within one try per node.

    An attempt already tries every node that refuses a socket; another one
    is for a node that accepted the socket and then failed the handshake
    (starting, stopping, its virtual host down). A refused login is the same
    on every node: raised at once.
    """
    for left in range(nodes - 1, -1, -1):
        try:
            return await attempt()
        except (BrokerUnreachable, AuthenticationError, ProbableAuthenticationError):
            raise
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            if not left:
                raise
            log.warning("broker handshake failed (%s); trying the next node", type(exc).__name__)
            await asyncio.sleep(random.uniform(0, _NEXT_ATTEMPT_PAUSE_S))
    raise AssertionError("unreachable")  # pragma: no cover


def _addresses(urls: str | Sequence[str]) -> tuple[str, ...]:
    found = split_urls(urls) if isinstance(urls, str) else tuple(urls)
    if not found:
        raise ValueError("no broker address")
    return found


def _node_url(address: str) -> URL:
    """The address's URL as the socket needs it: with its port (aiormq's default if none)."""
    url = URL(address)
    return url if url.port else url.with_port(DEFAULT_PORTS.get(url.scheme, 5672))


def _reason(exc: OSError, timeout_s: float | None) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s" if timeout_s else "timed out"
    return exc.strerror or type(exc).__name__


def _name_node(connection: aio_pika.Connection) -> None:
    """Point the connection's URL at the node its socket reached: aio-pika names
    the connection by it in logs (the factory picks the node on every connect)."""
    factory = connection.kwargs.get("transport_factory")
    node = factory.node if isinstance(factory, FailoverTransportFactory) else None
    if node is not None and node.host is not None:
        connection.url = connection.url.with_host(node.host).with_port(node.port)


def _reset_backoff(connection: Any) -> None:
    connection._tries = 0
