"""``llmq submit``: send chat-completion jobs from the command line.

One job from flags (``--model m --message "hi"``) or many from a JSONL file of
OpenAI requests (``--file jobs.jsonl``, one request per line). With ``--wait``
the command collects the replies on a reply queue of its own and writes one
JSON line per job (the reply envelope) to ``--out`` or stdout.

Without ``--wait`` the replies go to ``--reply-to QUEUE``, which must already
exist: a reply queue belongs to its reader (docs/protocol.md, section 7), and
a job whose reply cannot be delivered ends in the dead-letter queue. The
command checks the queue before sending anything; it never declares one,
because a queue made on a reader's behalf with the wrong arguments would
break that reader's own declaration.

Job ids are ``<id-prefix><line number>``, so every reply maps back to its line.
A full work queue (the broker nacks: backpressure) pauses new jobs and
resends the refused one with the same id, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from producers.errors import Backpressure, DeadlineExceeded, PublishFailed, Unroutable
from producers.quantiles import nearest_rank
from schemas.broker.connection import open_connection
from schemas.contract import SCHEMA_VERSION, SlaClass
from schemas.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from producers.client import LlmqClient

__all__ = ["SubmitError", "SubmitSummary", "read_jobs", "run_submit", "submit_command"]

# Sends of one refused job: 0.2 s .. 5 s apart (jittered), about 12 s in all.
_BACKPRESSURE_TRIES = 8
_BACKPRESSURE_BASE_S = 0.2
_MAX_PENDING = 1000  # jobs published and not yet settled (confirmed, or answered with --wait)
_MAX_BAD_LINES = 5


class _QuietClientExit(logging.Filter):
    """Drop aiormq's warning that the broker cancelled the reply consumer.

    ``LlmqClient`` deletes its reply queue on exit, which the broker reports
    as a consumer cancel; printed at the end of every run, it would read like
    a failure.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "cancelled by the broker" not in record.getMessage()


class SubmitError(Exception):
    """The jobs could not be sent; ``str()`` is ready to print."""


