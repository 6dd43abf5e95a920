"""``llmq submit``'s engine: send jobs, pace them, and collect what became of each.

:func:`run_submit` sends chat-completion jobs read from the command line or a
JSONL file of OpenAI requests (:func:`producers.submit_jobs.read_jobs`). With ``wait`` it collects
the replies on a reply queue of its own; without, the replies go to
``reply_to``, which must already exist: a reply queue belongs to its reader
(docs/protocol.md, section 7), and a job whose reply cannot be delivered ends
in the dead-letter queue. The command (``producers.submit_command``) and the
OpenAI batch files (``producers.openai_batch``) are built on it.

A full work queue (the broker nacks: backpressure) pauses new jobs and
resends the refused one with the same id, a bounded number of times.

Every job ends with a record whose error code is one of the closed set
(:class:`schemas.errors.ErrorCode`); a job that got no reply from a worker
says why in ``error.reason`` (:data:`producers.submit_jobs.REASON_CODES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from producers.errors import Backpressure, DeadlineExceeded, PublishFailed, Unroutable
from producers.submit_jobs import (
    NOT_SENT,
    REASON_CODES,
    Ask,
    OutboundJob,
    SubmitError,
    SubmitSummary,
    failure_record,
    read_jobs,
)
from schemas.broker.connection import open_connection
from schemas.contract import SlaClass
from schemas.errors import ErrorCode
from schemas.settings import Settings

if TYPE_CHECKING:
    from producers.client import LlmqClient

__all__ = [
    "NOT_SENT",
    "REASON_CODES",
    "Ask",
    "OutboundJob",
    "SubmitError",
    "SubmitSummary",
    "failure_record",
    "quiet_client_exit",
    "read_jobs",
    "run_submit",
]

# Sends of one refused job: 0.2 s .. 5 s apart (jittered), about 12 s in all.
_BACKPRESSURE_TRIES = 8
_BACKPRESSURE_BASE_S = 0.2
_MAX_PENDING = 1000  # jobs published and not yet settled (confirmed, or answered with --wait)


class _QuietClientExit(logging.Filter):
    """Drop aiormq's warning that the broker cancelled the reply consumer.

    ``LlmqClient`` deletes its reply queue on exit, which the broker reports
    as a consumer cancel; printed at the end of every run, it would read like
    a failure.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "cancelled by the broker" not in record.getMessage()


@contextlib.contextmanager
def quiet_client_exit() -> Iterator[None]:
    """While a command runs ``LlmqClient``: no warning for its reply queue's end."""
    quiet = _QuietClientExit()
    logging.getLogger("aiormq.channel").addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger("aiormq.channel").removeFilter(quiet)


async def _check_reply_queue(settings: Settings, queue: str) -> None:
    import aiormq

    connection = await open_connection(settings.broker.addresses, name="llmq-submit-check")
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise SubmitError(
            f"reply queue {queue!r} does not exist: declare it first (it is the reader's"
            " queue), or use --wait"
        ) from None
    finally:
        await connection.close()


