"""Spend that survives restarts: the fleet's month kept in a RabbitMQ stream.

::

    worker A ─┐  snapshot every 5 state intervals (if changed)   ┌───────────────────────┐
    worker B ─┴─ and once more at stop, after the drain ───────▶ │ topology.spend_stream │
                 (each: every origin's G-counter, confirmed)     │ stream, newest ~8 MB  │
                                                                 └───────────┬───────────┘
    worker C starting: 1. publish a marker (confirmed)                       │
                       2. read from the first offset up to the marker ◀──────┘
                       3. merge each snapshot (max per origin), then consume jobs

A snapshot is :meth:`SpendLedger.snapshot <workers.routing.spend.SpendLedger.snapshot>`:
the month, every origin's cumulative spend per budget as this worker knows
it, and the alert marks. Merging takes the max per origin and budget, so a
snapshot read twice, or several that overlap (every worker's holds the
others' entries), counts each origin once: nothing is double counted.
Snapshots of another month are ignored, so a new month starts at zero and
old months cost nothing but the stream's retention.

What is guaranteed:

* every snapshot confirmed before a starting worker's marker is read before
  it consumes a job (the stream is one ordered log; the marker is confirmed
  only once it is written, after everything confirmed before it);
* a worker stopped gracefully (SIGTERM) leaves a confirmed snapshot taken
  after its drain: all it spent, and all it heard;
* a worker that crashes loses at most what it spent since its last snapshot
  (5 state intervals, 5 s by default), and none of it while a peer that
  heard it (within about an interval) snapshots later;
* without the stream, or without permission to read or write it, the
  worker logs a warning and keeps spend in memory and gossip: never a crash.

Without a marker (a worker that may read but not write) the read stops
after :data:`QUIET_S` without a message; with one, after :data:`STALL_S`
without progress, and always within :data:`READ_MAX_S`: a slower broker
may then leave older snapshots unread, and the worker says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pamqp.commands import Basic

from schemas.broker.errors import Returned
from schemas.broker.publisher import PERSISTENT, Outgoing, Publisher
from schemas.contract import CONTENT_TYPE
from workers.spend_limits import SpendLimits

__all__ = ["SNAPSHOT_EVERY", "SpendStore", "decode_snapshot", "encode_snapshot"]

log = logging.getLogger("llmq.worker")

SNAPSHOT_VERSION = 1
SNAPSHOT_EVERY = 5
"""A snapshot every this many state intervals (when the spend changed)."""
QUIET_S = 1.0
"""Without a marker: the read ends after this long without a message."""
STALL_S = 5.0
"""With a marker: the read gives up after this long without a message."""
READ_MAX_S = 30.0
"""The read ends within this, however it goes: a bound on a worker's start."""
_PUBLISH_TIMEOUT_S = 10.0
_PREFETCH = 64


def encode_snapshot(spend: dict[str, Any] | None, *, origin: str) -> bytes:
    """A stream message: ``spend`` (a ledger snapshot), or None for a marker."""
    return orjson.dumps(
        {"v": SNAPSHOT_VERSION, "origin": origin, "sent_at": round(time.time(), 3), "spend": spend}
    )


