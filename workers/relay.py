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
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from schemas.broker.errors import Refused, Returned
from schemas.broker.ports import Confirming
from schemas.codec import Job
from schemas.stream import encode_part
from workers.amqp import reply_message
from workers.coalescer import Batch, CoalescePolicy, Coalescer
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
        (monotonic) passes; the upstream stream is closed on every path."""
        relayed = Relayed(run)
        wanted = _include_usage(job.body)
        coalescer: Coalescer[dict[str, Any]] = Coalescer(self.policy)
        try:
            for batch in self._take(coalescer, relayed, opened.first, wanted):
                await self._send(job, relayed, batch.chunks)
            while relayed.gone is None:
                now = self._clock()
                if now >= deadline:
                    raise UpstreamFailure(FailureKind.TIMEOUT, "the stream passed its deadline")
                read = asyncio.ensure_future(opened.rest.next(min(self._gap_s, deadline - now)))
                try:
                    chunks = await self._read(read, coalescer, job, relayed)
                finally:
                    if not read.done():
                        read.cancel()
                        with contextlib.suppress(BaseException):
                            await read
                if not chunks:
                    break
                for batch in self._take(coalescer, relayed, chunks, wanted):
                    await self._send(job, relayed, batch.chunks)
        except UpstreamFailure as failure:
            relayed.failure = failure
        finally:
            await opened.rest.aclose()
        relayed.tail = list(coalescer.finish().chunks)
        return relayed

    async def _read(
        self,
        read: asyncio.Future[list[Chunk]],
        coalescer: Coalescer[dict[str, Any]],
        job: Job,
        relayed: Relayed,
    ) -> list[Chunk]:
        """The next chunks; held chunks go when their time comes meanwhile."""
        while True:
            due = coalescer.deadline
            wait = None if due is None else max(0.0, due - self._clock())
            done, _ = await asyncio.wait({read}, timeout=wait)
            if done:
                return read.result()
            batch = coalescer.due(self._clock())
            if batch is not None and batch.chunks:
                await self._send(job, relayed, batch.chunks)
                if relayed.gone is not None:
                    return []

    def _take(
        self,
        coalescer: Coalescer[dict[str, Any]],
        relayed: Relayed,
        chunks: Sequence[Chunk],
        wanted: bool,
    ) -> list[Batch[dict[str, Any]]]:
        """Feed chunks to the coalescer; the batches it lets go now."""
        batches = []
        now = self._clock()
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
                batches.append(batch)
        return batches

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