async def run_submit(
    settings: Settings,
    jobs: Iterator[tuple[int, dict[str, Any]]] | Iterator[OutboundJob],
    *,
    total: int,
    sla_class: str = SlaClass.INTERACTIVE.value,
    sla_ms: int | None = None,
    rate: float | None = None,
    wait: bool = False,
    reply_to: str | None = None,
    tenant: str | None = None,
    id_prefix: str | None = None,
    on_result: Callable[[int, str, dict[str, Any]], None] | None = None,
    on_progress: Callable[[SubmitSummary], None] | None = None,
    max_pending: int = _MAX_PENDING,
    backpressure_tries: int = _BACKPRESSURE_TRIES,
    backpressure_base_s: float = _BACKPRESSURE_BASE_S,
    ask: Ask | None = None,
    halt_on_unsent: bool = False,
) -> SubmitSummary:
    """Publish ``jobs`` and, with ``wait``, collect the replies.

    Args:
        settings: the broker and the topology names.
        jobs: (line number, OpenAI request) pairs, whose job ids are
            ``id_prefix`` + line number; or :class:`OutboundJob` with ids of their own.
        total: how many ``jobs`` yields (for progress).
        sla_class: the routing key, ``interactive`` or ``batch``.
        sla_ms: each job's latency budget; default: the class default.
        rate: at most this many jobs per second.
        wait: wait for each reply (by default on this command's own reply queue).
        reply_to: without ``wait``: the existing queue the replies go to.
        tenant: the ``tenant`` header.
        id_prefix: job ids of line-numbered jobs are ``id_prefix`` + line number.
        on_result: called with (line, job id, record) per job: the reply
            envelope, or with ``wait`` unset ``{"job_id", "line", "status": "submitted"}``,
            or a :func:`failure_record` for a job that got no reply.
        on_progress: called after each job settled.
        max_pending: jobs in flight at once (sent and not yet settled).
        backpressure_tries: publishes of one job into a full queue before giving up on it.
        backpressure_base_s: the first backoff after a nack; doubles, up to 5 s.
        ask: with ``wait``: how to send a job and get its reply (default:
            ``LlmqClient.call``, on the client's own reply queue).
        halt_on_unsent: once the broker did not take a job, send no more
            (each later job is reported not sent, for the same reason).

    Returns:
        The counts, error codes and latencies.
    """
    from producers.client import LlmqClient

    if sla_class not in settings.topology.classes:
        raise SubmitError(f"unknown SLA class {sla_class!r}")
    if not wait:
        if not reply_to:
            raise SubmitError("without --wait, --reply-to must name the queue for the replies")
        await _check_reply_queue(settings, reply_to)
    prefix = id_prefix or f"submit-{uuid.uuid4().hex[:8]}-"
    run = _Submission(
        summary=SubmitSummary(total=total),
        options={
            "sla_class": sla_class,
            "sla_ms": sla_ms,
            **({"tenant": tenant} if tenant else {}),
        },
        ask=(ask or _call) if wait else None,
        reply_to=reply_to,
        on_result=on_result or (lambda *_: None),
        on_progress=on_progress,
        backpressure=(backpressure_tries, backpressure_base_s),
        halt_on_unsent=halt_on_unsent,
    )
    default_sla = settings.topology.classes[sla_class].default_sla_ms
    outbound = (
        j if isinstance(j, OutboundJob) else OutboundJob(j[0], f"{prefix}{j[0]}", j[1])
        for j in jobs
    )
    async with LlmqClient(
        settings.broker.addresses,
        exchange=settings.topology.jobs_exchange,
        default_sla_ms=default_sla,
    ) as client:
        if on_progress is not None:
            on_progress(run.summary)  # connected and checked: show the bar from the start
        await run.all(client, outbound, interval=1 / rate if rate else 0.0, max_pending=max_pending)
    run.summary.elapsed_s = time.monotonic() - run.started
    return run.summary


async def _call(client: LlmqClient, job: OutboundJob, options: dict[str, Any]) -> dict[str, Any]:
    """Send a job on the client's own reply queue and wait for its reply."""
    return await client.call(job.body, job_id=job.job_id, **options, **job.options)