def decode_snapshot(body: bytes) -> dict[str, Any] | None:
    """The ledger snapshot in a stream message; None for a marker or anything unknown."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("v") != SNAPSHOT_VERSION:
        return None
    spend = data.get("spend")
    return spend if isinstance(spend, dict) else None


class SpendStore:
    """This worker's reads and writes of the spend stream; inert without budgets."""

    def __init__(self, stream: str, limits: SpendLimits, *, state_interval_s: float) -> None:
        self.stream = stream
        self.limits = limits
        self.interval_s = SNAPSHOT_EVERY * state_interval_s
        """Seconds between snapshots."""
        self.origin = limits.ledger.origin
        self.read = 0
        """Snapshots merged at start."""
        self.complete = False
        """Whether the start-up read reached its marker (every earlier snapshot read)."""
        self.saved = 0
        """Snapshots this worker wrote."""
        self._publisher: Publisher | None = None
        self._last: bytes | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._missing = False

    def __repr__(self) -> str:
        return f"<SpendStore {self.stream} read={self.read} saved={self.saved}>"

    async def start(
        self, publish: AbstractRobustConnection, consume: AbstractRobustConnection
    ) -> None:
        """Merge the stream's snapshots into the ledger, then snapshot periodically.

        Call before consuming jobs. Never raises for the broker's sake.
        """
        if not self.limits.enabled:
            return
        marker = await self._mark(publish)
        if self._missing:
            return
        try:
            async with asyncio.timeout(READ_MAX_S):
                await self._read(consume, marker)
        except Exception as exc:
            # Whatever was merged stays: each snapshot is a valid lower bound.
            log.warning(
                "spend stream %r not read (%s): the month's spend so far is what peers say",
                self.stream,
                type(exc).__name__ if str(exc) == "" else f"{type(exc).__name__}: {exc}",
            )
        if marker is not None and not self.complete:
            log.warning(
                "spend stream %r: read %d snapshots but not to the end; older spend may be missing",
                self.stream,
                self.read,
            )
        if self._publisher is not None:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Write a last snapshot (confirmed) unless nothing changed; stop writing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._publisher is None:
            return
        try:
            await self.save()
        except Exception as exc:
            log.warning("last spend snapshot not written: %s", type(exc).__name__)
        with contextlib.suppress(Exception):
            await self._publisher.close()
        self._publisher = None

    async def save(self) -> bool:
        """Publish a snapshot now, confirmed; False when it would repeat the last one."""
        assert self._publisher is not None
        spend = self.limits.snapshot()
        if spend is None:
            return False
        key = orjson.dumps(spend)
        if key == self._last:
            return False
        await self._publish(encode_snapshot(spend, origin=self.origin), uuid.uuid4().hex)
        self._last = key
        self.saved += 1
        return True

    async def _mark(self, publish: AbstractRobustConnection) -> str | None:
        """Open the writing channel and publish this start's marker; its message id,
        or None when this worker cannot write the stream (it will not try again)."""
        try:
            self._publisher = await Publisher.open(publish)
            marker = f"marker:{self.origin}:{uuid.uuid4().hex[:8]}"
            await self._publish(encode_snapshot(None, origin=self.origin), marker)
            return marker
        except Exception as exc:
            self._missing = isinstance(exc, Returned)
            log.warning(
                "%s spend stream %r (%s): spend is not kept across restarts"
                " (run `llmq topology apply`, or grant the worker the stream)",
                "no" if self._missing else "cannot write",
                self.stream,
                type(exc).__name__,
            )
            if self._publisher is not None:
                with contextlib.suppress(Exception):
                    await self._publisher.close()
                self._publisher = None
            return None

    async def _publish(self, body: bytes, message_id: str) -> None:
        assert self._publisher is not None
        properties = Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=message_id,
        )
        await self._publisher.publish(
            Outgoing(body, properties),
            exchange="",
            routing_key=self.stream,
            timeout_s=_PUBLISH_TIMEOUT_S,
            retry_lost=False,
        )

    async def _read(self, consume: AbstractRobustConnection, marker: str | None) -> None:
        """Merge every snapshot from the stream's first offset up to ``marker``."""
        loop = asyncio.get_running_loop()
        channel = await consume.channel()
        reached = asyncio.Event()
        last = loop.time()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal last
            last = loop.time()
            try:
                if marker is not None and message.message_id == marker:
                    reached.set()
                else:
                    spend = decode_snapshot(message.body)
                    if spend is not None:
                        self.limits.heard(spend)
                        self.read += 1
            finally:
                await message.ack()  # a stream consumer's credit, not a removal

        try:
            await channel.set_qos(prefetch_count=_PREFETCH)
            queue = await channel.get_queue(self.stream, ensure=True)
            tag = await queue.consume(
                on_message, no_ack=False, arguments={"x-stream-offset": "first"}
            )
            idle = QUIET_S if marker is None else STALL_S
            while not reached.is_set() and loop.time() - last < idle:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reached.wait(), timeout=min(0.1, idle))
            self.complete = reached.is_set()
            await queue.cancel(tag)
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):
                    await channel.close()
        log.info(
            "spend stream %r: %d snapshots merged%s",
            self.stream,
            self.read,
            "" if marker is None else " (read to this start's marker)",
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.save()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next snapshot supersedes a lost one
                (log.debug if self._failing else log.warning)(
                    "spend snapshot not written: %s", type(exc).__name__
                )
                self._failing = True
            else:
                self._failing = False
