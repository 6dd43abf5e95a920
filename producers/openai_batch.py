"""``llmq submit --openai-batch``: an OpenAI Batch API file through llmq, resumable.

Each request line becomes a job (:mod:`producers.batch_file` reads and writes
the files); :func:`producers.submit.run_submit` sends them, a bounded number
in flight, pausing on backpressure; the replies come back on the batch's own
reply queue and each is written to the output file as it arrives.

**Identity.** A batch is named by a key: a digest of this host, the output
file's path and the input file's bytes, or of ``--id-prefix`` when given.
Job ids are PREFIX + custom id (default prefix ``oai.<key>.``), so a rerun
sends a job again under the same id; the reply queue is
``llmq.reply.batch.<key>``: durable, deleted when the batch is complete, else
expiring after a day unused.

**Resume.** The output file is the memory: a rerun skips every line already
in it and appends the rest. Replies that arrived while no run was reading
(Ctrl-C, a crash, a lost connection) wait in the reply queue and are written
without sending their jobs again. A job sent but not answered is sent again
under its id; a worker answers a repeat of a request it just served (or is
serving) without calling an upstream twice. A reply is acknowledged only
after its line is flushed to the file, so none is lost between the two.

**Not taken.** A job the broker does not take (queue full for minutes,
broker unreachable, no queue for the class) is not written: the run stops
sending, and a rerun continues where it stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from producers.batch_file import (
    BatchInput,
    BatchLine,
    OutputFile,
    Tally,
    error_record,
    job_id_for,
    reply_record,
)
from producers.errors import DeadlineExceeded
from producers.submit import run_submit
from producers.submit_jobs import NOT_SENT, REASON_CODES, OutboundJob, SubmitSummary
from schemas.broker.connection import connect
from schemas.codec import decode_reply
from schemas.contract import JOB_ID_RE, JobKind, SlaClass
from schemas.errors import ErrorCode
from schemas.settings import Settings

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from producers.client import LlmqClient

__all__ = ["CUSTOM_ID_HEADER", "BatchRun", "batch_key", "default_prefix", "reply_queue"]

CUSTOM_ID_HEADER = "custom-id"
"""The job header that carries the line's custom id (also into dead letters)."""

_REPLY_QUEUE_EXPIRES_MS = 24 * 3600 * 1000
_REPLY_GRACE_S = 5.0
_BACKPRESSURE_TRIES = 60  # a full queue: wait about 4 minutes before stopping the run
_PREFETCH = 1000
_BACKLOG_WAIT_S = 30.0


def batch_key(batch: BatchInput, output: Path, id_prefix: str | None = None) -> str:
    """What names one batch: its job ids and its reply queue derive from it.

    The input's digest is always in it: a reply queue must not be guessable from
    a prefix alone (whoever names a reply queue can read its answers)."""
    where = id_prefix or f"{socket.gethostname()}\0{output.resolve()}"
    seed = f"{where}\0{batch.digest}"
    return hashlib.sha256(seed.encode()).hexdigest()[:16]


def default_prefix(key: str) -> str:
    return f"oai.{key[:10]}."


def reply_queue(key: str) -> str:
    return f"llmq.reply.batch.{key}"


@dataclass(slots=True)
class BatchSummary:
    """What one run did to a batch; ``before`` and ``now`` count output lines."""

    lines: int
    before: Tally
    now: Tally
    invalid: int = 0
    """Lines written with ``invalid_request`` because they were no request."""
    unsent: dict[str, int] = field(default_factory=dict)
    """Lines the broker did not take, by reason: left for a rerun."""
    stray: int = 0
    """Replies of no pending job (a finished line, another input version): dropped."""
    submit: SubmitSummary = field(default_factory=SubmitSummary)

    @property
    def complete(self) -> bool:
        return self.before.total + self.now.total >= self.lines

    @property
    def ok(self) -> bool:
        return self.complete and not self.before.errors and not self.now.errors


