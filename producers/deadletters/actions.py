"""What ``llmq dlq replay`` and ``purge`` do to the dead letters they pick.

Replay is at-least-once: each dead letter is republished to the jobs exchange
with publisher confirms and ``mandatory``, and acked (removed from the
dead-letter queue) only after the broker confirmed the republish. Killed
between the two, the command leaves the job in both queues — a duplicate,
which callers drop by job id — never in neither.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, DeliveryMode

from producers.client import broker_user
from producers.deadletters.letters import Filter, replay_class, replay_headers, split_body
from producers.deadletters.queue import WINDOW, Confirm, DeadQueue, Selector, now_ms
from schemas.broker.errors import Refused, Returned
from schemas.broker.publisher import Outgoing, Publisher
from schemas.settings import Settings

__all__ = ["UNDECODABLE", "PurgeReport", "ReplayReport", "purge", "replay", "replay_message"]

_PUBLISH_TIMEOUT_S = 30.0
UNDECODABLE = "its AMQP properties could not be decoded (no job to rebuild)"
"""Why a replay leaves a dead letter whose properties could not be decoded where it is."""
_BACKPRESSURE_TRIES = 8  # a full work queue: back off 0.2 s .. 5 s (jittered), about 12 s in all


@dataclass(slots=True)
class ReplayReport:
    """How a replay went; ``done`` counts the matches settled one way or another."""

    total: int = 0
    scanned: int = 0
    matched: int = 0
    replayed: int = 0
    duplicates: int = 0
    """Extra copies of a job already replayed in this run: dropped, not sent twice."""
    failed: dict[str, int] = field(default_factory=dict)
    by_code: dict[str, int] = field(default_factory=dict)
    by_class: dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    cancelled: bool = False
    stopped: str | None = None
    """Why replaying stopped early (the rest stayed in the dead-letter queue)."""
    planned: list[dict[str, Any]] = field(default_factory=list)
    """With ``dry_run``: what would be replayed."""

    @property
    def done(self) -> int:
        return self.replayed + self.duplicates + sum(self.failed.values())


class _Pacer:
    """At most ``rate`` events per second, evenly spaced."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval


async def replay(
    settings: Settings,
    flt: Filter,
    *,
    rate: float | None = None,
    sla_ms: int | None = None,
    dry_run: bool = False,
    confirm: Confirm | None = None,
    progress: Callable[[ReplayReport], None] | None = None,
    window: int = WINDOW,
    backpressure_tries: int = _BACKPRESSURE_TRIES,
) -> ReplayReport:
    """Republish the matching dead letters as jobs; ack each only after its confirm.

    Args:
        settings: names the dead-letter queue, the jobs exchange and the classes.
        flt: which dead letters; ``flt.limit`` caps the replays.
        rate: at most this many republishes per second.
        sla_ms: the replays' latency budget; default: the original ``sla-ms``,
            else the class default.
        dry_run: pick and report, send and remove nothing.
        confirm: asked once, after the first window, before anything is sent.
        progress: called after each dead letter settled.
        window: dead letters held at once.
        backpressure_tries: publishes of one job into a full work queue before
            the replay stops (the rest stays dead-lettered).

    Returns:
        What happened, counted.
    """
    report = ReplayReport(dry_run=dry_run)
    classes = settings.topology.classes
    operator = broker_user(settings.broker.addresses[0])
    jobs_exchange = settings.topology.jobs_exchange
    pacer = _Pacer(rate)
    sent: set[str] = set()
    select = Selector(flt, confirm)
    async with DeadQueue(settings, window=window) as dq:
        report.total = dq.total
        publisher = None if dry_run else await dq.jobs_publisher()
        async for batch in dq.windows():
            picked = await select.pick(batch, dq.total)
            report.scanned, report.matched = select.scanned, select.matched
            for held in picked:
                if not select.acting:
                    break
                letter = held.letter
                target = replay_class(letter, classes)
                if publisher is None:
                    to = target if letter.undecodable is None else "(refused: undecodable)"
                    report.planned.append({**letter.row(now_ms()), "replay_to": to})
                    continue
                if letter.undecodable is not None:
                    # No id, reply_to or headers to rebuild a job from: it stays, the rest go on.
                    report.failed[UNDECODABLE] = report.failed.get(UNDECODABLE, 0) + 1
                elif letter.job_id is not None and letter.job_id in sent:
                    await dq.ack(held)
                    report.duplicates += 1
                else:
                    await pacer.wait()
                    message = replay_message(
                        held.message,
                        sla_ms=sla_ms,
                        default_sla_ms=classes[target].default_sla_ms,
                        user_id=operator,
                    )
                    failure = await _republish(
                        publisher, message, jobs_exchange, target, backpressure_tries
                    )
                    if failure is None:
                        await dq.ack(held)
                        report.replayed += 1
                        report.by_code[letter.code] = report.by_code.get(letter.code, 0) + 1
                        report.by_class[target] = report.by_class.get(target, 0) + 1
                        if letter.job_id is not None:
                            sent.add(letter.job_id)
                    else:
                        report.failed[failure] = report.failed.get(failure, 0) + 1
                        if failure == "backpressure":
                            select.acting = False
                            report.stopped = f"the {target} work queue stayed full"
                if progress is not None:
                    progress(report)
        report.scanned, report.matched = select.scanned, select.matched
        report.cancelled = select.cancelled
    return report


