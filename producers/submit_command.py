"""``llmq submit``: send chat-completion jobs, or an OpenAI batch file, from the command line.

The options, the progress bar and the summary; the sending is
:func:`producers.submit.run_submit`, the batch files
:mod:`producers.openai_batch` (its terminal side: :mod:`producers.batch_console`).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import orjson

from producers.batch_console import BatchOptions, run_batch_command
from producers.submit import (
    SubmitError,
    SubmitSummary,
    quiet_client_exit,
    read_jobs,
    run_submit,
)
from producers.submit_stream import run_stream
from schemas.contract import SlaClass
from schemas.settings import ConfigError, Settings, load_settings

__all__ = ["submit_command"]


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
            "[red]not submitted (the broker did not take them): "
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
    "--openai-batch",
    "batch_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An OpenAI Batch API input file (JSONL of custom_id, method, url, body); needs --output.",
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
    help="The SLA class [default: interactive; batch with --openai-batch].",
)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="At most R jobs/s.")
@click.option("--wait", is_flag=True, help="Wait for the replies and write them out.")
@click.option(
    "--stream",
    is_flag=True,
    help="One chat job: print its tokens as they arrive (stdout), then how it ended (stderr).",
)
@click.option(
    "--out",
    "--output",
    "out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the JSON lines here instead of stdout (--openai-batch: required, appended to).",
)
@click.option("--reply-to", help="Without --wait: the existing queue the replies go to.")
@click.option("--tenant", help="The tenant header.")
@click.option(
    "--id-prefix",
    help="Job ids are PREFIX + line number [default: submit-<random>-];"
    " with --openai-batch PREFIX + custom_id [default: oai.<batch key>.].",
)
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
    batch_file: Path | None,
    sla_ms: int | None,
    sla_class: str | None,
    rate: float | None,
    wait: bool,
    stream: bool,
    out: Path | None,
    reply_to: str | None,
    tenant: str | None,
    id_prefix: str | None,
    quiet: bool,
) -> None:
    """Submit one job (--model, --message), a JSONL file of jobs (--file), or an
    OpenAI batch file (--openai-batch FILE --output RESULTS).

    \b
    --stream: one job; its text is printed as it arrives, then a JSON line
    {"job_id", "finish_reason", "usage", "endpoint", "model"} on stderr.
    Exit status 1 on an error (code and message on stderr).

    \b
    --file / one job: one JSON line per job. With --wait its reply envelope;
    a job that got no reply has an error with a code of the closed set and
    error.reason saying why: deadline_exceeded (reason no_reply: sent, no
    reply within the SLA + 5 s), over_capacity (backpressure: the queue
    stayed full; publish_failed: the broker did not confirm), internal_error
    (unroutable: no queue for the class). Without --wait {"job_id", "line",
    "status"}; for one job just its id. Exit status 1 when a job was not
    submitted or, with --wait, did not end ok.

    \b
    --openai-batch: each line {"custom_id", "method": "POST", "url":
    "/v1/chat/completions" | "/v1/embeddings", "body"} becomes a job (class
    batch unless --class), and --output gets one OpenAI batch output line
    per input line, in the order answered: {"id", "custom_id", "response":
    {"status_code", "request_id": <job id>, "body"}, "error"}. An answered
    job has a response: 200 and the OpenAI body, or for an error reply the
    code's HTTP status (invalid_request/unknown_model/upstream_rejected 400,
    payload_too_large 413, over_capacity/over_budget 429, internal_error
    500, upstream_error 502, no_healthy_endpoint 503, deadline_exceeded 504)
    with an OpenAI error body {"error": {"message", "type", "param",
    "code"}}. A line that is no valid request (custom_id missing or
    repeated: custom_id null) or whose job got no reply in time has
    "response": null and "error": {"code": invalid_request |
    deadline_exceeded, "message"}.

    \b
    Resumable: run the same command again (same --output) after Ctrl-C, a
    crash or a broker outage. Lines already in the output are not sent
    again; a half-written last line is dropped and redone. Job ids are
    PREFIX + custom_id (a digest when it is no valid job id), so a job sent
    but not written is sent again under the same id: workers answer such a
    repeat from the reply they just sent, or join it while it runs. Replies
    that arrived meanwhile wait in the batch's reply queue
    (llmq.reply.batch.<key>, deleted once the batch is complete, else after
    a day unused) and are written without resending. Jobs the broker does
    not take (queue full for minutes, unreachable, unroutable) stop the run
    unwritten: rerun later. The batch key (in job ids and the reply queue)
    comes from this host, the --output path and the input's bytes: rerun
    with the same input; from another host, give both runs one --id-prefix.
    Each job carries its custom_id in the header custom-id and, when it is
    a valid id, as its correlation id.

    \b
    Failed jobs are also dead letters, replayable with `llmq dlq replay`
    (body, ids, kind, custom-id, tenant and the reply queue are kept). A
    replay's reply goes to the batch's reply queue: once the batch is
    complete that queue is gone, and the reply comes back to llmq.dead with
    reply-error (internal_error if the job now succeeded; the reply attached
    when small); while
    the batch is incomplete, the next run drops it (the line is written).
    To retry failed lines into a file, submit them as a new batch with
    another --output.

    \b
    Exit status (--openai-batch): 0 every line ok; 1 the output is complete
    with error lines; 75 incomplete (not taken by the broker: rerun);
    130 interrupted.
    """
    if batch_file is not None:
        jobs_given = (file_, model, messages, prompt, system, max_tokens, temperature, reply_to)
        if any(jobs_given):
            raise click.UsageError(
                "--openai-batch takes its requests from the file: no --file, --model, --message,"
                " --prompt, --system, --max-tokens, --temperature or --reply-to"
            )
        if out is None:
            raise click.UsageError("--openai-batch needs --output (the results, appended to)")
        options = BatchOptions(
            batch_file, out, sla_class or SlaClass.BATCH.value, sla_ms, rate, tenant, id_prefix
        )
        sys.exit(run_batch_command(_settings(config), options, quiet=quiet))
    if stream:
        if file_ is not None or batch_file is not None or wait or reply_to or rate or out:
            raise click.UsageError(
                "--stream sends one job (--model, --message): no --file, --openai-batch,"
                " --wait, --reply-to, --rate or --out"
            )
        _, one = _command_jobs(model, messages, prompt, system, max_tokens, temperature, None)
        settings = _settings(config)
        code = asyncio.run(
            run_stream(
                settings,
                next(one)[1],
                sla_class=sla_class or SlaClass.INTERACTIVE.value,
                sla_ms=sla_ms,
                tenant=tenant,
                out=sys.stdout,
                err=sys.stderr,
                quiet=quiet,
            )
        )
        sys.exit(code)
    if wait and reply_to:
        raise click.UsageError("--reply-to is for jobs sent without --wait")
    if not wait and not reply_to:
        raise click.UsageError(
            "without --wait, name the (existing) queue for the replies with --reply-to"
        )
    total, jobs = _command_jobs(model, messages, prompt, system, max_tokens, temperature, file_)
    settings = _settings(config)
    summary = _run(
        settings, jobs, total=total, sla_class=sla_class or SlaClass.INTERACTIVE.value,
        sla_ms=sla_ms, rate=rate, wait=wait, reply_to=reply_to, tenant=tenant,
        id_prefix=id_prefix, out=out, single=file_ is None and not wait, quiet=quiet,
    )  # fmt: skip
    if summary.not_submitted or (wait and summary.ok < summary.total):
        sys.exit(1)


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _run(
    settings: Settings,
    jobs: Iterator[tuple[int, dict[str, Any]]],
    *,
    total: int,
    out: Path | None,
    single: bool,
    quiet: bool,
    **options: Any,
) -> SubmitSummary:
    """``run_submit`` with a progress bar, the results written out, and a summary."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    wait = bool(options.get("wait"))
    sink = out.open("wb") if out is not None else None
    on_result = _result_writer(sink, single=single)
    on_progress, bar = _progress_bar(console, total=total, wait=wait, quiet=quiet)
    try:
        with quiet_client_exit():
            run = run_submit(
                settings, jobs, total=total, on_result=on_result, on_progress=on_progress, **options
            )
            summary = asyncio.run(run)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach the broker: {type(exc).__name__}") from None
    finally:
        bar.stop()
        if sink is not None:
            sink.close()
    if not quiet:
        _print_summary(summary, console, wait=wait)
    return summary


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
