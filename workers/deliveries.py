"""The worker shell's half that settles deliveries: each one exactly once.

Per delivery: :class:`~workers.intake.Intake` decides what it is, the
worker's ``route`` serves an admitted job, and :meth:`Deliveries.settle`
carries out the core's :func:`~workers.routing.disposition`: the reply and
the dead-letter copy, each confirmed by the broker, and only then the ack.
If the broker takes neither, the delivery is requeued (at-least-once).

It needs of the broker only a :class:`~schemas.broker.ports.Confirming`
publisher and :class:`~schemas.broker.ports.Incoming` messages, so the
tests run it on :mod:`schemas.broker.memory` in milliseconds.

======================================  =========================================
what happened                           what the delivery gets
======================================  =========================================
served or failed with a code            reply and/or dead letter, then ack
reply queue gone or full                dead letter carrying the reply, then ack
broker took neither                     requeue (reject); the delivery comes back
same request again, answered recently   the cached reply (``duplicate``)
same request again, still running       joins it: one upstream call, two replies
cancelled (shutdown, lost connection)   requeue (nack), unanswered
a bug (any other exception)             requeue (reject); on the last permitted
                                        delivery internal_error, reply and dead letter
======================================  =========================================

A requeue for a failure is a ``reject``: every RabbitMQ version counts it
toward the work queue's delivery limit, which ends a job that keeps failing
in the dead-letter queue. RabbitMQ 4.3 no longer counts a ``nack``, so a job
nacked on every failure would go round for ever; a shutdown's requeue stays
a ``nack``, which is not the job's fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiormq

from schemas.broker.errors import BrokerFailure, Refused, Returned
from schemas.broker.ports import Confirming, Incoming
from schemas.codec import Job
from schemas.contract import DEAD_HEADERS, HEADERS
from schemas.errors import ErrorCode
from workers.amqp import dead_letter_message, minimal_dead_letter, reply_message
from workers.events import Event, JobDone
from workers.intake import Intake, fingerprint
from workers.outcome import Outcome, Route, failure, seconds
from workers.routing import Disposition, disposition

__all__ = ["Deliveries", "WorkerStats"]

log = logging.getLogger("llmq.worker")

_RECENT_REPLIES = 10_000
_TENANT = frozenset({HEADERS.TENANT})


@dataclass(slots=True)
class WorkerStats:
    """Counters since start; ``repr`` is the worker's health line."""

    ok: int = 0
    errors: int = 0
    dead_letters: int = 0
    requeued: int = 0
    duplicates: int = 0
    reconnects: int = 0
    in_flight: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