class BatchRun:
    """One run of ``llmq submit --openai-batch`` over an open output file."""

    def __init__(
        self,
        settings: Settings,
        batch: BatchInput,
        output: OutputFile,
        *,
        key: str,
        prefix: str,
        sla_class: str = SlaClass.BATCH.value,
        sla_ms: int | None = None,
        tenant: str | None = None,
        on_progress: Callable[[BatchSummary], None] | None = None,
    ) -> None:
        self.settings = settings
        self.output = output
        self.prefix = prefix
        self.queue = reply_queue(key)
        self.sla_class = sla_class
        self.sla_ms = sla_ms
        self.tenant = tenant
        self.on_progress = on_progress
        self.todo = [line for line in batch.lines if line.key not in output.done]
        self.jobs: dict[str, BatchLine] = {
            job_id_for(prefix, line.custom_id): line
            for line in self.todo
            if line.problem is None and line.custom_id is not None
        }
        self.summary = BatchSummary(len(batch.lines), output.before, output.now)
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._seen = 0  # replies taken from the queue
        self._progress = asyncio.Event()

    async def run(self, *, rate: float | None = None, max_pending: int = 1000) -> BatchSummary:
        """Write the lines that are no requests, then send the rest and write their replies."""
        for line in self.todo:
            if line.problem is not None:
                message = f"line {line.number}: {line.problem}"
                if self._write(line.key, error_record(line, ErrorCode.INVALID_REQUEST, message)):
                    self.summary.invalid += 1
        if not self.jobs:
            return self.summary
        async with self._replies():
            self.summary.submit = await self._send(rate, max_pending)
        return self.summary

    @contextlib.asynccontextmanager
    async def _replies(self) -> AsyncIterator[None]:
        """Consume the batch's reply queue; first write the replies already waiting
        in it (an earlier run's), so their jobs are not sent again."""
        url = self.settings.broker.addresses
        connection = await connect(url, name="llmq-submit-batch")
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=_PREFETCH)
            queue = await channel.declare_queue(
                self.queue, durable=True, arguments={"x-expires": _REPLY_QUEUE_EXPIRES_MS}
            )
            waiting = queue.declaration_result.message_count or 0
            tag = await queue.consume(self._on_reply)
            try:
                # Bounded: a reply not seen by then is written when it comes.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_BACKLOG_WAIT_S):
                        while self._seen < waiting:
                            self._progress.clear()
                            await self._progress.wait()
                yield
            finally:
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            if self.summary.complete:
                with contextlib.suppress(Exception):
                    await channel.queue_delete(self.queue)
        finally:
            await connection.close()

    async def _send(self, rate: float | None, max_pending: int) -> SubmitSummary:
        return await run_submit(
            self.settings,
            self._outbound(),
            total=len(self.jobs),
            sla_class=self.sla_class,
            sla_ms=self.sla_ms,
            rate=rate,
            wait=True,
            tenant=self.tenant,
            on_result=self._on_result,
            max_pending=max_pending,
            backpressure_tries=_BACKPRESSURE_TRIES,
            ask=self._ask,
            halt_on_unsent=True,
        )

    def _outbound(self) -> Iterator[OutboundJob]:
        """The jobs still to send, checked as late as possible: a reply already
        waiting in the queue may have finished a line since the run began."""
        for job_id, line in self.jobs.items():
            if line.key in self.output.done:
                continue
            assert line.custom_id is not None
            assert line.body is not None
            correlation = line.custom_id if JOB_ID_RE.match(line.custom_id) else job_id
            options = {
                "correlation_id": correlation,
                "headers": {CUSTOM_ID_HEADER: line.custom_id},
                "kind": line.kind or JobKind.CHAT,
            }
            yield OutboundJob(line.number, job_id, line.body, options)

    async def _ask(
        self, client: LlmqClient, job: OutboundJob, options: dict[str, Any]
    ) -> dict[str, Any]:
        """Send ``job`` with the batch's reply queue; the reply it gets (written by
        :meth:`_on_reply` already), or ``DeadlineExceeded`` after the SLA and a grace."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[job.job_id] = future
        sla_ms = (
            options.get("sla_ms") or self.settings.topology.classes[self.sla_class].default_sla_ms
        )
        wait_s = sla_ms / 1000 + _REPLY_GRACE_S
        try:
            await client.submit(
                job.body, reply_to=self.queue, job_id=job.job_id, **options, **job.options
            )
            return await asyncio.wait_for(future, wait_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no reply within {wait_s:.1f} s", job_id=job.job_id, reply={}
            ) from None
        finally:
            if self._waiting.get(job.job_id) is future:
                del self._waiting[job.job_id]

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        """Write a reply's line, wake its sender, then acknowledge it."""
        try:
            reply: dict[str, Any] | None = decode_reply(message.body)
        except (ValueError, orjson.JSONDecodeError):
            reply = None
        header_id = (message.headers or {}).get("job-id")
        job_id = str((reply or {}).get("job_id") or header_id or "")
        line = self.jobs.get(job_id)
        if line is None:
            self.summary.stray += 1
        else:
            reply = reply or _unreadable(job_id)
            if not self._write(line.key, reply_record(line, job_id, reply)):
                self.summary.stray += 1
            future = self._waiting.pop(job_id, None)
            if future is not None and not future.done():
                future.set_result(reply)
        await message.ack()
        self._seen += 1
        self._progress.set()

    def _on_result(self, _line: int, job_id: str, record: dict[str, Any]) -> None:
        """What ``run_submit`` settled: a reply (written already), no reply in
        time (written now), or a job the broker did not take (left for a rerun)."""
        line = self.jobs[job_id]
        error = record.get("error") or {}
        reason = error.get("reason")
        if reason in NOT_SENT:
            self.summary.unsent[reason] = self.summary.unsent.get(reason, 0) + 1
        elif reason in REASON_CODES:
            self._write(
                line.key, error_record(line, REASON_CODES[reason], str(error.get("message")))
            )
        else:
            self._write(line.key, reply_record(line, job_id, record))

    def _write(self, key: str | int, record: Mapping[str, Any]) -> bool:
        written = self.output.write(key, record)
        if written and self.on_progress is not None:
            self.on_progress(self.summary)
        return written


def _unreadable(job_id: str) -> dict[str, Any]:
    """The reply envelope standing in for one that could not be decoded."""
    error = {
        "code": ErrorCode.INTERNAL_ERROR.value,
        "message": "the worker's reply could not be read",
        "retriable": False,
    }
    return {"job_id": job_id, "status": "error", "response": None, "error": error}