@dataclass(slots=True)
class SubmitSummary:
    """What happened to the jobs of one ``llmq submit``."""

    total: int = 0
    submitted: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Error replies by code; ``no_reply`` when none came in time."""
    not_submitted: dict[str, int] = field(default_factory=dict)
    backpressure: int = 0
    """Broker nacks (queue full) that made us wait and resend."""
    latencies_ms: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    def percentile(self, q: float) -> float | None:
        return nearest_rank(self.latencies_ms, q)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "submitted": self.submitted,
            "ok": self.ok,
            "errors": dict(self.errors),
            "not_submitted": dict(self.not_submitted),
            "backpressure": self.backpressure,
            "p50_ms": self.percentile(0.5),
            "p99_ms": self.percentile(0.99),
            "elapsed_s": round(self.elapsed_s, 3),
        }


def read_jobs(
    path: Path, defaults: dict[str, Any]
) -> tuple[int, Callable[[], Iterator[tuple[int, dict[str, Any]]]]]:
    """Check a JSONL file of OpenAI requests; return its job count and a reader.

    The whole file is checked before anything is sent, so a typo on line
    9 000 does not leave 8 999 jobs sent and the rest not. ``defaults`` fill
    fields a line leaves out (``model``, ``max_tokens``, ``temperature``).
    Blank lines are skipped; job ids keep the file's line numbers.
    """
    count, bad = 0, []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                _parse_line(number, raw, defaults)
                count += 1
            except ValueError as exc:
                bad.append(str(exc))
                if len(bad) >= _MAX_BAD_LINES:
                    break
    if bad:
        raise SubmitError(f"{path}: " + "; ".join(bad) + " — nothing was sent")
    if count == 0:
        raise SubmitError(f"{path}: no jobs in the file")

    def jobs() -> Iterator[tuple[int, dict[str, Any]]]:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    yield number, _parse_line(number, raw, defaults)

    return count, jobs


def _parse_line(number: int, raw: bytes, defaults: dict[str, Any]) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"line {number}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"line {number}: not a JSON object")
    for key, value in defaults.items():
        data.setdefault(key, value)
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise ValueError(f"line {number}: no model (add one, or give --model)")
    if not isinstance(data.get("messages"), list) or not data["messages"]:
        raise ValueError(f"line {number}: messages must be a non-empty list")
    return data


def _failure(job_id: str, code: str, message: str, *, retriable: bool) -> dict[str, Any]:
    """A reply-shaped record for a job that got no reply from a worker."""
    return {
        "schema_version": SCHEMA_VERSION,
        "job_id": job_id,
        "status": "error",
        "response": None,
        "error": {"code": code, "message": message, "retriable": retriable},
        "routing": {},
    }


async def _check_reply_queue(settings: Settings, queue: str) -> None:
    import aiormq

    connection = await open_connection(
        settings.broker.url.get_secret_value(), name="llmq-submit-check"
    )
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
    jobs: Iterator[tuple[int, dict[str, Any]]],
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
) -> SubmitSummary:
    """Publish ``jobs`` (line number, OpenAI request) and, with ``wait``, collect the replies.

    Args:
        settings: the broker and the topology names.
        jobs: the requests, each with the line number that names its job id.
        total: how many ``jobs`` yields (for progress).
        sla_class: the routing key, ``interactive`` or ``batch``.
        sla_ms: each job's latency budget; default: the class default.
        rate: at most this many jobs per second.
        wait: wait for each reply on this command's own reply queue.
        reply_to: without ``wait``: the existing queue the replies go to.
        tenant: the ``tenant`` header.
        id_prefix: job ids are ``id_prefix`` + line number.
        on_result: called with (line, job id, record) per job: the reply
            envelope, or with ``wait`` unset ``{"job_id", "line", "status": "submitted"}``,
            or a reply-shaped error record for a job that got none.
        on_progress: called after each job settled.
        max_pending: jobs in flight at once.
        backpressure_tries: publishes of one job into a full queue before giving up on it.
        backpressure_base_s: the first backoff after a nack; doubles, up to 5 s.

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
    run = _Submission(
        prefix=id_prefix or f"submit-{uuid.uuid4().hex[:8]}-",
        summary=SubmitSummary(total=total),
        options={
            "sla_class": sla_class,
            "sla_ms": sla_ms,
            **({"tenant": tenant} if tenant else {}),
        },
        wait=wait,
        reply_to=reply_to,
        on_result=on_result or (lambda *_: None),
        on_progress=on_progress,
        backpressure_tries=backpressure_tries,
        backpressure_base_s=backpressure_base_s,
    )
    default_sla = settings.topology.classes[sla_class].default_sla_ms
    async with LlmqClient(
        settings.broker.url.get_secret_value(),
        exchange=settings.topology.jobs_exchange,
        default_sla_ms=default_sla,
    ) as client:
        if on_progress is not None:
            on_progress(run.summary)  # connected and checked: show the bar from the start
        await run.all(client, jobs, interval=1 / rate if rate else 0.0, max_pending=max_pending)
    run.summary.elapsed_s = time.monotonic() - run.started
    return run.summary