def replay_message(
    incoming: AbstractIncomingMessage,
    *,
    sla_ms: int | None,
    default_sla_ms: int,
    user_id: str | None = None,
) -> aio_pika.Message:
    """The job to republish for a dead letter: its body and ids, fresh headers.

    ``user_id`` is the operator's broker user: a worker that trusts it keeps the
    tenant the dead letter recorded (docs/security.md, "Tenants").
    """
    now = now_ms()
    body, _ = split_body(incoming.body, incoming.headers or {})
    return aio_pika.Message(
        body,
        user_id=user_id,
        headers=replay_headers(
            incoming.headers or {}, now_ms=now, sla_ms=sla_ms, default_sla_ms=default_sla_ms
        ),
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        delivery_mode=DeliveryMode.PERSISTENT,
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        message_id=incoming.message_id,
        timestamp=now // 1000,
        type=incoming.type,
        app_id=incoming.app_id,
    )


async def _republish(
    publisher: Publisher,
    message: aio_pika.Message,
    exchange: str,
    routing_key: str,
    tries: int,
) -> str | None:
    """Publish with confirm and ``mandatory``: None once the broker has it, else why not.

    A lost connection raises: the command stops and the broker takes back
    what it held, this dead letter included.
    """
    outgoing = Outgoing.of(message)
    for attempt in range(tries):
        try:
            await publisher.publish(
                outgoing,
                exchange=exchange,
                routing_key=routing_key,
                timeout_s=_PUBLISH_TIMEOUT_S,
                retry_lost=False,
            )
            return None
        except Returned:
            return "unroutable"
        except Refused:
            # The work queue is full (reject-publish): slow down, same message.
            if attempt + 1 < tries:
                await asyncio.sleep(min(5.0, 0.2 * 2**attempt) * random.uniform(0.5, 1.0))
    return "backpressure"


@dataclass(slots=True)
class PurgeReport:
    total: int = 0
    scanned: int = 0
    matched: int = 0
    deleted: int = 0
    cancelled: bool = False


async def purge(
    settings: Settings, flt: Filter, *, confirm: Confirm | None = None, window: int = WINDOW
) -> PurgeReport:
    """Delete (ack) the matching dead letters; everything else goes back, in order."""
    report = PurgeReport()
    select = Selector(flt, confirm)
    async with DeadQueue(settings, window=window) as dq:
        report.total = dq.total
        async for batch in dq.windows():
            for held in await select.pick(batch, dq.total):
                await dq.ack(held)
                report.deleted += 1
        report.scanned, report.matched = select.scanned, select.matched
        report.cancelled = select.cancelled
    return report