class Deliveries:
    """Owns every delivery from arrival to ack or requeue, and the tasks serving them."""

    def __init__(
        self,
        intake: Intake,
        route: Route,
        *,
        name: str,
        dead_exchange: str,
        delivery_limit: int,
        hook: Callable[[Event], None],
        stats: WorkerStats | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.intake = intake
        self.route = route
        self.name = name
        self.publisher: Confirming | None = None
        self.stats = stats if stats is not None else WorkerStats()
        self._dead_exchange = dead_exchange
        self._delivery_limit = delivery_limit
        self._hook = hook
        self._clock = clock
        self._tasks: set[asyncio.Task[None]] = set()
        self._recent: OrderedDict[tuple[str, int, bytes], bytes] = OrderedDict()
        self._inflight: dict[tuple[str, int, bytes], asyncio.Future[Outcome]] = {}

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    async def on_message(self, message: Incoming) -> None:
        # A task of our own, not the consumer's (aiormq cancels that one when
        # the consuming channel closes): a job in flight outlives a lost
        # connection, so its redelivery joins it instead of paying the upstream twice.
        task = asyncio.create_task(self.process(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, grace_s: float) -> None:
        """Let the deliveries in flight finish within ``grace_s``; cancel (requeue) the rest."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)

    async def process(self, message: Incoming) -> None:
        self.stats.in_flight += 1
        try:
            outcome = await self.serve(message)
            await self.settle(message, outcome)
        except asyncio.CancelledError:
            # Shutdown or lost connection: give the job back, unanswered.
            await self.requeue(message)
            raise
        except BrokerFailure as exc:
            log.warning("job %s not settled (%s); requeueing", message.message_id, exc)
            await self.requeue(message, failed=True)
        except Exception:
            log.exception("job %s: unexpected error", message.message_id)
            await self.crashed(message)
        finally:
            self.stats.in_flight -= 1

    async def serve(self, message: Incoming) -> Outcome:
        now_ms = int(self._clock() * 1000)
        job = self.intake.admit(message, now_ms)
        if isinstance(job, Outcome):
            return job
        # A cached or running answer is shared only with the same request: same
        # body, reply queue, broker user and tenant. Another request that reuses
        # a known job id runs on its own and never sees the first one's answer.
        key = (job.job_id, job.replay_count, fingerprint(message.body, job))
        cached = self._recent.get(key)
        if cached is not None:
            self.stats.duplicates += 1
            return Outcome(job.job_id, cached, job=job, duplicate=True, reply_to=job.reply_to)
        original = self._inflight.get(key)
        if original is not None:
            # A redelivery (lost ack, reconnect) of a job this worker is still
            # serving: share its outcome instead of paying the upstream twice.
            self.stats.duplicates += 1
            await asyncio.wait({original})
            if not original.cancelled() and original.exception() is None:
                return replace(original.result(), duplicate=True)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            outcome = await self.route(job, now_ms)
        except BaseException:
            future.cancel()
            raise
        finally:
            if self._inflight.get(key) is future:
                del self._inflight[key]
        if outcome.code is None and not job.stream:
            # A stream's outcome is its last part only: a repeat runs again instead.
            self._remember(key, outcome.reply)
        future.set_result(outcome)
        return outcome

    def _remember(self, key: tuple[str, int, bytes], body: bytes) -> None:
        # A copy: orjson's result keeps a ~4 KB allocation whatever its length,
        # which would make this cache ~8x larger than its contents.
        self._recent[key] = bytes(memoryview(body))
        if len(self._recent) > _RECENT_REPLIES:
            self._recent.popitem(last=False)

    async def settle(self, message: Incoming, outcome: Outcome) -> None:
        """Carry out the core's disposition: reply, dead letter, then ack, each confirmed."""
        publisher = self.publisher
        assert publisher is not None, "settle before the publisher is attached"
        plan = disposition(outcome.code, has_reply_to=outcome.reply_to is not None)
        extra: dict[str, Any] = {}
        undelivered: bytes | None = None
        job = outcome.job
        if plan.reply and outcome.reply_to:
            reply = reply_message(
                outcome.reply,
                correlation_id=message.correlation_id or message.message_id,
                job_id=outcome.job_id,
                traceparent=None if job is None else job.traceparent,
            )
            try:
                await publisher.publish(reply, exchange="", routing_key=outcome.reply_to)
            except (Returned, Refused) as exc:
                # The caller's queue is gone or full: keep the answer in the dead
                # letter rather than requeue the job into the same wall.
                plan = disposition(outcome.code, has_reply_to=True, reply_unroutable=True)
                why = "does not exist" if isinstance(exc, Returned) else "refused it (full)"
                extra = {DEAD_HEADERS.REPLY_ERROR: f"reply_to queue {why}"}
                undelivered = outcome.reply
        if plan.dead_letter:
            assert plan.code is not None
            reason = outcome.message or "the reply could not be delivered"
            await self.dead_letter(
                message, plan.code, reason, outcome.attempts, extra, undelivered, job
            )
        try:
            await message.ack()
        except (
            aiormq.exceptions.AMQPError,
            aiormq.exceptions.ChannelInvalidStateError,
            ConnectionError,
        ) as exc:
            # The channel died after the reply was confirmed: the broker will
            # redeliver the job and the caller may see the reply twice.
            raise BrokerFailure(f"ack lost ({type(exc).__name__})") from None
        self._count(message, outcome, plan)

    def _count(self, message: Incoming, outcome: Outcome, plan: Disposition) -> None:
        if outcome.code is None:
            self.stats.ok += 1
        else:
            self.stats.errors += 1
            name = outcome.code.value
            self.stats.by_code[name] = self.stats.by_code.get(name, 0) + 1
        routing, job = outcome.routing, outcome.job
        self._hook(
            JobDone(
                job_id=outcome.job_id,
                sla_class=message.routing_key or "",
                code=plan.code if plan.dead_letter else outcome.code,
                dead_lettered=plan.dead_letter,
                model=None if routing is None else routing.model,
                endpoint=None if routing is None else routing.endpoint,
                tenant=None if job is None else job.tenant,
                attempts=outcome.attempts,
                queue_s=None if routing is None else seconds(routing.queue_ms),
                total_s=None if routing is None else seconds(routing.total_ms),
                duplicate=outcome.duplicate,
            )
        )

    async def dead_letter(
        self,
        message: Incoming,
        code: ErrorCode,
        error: str,
        attempts: int,
        extra: dict[str, Any],
        reply: bytes | None = None,
        job: Job | None = None,
    ) -> None:
        """Publish the dead letter; if the broker will not take it, a minimal one.

        The rule that keeps this from looping: the full copy (bounded headers),
        then once the copy without the job's own headers and the reply; if that
        fails too, :class:`BrokerFailure` requeues the job, and its delivery
        limit ends it in the broker's own dead-lettering.
        """
        publisher = self.publisher
        assert publisher is not None
        headers = {
            DEAD_HEADERS.ERROR_CODE: code.value,
            DEAD_HEADERS.ERROR: error[:1000],
            DEAD_HEADERS.ATTEMPTS: attempts,
            DEAD_HEADERS.FAILED_AT: int(self._clock() * 1000),
            DEAD_HEADERS.WORKER: self.name[:255],
            DEAD_HEADERS.SLA_CLASS: (message.routing_key or "")[:255],
            **extra,
        }
        omit: frozenset[str] = frozenset()
        if job is not None:
            # The tenant the job was billed to, not the one it claimed: a replay by
            # a trusted operator then bills the same tenant again.
            if job.tenant is None:
                omit = _TENANT
            else:
                headers[HEADERS.TENANT] = job.tenant
        exchange = self._dead_exchange
        key = (message.routing_key or "")[:255]
        try:
            letter = dead_letter_message(
                message, headers, reply=reply, frame_max=publisher.frame_max, omit=omit
            )
            await publisher.publish(letter, exchange=exchange, routing_key=key)
        except BrokerFailure as exc:
            log.warning(
                "job %s: dead letter refused (%s); sending a minimal one", message.message_id, exc
            )
            await publisher.publish(
                minimal_dead_letter(message, headers), exchange=exchange, routing_key=key
            )
        self.stats.dead_letters += 1

    async def requeue(self, message: Incoming, *, failed: bool = False) -> None:
        """Give the delivery back; ``failed`` counts it toward the delivery limit."""
        self.stats.requeued += 1
        with contextlib.suppress(Exception):
            if failed:
                await message.reject(requeue=True)
            else:
                await message.nack(requeue=True)

    async def crashed(self, message: Incoming) -> None:
        """A bug hit this job: requeue it, or on its last permitted delivery end it here.

        The broker dead-letters a job after ``delivery-limit`` redeliveries, but
        sends no reply; answering on the last delivery keeps callers from waiting.
        """
        count = (message.headers or {}).get("x-delivery-count", 0)
        if isinstance(count, int) and count >= self._delivery_limit:
            outcome = failure(
                message.message_id,
                ErrorCode.INTERNAL_ERROR,
                f"the worker failed on this job {count + 1} times",
                reply_to=self.intake.reply_queue(message.reply_to),
            )
            with contextlib.suppress(Exception):
                await self.settle(message, outcome)
                return
        await self.requeue(message, failed=True)