class _Submission:
    """One ``run_submit``: its jobs in flight, its pause after backpressure, its tally."""

    def __init__(
        self,
        *,
        summary: SubmitSummary,
        options: dict[str, Any],
        ask: Ask | None,
        reply_to: str | None,
        on_result: Callable[[int, str, dict[str, Any]], None],
        on_progress: Callable[[SubmitSummary], None] | None,
        backpressure: tuple[int, float],
        halt_on_unsent: bool,
    ) -> None:
        self.summary = summary
        self.options = options
        self.ask = ask
        self.reply_to = reply_to
        self.on_result = on_result
        self.on_progress = on_progress
        self.tries, self.base_s = backpressure
        self.halt_on_unsent = halt_on_unsent
        self.paused_until = 0.0
        self.stop: tuple[str, str] | None = None
        """Why no more jobs are sent: (reason, message)."""
        self.started = time.monotonic()

    async def all(
        self,
        client: LlmqClient,
        jobs: Iterator[OutboundJob],
        *,
        interval: float,
        max_pending: int,
    ) -> None:
        pending = asyncio.Semaphore(max_pending)
        tasks: set[asyncio.Task[None]] = set()
        try:
            for i, job in enumerate(jobs):
                if self.stop is not None:
                    self.not_sent(job, *self.stop)
                    continue
                await pending.acquire()
                # Even spacing from the start (not from the last job), so a slow
                # publish does not lower the rate; a backpressure pause comes first.
                delay = max(self.started + i * interval, self.paused_until) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self.stop is not None:  # decided while this one waited for its turn
                    pending.release()
                    self.not_sent(job, *self.stop)
                    continue
                task = asyncio.create_task(self.one(client, job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _: pending.release())
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            # Cancelled (Ctrl-C) or failed: the jobs in flight end with the run,
            # not as orphans that outlive its client.
            running = list(tasks)
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    def settle(self, job: OutboundJob, record: dict[str, Any]) -> None:
        self.on_result(job.line, job.job_id, record)
        if self.on_progress is not None:
            self.on_progress(self.summary)

    def not_sent(self, job: OutboundJob, reason: str, message: str) -> None:
        code = REASON_CODES[reason].value
        self.summary.not_submitted[code] = self.summary.not_submitted.get(code, 0) + 1
        self.settle(job, failure_record(job.job_id, reason, message))

    def refused(self, job: OutboundJob, reason: str, message: str) -> None:
        """The broker did not take ``job``; with ``halt_on_unsent`` (or when no
        queue is bound, which no resend fixes) no later job is sent either."""
        if self.stop is None and (self.halt_on_unsent or reason == "unroutable"):
            self.stop = (reason, f"not sent after an earlier job was refused: {message}")
        self.not_sent(job, reason, message)

    async def one(self, client: LlmqClient, job: OutboundJob) -> None:
        for attempt in range(self.tries):
            try:
                if self.ask is not None:
                    await self._answered(client, job, self.ask)
                else:
                    await client.submit(
                        job.body, reply_to=self.reply_to, job_id=job.job_id,
                        **self.options, **job.options,
                    )  # fmt: skip
                    self.summary.submitted += 1
                    self.settle(
                        job, {"job_id": job.job_id, "line": job.line, "status": "submitted"}
                    )
                return
            except Backpressure:
                # The queue is full: hold back every new job too, then resend this one.
                self.summary.backpressure += 1
                delay = min(5.0, self.base_s * 2**attempt) * random.uniform(0.5, 1.0)
                self.paused_until = max(self.paused_until, time.monotonic() + delay)
                if attempt + 1 < self.tries:
                    await asyncio.sleep(delay)
            except Unroutable as exc:
                self.refused(job, "unroutable", str(exc))
                return
            except PublishFailed as exc:
                self.refused(job, "publish_failed", str(exc))
                return
        self.refused(job, "backpressure", f"the {self.options['sla_class']} queue stayed full")

    async def _answered(self, client: LlmqClient, job: OutboundJob, ask: Ask) -> None:
        summary = self.summary
        t0 = time.monotonic()
        try:
            reply = await ask(client, job, self.options)
        except DeadlineExceeded as exc:
            summary.submitted += 1
            code = REASON_CODES["no_reply"].value
            summary.errors[code] = summary.errors.get(code, 0) + 1
            self.settle(job, failure_record(job.job_id, "no_reply", f"submitted, but {exc}"))
            return
        summary.submitted += 1
        summary.latencies_ms.append((time.monotonic() - t0) * 1000)
        if reply.get("status") == "ok":
            summary.ok += 1
        else:
            code = str((reply.get("error") or {}).get("code", ErrorCode.INTERNAL_ERROR.value))
            summary.errors[code] = summary.errors.get(code, 0) + 1
        self.settle(job, reply)
