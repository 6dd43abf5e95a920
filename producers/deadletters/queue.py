"""The dead-letter queue over AMQP: browse it in order-keeping windows, act, give back.

RabbitMQ has no way to read a quorum queue without taking the messages. So
every ``llmq dlq`` command *holds* the dead letters it looks at (delivered,
not acked) and gives back what it does not remove:

- It takes the queue in windows of at most ``window`` messages (one consumer,
  prefetch = window), as many windows as the queue held when the command
  started, so each message is seen once.
- After each window it gives back what it kept, in order, by publishing a
  copy to the tail of the queue (:mod:`producers.deadletters.copies`) and
  acking the original once the broker confirmed the copy. A requeue would
  count as a delivery (RabbitMQ 4.0–4.2), and past the delivery limit (20 by
  default since 4.0) the broker drops a message of a queue without a
  dead-letter exchange; a copy was never delivered. After the last window
  the queue is back in its original order, whatever the broker version.
- If the broker will not take a copy (the queue is full, a memory alarm
  blocks publishing, the publishing connection is gone), the rest of the
  command requeues instead (``nack``), once per letter: nothing is lost, the
  order may change.
- Removing happens only by ``ack``: after the confirm of the republish
  (replay) or at once (purge). If the command dies, its connection closes and
  the broker requeues everything still held: nothing is lost, the order may
  not be kept, and a letter whose copy was confirmed but whose original was
  not yet acked is there twice (same job id: ``show`` counts the copies,
  ``replay`` sends one, ``purge`` removes both).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from producers.client import broker_user
from producers.deadletters.copies import browse_copy
from producers.deadletters.letters import DeadLetter, Filter, read_letter
from schemas.broker.connection import open_connection
from schemas.broker.errors import BrokerFailure
from schemas.broker.publisher import Publisher
from schemas.broker_urls import node_of
from schemas.settings import Settings

__all__ = [
    "WINDOW",
    "Browse",
    "Confirm",
    "DeadQueue",
    "DlqError",
    "Held",
    "Selector",
    "browse",
    "now_ms",
]

WINDOW = 10_000
"""Dead letters held at once (a prefetch count: at most 65 535)."""
_IDLE_S = 0.5  # no delivery for this long: ask the broker whether the queue is empty
_TAKE_TIMEOUT_S = 30.0
_SETTLE_TIMEOUT_S = 2.0  # then someone else is consuming too: do not wait for them
_GIVE_BACK_TIMEOUT_S = 10.0  # a copy not confirmed by then: requeue from here on

Confirm = Callable[[int, int, bool], Awaitable[bool]]
"""``confirm(matched, total, complete)``: asked once, after the first window;
``complete`` says whether that window was the whole queue."""


class DlqError(Exception):
    """A dead-letter command could not run; ``str()`` is ready to print."""


@dataclass(slots=True)
class Held:
    """A dead letter delivered to us and not yet given back."""

    message: AbstractIncomingMessage
    letter: DeadLetter
    settled: bool = False


class DeadQueue:
    """The dead-letter queue of ``settings``: ``async with DeadQueue(settings) as dq``."""

    def __init__(self, settings: Settings, *, window: int = WINDOW) -> None:
        if not 1 <= window <= 65_535:
            raise ValueError("window must be between 1 and 65535 (a prefetch count)")
        self.settings = settings
        self.name = settings.topology.dead_queue
        self.total = 0
        """Ready messages when the command started: the length of one full cycle."""
        self._window = window
        self._connections: list[aio_pika.abc.AbstractConnection] = []
        self._strays: list[AbstractIncomingMessage] = []
        self._acked = 0
        self._copies: Publisher | None = None
        self._operator: str | None = None
        self.copied = 0
        """Dead letters given back as a confirmed copy at the tail."""
        self.requeued = 0
        """Dead letters given back by a requeue (the broker would not take a copy)."""

    async def __aenter__(self) -> DeadQueue:
        self._conn = await _connect(self.settings, "llmq-dlq")
        self._connections.append(self._conn)
        self._channel = await self._conn.channel(publisher_confirms=False)
        try:
            self._queue = await self._channel.declare_queue(self.name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            await self.close()
            raise DlqError(
                f"the dead-letter queue {self.name!r} does not exist; run `llmq topology apply`"
            ) from None
        self.total = self._queue.declaration_result.message_count or 0
        # Copies go out on a connection of their own: a broker alarm blocks
        # publishers, and must not stall the acks and nacks of what we hold.
        conn = await _connect(self.settings, "llmq-dlq-copies")
        self._connections.append(conn)
        self._copies = await Publisher.open(conn)
        self._operator = broker_user(self.settings.broker.addresses[0])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close; the broker requeues whatever is still held."""
        for conn in self._connections:
            with contextlib.suppress(Exception):
                await conn.close()
        self._connections.clear()

    async def windows(self) -> AsyncIterator[list[Held]]:
        """Hold the queue window by window, once round; requeue each window's rest in order."""
        seen = 0
        while seen < self.total:
            batch = await self._take(min(self._window, self.total - seen))
            if not batch:
                break  # someone else took them
            seen += len(batch)
            yield batch
            await self._give_back([h.message for h in batch if not h.settled])
        await self._settled(self.total - self._acked)

    async def _settled(self, expected: int) -> None:
        """Wait (briefly) until the queue counts what we gave back.

        Confirmed copies are counted at once, but the broker applies requeues
        a moment after the nack; a command started right after this one would
        otherwise count fewer messages, go round only part of the queue and
        rotate it.
        """
        give_up = time.monotonic() + _SETTLE_TIMEOUT_S
        while time.monotonic() < give_up:
            if await self._ready() >= expected:
                return
            await asyncio.sleep(0.02)

    async def _take(self, n: int) -> list[Held]:
        await self._channel.set_qos(prefetch_count=n)
        taken: list[AbstractIncomingMessage] = []
        full = asyncio.Event()
        open_ = True

        async def on_message(message: AbstractIncomingMessage) -> None:
            if not open_:
                self._strays.append(message)  # arrived after the cancel: give it back later
                return
            taken.append(message)
            if len(taken) >= n:
                full.set()

        tag = await self._queue.consume(on_message, no_ack=False)
        give_up = time.monotonic() + _TAKE_TIMEOUT_S
        try:
            while not full.is_set() and time.monotonic() < give_up:
                before = len(taken)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(full.wait(), _IDLE_S)
                if not full.is_set() and len(taken) == before and await self._ready() == 0:
                    break  # fewer than counted: another consumer took some
        finally:
            await self._queue.cancel(tag)
        for _ in range(3):  # deliveries read before the cancel-ok run their callbacks
            await asyncio.sleep(0)
        open_ = False
        return [Held(m, read_letter(m)) for m in taken]

    async def _ready(self) -> int:
        queue = await self._channel.declare_queue(self.name, passive=True)
        return queue.declaration_result.message_count or 0

    async def _give_back(self, messages: list[AbstractIncomingMessage]) -> None:
        """Give back, in order: a confirmed copy at the tail, then the original acked."""
        for message in [*messages, *self._strays]:
            if self._copies is not None:
                copy = browse_copy(message.body, message.properties, operator=self._operator)
                try:
                    await self._copies.publish(
                        copy,
                        exchange="",
                        routing_key=self.name,
                        timeout_s=_GIVE_BACK_TIMEOUT_S,
                        retry_lost=False,
                    )
                except BrokerFailure:
                    # Full, blocked or gone: the copy may still arrive (a
                    # duplicate, never a loss); requeue the rest of the way.
                    self._copies = None
                else:
                    await message.ack()
                    self.copied += 1
                    continue
            await message.nack(requeue=True)
            self.requeued += 1
            # The round trip keeps the returns in order (RabbitMQ 3.10 batches
            # back-to-back nacks and puts a batch back in hash order).
            await self._channel.set_qos(prefetch_count=1)
        self._strays.clear()

    async def ack(self, held: Held) -> None:
        """Remove a held dead letter for good."""
        await held.message.ack()
        held.settled = True
        self._acked += 1

    async def jobs_publisher(self) -> Publisher:
        """A confirming publisher to the jobs exchange, on a connection of its own.

        Publishing gets its own connection: a broker alarm blocks publishers,
        and must not stall the acks and nacks of what we hold.
        """
        conn = await _connect(self.settings, "llmq-dlq-replay")
        self._connections.append(conn)
        name = self.settings.topology.jobs_exchange
        try:
            channel = await conn.channel()
            await channel.get_exchange(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise DlqError(
                f"the jobs exchange {name!r} does not exist; run `llmq topology apply`"
            ) from None
        return await Publisher.open(conn)


async def _connect(settings: Settings, name: str) -> aio_pika.abc.AbstractConnection:
    urls = settings.broker.addresses
    try:
        # Frames read through the guard: a dead letter the client library could
        # not decode arrives marked instead of ending the connection (schemas/broker/frames.py).
        return await open_connection(urls, name=name, heartbeat_s=settings.broker.heartbeat_s)
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        # Never print the password: each node's host:port, and the virtual host.
        where = ", ".join(node_of(url) for url in urls) + (urlsplit(urls[0]).path or "/")
        raise DlqError(f"cannot reach the broker at {where}: {type(exc).__name__}") from None


# ---- browse ---------------------------------------------------------------


@dataclass(slots=True)
class Browse:
    """What ``list`` and ``show`` saw: the matches, in queue order."""

    total: int = 0
    scanned: int = 0
    matched: int = 0
    letters: list[DeadLetter] = field(default_factory=list)
    messages: list[AbstractIncomingMessage] = field(default_factory=list)
    """The matching messages themselves, when asked for (``show``)."""


async def browse(
    settings: Settings,
    flt: Filter,
    *,
    job_id: str | None = None,
    keep_messages: bool = False,
    window: int = WINDOW,
) -> Browse:
    """Look at every dead letter, give them all back in order; return the matches."""
    out = Browse()
    async with DeadQueue(settings, window=window) as dq:
        out.total = dq.total
        async for batch in dq.windows():
            now = now_ms()
            for held in batch:
                out.scanned += 1
                letter = held.letter
                if job_id is not None and letter.job_id != job_id:
                    continue
                if not flt.matches(letter, now):
                    continue
                out.matched += 1
                if flt.limit is None or len(out.letters) < flt.limit:
                    out.letters.append(letter)
                    if keep_messages:
                        out.messages.append(held.message)
    return out


class Selector:
    """Picks the dead letters a replay or purge acts on, and asks once before acting."""

    def __init__(self, flt: Filter, confirm: Confirm | None) -> None:
        self.flt = flt
        self.scanned = 0
        self.matched = 0
        self.acting = True
        self.cancelled = False
        self._confirm = confirm

    async def pick(self, batch: list[Held], total: int) -> list[Held]:
        """The matches of one window (within ``limit``); empty once cancelled or stopped."""
        now = now_ms()
        picked = []
        limit = self.flt.limit
        for held in batch:
            self.scanned += 1
            if not self.acting or (limit is not None and self.matched >= limit):
                continue  # keep going round: the queue's order comes back at the end
            if self.flt.matches(held.letter, now):
                self.matched += 1
                picked.append(held)
        if self._confirm is not None:
            confirm, self._confirm = self._confirm, None
            if not await confirm(self.matched, total, self.scanned >= total):
                self.cancelled, self.acting = True, False
                return []
        return picked


def now_ms() -> int:
    """Wall-clock time in Unix epoch ms (ages and deadlines are wall-clock)."""
    return int(time.time() * 1000)