class _Submission:
    """One ``run_submit``: its jobs in flight, its pause after backpressure, its tally."""

    def __init__(
        self,
        *,
        prefix: str,
        summary: SubmitSummary,
        options: dict[str, Any],
        wait: bool,
        reply_to: str | None,
        on_result: Callable[[int, str, dict[str, Any]], None],
        on_progress: Callable[[SubmitSummary], None] | None,
        backpressure_tries: int,
        backpressure_base_s: float,
    ) -> None:
        self.prefix = prefix
        self.summary = summary
        self.options = options
        self.wait = wait
        self.reply_to = reply_to
        self.on_result = on_result
        self.on_progress = on_progress
        self.tries = backpressure_tries
        self.base_s = backpressure_base_s
        self.paused_until = 0.0
        self.stop: str | None = None
        self.started = time.monotonic()

    async def all(
        self,
        client: LlmqClient,
        jobs: Iterator[tuple[int, dict[str, Any]]],
        *,
        interval: float,
        max_pending: int,
    ) -> None:
        pending = asyncio.Semaphore(max_pending)
        tasks: set[asyncio.Task[None]] = set()
        for i, (line, body) in enumerate(jobs):
            if self.stop is not None:
                self.not_sent(line, f"{self.prefix}{line}", "unroutable", self.stop)
                continue
            await pending.acquire()
            # Even spacing from the start (not from the last job), so a slow
            # publish does not lower the rate; a backpressure pause comes first.
            delay = max(self.started + i * interval, self.paused_until) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self.one(client, line, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: pending.release())
        if tasks:
            await asyncio.gather(*tasks)

    def settle(self, line: int, job_id: str, record: dict[str, Any]) -> None:
        self.on_result(line, job_id, record)
        if self.on_progress is not None:
            self.on_progress(self.summary)

    def not_sent(self, line: int, job_id: str, reason: str, message: str) -> None:
        self.summary.not_submitted[reason] = self.summary.not_submitted.get(reason, 0) + 1
        record = _failure(job_id, reason, message, retriable=reason != "unroutable")
        self.settle(line, job_id, record)

    async def one(self, client: LlmqClient, line: int, body: dict[str, Any]) -> None:
        job_id = f"{self.prefix}{line}"
        for attempt in range(self.tries):
            try:
                if self.wait:
                    await self._call(client, line, job_id, body)
                else:
                    await client.submit(body, reply_to=self.reply_to, job_id=job_id, **self.options)
                    self.summary.submitted += 1
                    self.settle(
                        line, job_id, {"job_id": job_id, "line": line, "status": "submitted"}
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
                self.stop = f"unroutable: {exc}"
                self.not_sent(line, job_id, "unroutable", str(exc))
                return
            except PublishFailed as exc:
                self.not_sent(line, job_id, "publish_failed", str(exc))
                return
        self.not_sent(line, job_id, "backpressure", "the queue stayed full")

    async def _call(self, client: LlmqClient, line: int, job_id: str, body: dict[str, Any]) -> None:
        summary = self.summary
        t0 = time.monotonic()
        try:
            reply = await client.call(body, job_id=job_id, **self.options)
        except DeadlineExceeded as exc:
            summary.submitted += 1
            summary.errors["no_reply"] = summary.errors.get("no_reply", 0) + 1
            self.settle(line, job_id, _failure(job_id, "no_reply", str(exc), retriable=True))
            return
        summary.submitted += 1
        summary.latencies_ms.append((time.monotonic() - t0) * 1000)
        if reply.get("status") == "ok":
            summary.ok += 1
        else:
            code = str((reply.get("error") or {}).get("code", "?"))
            summary.errors[code] = summary.errors.get(code, 0) + 1
        self.settle(line, job_id, reply)


def _print_summary(summary: SubmitSummary, console: Any, *, wait: bool) -> None:
    from rich.table import Table

    table = Table(title="llmq submit")
    columns = ["jobs", "submitted"]
    values: list[object] = [summary.total, summary.submitted]
    if wait:
        columns += ["ok", "errors", "p50 ms", "p99 ms"]
        p50, p99 = summary.percentile(0.5), summary.percentile(0.99)
        values += [
            summary.ok,
            sum(summary.errors.values()),
            "-" if p50 is None else round(p50, 1),
            "-" if p99 is None else round(p99, 1),
        ]
    columns += ["backpressure", "seconds", "jobs/s"]
    values += [
        summary.backpressure,
        round(summary.elapsed_s, 2),
        round(summary.submitted / summary.elapsed_s, 1) if summary.elapsed_s else "-",
    ]
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(*(str(v) for v in values))
    console.print(table)
    if summary.errors:
        console.print(
            "errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(summary.errors.items()))
        )
    if summary.not_submitted:
        console.print(
            "[red]not submitted: "
            + ", ".join(f"{k}={v}" for k, v in sorted(summary.not_submitted.items()))
            + "[/]"
        )


@click.command("submit")
@click.option("--config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG", help="llmq.toml")
@click.option("--model", help="The model (with --file: for lines that name none).")
@click.option("--message", "messages", multiple=True, help="A user message (repeatable).")
@click.option("--prompt", help="The user message of a one-message job.")
@click.option("--system", help="A system message before the user messages.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="max_tokens of the request.")
@click.option("--temperature", type=click.FloatRange(0, 2), help="temperature of the request.")
@click.option(
    "--file",
    "file_",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL: one OpenAI chat-completions request per line.",
)
@click.option(
    "--sla-ms",
    type=click.IntRange(min=1),
    help="Latency budget per job [default: the class default].",
)
@click.option(
    "--class",
    "sla_class",
    type=click.Choice([c.value for c in SlaClass]),
    default=SlaClass.INTERACTIVE.value,
    show_default=True,
)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="At most R jobs/s.")
@click.option("--wait", is_flag=True, help="Wait for the replies and write them out.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the JSON lines here instead of stdout.",
)
@click.option("--reply-to", help="Without --wait: the existing queue the replies go to.")
@click.option("--tenant", help="The tenant header.")
@click.option("--id-prefix", help="Job ids are PREFIX + line number [default: submit-<random>-].")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def submit_command(
    config: str | None,
    model: str | None,
    messages: tuple[str, ...],
    prompt: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    file_: Path | None,
    sla_ms: int | None,
    sla_class: str,
    rate: float | None,
    wait: bool,
    out: Path | None,
    reply_to: str | None,
    tenant: str | None,
    id_prefix: str | None,
    quiet: bool,
) -> None:
    """Submit one job (--model, --message) or a JSONL file of jobs (--file).

    Writes one JSON line per job: with --wait its reply envelope (a job that got
    no reply gets an error line with code no_reply, one the broker did not take
    not_submitted codes backpressure/unroutable/publish_failed); without --wait
    {"job_id", "line", "status"}. For one job without --wait: just its id.
    Exit status 1 when a job was not submitted or, with --wait, did not end ok.
    """
    if wait and reply_to:
        raise click.UsageError("--reply-to is for jobs sent without --wait")
    if not wait and not reply_to:
        raise click.UsageError(
            "without --wait, name the (existing) queue for the replies with --reply-to"
        )
    total, jobs = _command_jobs(model, messages, prompt, system, max_tokens, temperature, file_)
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    sink = out.open("wb") if out is not None else None
    on_result = _result_writer(sink, single=file_ is None and not wait)
    on_progress, bar = _progress_bar(console, total=total, wait=wait, quiet=quiet)
    quiet_exit = _QuietClientExit()
    logging.getLogger("aiormq.channel").addFilter(quiet_exit)
    try:
        try:
            run = run_submit(
                settings, jobs, total=total, sla_class=sla_class, sla_ms=sla_ms, rate=rate,
                wait=wait, reply_to=reply_to, tenant=tenant, id_prefix=id_prefix,
                on_result=on_result, on_progress=on_progress,
            )  # fmt: skip
            summary = asyncio.run(run)
        finally:
            bar.stop()
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the broker: {type(exc).__name__}") from None
    finally:
        logging.getLogger("aiormq.channel").removeFilter(quiet_exit)
        if sink is not None:
            sink.close()
    if not quiet:
        _print_summary(summary, console, wait=wait)
    if summary.not_submitted or (wait and summary.ok < summary.total):
        sys.exit(1)


def _command_jobs(
    model: str | None,
    messages: tuple[str, ...],
    prompt: str | None,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    file_: Path | None,
) -> tuple[int, Iterator[tuple[int, dict[str, Any]]]]:
    """The jobs ``llmq submit`` was given: one from the options, or a JSONL file's."""
    defaults: dict[str, Any] = {}
    if max_tokens is not None:
        defaults["max_tokens"] = max_tokens
    if temperature is not None:
        defaults["temperature"] = temperature
    if file_ is not None:
        if messages or prompt or system:
            raise click.UsageError("--file and --message/--prompt/--system exclude each other")
        if model:
            defaults["model"] = model
        try:
            total, reader = read_jobs(file_, defaults)
        except SubmitError as exc:
            raise click.ClickException(str(exc)) from None
        return total, reader()
    if not model or not (messages or prompt):
        raise click.UsageError("give --model and --message (or --prompt), or --file")
    chat = [{"role": "system", "content": system}] if system else []
    chat += [{"role": "user", "content": m} for m in (*messages, *([prompt] if prompt else []))]
    return 1, iter([(1, {"model": model, "messages": chat, **defaults})])


def _progress_bar(
    console: Any, *, total: int, wait: bool, quiet: bool
) -> tuple[Callable[[SubmitSummary], None], Any]:
    """A progress bar on stderr and the callback that moves it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet,
        redirect_stdout=False,
    )
    task = bar.add_task("answered" if wait else "submitted", total=total)

    def on_progress(summary: SubmitSummary) -> None:
        done = summary.ok + sum(summary.errors.values()) + sum(summary.not_submitted.values())
        if not wait:
            done = summary.submitted + sum(summary.not_submitted.values())
        note = f" (backpressure ×{summary.backpressure})" if summary.backpressure else ""
        if not bar.live.is_started:
            bar.start()  # only now: checks that fail first print no empty bar
        bar.update(task, completed=done, description=("answered" if wait else "submitted") + note)

    return on_progress, bar


def _result_writer(sink: Any, *, single: bool) -> Callable[[int, str, dict[str, Any]], None]:
    """One JSON line per job to ``sink`` (or stdout); a single submitted job: its id."""

    def on_result(line: int, job_id: str, record: dict[str, Any]) -> None:
        if sink is not None:
            sink.write(orjson.dumps(record) + b"\n")
        elif single and record.get("status") == "submitted":
            click.echo(job_id)
        else:
            click.echo(orjson.dumps(record).decode())

    return on_result
