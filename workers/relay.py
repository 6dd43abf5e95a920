"""Carry one streamed answer from the upstream to the caller, part by part.

After the dispatcher's attempt reached its first token, the relay reads the
rest of the upstream stream, lets the :class:`~workers.coalescer.Coalescer`
decide when chunks go, and publishes each batch as one part
(:mod:`schemas.stream`) to the job's ``reply_to``, in order, each confirmed
by the broker before the next. It returns what happened as data
(:class:`Relayed`); the worker turns that into the stream's last part, which
:meth:`Deliveries.settle` publishes like any reply (and dead-letters when the
stream broke off).

The relay owns the upstream stream: it reads it to the end or closes it, on
every path. How a stream can end:

=====================================  =======================================
what happened                          :class:`Relayed`
=====================================  =======================================
the upstream finished                  ``failure`` None; ``tail`` for the last part
the upstream failed or went silent     ``failure`` (the upstream's, or a timeout)
the job's deadline passed              ``failure`` (timeout)
the caller's queue is gone or full     ``gone``: the caller stopped listening;
                                       the upstream call is dropped at once
the broker failed                      :class:`BrokerFailure` propagates: the
                                       job is requeued and served again
=====================================  =======================================
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.broker.errors import Refused, Returned
from schemas.broker.ports import Confirming
from schemas.codec import Job
from schemas.stream import encode_part
from workers.amqp import reply_message
from workers.coalescer import CoalescePolicy, Coalescer
from workers.errors import UpstreamFailure
from workers.providers.chunks import Chunk
from workers.routing import FailureKind
from workers.upstream_streams import Opened

__all__ = ["Relayed", "StreamRelay"]


@dataclass(slots=True)
class Relayed:
    """How a relayed stream ended; the last part is built from it."""

    run: str
    seq: int = 0
    """Parts published so far; the last part takes this number."""
    tokens: int = 0
    """Chunks with a token that reached the upstream reader (the bill's fallback)."""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    tail: list[dict[str, Any]] = field(default_factory=list)
    """Chunks held back for the last part."""
    failure: UpstreamFailure | None = None
    gone: str | None = None
    """Why the caller's queue took no more parts, if it did not."""
    first_part_at: float | None = None
    """Monotonic time the first part was confirmed."""


class StreamRelay:
    """Relays streams for one worker: the publisher, the coalescing policy, a clock."""

    def __init__(
        self,
        publisher: Callable[[], Confirming | None],
        policy: CoalescePolicy,
        *,
        gap_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publisher = publisher
        self.policy = policy
        self._gap_s = gap_s
        self._clock = clock

    async def relay(self, job: Job, opened: Opened, *, run: str, deadline: float) -> Relayed:
        """Relay ``opened`` to ``job.reply_to`` until it ends, fails or ``deadline``
        (monotonic) passes; the upstream stream is closed on every path, and every
        part is confirmed before this returns."""
        relayed = Relayed(run)
        wanted = _include_usage(job.body)
        coalescer: Coalescer[dict[str, Any]] = Coalescer(self.policy)
        sender = _Sender(lambda chunks: self._send(job, relayed, chunks), self.policy.max_bytes)
        timer = _Timer(coalescer, sender, self._clock)
        try:
            try:
                chunks = opened.first
                while True:
                    now = self._clock()
                    self._take(coalescer, sender, relayed, chunks, wanted, now)
                    timer.arm()
                    sender.check()
                    if relayed.gone is not None:
                        break
                    if now >= deadline:
                        raise UpstreamFailure(FailureKind.TIMEOUT, "the stream passed its deadline")
                    # Held chunks go on the timer meanwhile: the read is never interrupted.
                    chunks = await opened.rest.next(min(self._gap_s, deadline - now))
                    if not chunks:
                        break
            except UpstreamFailure as failure:
                relayed.failure = failure
            finally:
                timer.cancel()
                await opened.rest.aclose()
            relayed.tail = list(coalescer.finish().chunks)
            await sender.close()  # every part out before the last one goes
        finally:
            await sender.abort()
        return relayed

    @staticmethod
    def _take(
        coalescer: Coalescer[dict[str, Any]],
        sender: _Sender,
        relayed: Relayed,
        chunks: Sequence[Chunk],
        wanted: bool,
        now: float,
    ) -> None:
        """Feed chunks arrived at ``now`` to the coalescer; what it lets go, to the sender."""
        for chunk in chunks:
            relayed.tokens += chunk.tokens
            if chunk.finish_reason is not None:
                relayed.finish_reason = chunk.finish_reason
            if chunk.usage is not None:
                relayed.usage = chunk.usage
                if chunk.usage_only and not wanted:
                    continue  # asked for by the worker (for the bill), not by the caller
            batch = coalescer.add(chunk.body, now, tokens=chunk.tokens, size=chunk.size)
            if batch is not None and batch.chunks:
                sender.put(batch.chunks, batch.size)

    async def _send(self, job: Job, relayed: Relayed, chunks: Sequence[dict[str, Any]]) -> None:
        if relayed.gone is not None:
            return
        publisher = self._publisher()
        assert publisher is not None, "relay before the publisher is attached"
        body = encode_part(job.job_id, relayed.run, relayed.seq, chunks)
        message = reply_message(
            body,
            correlation_id=job.correlation_id,
            job_id=job.job_id,
            traceparent=job.traceparent,
        )
        assert job.reply_to is not None
        try:
            await publisher.publish(message, exchange="", routing_key=job.reply_to)
        except Returned:
            relayed.gone = "the stream's reply queue does not exist (the caller left)"
            return
        except Refused:
            relayed.gone = "the stream's reply queue refused a part (full)"
            return
        relayed.seq += 1
        if relayed.first_part_at is None:
            relayed.first_part_at = self._clock()


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


class _Sender:
    """Publishes one stream's parts in order, one at a time, each confirmed,
    without holding up the reading: batches handed over while a confirm is
    outstanding go together in the next part (a slow broker means fewer,
    larger parts, not a stalled upstream read), as many as fit in
    ``max_bytes``: a part never outgrows the broker's message size however
    long the broker stalls."""

    def __init__(
        self, publish: Callable[[list[dict[str, Any]]], Awaitable[None]], max_bytes: int
    ) -> None:
        self._publish = publish
        self._max_bytes = max_bytes
        self._held: collections.deque[tuple[Sequence[dict[str, Any]], int]] = collections.deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._task = asyncio.create_task(self._run())

    def put(self, chunks: Sequence[dict[str, Any]], size: int = 0) -> None:
        self._held.append((chunks, size))
        self._wake.set()

    def _next_part(self) -> list[dict[str, Any]]:
        """The held batches at the front that fit in one part (at least one)."""
        chunks, size = self._held.popleft()
        part = list(chunks)
        while self._held and size + self._held[0][1] <= self._max_bytes:
            more, more_size = self._held.popleft()
            part += more
            size += more_size
        return part

    def check(self) -> None:
        """Raise the sender's failure (the broker's), if it failed."""
        if self._task.done() and not self._task.cancelled():
            error = self._task.exception()
            if error is not None:
                raise error

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._held:
                await self._publish(self._next_part())
            if self._closing:
                return

    async def close(self) -> None:
        """Publish what is held, then end; the broker's failure propagates."""
        self._closing = True
        self._wake.set()
        await self._task

    async def abort(self) -> None:
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _Timer:
    """Lets a held batch go when its time comes, from a loop timer: the relay's
    read of the upstream is never interrupted for it (no task per read)."""

    def __init__(
        self, coalescer: Coalescer[dict[str, Any]], sender: _Sender, clock: Callable[[], float]
    ) -> None:
        self._coalescer = coalescer
        self._sender = sender
        self._clock = clock
        self._handle: asyncio.TimerHandle | None = None
        self._at: float | None = None

    def arm(self) -> None:
        """Set the timer for the held batch's deadline, if it is not set for it yet."""
        due = self._coalescer.deadline
        if due == self._at:
            return
        self.cancel()
        if due is not None:
            self._at = due
            delay = max(0.0, due - self._clock())
            self._handle = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = self._at = None
        batch = self._coalescer.due(self._clock())
        if batch is not None and batch.chunks:
            self._sender.put(batch.chunks, batch.size)
        self.arm()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._at = None
